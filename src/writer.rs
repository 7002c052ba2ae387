//! Writing a planned output. The splice ([`crate::onnx::splice`]) copies every untouched byte
//! range in file order; when it reaches a block's fused weight, the [`Producer`] (folding every
//! block ahead of the writer) hands it over; a checker thread evaluates each block's original
//! subgraph while the block is folded and compares the new Conv with it once written (one block
//! behind at most). Files appear only after every check passed and the written model holds the
//! output invariant ([`crate::onnx::audit`]).

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use bytes::Bytes;

use crate::constant::Constants;
use crate::error::{Error, Result};
use crate::onnx::Model;
use crate::onnx::output::{self, Check, Planned};
use crate::onnx::splice::{self, Sink};
use crate::patch::Patch;
use crate::plan::Plan;
use crate::producer::{self, Produced, Producer};
use crate::verify::{self, Deviation};

/// Where a fusion's output goes.
pub enum Target<'a> {
    /// A file, written atomically, with a sidecar when needed; never over `protected` (the
    /// input and its data files).
    File {
        output: &'a std::path::Path,
        protected: Vec<PathBuf>,
    },
    /// Memory: the whole model inline (so at most 2 GiB).
    Memory(&'a mut Vec<u8>),
    /// Nowhere: a dry run that still folds and verifies every block.
    Discard,
}

/// The output as the splice laid it out, and where its sidecar goes.
pub struct Layout {
    pub output: splice::Output,
    /// The sidecar's path (`OUT.data`), when the output is a file.
    pub sidecar: Option<PathBuf>,
}

/// What writing a block found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// How far the fused Conv is from the original, when checked.
    pub deviation: Option<Deviation>,
    /// For half-precision weights: the largest change rounding the fold made, relative to the
    /// largest weight.
    pub rounding: Option<f64>,
}

/// How each block is written and checked.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub verify: bool,
    pub tolerance: Option<f64>,
    pub sync: bool,
}

/// What is written: the model, its patch and plans, and the layout of the output.
pub struct Job<'a, 'i, 'm> {
    pub index: &'a Constants<'i, 'm>,
    pub model: &'a Model,
    pub plans: &'a [Plan<'a>],
    pub patch: &'a Patch,
    pub layout: &'a Layout,
}

