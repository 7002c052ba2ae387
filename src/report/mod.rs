//! What the tool tells people and pipelines, assembled last — from the plans, the patch and what
//! writing or inspecting each block found: one [`BlockInfo`] per block found (fused or not, and
//! why not), one [`FoldInfo`] per linear fold and a [`Stay`] per BatchNormalization left
//! (`linear.rs`), and the totals of a fusion.

mod linear;

pub use linear::{FoldInfo, Stay};

use std::time::Duration;

use crate::constant::Constants;
use crate::cost::Cost;
use crate::geometry::Window;
use crate::graph::is_default_domain;
use crate::onnx::proto::{NodeProto, TensorProto};
use crate::patch::Patch;
use crate::pattern::{Block, Term};
use crate::plan::{Analysis, SkipKind, Skipped};
use crate::quant::Int8Stats;
use crate::verify::Deviation;
use crate::writer::Outcome;

/// A block as a reader of the training structure sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockInfo {
    /// Module path (`stage1.0`) or the sum node's name.
    pub name: String,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Strides of the branches' convolutions.
    pub stride: Vec<usize>,
    pub groups: usize,
    /// One entry per summand: its kernel (`3x3`, `1x1`, `7x7 d2`), `avgpool 3x3` or
    /// `identity`; a subtracted summand starts with `−`.
    pub branches: Vec<String>,
    /// Per-channel operations applied after the sum, in order (`BatchNormalization`, `Mul`, …).
    pub post: Vec<String>,
    /// Why not, when it is not.
    pub reason: Option<String>,
    /// When the fold holds only for inputs of one spatial size (`auto_pad=SAME_*` with
    /// strides, or branch pads that agree only there): that size.
    pub sized_for: Option<Vec<usize>>,
    /// A candidate for re-parameterization; `false` for a sum that looks like a block but is
    /// none (its summands read tensors a nonlinearity separates: a residual connection).
    pub candidate: bool,
    /// For float16/bfloat16 weights: the largest change rounding the f64 fold to that type made,
    /// relative to the largest weight.
    pub rounding_error: Option<f64>,
    /// How far the fused Conv is from the original subgraph, when verified.
    pub deviation: Option<Deviation>,
    /// Parameters and FLOPs before → after (`inspect`).
    pub cost: Option<Cost>,
    /// Quantization statistics of the fused kernel (`inspect --int8`).
    pub int8: Option<Int8Stats>,
}

impl BlockInfo {
    /// Whether the block is (or would be) folded: it has no reason not to be.
    pub fn is_fusable(&self) -> bool {
        self.reason.is_none()
    }

    /// Whether one summand is the identity.
    pub fn has_identity(&self) -> bool {
        self.branches
            .iter()
            .any(|b| b.trim_start_matches('−') == "identity")
    }
}

