//! # onnx-repvgg
//!
//! Structural re-parameterization of ONNX models: every RepVGG-style block — parallel
//! Conv(+BatchNormalization) branches and an optional identity, summed by `Add` — becomes one
//! Conv with bias, computed from the ONNX file alone.
//!
//! Data flows one way: bytes ([`onnx::Model`]) → index ([`graph::GraphIndex`]) → candidate
//! blocks ([`pattern`]) → folded convolutions ([`fold`], [`affine`]) → plans ([`plan`]) → a
//! patch ([`rewrite`]) → bytes ([`onnx::splice`], [`onnx::output`]).
//!
//! ```no_run
//! let options = onnx_repvgg::Options::default();
//! let report = onnx_repvgg::fuse_file("train.onnx".as_ref(), "deploy.onnx".as_ref(), options)?;
//! println!("{} blocks fused", report.fused.len());
//! # Ok::<(), onnx_repvgg::Error>(())
//! ```

pub mod affine;
pub mod cli;
pub mod constant;
pub mod cost;
pub mod dot;
pub mod error;
pub mod fold;
pub mod graph;
pub mod memory;
pub mod naming;
pub mod onnx;
pub mod pattern;
pub mod plan;
pub mod producer;
#[cfg(feature = "python")]
mod python;
pub mod quant;
pub mod recipe;
pub mod report;
pub mod rewrite;
pub mod shapes;
pub mod simd;
pub mod tensor;
pub mod verify;

use std::path::Path;
use std::time::Instant;

pub use error::{Error, Result};
pub use report::{BlockInfo, FuseReport, InspectReport};

use bytes::Bytes;
use graph::GraphIndex;
use onnx::Model;
use onnx::splice::{self, DataLayout, PROTOBUF_LIMIT};
use producer::Producer;

/// What may be folded, and how it is checked.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Fold BatchNormalization nodes exported in training mode, using their running statistics
    /// (inference semantics). Off by default: such exports usually come from a model that was
    /// not put in eval mode, and the export updated its statistics.
    pub allow_training_bn: bool,
    /// Check every fused block numerically against its original subgraph before writing
    /// (see [`verify`]).
    pub verify: bool,
    /// Largest accepted relative deviation; by default it depends on the weights' type.
    pub tolerance: Option<f64>,
    /// Flush the output to disk (`fdatasync`) before renaming it into place, so that it also
    /// survives a power cut. Off by default, as with `cp`: the output still appears atomically
    /// (whole or not at all) to every other program, and the input is never written.
    pub sync: bool,
    /// Fail, writing nothing, when any candidate block is not fused.
    pub strict: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_training_bn: false,
            verify: true,
            tolerance: None,
            sync: false,
            strict: false,
        }
    }
}

impl Options {
    fn fold(self) -> fold::FoldOptions {
        fold::FoldOptions {
            allow_training_bn: self.allow_training_bn,
        }
    }
}

/// Reads `input`, folds every block it can, and writes the result to `output` (atomically; with
/// a sidecar `OUT.data` when the input has external data or the output would pass 2 GiB).
pub fn fuse_file(input: &Path, output: &Path, options: Options) -> Result<FuseReport> {
    fuse_file_with_progress(input, output, options, &|_, _| {})
}

/// [`fuse_file`], calling `progress(done, total)` as blocks are written.
pub fn fuse_file_with_progress(
    input: &Path,
    output: &Path,
    options: Options,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<FuseReport> {
    let model = Model::open(input)?;
    let mut protected = vec![input.to_path_buf()];
    protected.extend(model.external.paths().iter().cloned());
    onnx::output::check_output(output, &protected)?;
    fuse(
        &model,
        Target::File { output, protected },
        options,
        progress,
    )
    .map_err(|e| e.in_file(input))
}

/// Everything [`fuse_file`] does — fold, verify, lay out — but writes nothing: the report of
/// what a fusion of `input` would do.
pub fn dry_run_file(input: &Path, options: Options) -> Result<FuseReport> {
    let model = Model::open(input)?;
    fuse(&model, Target::Discard, options, &|_, _| {}).map_err(|e| e.in_file(input))
}

/// What names a model that came as bytes in errors.
pub const IN_MEMORY: &str = "<memory>";

/// [`fuse_file`] for a model held in memory: returns the deploy model's bytes and the report.
/// The model must hold all its tensors (no external data) and so must the output (< 2 GiB).
///
/// ```
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/models/tiny/ts_fold_op17.onnx");
/// let training = std::fs::read(path)?;
/// let (deploy, report) = onnx_repvgg::fuse_model(&training, onnx_repvgg::Options::default())?;
/// assert_eq!(report.fused.len(), 7);
/// assert!(report.skipped.is_empty());
/// // The deploy model is smaller: one Conv per block instead of two Convs, BNs and Adds.
/// assert!(deploy.len() < training.len());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn fuse_model(bytes: &[u8], options: Options) -> Result<(Vec<u8>, FuseReport)> {
    fuse_model_named(Bytes::copy_from_slice(bytes), Path::new(IN_MEMORY), options)
}

