//! # onnx-repvgg
//!
//! Structural re-parameterization of ONNX models: every RepVGG-style block — parallel
//! Conv(+BatchNormalization) branches and an optional identity, summed by `Add` — becomes one
//! Conv with bias, computed from the ONNX file alone.
//!
//! Data flows one way, as [`fuse_file`] runs it (`src/fuse.rs`, step by step):
//!
//! 1. **bytes → model**: [`onnx::Model`] maps the file ([`onnx::map`]), scans the main graph at
//!    the wire level ([`onnx::wire`]), decodes its nodes and tensor headers, and opens every
//!    external data file any tensor names ([`onnx::tensors`], [`onnx::external`]);
//! 2. **model → index**: [`graph::GraphIndex`] (who produces and consumes what; the input's
//!    structure checked by [`onnx::audit`]) and [`constant::Constants`] (declared and computed
//!    constants);
//! 3. **index → blocks**: [`pattern`] finds expression trees over one input;
//! 4. **blocks → plans**: [`fold`] checks each block's fold on shapes only ([`layout`],
//!    [`geometry`]) and [`plan`] names it, or says why not;
//! 5. **plans → patch**: [`rewrite`] decides what replaces what ([`patch::Patch`]);
//! 6. **patch → bytes**: [`onnx::splice`] lays the output out and copies what is untouched,
//!    [`writer`] runs it with the [`producer`] folding each block's weights from the mapped
//!    bytes ([`recipe`]) and [`verify`] checking each one beside it, and [`onnx::output`] puts the
//!    files in place once the written model holds the output invariant ([`onnx::audit`]);
//! 7. **→ report**: [`report`] is assembled last, from the plans and what writing each found.
//!
//! ```no_run
//! let options = onnx_repvgg::Options::default();
//! let report = onnx_repvgg::fuse_file("train.onnx".as_ref(), "deploy.onnx".as_ref(), options)?;
//! println!("{} blocks fused", report.fused.len());
//! # Ok::<(), onnx_repvgg::Error>(())
//! ```

pub mod cli;
pub mod constant;
pub mod cost;
pub mod dot;
pub mod error;
pub mod features;
pub mod fold;
mod fuse;
pub mod geometry;
pub mod graph;
mod inspect;
pub mod layout;
pub mod linear;
pub mod memory;
pub mod naming;
pub mod onnx;
pub mod patch;
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
pub mod writer;

use std::path::Path;

pub use error::{Error, Result};
pub use report::{BlockInfo, FuseReport, InspectReport};

use bytes::Bytes;
use constant::Constants;
use fuse::fuse;
use graph::GraphIndex;
use onnx::Model;
use writer::Target;

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
    /// Fail, writing nothing, when any candidate block is not fused ([`Error::NotFused`]).
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
    inspect_model_named(Bytes::copy_from_slice(bytes), name, options)
}

/// [`inspect_file_with`] for a model held in memory, naming it `name` in errors (the CLI says
/// `<stdin>`). The model must hold all its tensors (no external data).
pub fn inspect_model_named(
    bytes: Bytes,
    name: &Path,
    options: &InspectOptions,
) -> Result<InspectReport> {
    let model = Model::from_bytes(name, bytes, None).map_err(|e| e.in_file(name))?;
    inspect::inspect(&model, options).map_err(|e| e.in_file(name))
}

/// [`dot_file`] for a model held in memory, naming it `name` in errors.
pub fn dot_model_named(
    bytes: Bytes,
    name: &Path,
    block: Option<&str>,
    options: Options,
) -> Result<String> {
    let model = Model::from_bytes(name, bytes, None).map_err(|e| e.in_file(name))?;
    dot_of(&model, block, options).map_err(|e| e.in_file(name))
}

/// Graphviz DOT of `input`'s structure before and after fusion, or of the block named `block`.
pub fn dot_file(input: &Path, block: Option<&str>, options: Options) -> Result<String> {
    let model = Model::open(input)?;
    dot_of(&model, block, options).map_err(|e| e.in_file(input))
}

fn dot_of(model: &Model, block: Option<&str>, options: Options) -> Result<String> {
    let graph = GraphIndex::new(model)?;
    let index = Constants::new(&graph);
    let analysis = plan::analyse(&index, options.fold())?;
    dot::draw(&index, &analysis, block)
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

pub use inspect::DEFAULT_INPUT_SIZE;

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
    inspect::inspect(&model, options).map_err(|e| e.in_file(input))
}
