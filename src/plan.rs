//! Match → plan: every candidate block either becomes a [`BlockPlan`] (its fold computed, its
//! names chosen) or a skipped [`BlockInfo`] with the reason. Read-only.

use std::ops::Range;

use crate::affine::Layout;
use crate::error::Result;
use crate::fold::{self, FoldError, FoldOptions};
use crate::graph::GraphIndex;
use crate::naming::{self, NamePool};
use crate::pattern::{self, Block};
use crate::recipe::{Recipe, Rounding};
use crate::report::{self, BlockInfo};
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
    pub options: FoldOptions,
    /// Name of the new Conv node; its weight and bias are `{node_name}.weight` / `.bias`.
    pub node_name: String,
}

/// Everything the analysis decided.
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    pub plans: Vec<BlockPlan>,
    pub skipped: Vec<BlockInfo>,
    /// Each skipped block (parallel to `skipped`).
    pub skipped_blocks: Vec<Block>,
}

impl Analysis {
    /// All blocks found, fused or not, in graph order.
    pub fn blocks(&self) -> Vec<BlockInfo> {
        let mut all: Vec<(usize, BlockInfo)> = self
            .plans
            .iter()
            .map(|p| (p.block.root, p.info.clone()))
            .collect();
        all.extend(
            self.skipped_blocks
                .iter()
                .map(|b| b.root)
                .zip(self.skipped.iter().cloned()),
        );
        all.sort_by_key(|(root, _)| *root);
        all.into_iter().map(|(_, info)| info).collect()
    }
}

/// Finds and folds every block of the graph.
pub fn analyse(index: &GraphIndex, options: FoldOptions) -> Result<Analysis> {
    let mut analysis = Analysis::default();
    let mut pool = NamePool::new(index);
    for candidate in pattern::find_blocks(index) {
        let block = candidate.block;
        let mut info = report::describe(index, &block, naming::block_name(index, &block));
        let outcome = match candidate.blocked {
            Some(reason) => Err(FoldError::Skip(reason)),
            None => fold::layout(index, &block, options),
        };
        match outcome {
            Ok((layout, dtype)) => {
                let node_name =
                    pool.claim(&format!("{}.rbr_reparam", info.name), &[".weight", ".bias"]);
                analysis.plans.push(BlockPlan {
                    block,
                    info,
                    layout,
                    dtype,
                    options,
                    node_name,
                });
            }
            Err(FoldError::Skip(reason)) => {
                info.reason = Some(reason);
                analysis.skipped_blocks.push(block);
                analysis.skipped.push(info);
            }
            Err(FoldError::Invalid(e)) => return Err(e),
        }
    }
    Ok(analysis)
}

/// What writing a block's fused tensors leaves to check and report.
#[derive(Debug, Clone)]
pub struct Produced {
    /// The encoded bias.
    pub bias: bytes::Bytes,
    /// The written weight rows of the requested output channels, decoded, in request order.
    pub sampled: ndarray::ArrayD<f64>,
    /// For half-precision weights: the largest change rounding the f64 fold to that type made,
    /// relative to the largest weight.
    pub rounding: Option<f64>,
}

/// Bytes of weights folded between two releases of the input's mapped pages.
const RELEASE_BYTES: usize = 64 << 20;

/// Weights folded at a time (whole output channels, at least one): 256 KB as float32.
const CHUNK_ELEMENTS: usize = 1 << 16;