/// The report of a fusion, assembled last: from the plans, what writing each one found
/// (`outcomes`, by plan), and the patch.
pub fn fusion(
    index: &Constants,
    analysis: &Analysis,
    patch: &Patch,
    outcomes: &[Outcome],
    elapsed: Duration,
) -> FuseReport {
    let model = index.model;
    let fused = analysis
        .plans
        .iter()
        .zip(outcomes)
        .map(|(plan, outcome)| BlockInfo {
            sized_for: plan.sized_for().map(<[usize]>::to_vec),
            deviation: outcome.deviation,
            rounding_error: outcome.rounding,
            ..describe(index, &plan.block, &plan.name)
        });
    let linear_outcomes = outcomes.iter().skip(analysis.plans.len());
    let folds = analysis
        .linear
        .plans
        .iter()
        .zip(linear_outcomes)
        .map(|(plan, outcome)| FoldInfo {
            deviation: outcome.deviation,
            rounding_error: outcome.rounding,
            ..linear::describe(index, plan)
        });
    let skipped = |kind| {
        let of_kind = analysis.skipped_of(kind);
        of_kind.map(|s| skipped_info(index, s)).collect()
    };
    // Parameters: the elements of the main graph's constant tensors, initializers and
    // `Constant` nodes alike.
    let elements = |t: &TensorProto| t.dims.iter().map(|&d| d.max(0) as u64).product::<u64>();
    let constant_node = |n: usize| constant_elements(&model.nodes[n]);
    let params_before: u64 = model.initializers.iter().map(elements).sum::<u64>()
        + (0..model.nodes.len()).map(constant_node).sum::<u64>();
    let removed = patch.removed_initializers.iter();
    let params_removed: u64 = removed
        .map(|&i| elements(&model.initializers[i]))
        .sum::<u64>()
        + patch
            .removed_nodes
            .iter()
            .map(|&n| constant_node(n))
            .sum::<u64>();
    let params_added: u64 = patch.new_tensors.iter().map(|t| t.elements() as u64).sum();
    FuseReport {
        fused: fused.collect(),
        folds: folds.collect(),
        bn_folded: linear::bn_folded(analysis),
        bn_left: linear::stays(index, analysis),
        skipped: skipped(SkipKind::Unfoldable),
        not_blocks: skipped(SkipKind::NotABlock),
        nodes_before: model.nodes.len(),
        nodes_after: model.nodes.len() - patch.removed_nodes.len(),
        params_before,
        params_after: params_before - params_removed + params_added,
        training_bn_folded: crate::plan::training_bns(index, analysis),
        elapsed,
    }
}

/// What `inspect` found for each plan: its cost and, on request, the INT8 statistics of its
/// fused kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inspected {
    pub cost: Option<Cost>,
    pub int8: Option<Int8Stats>,
}

/// The report of `inspect`, assembled from the plans and what was found for each (`planned`, by
/// plan; `skipped_costs`, by skipped block) at the input shape counted.
pub fn inspection(
    index: &Constants,
    analysis: &Analysis,
    planned: &[Inspected],
    skipped_costs: &[Cost],
    input_shape: Option<Vec<usize>>,
) -> InspectReport {
    let plans = analysis.plans.iter().zip(planned).map(|(plan, found)| {
        let info = BlockInfo {
            sized_for: plan.sized_for().map(<[usize]>::to_vec),
            cost: found.cost,
            int8: found.int8,
            ..describe(index, &plan.block, &plan.name)
        };
        (plan.block.root, info)
    });
    let skipped = analysis
        .skipped
        .iter()
        .zip(skipped_costs)
        .map(|(s, &cost)| {
            let info = BlockInfo {
                cost: Some(cost),
                ..skipped_info(index, s)
            };
            (s.block.root, info)
        });
    let mut blocks: Vec<(usize, BlockInfo)> = plans.chain(skipped).collect();
    blocks.sort_by_key(|(root, _)| *root);
    InspectReport {
        blocks: blocks.into_iter().map(|(_, info)| info).collect(),
        folds: analysis
            .linear
            .plans
            .iter()
            .map(|p| linear::describe(index, p))
            .collect(),
        bn_folded: linear::bn_folded(analysis),
        bn_left: linear::stays(index, analysis),
        input_shape,
    }
}

fn skipped_info(index: &Constants, s: &Skipped) -> BlockInfo {
    BlockInfo {
        reason: Some(s.reason.clone()),
        candidate: s.kind != SkipKind::NotABlock,
        ..describe(index, &s.block, &s.name)
    }
}

/// The elements a `Constant` node holds (0 for any other node).
fn constant_elements(node: &NodeProto) -> u64 {
    if node.op_type() != "Constant" || !is_default_domain(node) {
        return 0;
    }
    let a = node.attribute.first();
    let tensor = a.and_then(|a| a.t.as_ref());
    let dims = tensor.map(|t| t.dims.iter().map(|&d| d.max(0) as u64).product::<u64>());
    let listed = a.map_or(0, |a| (a.floats.len() + a.ints.len()).max(1) as u64);
    dims.unwrap_or(listed)
}