/// [`fuse_model`] without copying the input, naming the model `name` in errors (the CLI says
/// `<stdin>`).
pub fn fuse_model_named(
    bytes: Bytes,
    name: &Path,
    options: Options,
) -> Result<(Vec<u8>, FuseReport)> {
    let model = Model::from_bytes(name, bytes, None).map_err(|e| e.in_file(name))?;
    let mut out = Vec::new();
    let report =
        fuse(&model, Target::Memory(&mut out), options, &|_, _| {}).map_err(|e| e.in_file(name))?;
    Ok((out, report))
}

/// [`inspect_file`] for a model held in memory.
///
/// ```
/// let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/models/tiny/ts_fold_op17.onnx");
/// let report = onnx_repvgg::inspect_model(&std::fs::read(path)?, onnx_repvgg::Options::default())?;
/// assert_eq!(report.blocks.len(), 7);
/// assert_eq!(report.without_identity(), 5);
/// assert_eq!(report.fusable(), 7);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn inspect_model(bytes: &[u8], options: Options) -> Result<InspectReport> {
    let options = InspectOptions {
        allow_training_bn: options.allow_training_bn,
        ..InspectOptions::default()
    };
    inspect_model_with(bytes, &options)
}

/// [`inspect_file_with`] for a model held in memory.
pub fn inspect_model_with(bytes: &[u8], options: &InspectOptions) -> Result<InspectReport> {
    let name = Path::new(IN_MEMORY);
    let model = Model::from_bytes(name, Bytes::copy_from_slice(bytes), None)
        .map_err(|e| e.in_file(name))?;
    inspect(&model, options).map_err(|e| e.in_file(name))
}

/// Where a fusion's output goes.
enum Target<'a> {
    /// A file, written atomically, with a sidecar when needed; never over `protected`.
    File {
        output: &'a Path,
        protected: Vec<std::path::PathBuf>,
    },
    /// Memory: the whole model inline (so at most 2 GiB).
    Memory(&'a mut Vec<u8>),
    /// Nowhere: a dry run that still folds and verifies every block.
    Discard,
}

