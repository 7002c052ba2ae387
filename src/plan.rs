//! Match → plan: every candidate block either becomes a [`BlockPlan`] (its fold computed, its
//! names chosen) or a skipped [`BlockInfo`] with the reason. Read-only.

use crate::affine::Layout;
use crate::error::Result;
use crate::fold::{self, FoldError, FoldOptions, Folded};
use crate::graph::GraphIndex;
use crate::naming::{self, NamePool};
use crate::pattern::{self, Block};
use crate::report::{self, BlockInfo};
use crate::tensor::{self, FloatType};

/// A block ready to be replaced by one Conv: its shape is known, its numbers are computed when
/// the output is written ([`BlockPlan::fold`]).
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
    /// Root sum node of each skipped block (parallel to `skipped`).
    skipped_roots: Vec<usize>,
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
            self.skipped_roots
                .iter()
                .copied()
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
                info.fusable = false;
                info.reason = Some(reason);
                analysis.skipped_roots.push(block.root);
                analysis.skipped.push(info);
            }
            Err(FoldError::Invalid(e)) => return Err(e),
        }
    }
    Ok(analysis)
}

impl BlockPlan {
    /// Computes the fused Conv (the planned layout, now with its numbers).
    pub fn fold(&self, index: &GraphIndex) -> Result<Folded> {
        let folded = match fold::fold(index, &self.block, self.options) {
            Ok(f) => f,
            Err(FoldError::Invalid(e)) => return Err(e),
            Err(FoldError::Skip(reason)) => {
                return Err(crate::Error::Graph(format!(
                    "block '{}' no longer folds: {reason}",
                    self.info.name
                )));
            }
        };
        if folded.conv.layout() != self.layout {
            return Err(crate::Error::Graph(format!(
                "block '{}' folded to another shape than planned",
                self.info.name
            )));
        }
        Ok(folded)
    }
}

impl BlockPlan {
    /// The fused weight and bias as the bytes written (little-endian, in the planned element
    /// type), and the rounding that writing half-precision weights made (see [`rounding_error`]).
    pub fn tensors(&self, index: &GraphIndex) -> Result<(Vec<bytes::Bytes>, Option<f64>)> {
        let folded = self.fold(index)?;
        let rounding = rounding_error(&folded);
        let weight = tensor::to_le_bytes(&folded.conv.weight, self.dtype);
        let bias = tensor::to_le_bytes(&folded.conv.bias.into_dyn(), self.dtype);
        Ok((vec![weight.into(), bias.into()], rounding))
    }
}

/// For half-precision weights: how much writing the f64 fold in that type changes it, relative
/// to the largest weight.
pub fn rounding_error(folded: &Folded) -> Option<f64> {
    if !matches!(folded.dtype, FloatType::F16 | FloatType::Bf16) {
        return None;
    }
    let w = &folded.conv.weight;
    let scale = w
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    let worst = w
        .iter()
        .chain(folded.conv.bias.iter())
        .fold(0.0f64, |m, &v| m.max((folded.dtype.round(v) - v).abs()));
    Some(worst / scale)
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