/// Describes `block` from the graph alone (weight dims and attributes; no tensor data).
pub fn describe(index: &Constants, block: &Block, name: &str) -> BlockInfo {
    let mut info = BlockInfo {
        name: name.to_string(),
        in_channels: 0,
        out_channels: 0,
        stride: Vec::new(),
        groups: 1,
        branches: Vec::new(),
        post: Vec::new(),
        reason: None,
        sized_for: None,
        candidate: true,
        rounding_error: None,
        deviation: None,
        cost: None,
        int8: None,
    };
    if let Some(&conv) = block.convs().first() {
        let dims = weight_dims(index, conv);
        if let Some(window) = dims
            .get(2..)
            .and_then(|kernel| Window::of(index.node(conv), Some(kernel)).ok())
        {
            info.groups = window.group;
            info.out_channels = dims[0];
            info.in_channels = dims[1].saturating_mul(window.group);
            info.stride = window.strides;
        }
    }
    let mut top = &block.term;
    while let Term::Channel { node, inner, .. } = top {
        info.post.insert(0, index.node(*node).op_type().to_string());
        top = inner;
    }
    match top {
        Term::Sum { .. } => summands(index, block, top, false, &mut info.branches),
        leaf => info.branches.push(branch_label(index, block, leaf)),
    }
    info
}

fn weight_dims(index: &Constants, conv: usize) -> Vec<usize> {
    index
        .node(conv)
        .input
        .get(1)
        .and_then(|w| index.declared_tensor(w))
        .map(|w| w.dims.iter().map(|&d| d.max(0) as usize).collect())
        .unwrap_or_default()
}

/// `3x3`, `2x1x1`.
fn axes(values: &[usize]) -> String {
    let text: Vec<String> = values.iter().map(usize::to_string).collect();
    text.join("x")
}

/// Flattens nested sums into one list of summand labels.
fn summands(index: &Constants, block: &Block, term: &Term, negated: bool, out: &mut Vec<String>) {
    match term {
        Term::Sum { terms, .. } => {
            for (neg, t) in terms {
                summands(index, block, t, negated ^ neg, out);
            }
        }
        other => {
            let label = branch_label(index, block, other);
            out.push(if negated {
                format!("−{label}")
            } else {
                label
            });
        }
    }
}

/// `3x3`, `1x1`, `7x7 d2`, `avgpool 3x3`, `identity`; a Conv with per-channel ops after it is
/// labelled by its kernel; a summand that is some other value (in a block that cannot fold), by
/// its name.
fn branch_label(index: &Constants, block: &Block, term: &Term) -> String {
    match term {
        Term::Raw(v) if *v == block.input => "identity".into(),
        Term::Raw(v) => v.clone(),
        Term::Conv(n) => {
            let dims = weight_dims(index, *n);
            let kernel = dims.get(2..).unwrap_or(&[]);
            let mut label = match kernel.is_empty() {
                true => "conv".to_string(),
                false => axes(kernel),
            };
            let window = Window::of(index.node(*n), Some(kernel)).ok();
            if let Some(d) = window
                .map(|w| w.dilations)
                .filter(|d| d.iter().any(|&v| v > 1))
            {
                label += &format!(" d{}", axes(&d));
            }
            label
        }
        Term::AvgPool(n) => {
            let window = Window::of(index.node(*n), None).ok();
            format!(
                "avgpool {}",
                axes(&window.map(|w| w.kernel).unwrap_or_default())
            )
        }
        Term::Channel { inner, .. } => branch_label(index, block, inner),
        Term::Sum { .. } => {
            let mut inner = Vec::new();
            summands(index, block, term, false, &mut inner);
            format!("({})", inner.join(" + "))
        }
    }
}

