//! Match → plan: every candidate block either becomes a [`BlockPlan`] (its fold computed, its
//! names chosen) or a skipped [`BlockInfo`] with the reason. Read-only.

use crate::error::Result;
use crate::fold::{self, FoldError, FoldOptions, Folded};
use crate::graph::GraphIndex;
use crate::naming::{self, NamePool};
use crate::pattern::{self, Block};
use crate::report::{self, BlockInfo};
use crate::tensor::FloatType;

/// A block ready to be replaced by one Conv.
#[derive(Debug, Clone)]
pub struct BlockPlan {
    pub block: Block,
    pub info: BlockInfo,
    pub folded: Folded,
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
            None => fold::fold(index, &block, options),
        };
        match outcome {
            Ok(folded) => {
                info.rounding_error = rounding_error(&folded);
                let node_name =
                    pool.claim(&format!("{}.rbr_reparam", info.name), &[".weight", ".bias"]);
                analysis.plans.push(BlockPlan {
                    block,
                    info,
                    folded,
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

/// For half-precision weights: how much writing the f64 fold in that type changes it, relative
/// to the largest weight.
fn rounding_error(folded: &Folded) -> Option<f64> {
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
