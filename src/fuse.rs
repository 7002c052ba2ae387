//! `fuse`, step by step: index the graph, plan the blocks, refuse what must not be written, build
//! the patch, lay the output out, check the memory, write (folding and checking every block on
//! the way), and report.

use std::time::Instant;

use crate::constant::Constants;
use crate::error::{Error, Result};
use crate::graph::GraphIndex;
use crate::onnx::Model;
use crate::onnx::splice::{self, DataLayout, PROTOBUF_LIMIT};
use crate::patch::Patch;
use crate::plan::{self, Analysis, Plan, SkipKind};
use crate::report::{self, FuseReport};
use crate::writer::{self, Job, Layout, Settings, Target};
use crate::{Options, memory, rewrite};

/// Folds every block of `model` it can and writes the result to `target`.
pub(crate) fn fuse(
    model: &Model,
    target: Target,
    options: Options,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<FuseReport> {
    let start = Instant::now();
    let graph = GraphIndex::new(model)?;
    let index = Constants::new(&graph);
    let analysis = plan::analyse(&index, options.fold())?;
    refuse(&index, &analysis, options.strict)?;
    let patch = rewrite::build(&index, &analysis);
    let plans = analysis.all();
    let layout = lay_out(model, &patch, &target)?;
    check_memory(&index, &plans, &layout, &target)?;
    let job = Job {
        index: &index,
        model,
        plans: &plans,
        patch: &patch,
        layout: &layout,
    };
    let settings = Settings {
        verify: options.verify,
        tolerance: options.tolerance,
        sync: options.sync,
    };
    let outcomes = writer::write(&job, target, settings, progress)?;
    Ok(report::fusion(
        &index,
        &analysis,
        &patch,
        &outcomes,
        start.elapsed(),
    ))
}

/// A candidate block with a BatchNormalization in training mode is an error (unless allowed,
/// when it is planned like any other); with `strict`, so is any candidate left unfused.
fn refuse(index: &Constants, analysis: &Analysis, strict: bool) -> Result<()> {
    if let Some(training) = analysis.skipped_of(SkipKind::Training).next() {
        return Err(Error::Training {
            block: training.name.clone(),
            reason: training.reason.clone(),
        });
    }
    if let Some((n, reason)) = analysis.linear.training.first() {
        return Err(Error::Training {
            block: index.node(*n).name().to_string(),
            reason: reason.clone(),
        });
    }
    let unfoldable = analysis.skipped_of(SkipKind::Unfoldable);
    let named: Vec<(String, String)> = unfoldable
        .map(|s| (s.name.clone(), s.reason.clone()))
        .collect();
    match strict && !named.is_empty() {
        true => Err(Error::NotFused(named)),
        false => Ok(()),
    }
}

/// Where every byte of the output goes: inline as the input was, or with a sidecar `OUT.data`
/// when the input has external data or the output would pass protobuf's 2 GiB limit.
fn lay_out(model: &Model, patch: &Patch, target: &Target) -> Result<Layout> {
    let (sidecar, location) = match target {
        Target::File { output, .. } => {
            let (path, location) = crate::onnx::output::sidecar_for(output)?;
            (Some(path), location)
        }
        _ => (None, String::new()),
    };
    let sidecar_layout = |move_inline| DataLayout::Sidecar {
        location: location.clone(),
        move_inline,
    };
    let first = match model.has_external_data() {
        true => sidecar_layout(false),
        false => DataLayout::Inline,
    };
    let mut output = splice::plan(model, patch, &first)?;
    if output.model_len > PROTOBUF_LIMIT {
        output = splice::plan(model, patch, &sidecar_layout(true))?;
    }
    Ok(Layout { output, sidecar })
}

/// Refuses a run that would not fit in the memory available (see [`crate::memory`]).
fn check_memory(index: &Constants, plans: &[Plan], layout: &Layout, target: &Target) -> Result<()> {
    let in_memory = match target {
        Target::Memory(_) => layout.output.model_len,
        _ => 0,
    };
    let working = memory::working_memory(index, plans);
    memory::check(memory::BASELINE + working + in_memory, "fusing this model")
}