/// Writes the job to `target`; returns what writing each plan found, by plan.
pub fn write(
    job: &Job,
    target: Target,
    settings: Settings,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<Outcome>> {
    let planned = &job.layout.output;
    let mut outcomes = vec![Outcome::default(); job.plans.len()];
    let mut fill = |model_sink: &mut Sink, sidecar_sink: Option<&mut Sink>| {
        fill(
            job,
            settings,
            progress,
            &mut outcomes,
            model_sink,
            sidecar_sink,
        )
    };
    match target {
        Target::File { output, protected } => {
            let sidecar = job.layout.sidecar.as_deref().zip(planned.sidecar_len);
            if let Some((path, _)) = sidecar {
                output::check_output(path, &protected)?;
            }
            let model = Planned {
                path: output,
                len: planned.model_len,
            };
            let sidecar = sidecar.map(|(path, len)| Planned { path, len });
            output::write_with(model, sidecar, settings.sync, Check::Model, fill)?;
        }
        Target::Memory(out) => {
            if planned.sidecar_len.is_some() {
                return Err(Error::Graph(
                    "the fused model needs external data (over 2 GiB): write it to a file".into(),
                ));
            }
            let mut sink = Sink::Memory(std::mem::take(out));
            fill(&mut sink, None)?;
            if let Sink::Memory(bytes) = sink {
                // The same invariant as a file's, on the bytes handed back.
                let bytes = Bytes::from(bytes);
                crate::onnx::audit::audit(bytes.clone(), None).map_err(Error::Internal)?;
                *out = Vec::from(bytes);
            }
        }
        Target::Discard => fill(&mut Sink::Discard, Some(&mut Sink::Discard))?,
    }
    Ok(outcomes)
}

/// Runs the splice into the sinks, the producer folding the blocks and, with `verify`, the
/// checker beside them.
fn fill(
    job: &Job,
    settings: Settings,
    progress: &(dyn Fn(usize, usize) + Sync),
    outcomes: &mut [Outcome],
    model_sink: &mut Sink,
    sidecar_sink: Option<&mut Sink>,
) -> Result<()> {
    let order = job.layout.output.block_order(job.patch);
    std::thread::scope(|scope| {
        let (send, receive) = sync_channel::<(usize, Produced)>(1);
        let checker = settings.verify.then(|| {
            let order = &order;
            scope.spawn(move || {
                producer::yield_to_writer();
                check_all(job, order, settings.tolerance, receive)
            })
        });
        let written = Producer::run(job.index, job.plans, order.clone(), |producer| {
            let mut produce = |p: usize, write: &mut dyn FnMut(&[u8]) -> Result<()>| {
                let (rounding, bias) = produce(job, settings, producer, p, write, &send)?;
                outcomes[p].rounding = rounding;
                progress(p + 1, job.plans.len());
                Ok(vec![bias])
            };
            splice::write(
                &job.layout.output,
                job.model,
                job.patch,
                model_sink,
                sidecar_sink,
                &mut produce,
            )
        });
        drop(send);
        if let Some(checker) = checker {
            let deviations = checker
                .join()
                .map_err(|_| Error::Internal("the check of a block panicked".into()))??;
            for (p, deviation) in deviations {
                outcomes[p].deviation = Some(deviation);
            }
        }
        written
    })
}

/// Folds plan `p`'s weight into `write`; hands what the check needs to the checker (or lets go
/// of the block's input pages when there is none); returns the rounding of half-precision
/// weights and the encoded bias (written when its turn comes).
fn produce(
    job: &Job,
    settings: Settings,
    producer: &Producer,
    p: usize,
    write: &mut dyn FnMut(&[u8]) -> Result<()>,
    checker: &SyncSender<(usize, Produced)>,
) -> Result<(Option<f64>, Bytes)> {
    let plan = job.plans[p];
    let sample = match (settings.verify, plan) {
        (true, Plan::Conv(plan)) => verify::sample(&plan.layout, &plan.name),
        // A linear fold's check reads the whole weight as written.
        (true, Plan::Linear(_)) => (0..plan.weight_dims()[0]).collect(),
        (false, _) => Vec::new(),
    };
    let produced = producer.write_block(p, write, &sample)?;
    let (rounding, bias) = (produced.rounding, produced.bias.clone());
    match settings.verify {
        // The checker stopped on a failed check: its error is the one to report.
        true => checker
            .send((p, produced))
            .map_err(|_| Error::Internal("a block failed its check".into()))?,
        false => producer::release_pages(job.index, plan),
    }
    Ok((rounding, bias))
}

/// The checker: each block in the order written, its original evaluated while it is folded and
/// its fused Conv compared once written.
fn check_all(
    job: &Job,
    order: &[usize],
    tolerance: Option<f64>,
    receive: Receiver<(usize, Produced)>,
) -> Result<Vec<(usize, Deviation)>> {
    let mut deviations = Vec::new();
    for &p in order {
        let plan = job.plans[p];
        let expected = match plan {
            Plan::Conv(plan) => {
                let node = &job.patch.replaced[&plan.block.root][0];
                Some(verify::reference(job.index, &plan.subject(), node))
            }
            Plan::Linear(_) => None,
        };
        // The writer hung up: it stopped on an error, which is the one to report.
        let Ok((written, produced)) = receive.recv() else {
            break;
        };
        producer::release_pages(job.index, plan);
        if written != p {
            return Err(Error::Internal(
                "the blocks were checked out of order".into(),
            ));
        }
        let deviation = match (plan, expected) {
            (Plan::Conv(plan), Some(expected)) => {
                let node = &job.patch.replaced[&plan.block.root][0];
                let rows = verify::Values::Stored(&produced.sampled_bytes, produced.dtype);
                let bias = produced.bias()?;
                let subject = plan.subject();
                verify::compare(&expected?, &subject, node, rows, &bias, tolerance)?
            }
            (Plan::Linear(plan), _) => {
                verify::linear(job.index, job.patch, plan, &produced, tolerance)?
            }
            (Plan::Conv(_), None) => continue,
        };
        deviations.push((p, deviation));
    }
    Ok(deviations)
}
