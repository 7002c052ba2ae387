//! What the tool tells people and pipelines: one [`BlockInfo`] per block found (fused or not, and
//! why not), and the totals of a fusion.

use std::time::Duration;

use crate::graph::GraphIndex;
use crate::onnx::attr;
use crate::pattern::{Block, Term};

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
    /// A candidate for re-parameterization; `false` for a sum that looks like a block but is
    /// none (its summands read tensors a nonlinearity separates: a residual connection).
    pub candidate: bool,
    /// For float16/bfloat16 weights: the largest change rounding the f64 fold to that type made,
    /// relative to the largest weight.
    pub rounding_error: Option<f64>,
    /// How far the fused Conv is from the original subgraph, when verified.
    pub deviation: Option<crate::verify::Deviation>,
    /// Parameters and FLOPs before → after (`inspect`).
    pub cost: Option<crate::cost::Cost>,
    /// Quantization statistics of the fused kernel (`inspect --int8`).
    pub int8: Option<crate::quant::Int8Stats>,
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

/// Describes `block` from the graph alone (weight dims and attributes; no tensor data).
pub fn describe(index: &GraphIndex, block: &Block, name: String) -> BlockInfo {
    let mut info = BlockInfo {
        name,
        in_channels: 0,
        out_channels: 0,
        stride: Vec::new(),
        groups: 1,
        branches: Vec::new(),
        post: Vec::new(),
        reason: None,
        candidate: true,
        rounding_error: None,
        deviation: None,
        cost: None,
        int8: None,
    };
    if let Some(&conv) = block.convs().first() {
        let node = index.node(conv);
        let dims = weight_dims(index, conv);
        if dims.len() > 2 {
            let groups = attr::int(node, "group").unwrap_or(1).max(1) as usize;
            info.groups = groups;
            info.out_channels = dims[0];
            info.in_channels = dims[1].saturating_mul(groups);
            info.stride = attr::ints(node, "strides")
                .map(|s| s.iter().map(|&v| v.max(0) as usize).collect())
                .unwrap_or_else(|| vec![1; dims.len() - 2]);
        }
    }
    let mut top = &block.term;
    while let Term::Channel { node, inner, .. } = top {
        info.post.insert(0, index.node(*node).op_type().to_string());
        top = inner;
    }
    match top {
        Term::Sum { .. } => summands(index, top, false, &mut info.branches),
        leaf => info.branches.push(branch_label(index, leaf)),
    }
    info
}

fn weight_dims(index: &GraphIndex, conv: usize) -> Vec<usize> {
    index
        .node(conv)
        .input
        .get(1)
        .and_then(|w| index.declared_tensor(w))
        .map(|w| w.dims.iter().map(|&d| d.max(0) as usize).collect())
        .unwrap_or_default()
}

/// Flattens nested sums into one list of summand labels.
fn summands(index: &GraphIndex, term: &Term, negated: bool, out: &mut Vec<String>) {
    match term {
        Term::Sum { terms, .. } => {
            for (neg, t) in terms {
                summands(index, t, negated ^ neg, out);
            }
        }
        other => {
            let label = branch_label(index, other);
            out.push(if negated {
                format!("−{label}")
            } else {
                label
            });
        }
    }
}

/// `3x3`, `1x1`, `7x7 d2`, `avgpool 3x3`, `identity`; a Conv with per-channel ops after it is
/// labelled by its kernel.
fn branch_label(index: &GraphIndex, term: &Term) -> String {
    match term {
        Term::Raw(_) => "identity".into(),
        Term::Conv(n) => {
            let dims = weight_dims(index, *n);
            let kernel = dims.get(2..).unwrap_or(&[]);
            let mut label = if kernel.is_empty() {
                "conv".to_string()
            } else {
                kernel
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join("x")
            };
            if let Some(d) =
                attr::ints(index.node(*n), "dilations").filter(|d| d.iter().any(|&v| v > 1))
            {
                label += &format!(
                    " d{}",
                    d.iter().map(i64::to_string).collect::<Vec<_>>().join("x")
                );
            }
            label
        }
        Term::AvgPool(n) => {
            let k = attr::ints(index.node(*n), "kernel_shape").unwrap_or(&[]);
            format!(
                "avgpool {}",
                k.iter().map(i64::to_string).collect::<Vec<_>>().join("x")
            )
        }
        Term::Channel { inner, .. } => branch_label(index, inner),
        Term::Sum { .. } => {
            let mut inner = Vec::new();
            summands(index, term, false, &mut inner);
            format!("({})", inner.join(" + "))
        }
    }
}

/// The outcome of a fusion.
#[derive(Debug, Clone, Default)]
pub struct FuseReport {
    /// Blocks folded into one Conv each.
    pub fused: Vec<BlockInfo>,
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
    /// The verified block that deviates most, if any was verified.
    pub fn worst(&self) -> Option<&BlockInfo> {
        self.fused
            .iter()
            .filter(|b| b.deviation.is_some())
            .max_by(|a, b| {
                let rel = |x: &BlockInfo| x.deviation.map_or(0.0, |d| d.rel);
                rel(a).total_cmp(&rel(b))
            })
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
            },
            "blocks": self.blocks.iter().map(BlockInfo::to_json).collect::<Vec<_>>(),
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
                "seconds": self.elapsed.as_secs_f64(),
                "worst": self.worst().map(|b| serde_json::json!({
                    "block": b.name,
                    "rel": b.deviation.map(|d| d.rel),
                })),
            },
            "fused": self.fused.iter().map(BlockInfo::to_json).collect::<Vec<_>>(),
            "skipped": self.skipped.iter().map(BlockInfo::to_json).collect::<Vec<_>>(),
            "not_blocks": self.not_blocks.iter().map(BlockInfo::to_json).collect::<Vec<_>>(),
        })
    }
}