/// The outcome of a fusion.
#[derive(Debug, Clone, Default)]
pub struct FuseReport {
    /// Blocks folded into one Conv each.
    pub fused: Vec<BlockInfo>,
    /// Scales folded into the linear operators beside them.
    pub folds: Vec<FoldInfo>,
    /// BatchNormalization nodes those folds took in (one may reach several).
    pub bn_folded: usize,
    /// BatchNormalization nodes left in the model, with the reason.
    pub bn_left: Vec<Stay>,
    /// Candidate blocks left as they were, with the reason.
    pub skipped: Vec<BlockInfo>,
    /// Sums that look like blocks but are none (their summands read different tensors, as in
    /// a residual connection), with the reason: not candidates, listed for `-v`.
    pub not_blocks: Vec<BlockInfo>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Elements of all initializers.
    pub params_before: u64,
    pub params_after: u64,
    /// BatchNormalization nodes in training mode folded with their running statistics.
    pub training_bn_folded: usize,
    pub elapsed: Duration,
}

impl FuseReport {
    /// The verified block or fold that deviates most (its name and deviation), if any was
    /// verified.
    pub fn worst(&self) -> Option<(&str, Deviation)> {
        let blocks = self.fused.iter().map(|b| (b.name.as_str(), b.deviation));
        let folds = self.folds.iter().map(|f| (f.name.as_str(), f.deviation));
        blocks
            .chain(folds)
            .filter_map(|(name, d)| Some((name, d?)))
            .max_by(|a, b| a.1.rel.total_cmp(&b.1.rel))
    }

    /// Fused blocks that had no identity branch.
    pub fn fused_without_identity(&self) -> usize {
        self.fused.iter().filter(|b| !b.has_identity()).count()
    }
}

/// What `inspect` finds.
#[derive(Debug, Clone, Default)]
pub struct InspectReport {
    pub blocks: Vec<BlockInfo>,
    /// The linear folds `fuse` would make.
    pub folds: Vec<FoldInfo>,
    /// BatchNormalization nodes those folds take in.
    pub bn_folded: usize,
    /// BatchNormalization nodes `fuse` would leave, with the reason.
    pub bn_left: Vec<Stay>,
    /// The input shape FLOPs are counted for (batch 1), when known.
    pub input_shape: Option<Vec<usize>>,
}

impl InspectReport {
    /// Candidate blocks (see [`BlockInfo::candidate`]), fusable or not.
    pub fn candidates(&self) -> impl Iterator<Item = &BlockInfo> {
        self.blocks.iter().filter(|b| b.candidate)
    }

    pub fn fusable(&self) -> usize {
        self.blocks.iter().filter(|b| b.is_fusable()).count()
    }

    /// Candidate blocks without an identity branch.
    pub fn without_identity(&self) -> usize {
        self.candidates().filter(|b| !b.has_identity()).count()
    }

    /// Sums found that are no blocks (residual connections), listed with the reason.
    pub fn not_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| !b.candidate).count()
    }

    /// Totals over the candidate blocks: parameters before and after (fused blocks counted
    /// after fusion, others as they are), FLOPs likewise; `None` when some block's count is
    /// unknown.
    pub fn totals(&self) -> [Option<u64>; 4] {
        let sum = |f: &dyn Fn(&crate::cost::Cost) -> Option<u64>| {
            self.candidates()
                .map(|b| b.cost.as_ref().and_then(f))
                .sum::<Option<u64>>()
        };
        [
            sum(&|c| Some(c.params_before)),
            sum(&|c| Some(c.params_after.unwrap_or(c.params_before))),
            sum(&|c| c.flops_before),
            sum(&|c| match c.params_after {
                Some(_) => c.flops_after,
                None => c.flops_before,
            }),
        ]
    }

    /// Fused kernels flagged for per-tensor INT8 and, second, those of them flagged per channel
    /// too; `None` when no kernel was measured (no `--int8`).
    pub fn int8_risky(&self) -> Option<[usize; 2]> {
        let measured: Vec<crate::quant::Int8Stats> =
            self.blocks.iter().filter_map(|b| b.int8).collect();
        if measured.is_empty() {
            return None;
        }
        Some([
            measured.iter().filter(|q| q.is_risky()).count(),
            measured
                .iter()
                .filter(|q| q.advice() == crate::quant::Advice::KeepFloat)
                .count(),
        ])
    }
}