fn fuse(
    model: &Model,
    target: Target,
    options: Options,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<FuseReport> {
    let start = Instant::now();
    let index = GraphIndex::new(model)?;
    let analysis = plan::analyse(&index, options.fold())?;
    if options.strict
        && let Some(first) = analysis.skipped.first()
    {
        return Err(Error::Strict(format!(
            "{} candidate block(s) not fused, nothing written; {}: {}",
            analysis.skipped.len(),
            first.name,
            first.reason.as_deref().unwrap_or("not fusable")
        )));
    }
    let patch = rewrite::build(&index, &analysis.plans);
    let output = match &target {
        Target::File { output, .. } => Some(*output),
        _ => None,
    };
    let (sidecar_path, location) = match output {
        Some(output) => onnx::output::sidecar_for(output)?,
        None => Default::default(),
    };
    let mut layout = if model.has_external_data() {
        DataLayout::Sidecar {
            location: location.clone(),
            move_inline: false,
        }
    } else {
        DataLayout::Inline
    };
    let mut planned = splice::plan(model, &patch, &layout)?;
    if planned.model_len > PROTOBUF_LIMIT {
        layout = DataLayout::Sidecar {
            location,
            move_inline: true,
        };
        planned = splice::plan(model, &patch, &layout)?;
    }
    let in_memory = match &target {
        Target::Memory(_) => planned.model_len as u64,
        _ => 0,
    };
    memory::check(
        memory::BASELINE + plan::working_memory(&index, &analysis.plans) + in_memory,
        "fusing this model",
    )?;
    let mut fused: Vec<BlockInfo> = analysis.plans.iter().map(|p| p.info.clone()).collect();
    let order = planned.block_order(&patch);
    // Each block is checked on a thread of its own: the original is evaluated while the block is
    // folded (its input pages are in use anyway), the fused Conv once the block is written (one
    // block behind at most). The output is renamed into place only after every check.
    let checks = |receive: std::sync::mpsc::Receiver<(usize, plan::Produced)>| {
        let mut deviations = Vec::new();
        for &p in &order {
            let plan = &analysis.plans[p];
            let node = &patch.replaced[&plan.block.root];
            let expected = verify::reference(&index, plan, node);
            // The writer hung up: it stopped on an error, which is the one to report.
            let Ok((written, produced)) = receive.recv() else {
                break;
            };
            plan.release_pages(&index);
            if written != p {
                return Err(Error::Graph("the blocks were checked out of order".into()));
            }
            let rows = verify::Values::Stored(&produced.sampled_bytes, produced.dtype);
            let bias = produced.bias()?;
            let deviation =
                verify::compare(&expected?, plan, node, rows, &bias, options.tolerance)?;
            deviations.push((p, deviation));
        }
        Ok(deviations)
    };
    let mut deviations = Vec::new();
    let mut write = |model_sink: &mut splice::Sink, sidecar_sink: Option<&mut splice::Sink>| {
        std::thread::scope(|scope| -> Result<()> {
            let (send, receive) = std::sync::mpsc::sync_channel::<(usize, plan::Produced)>(1);
            let checker = options.verify.then(|| {
                scope.spawn(move || {
                    producer::yield_to_writer();
                    checks(receive)
                })
            });
            let written = Producer::run(&index, &analysis.plans, order.clone(), |producer| {
                let mut produce =
                    |p: usize, write: &mut dyn FnMut(&[u8]) -> Result<()>| -> Result<Vec<Bytes>> {
                        let plan = &analysis.plans[p];
                        let sample = match options.verify {
                            true => verify::sample(plan),
                            false => Vec::new(),
                        };
                        let produced = producer.write_block(p, write, &sample)?;
                        fused[p].rounding_error = produced.rounding;
                        let bias = produced.bias.clone();
                        match options.verify {
                            true => {
                                if send.send((p, produced)).is_err() {
                                    // The checker stopped on a failed check: its error is the one
                                    // to report.
                                    return Err(Error::Graph("a block failed its check".into()));
                                }
                            }
                            false => plan.release_pages(&index),
                        }
                        progress(p + 1, analysis.plans.len());
                        Ok(vec![bias])
                    };
                splice::write(
                    &planned,
                    model,
                    &patch,
                    model_sink,
                    sidecar_sink,
                    &mut produce,
                )
            });
            drop(send);
            if let Some(checker) = checker {
                let checked = checker
                    .join()
                    .map_err(|_| Error::Graph("the check of a block panicked".into()))?;
                deviations = checked?;
            }
            written
        })
    };
    match target {
        Target::File { output, protected } => {
            let sidecar = planned.sidecar_len.map(|_| sidecar_path.as_path());
            if let Some(path) = sidecar {
                onnx::output::check_output(path, &protected)?;
            }
            let model = onnx::output::Planned {
                path: output,
                len: planned.model_len,
            };
            let sidecar = sidecar
                .zip(planned.sidecar_len)
                .map(|(path, len)| onnx::output::Planned { path, len });
            onnx::output::write_with(model, sidecar, options.sync, write)?;
        }
        Target::Memory(out) => {
            if planned.sidecar_len.is_some() {
                return Err(Error::Graph(
                    "the fused model needs external data (over 2 GiB): write it to a file".into(),
                ));
            }
            let mut sink = splice::Sink::Memory(std::mem::take(out));
            write(&mut sink, None)?;
            if let splice::Sink::Memory(bytes) = sink {
                *out = bytes;
            }
        }
        Target::Discard => write(&mut splice::Sink::Discard, Some(&mut splice::Sink::Discard))?,
    }
    for (p, deviation) in deviations {
        fused[p].deviation = Some(deviation);
    }

    let elements =
        |t: &onnx::proto::TensorProto| t.dims.iter().map(|&d| d.max(0) as u64).product::<u64>();
    let params_before: u64 = model.initializers.iter().map(elements).sum();
    let params_removed: u64 = patch
        .removed_initializers
        .iter()
        .map(|&i| elements(&model.initializers[i]))
        .sum();
    let params_added: u64 = patch
        .new_tensors
        .iter()
        .map(|t| t.dims.iter().product::<usize>() as u64)
        .sum();
    Ok(FuseReport {
        fused,
        skipped: analysis.skipped.clone(),
        nodes_before: model.nodes.len(),
        nodes_after: model.nodes.len() - patch.removed_nodes.len(),
        params_before,
        params_after: params_before - params_removed + params_added,
        training_bn_folded: plan::training_bns(&index, &analysis.plans),
        elapsed: start.elapsed(),
    })
}

/// Graphviz DOT of `input`'s structure before and after fusion, or of the block named `block`.
pub fn dot_file(input: &Path, block: Option<&str>, options: Options) -> Result<String> {
    let model = Model::open(input)?;
    let draw = || -> Result<String> {
        let index = GraphIndex::new(&model)?;
        let analysis = plan::analyse(&index, options.fold())?;
        dot::draw(&index, &analysis, block)
    };
    draw().map_err(|e| e.in_file(input))
}

/// What `inspect` computes beyond the blocks.
#[derive(Debug, Clone, Default)]
pub struct InspectOptions {
    /// Count BatchNormalization nodes in training mode as foldable.
    pub allow_training_bn: bool,
    /// Spatial size of the input FLOPs are counted for (one number per axis, or one for all);
    /// by default the model's declared size, or 224 where it is symbolic.
    pub input_size: Option<Vec<usize>>,
    /// Fold every block (nothing is written) and report INT8 statistics of its kernel.
    pub int8: bool,
}

/// Spatial size assumed where the model's input size is symbolic and none is stated.
pub const DEFAULT_INPUT_SIZE: usize = 224;

/// Finds every block of `input` and tells whether (and why not) each can be folded.
pub fn inspect_file(input: &Path, options: Options) -> Result<InspectReport> {
    let options = InspectOptions {
        allow_training_bn: options.allow_training_bn,
        ..InspectOptions::default()
    };
    inspect_file_with(input, &options)
}

/// [`inspect_file`] with costs at a stated input size and, on request, INT8 statistics.
pub fn inspect_file_with(input: &Path, options: &InspectOptions) -> Result<InspectReport> {
    let model = Model::open(input)?;
    inspect(&model, options).map_err(|e| e.in_file(input))
}

fn inspect(model: &Model, options: &InspectOptions) -> Result<InspectReport> {
    let index = GraphIndex::new(model)?;
    let fold = fold::FoldOptions {
        allow_training_bn: options.allow_training_bn,
    };
    let mut analysis = plan::analyse(&index, fold)?;
    let mut shapes = shapes::Shapes::infer(&index, options.input_size.as_deref());
    let symbolic = shapes.input.as_ref().is_none_or(|s| s.len() < 3);
    if options.input_size.is_none() && symbolic {
        let default = [DEFAULT_INPUT_SIZE];
        shapes = shapes::Shapes::infer(&index, Some(&default));
    }
    if options.int8 {
        let largest = analysis
            .plans
            .iter()
            .map(|p| p.layout.weight_dims().iter().product::<usize>() as u64 * 8)
            .max()
            .unwrap_or(0);
        memory::check(
            memory::BASELINE + plan::working_memory(&index, &analysis.plans) + largest,
            "computing the INT8 statistics of this model",
        )?;
    }
    for plan in &mut analysis.plans {
        plan.info.cost = Some(cost::of_block(
            &index,
            &plan.block,
            Some(&plan.layout),
            &shapes,
        ));
        if options.int8 {
            let mut weights = Vec::with_capacity(plan.layout.weight_dims().iter().product());
            plan.write_tensors(
                &index,
                &mut |bytes| {
                    tensor::decode_into(bytes, plan.dtype, &mut weights);
                    Ok(())
                },
                &[],
            )?;
            plan.info.int8 = Some(quant::Int8Stats::of(&weights, plan.layout.out_channels));
            model.release_pages();
        }
    }
    for (info, block) in analysis.skipped.iter_mut().zip(&analysis.skipped_blocks) {
        info.cost = Some(cost::of_block(&index, block, None, &shapes));
    }
    Ok(InspectReport {
        blocks: analysis.blocks(),
        input_shape: shapes.input.clone(),
    })
}