impl BlockPlan {
    /// Folds the block in chunks of output channels and hands each chunk of the encoded weight
    /// to `write` (so even the largest block never sits in memory whole); returns the encoded
    /// bias and the written rows `sample` asks for.
    pub fn write_tensors(
        &self,
        index: &GraphIndex,
        write: &mut dyn FnMut(&[u8]) -> Result<()>,
        sample: &[usize],
    ) -> Result<Produced> {
        let dims = self.layout.weight_dims();
        let row_len: usize = dims[1..].iter().product();
        let rows_per_chunk = (CHUNK_ELEMENTS / row_len.max(1)).max(1);
        let mut sampled_dims = dims.clone();
        sampled_dims[0] = sample.len();
        let mut sampled = ndarray::ArrayD::zeros(ndarray::IxDyn(&sampled_dims));
        let (mut largest, mut rounded) = (0.0f64, 0.0f64);
        let out_channels = self.layout.out_channels;
        let row_bytes = row_len * self.dtype.size();
        let starts: Vec<usize> = (0..out_channels).step_by(rows_per_chunk).collect();
        let recipe = match fold::recipe(index, &self.block, self.options) {
            Ok(r) if r.layout.weight_dims() == dims => r,
            Ok(_) => {
                return Err(crate::Error::Graph(format!(
                    "block '{}' folded to another shape than planned",
                    self.info.name
                )));
            }
            Err(FoldError::Invalid(e)) => return Err(e),
            Err(FoldError::Skip(reason)) => {
                return Err(crate::Error::Graph(format!(
                    "block '{}' no longer folds: {reason}",
                    self.info.name
                )));
            }
        };
        // A producer thread folds and encodes a window of chunks in parallel while this thread
        // writes the window before it, in order: folding overlaps the writing.
        let window = 2 * rayon::current_num_threads();
        let (send, receive) = std::sync::mpsc::sync_channel::<Vec<Chunk>>(1);
        let recipe = &recipe;
        let buffers = Buffers::default();
        let buffers = &buffers;
        std::thread::scope(|scope| -> Result<()> {
            scope.spawn(move || {
                let mut unreleased = 0usize;
                for starts in starts.chunks(window) {
                    // Input pages read for the fold stay resident until released; let them go
                    // every 64 MB of weights, so that even one huge block stays small in memory.
                    unreleased += starts.len() * rows_per_chunk * row_bytes;
                    if unreleased > RELEASE_BYTES {
                        index.model.release_pages();
                        unreleased = 0;
                    }
                    use rayon::prelude::*;
                    let chunks = starts
                        .par_iter()
                        .map(|&start| {
                            let rows = start..(start + rows_per_chunk).min(out_channels);
                            Chunk::encode(recipe, rows, self.dtype, buffers.take())
                        })
                        .collect();
                    // The receiver hangs up after an error: nothing more to fold.
                    if send.send(chunks).is_err() {
                        return;
                    }
                }
            });
            for window in receive {
                for chunk in window {
                    write(&chunk.encoded)?;
                    for (i, &r) in sample.iter().enumerate() {
                        if chunk.rows.contains(&r) {
                            let at = (r - chunk.rows.start) * row_bytes;
                            let values =
                                tensor::decode(&chunk.encoded[at..at + row_bytes], self.dtype);
                            let mut row = sampled.index_axis_mut(ndarray::Axis(0), i);
                            row.iter_mut().zip(values).for_each(|(d, v)| *d = v);
                        }
                    }
                    largest = largest.max(chunk.rounding.largest);
                    rounded = rounded.max(chunk.rounding.rounded);
                    buffers.give(chunk.encoded);
                }
            }
            Ok(())
        })?;
        let mut bias = Vec::new();
        tensor::encode_into(&recipe.bias, self.dtype, &mut bias);
        let half = matches!(self.dtype, FloatType::F16 | FloatType::Bf16);
        let rounding = half.then(|| rounded / largest.max(f64::MIN_POSITIVE));
        Ok(Produced {
            bias: bias.into(),
            sampled,
            rounding,
        })
    }
}

/// One chunk of output channels, folded and encoded.
struct Chunk {
    rows: Range<usize>,
    encoded: Vec<u8>,
    rounding: Rounding,
}

thread_local! {
    /// Each folding thread's row buffers, reused from chunk to chunk.
    static ROWS: std::cell::RefCell<(Vec<f64>, Vec<f64>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// Encoded chunks' buffers, back from the writer for the next chunks: fresh allocations this
/// size would each be mapped, faulted in and zeroed by the kernel.
#[derive(Default)]
struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

impl Buffers {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .ok()
            .and_then(|mut b| b.pop())
            .unwrap_or_default()
    }

    fn give(&self, buffer: Vec<u8>) {
        if let Ok(mut b) = self.0.lock() {
            b.push(buffer);
        }
    }
}

impl Chunk {
    fn encode(recipe: &Recipe, rows: Range<usize>, ty: FloatType, mut encoded: Vec<u8>) -> Chunk {
        // A recycled buffer already has the length (but for a block's last chunk): no zeroing.
        encoded.resize(rows.len() * recipe.row_len() * ty.size(), 0);
        let rounding = ROWS.with_borrow_mut(|(acc, scratch)| {
            recipe.encode_rows(rows.clone(), ty, &mut encoded, acc, scratch)
        });
        Chunk {
            rows,
            encoded,
            rounding,
        }
    }
}

/// Memory folding the plans takes beyond the mapped files, for the hungriest block (blocks are
/// written one at a time, and checked one behind): the encoded chunks in flight (up to three
/// windows), each folding thread's row buffers, the checked rows of up to three blocks and, for
/// tensors stored as typed fields rather than raw bytes, their values decoded whole.
pub fn working_memory(index: &GraphIndex, plans: &[BlockPlan]) -> u64 {
    let threads = rayon::current_num_threads() as u64;
    let block = |p: &BlockPlan| {
        let row = p.layout.weight_dims()[1..].iter().product::<usize>() as u64;
        let chunk = row.max(CHUNK_ELEMENTS as u64) * p.dtype.size() as u64;
        let in_flight = 3 * 2 * threads * chunk;
        let rows = threads * 2 * row * 8;
        let checked = 3 * crate::verify::sample(p).len() as u64 * row * 8;
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
pub fn training_bns(index: &GraphIndex, plans: &[BlockPlan]) -> usize {
    plans
        .iter()
        .flat_map(|p| p.block.nodes())
        .filter(|&n| {
            index.node(n).op_type() == "BatchNormalization" && fold::is_training_bn(index, n)
        })
        .count()
}
