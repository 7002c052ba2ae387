//! What is said of the linear folds: one [`FoldInfo`] per fold (its kind, its operator, what it
//! took in, parameters before → after, how its check went), and every BatchNormalization that
//! stays in the model, with the reason ([`Stay`]).

use std::collections::{HashMap, HashSet};

use crate::constant::Constants;
use crate::linear::{Kind, LinearPlan};
use crate::plan::Analysis;
use crate::verify::Deviation;

/// A linear fold as people read it.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldInfo {
    /// Module path or the operator's name.
    pub name: String,
    /// `linear` (scales after a Gemm or MatMul), `bn→linear` and `bn→conv` (before it; `scale→…`
    /// where no BatchNormalization is among them), `convtranspose` (scales after one), `heads`
    /// (linear heads on one input, summed).
    pub kind: String,
    /// The operator written: `Gemm`, `MatMul` (with its bias `Add`), `Conv`, `ConvTranspose`.
    pub op: String,
    pub in_features: usize,
    pub out_features: usize,
    /// Linear operators summed into one (1 but for `heads`).
    pub heads: usize,
    /// The per-feature operators folded in, in graph order (`BatchNormalization`, `Mul`, …).
    pub folded: Vec<String>,
    /// Elements of the constants the fold replaces, and of the fused weight and bias.
    pub params_before: u64,
    pub params_after: u64,
    /// For float16/bfloat16 weights: the largest change rounding made, relative to the largest
    /// weight.
    pub rounding_error: Option<f64>,
    /// How far the fused operator is from the original, when verified.
    pub deviation: Option<Deviation>,
}

/// A BatchNormalization left in the model, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stay {
    /// The node's name (its output's where it has none).
    pub node: String,
    pub reason: String,
}

const SCALES: [&str; 5] = ["BatchNormalization", "Mul", "Div", "Add", "Sub"];

/// Describes a fold from its plan and the graph (no tensor data).
pub fn describe(index: &Constants, plan: &LinearPlan) -> FoldInfo {
    let heads: HashSet<&str> = plan
        .heads
        .iter()
        .flat_map(|h| index.node(h.node).output.first().map(String::as_str))
        .collect();
    let mut taken: Vec<usize> = plan.removed.iter().chain(&plan.pushed).copied().collect();
    taken.sort_unstable();
    taken.dedup();
    // The scales among what goes: not views, not the sum of the heads.
    let folded = taken.iter().map(|&n| index.node(n)).filter(|node| {
        let sum = plan.heads.len() > 1
            && node.op_type() == "Add"
            && node.input.iter().all(|v| heads.contains(v.as_str()));
        SCALES.contains(&node.op_type()) && !sum
    });
    let folded: Vec<String> = folded.map(|node| node.op_type().to_string()).collect();
    let has_bn = folded.iter().any(|op| op == "BatchNormalization");
    let before = if has_bn { "bn" } else { "scale" };
    let kind = match plan.kind {
        _ if plan.heads.len() > 1 => "heads".to_string(),
        Kind::ConvTranspose { .. } => "convtranspose".into(),
        Kind::Conv { .. } => format!("{before}→conv"),
        _ if !plan.pushed.is_empty() => format!("{before}→linear"),
        _ => "linear".into(),
    };
    let constants = |n: usize| -> u64 {
        let inputs = index.node(n).input.iter().filter(|v| !v.is_empty());
        inputs
            .filter(|v| index.constant(v).is_some())
            .filter_map(|v| index.tensor_dims(v))
            .map(|dims| dims.iter().map(|&d| d.max(0) as u64).product::<u64>())
            .sum()
    };
    let counted = taken
        .iter()
        .copied()
        .filter(|&n| SCALES.contains(&index.node(n).op_type()));
    let params_before = plan.heads.iter().map(|h| constants(h.node)).sum::<u64>()
        + counted.map(constants).sum::<u64>();
    let weights: usize = plan.weight_dims.iter().product();
    let (out_features, in_features) = plan.features();
    FoldInfo {
        name: plan.name.clone(),
        kind,
        op: plan.op().to_string(),
        in_features,
        out_features,
        heads: plan.heads.len(),
        folded,
        params_before,
        params_after: (weights + plan.has_bias() as usize * out_features) as u64,
        rounding_error: None,
        deviation: None,
    }
}

/// BatchNormalization nodes the linear folds take in, each once.
pub fn bn_folded(analysis: &Analysis) -> usize {
    let bns = analysis.linear.plans.iter().flat_map(|p| &p.bns);
    bns.collect::<HashSet<_>>().len()
}

/// Every BatchNormalization left in the model, in graph order, with the reason: that of the
/// block it belongs to where one was not fused, else what stopped every fold beside it.
pub fn stays(index: &Constants, analysis: &Analysis) -> Vec<Stay> {
    let mut in_block: HashMap<usize, String> = HashMap::new();
    for s in &analysis.skipped {
        for n in s.block.nodes() {
            in_block
                .entry(n)
                .or_insert_with(|| format!("in block '{}', not fused: {}", s.name, s.reason));
        }
    }
    analysis
        .linear
        .stays
        .iter()
        .map(|(n, reason)| {
            let node = index.node(*n);
            let name = match node.name() {
                "" => node.output.first().cloned().unwrap_or_default(),
                name => name.to_string(),
            };
            Stay {
                node: name,
                reason: in_block.get(n).cloned().unwrap_or_else(|| reason.clone()),
            }
        })
        .collect()
}

impl FoldInfo {
    /// The fold as JSON (the documented `"folds"` item of `fuse --json` and `inspect --json`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "kind": self.kind,
            "op": self.op,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "heads": self.heads,
            "folded": self.folded,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "rounding_error": self.rounding_error,
            "deviation": self.deviation.map(|d| serde_json::json!({"abs": d.abs, "rel": d.rel})),
        })
    }
}

impl Stay {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"node": self.node, "reason": self.reason})
    }
}
