//! Match → plan: every candidate block either becomes a [`BlockPlan`] (its fold computed, its
//! names chosen) or a skipped [`BlockInfo`] with the reason. Read-only.

use crate::affine::Layout;
use crate::constant::Constants;
use crate::error::Result;
use crate::fold::{self, FoldError, FoldOptions};
use crate::naming::{self, NamePool};
use crate::pattern::{self, Block, Refusal};
use crate::producer::{self, Producer};
use crate::report::{self, BlockInfo};
use crate::shapes::Shapes;
use crate::tensor::{self, FloatType};

/// A block ready to be replaced by one Conv: its shape is known, its numbers are computed when
/// the output is written ([`BlockPlan::write_tensors`]).
#[derive(Debug, Clone)]
pub struct BlockPlan {
    pub block: Block,
    pub info: BlockInfo,
    /// The fused Conv's shape and geometry.
    pub layout: Layout,
    /// The fused weights' element type (that of the first Conv's weight).
    pub dtype: FloatType,
    /// The block input's spatial size, when static (pads that depend on it are resolved at it).
    pub spatial: Option<Vec<usize>>,
    /// Whether the fold holds only at that size (see [`fold::Planned::sized`]).
    pub sized: bool,
    pub options: FoldOptions,
    /// Name of the new Conv node; its weight and bias are `{node_name}.weight` / `.bias`.
    pub node_name: String,
}

/// Why a block found was not planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipKind {
    /// A sum that looks like a block but is none: its summands read different tensors (a
    /// residual connection, a sequential branch). Not a candidate: reported only on request.
    NotABlock,
    /// A candidate that cannot be folded exactly (the reason says why).
    Unfoldable,
    /// A candidate with a BatchNormalization in training mode, and folding those is not allowed.
    Training,
}

/// A block found but not planned.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub block: Block,
    pub info: BlockInfo,
    pub kind: SkipKind,
}

/// Everything the analysis decided.
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    pub plans: Vec<BlockPlan>,
    /// Blocks found but not planned, with the reason, in graph order.
    pub skipped: Vec<Skipped>,
}

impl Analysis {
    /// All blocks found, fused or not, in graph order.
    pub fn blocks(&self) -> Vec<BlockInfo> {
        let mut all: Vec<(usize, BlockInfo)> = self
            .plans
            .iter()
            .map(|p| (p.block.root, p.info.clone()))
            .collect();
        all.extend(self.skipped.iter().map(|s| (s.block.root, s.info.clone())));
        all.sort_by_key(|(root, _)| *root);
        all.into_iter().map(|(_, info)| info).collect()
    }

    /// The skipped blocks of `kind`.
    pub fn skipped_of(&self, kind: SkipKind) -> impl Iterator<Item = &Skipped> {
        self.skipped.iter().filter(move |s| s.kind == kind)
    }
}

/// Finds and folds every block of the graph.
pub fn analyse(index: &Constants, options: FoldOptions) -> Result<Analysis> {
    let mut analysis = Analysis::default();
    let mut pool = NamePool::new(index);
    // Spatial sizes propagated from the declared graph inputs: `auto_pad=SAME_*` with strides,
    // and branches whose pads agree only at some sizes, are resolved at them.
    let shapes = Shapes::infer(index, None);
    for candidate in pattern::find_blocks(index) {
        let block = candidate.block;
        let spatial = shapes
            .get(index, &block.input)
            .and_then(|s| s.get(2..).map(<[usize]>::to_vec));
        let mut info = report::describe(index, &block, naming::block_name(index, &block));
        let outcome = match candidate.refusal {
            Some(Refusal::NotABlock(reason)) => Err((SkipKind::NotABlock, reason)),
            Some(Refusal::Blocked(reason)) => Err((SkipKind::Unfoldable, reason)),
            None => match fold::layout(index, &block, options, spatial.as_deref()) {
                Ok(planned) => Ok(planned),
                Err(FoldError::Skip(reason)) => Err((SkipKind::Unfoldable, reason)),
                Err(FoldError::Training(reason)) => Err((SkipKind::Training, reason)),
                Err(FoldError::Invalid(e)) => return Err(e),
            },
        };
        match outcome {
            Ok(planned) => {
                let node_name =
                    pool.claim(&format!("{}.rbr_reparam", info.name), &[".weight", ".bias"]);
                if planned.sized {
                    info.sized_for = spatial.clone();
                }
                analysis.plans.push(BlockPlan {
                    block,
                    info,
                    layout: planned.layout,
                    dtype: planned.dtype,
                    spatial,
                    sized: planned.sized,
                    options,
                    node_name,
                });
            }
            Err((kind, reason)) => {
                info.reason = Some(reason);
                analysis.skipped.push(Skipped { block, info, kind });
            }
        }
    }
    Ok(analysis)
}