impl BlockInfo {
    /// The block as JSON (the documented `inspect --json` / `fuse --json` item).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "stride": self.stride,
            "groups": self.groups,
            "branches": self.branches,
            "post": self.post,
            "identity": self.has_identity(),
            "fusable": self.is_fusable(),
            "candidate": self.candidate,
            "reason": self.reason,
            "sized_for": self.sized_for,
            "deviation": self.deviation.map(|d| serde_json::json!({"abs": d.abs, "rel": d.rel})),
            "rounding_error": self.rounding_error,
            "params_before": self.cost.map(|c| c.params_before),
            "params_after": self.cost.and_then(|c| c.params_after),
            "flops_before": self.cost.and_then(|c| c.flops_before),
            "flops_after": self.cost.and_then(|c| c.flops_after),
            "int8": self.int8.map(|q| q.to_json()),
        })
    }
}

impl InspectReport {
    /// `{"summary": {...}, "blocks": [...]}`: `blocks` counts the candidates; the list has every
    /// sum found, the sums that are no blocks with `"candidate": false` and the reason.
    pub fn to_json(&self) -> serde_json::Value {
        let [params_before, params_after, flops_before, flops_after] = self.totals();
        let risky = self.int8_risky();
        serde_json::json!({
            "summary": {
                "blocks": self.candidates().count(),
                "fusable": self.fusable(),
                "without_identity": self.without_identity(),
                "not_blocks": self.not_blocks(),
                "input_shape": self.input_shape,
                "params_before": params_before,
                "params_after": params_after,
                "flops_before": flops_before,
                "flops_after": flops_after,
                "int8_risky": risky.map(|[tensor, _]| tensor),
                "int8_risky_per_channel": risky.map(|[_, channel]| channel),
                "folds": self.folds.len(),
                "bn_folded": self.bn_folded,
                "bn_left": self.bn_left.len(),
            },
            "blocks": self.blocks.iter().map(BlockInfo::to_json).collect::<Vec<_>>(),
            "folds": self.folds.iter().map(FoldInfo::to_json).collect::<Vec<_>>(),
            "bn_left": self.bn_left.iter().map(Stay::to_json).collect::<Vec<_>>(),
        })
    }
}

impl FuseReport {
    /// `{"summary": {...}, "fused": [...], "skipped": [...]}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "summary": {
                "fused": self.fused.len(),
                "without_identity": self.fused_without_identity(),
                "skipped": self.skipped.len(),
                "not_blocks": self.not_blocks.len(),
                "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after,
                "params_before": self.params_before,
                "params_after": self.params_after,
                "training_bn_folded": self.training_bn_folded,
                "folds": self.folds.len(),
                "bn_folded": self.bn_folded,
                "bn_left": self.bn_left.len(),
                "seconds": self.elapsed.as_secs_f64(),
                "worst": self.worst().map(|(name, d)| serde_json::json!({
                    "block": name,
                    "rel": d.rel,
                })),
            },
            "fused": self.fused.iter().map(BlockInfo::to_json).collect::<Vec<_>>(),
            "folds": self.folds.iter().map(FoldInfo::to_json).collect::<Vec<_>>(),
            "bn_left": self.bn_left.iter().map(Stay::to_json).collect::<Vec<_>>(),
            "skipped": self.skipped.iter().map(BlockInfo::to_json).collect::<Vec<_>>(),
            "not_blocks": self.not_blocks.iter().map(BlockInfo::to_json).collect::<Vec<_>>(),
        })
    }
}
