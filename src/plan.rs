//! Match → plan: every tree the finder reports either becomes a [`BlockPlan`] (the fused Conv's
//! shape known, its names chosen; its numbers are computed only when written) or a [`Skipped`]
//! block with the kind and the reason. Read-only; what is printed about them is assembled later,
//! from the plans and what writing them found (`report`).

use crate::constant::Constants;
use crate::error::Result;
use std::collections::HashSet;

use crate::fold::{self, FoldError, FoldOptions};
use crate::layout::Layout;
use crate::linear::{self, LinearAnalysis, LinearPlan};
use crate::naming::{self, NamePool};
use crate::pattern::{self, Block, Refusal};
use crate::shapes::Shapes;
use crate::tensor::FloatType;

/// A block ready to be replaced by one Conv.
#[derive(Debug, Clone)]
pub struct BlockPlan {
    pub block: Block,
    /// Module path (`stage1.0`) or the sum node's name.
    pub name: String,
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

impl BlockPlan {
    /// The input size the fold holds for only, if any.
    pub fn sized_for(&self) -> Option<&[usize]> {
        self.spatial.as_deref().filter(|_| self.sized)
    }

    /// What the numerical check of this block is of.
    pub fn subject(&self) -> crate::verify::Subject<'_> {
        crate::verify::Subject {
            name: &self.name,
            block: &self.block,
            layout: &self.layout,
            dtype: self.dtype,
            sized: self.sized_for(),
        }
    }
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
    pub name: String,
    pub kind: SkipKind,
    pub reason: String,
}

/// Everything the analysis decided, in graph order.
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    pub plans: Vec<BlockPlan>,
    pub skipped: Vec<Skipped>,
    /// Scales folded into linear operators beside them (after the convolution blocks).
    pub linear: LinearAnalysis,
}

/// A plan as the writer sees it: a convolution block, or a linear fold.
#[derive(Debug, Clone, Copy)]
pub enum Plan<'a> {
    Conv(&'a BlockPlan),
    Linear(&'a LinearPlan),
}

impl<'a> Plan<'a> {
    pub fn name(&self) -> &'a str {
        match self {
            Plan::Conv(p) => &p.name,
            Plan::Linear(p) => &p.name,
        }
    }

    /// The fused node's name (its tensors are `{node_name}.weight` and `.bias`).
    pub fn node_name(&self) -> &'a str {
        match self {
            Plan::Conv(p) => &p.node_name,
            Plan::Linear(p) => &p.node_name,
        }
    }

    pub fn dtype(&self) -> FloatType {
        match self {
            Plan::Conv(p) => p.dtype,
            Plan::Linear(p) => p.dtype,
        }
    }

    /// The fused weight's dims.
    pub fn weight_dims(&self) -> Vec<usize> {
        match self {
            Plan::Conv(p) => p.layout.weight_dims(),
            Plan::Linear(p) => p.weight_dims.clone(),
        }
    }

    /// The fused bias's length: the output channels or features.
    pub fn outputs(&self) -> usize {
        match self {
            Plan::Conv(p) => p.layout.out_channels,
            Plan::Linear(p) => p.features().0,
        }
    }

    /// The nodes whose tensors the fold reads.
    pub fn nodes(&self) -> Vec<usize> {
        match self {
            Plan::Conv(p) => p.block.nodes(),
            Plan::Linear(p) => p.heads.iter().map(|h| h.node).collect(),
        }
    }
}

impl Analysis {
    /// Every plan: the convolution blocks, then the linear folds.
    pub fn all(&self) -> Vec<Plan<'_>> {
        let conv = self.plans.iter().map(Plan::Conv);
        conv.chain(self.linear.plans.iter().map(Plan::Linear))
            .collect()
    }

    /// Every block found, planned or skipped, in graph order: its tree, its name and whether it
    /// is planned.
    pub fn blocks(&self) -> Vec<(&Block, &str, bool)> {
        let planned = self.plans.iter().map(|p| (&p.block, p.name.as_str(), true));
        let skipped = self
            .skipped
            .iter()
            .map(|s| (&s.block, s.name.as_str(), false));
        let mut all: Vec<_> = planned.chain(skipped).collect();
        all.sort_by_key(|(block, _, _)| block.root);
        all
    }

    /// The skipped blocks of `kind`.
    pub fn skipped_of(&self, kind: SkipKind) -> impl Iterator<Item = &Skipped> {
        self.skipped.iter().filter(move |s| s.kind == kind)
    }
}

/// Finds every block of the graph and plans each one that folds.
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
        let name = naming::block_name(index, &block);
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
                let node_name = pool.claim(&format!("{name}.rbr_reparam"), &[".weight", ".bias"]);
                analysis.plans.push(BlockPlan {
                    block,
                    name,
                    layout: planned.layout,
                    dtype: planned.dtype,
                    spatial,
                    sized: planned.sized,
                    options,
                    node_name,
                });
            }
            Err((kind, reason)) => analysis.skipped.push(Skipped {
                block,
                name,
                kind,
                reason,
            }),
        }
    }
    // Then the scales beside linear operators, on what the blocks left.
    let claimed: HashSet<usize> = analysis
        .plans
        .iter()
        .flat_map(|p| p.block.nodes())
        .collect();
    analysis.linear = linear::analyse(index, &shapes, &claimed, options)?;
    for plan in &mut analysis.linear.plans {
        plan.node_name = pool.claim(
            &format!("{}.fused", plan.name),
            &[".weight", ".bias", ".matmul"],
        );
    }
    Ok(analysis)
}

/// BatchNormalization nodes in training mode among the planned blocks and folds.
pub fn training_bns(index: &Constants, analysis: &Analysis) -> usize {
    let blocks = analysis.plans.iter().flat_map(|p| p.block.nodes());
    let linear = analysis
        .linear
        .plans
        .iter()
        .flat_map(|p| p.bns.iter().copied());
    let mut nodes: Vec<usize> = blocks.chain(linear).collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
        .into_iter()
        .filter(|&n| {
            index.node(n).op_type() == "BatchNormalization" && fold::is_training_bn(index, n)
        })
        .count()
}