/// What writing a block's fused tensors leaves to check and report.
#[derive(Debug, Clone)]
pub struct Produced {
    /// The encoded bias.
    pub bias: bytes::Bytes,
    /// The written weight rows of the requested output channels, in request order, as written
    /// (decoded by [`Produced::sampled`], off the writer's thread).
    pub sampled_bytes: Vec<u8>,
    /// Their dims (the weight's, with the request's length first) and element type.
    pub sampled_dims: Vec<usize>,
    pub dtype: FloatType,
    /// For half-precision weights: the largest change rounding the f64 fold to that type made,
    /// relative to the largest weight.
    pub rounding: Option<f64>,
}

impl Produced {
    /// The written rows of the requested output channels, decoded.
    pub fn sampled(&self) -> Result<ndarray::ArrayD<f64>> {
        let values = tensor::decode(&self.sampled_bytes, self.dtype);
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&self.sampled_dims), values)
            .map_err(|e| crate::Error::Graph(format!("sampled rows: {e}")))
    }

    /// The bias, decoded.
    pub fn bias(&self) -> Result<ndarray::ArrayD<f64>> {
        let values = tensor::decode(&self.bias, self.dtype);
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[values.len()]), values)
            .map_err(|e| crate::Error::Graph(format!("bias: {e}")))
    }
}

/// Tensors smaller than this keep their pages (see [`BlockPlan::release_pages`]).
const RELEASE_AT_LEAST: usize = 1 << 16;

impl BlockPlan {
    /// Folds the block in chunks of output channels and hands each chunk of the encoded weight
    /// to `write` (so even the largest block never sits in memory whole); returns the encoded
    /// bias and the written rows `sample` asks for. (To fold many blocks, see [`Producer`].)
    pub fn write_tensors(
        &self,
        index: &Constants,
        write: &mut dyn FnMut(&[u8]) -> Result<()>,
        sample: &[usize],
    ) -> Result<Produced> {
        Producer::run(index, std::slice::from_ref(self), vec![0], |producer| {
            producer.write_block(0, write, sample)
        })
    }

    /// Lets go of the input's mapped pages under the data of the tensors the block reads (they
    /// stay in the page cache).
    pub fn release_pages(&self, index: &Constants) {
        let tensors = self
            .block
            .nodes()
            .into_iter()
            .flat_map(|n| &index.node(n).input)
            .filter_map(|v| index.declared_tensor(v));
        // Small tensors share pages with others and are not worth a call (each one interrupts
        // the other cores to flush their TLBs).
        for t in tensors {
            match tensor::stored(t, &index.model.external) {
                Some(bytes) if bytes.len() >= RELEASE_AT_LEAST => index.model.release(&bytes),
                _ => {}
            }
        }
    }
}

/// Memory folding the plans takes beyond the mapped files, for the hungriest block (blocks are
/// written one at a time, and checked one behind): the encoded chunks in flight (those folded
/// ahead of the writer and those being folded), each worker's row buffers (at most a row each),
/// the sampled rows of up to three blocks as written (the check decodes one row at a time) and,
/// for tensors stored as typed fields rather than raw bytes, their values decoded whole.
pub fn working_memory(index: &Constants, plans: &[BlockPlan]) -> u64 {
    let threads = producer::workers() as u64;
    let block = |p: &BlockPlan| {
        let row = p.layout.weight_dims()[1..].iter().product::<usize>() as u64;
        let chunk = row.max(producer::CHUNK_ELEMENTS as u64) * p.dtype.size() as u64;
        let in_flight = (producer::AHEAD_PER_WORKER as u64 + 1) * threads * chunk;
        let rows = threads * 2 * row * 8;
        let sampled = crate::verify::sample(p).len() as u64 * row * p.dtype.size() as u64;
        let checked = 3 * sampled + row * 8;
        let typed = p
            .block
            .nodes()
            .iter()
            .flat_map(|&n| &index.node(n).input)
            .filter_map(|v| index.declared_tensor(v))
            .filter(|t| t.raw_data.is_none() && !crate::onnx::external::is_external(t))
            .map(|t| {
                t.dims
                    .iter()
                    .fold(8u64, |n, &d| n.saturating_mul(d.max(0) as u64))
            })
            .fold(0u64, u64::saturating_add);
        [in_flight, rows, checked, typed]
            .into_iter()
            .fold(0u64, u64::saturating_add)
    };
    plans.iter().map(block).max().unwrap_or(0)
}

/// BatchNormalization nodes in training mode among the planned blocks.
pub fn training_bns(index: &Constants, plans: &[BlockPlan]) -> usize {
    plans
        .iter()
        .flat_map(|p| p.block.nodes())
        .filter(|&n| {
            index.node(n).op_type() == "BatchNormalization" && fold::is_training_bn(index, n)
        })
        .count()
}
