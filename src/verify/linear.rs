//! The check of a linear fold: the values the fold ends at (see [`LinearPlan::ends`]), computed from a random input where
//! it begins, once through the original nodes and once through the patched graph (the fused
//! operator with its weight and bias as written, kept nodes as rewired), both by the dense
//! evaluator — each operator by its ONNX definition, sharing no code with the fold.

use std::collections::HashMap;

use super::dense::{self, Graph, Tensor};
use super::{Deviation, default_tolerance, input, seed};
use crate::constant::Constants;
use crate::fold;
use crate::linear::LinearPlan;
use crate::onnx::proto::NodeProto;
use crate::patch::Patch;
use crate::producer::Produced;
use crate::tensor;

/// The original graph, its BatchNormalization nodes exported in training mode read with
/// inference semantics (as the fold reads them, when that is allowed).
struct Original<'a, 'i, 'm> {
    index: &'a Constants<'i, 'm>,
    inference: HashMap<String, NodeProto>,
}

impl<'a, 'i, 'm> Original<'a, 'i, 'm> {
    fn new(index: &'a Constants<'i, 'm>, plan: &LinearPlan) -> Self {
        let training = plan.bns.iter().filter(|&&n| fold::is_training_bn(index, n));
        let inference = training
            .map(|&n| {
                let mut node = index.node(n).clone();
                node.attribute.retain(|a| a.name() != "training_mode");
                node.output.truncate(1);
                (node.output[0].clone(), node)
            })
            .collect();
        Original { index, inference }
    }
}

impl Graph for Original<'_, '_, '_> {
    fn producer(&self, value: &str) -> Option<&NodeProto> {
        if let Some(node) = self.inference.get(value) {
            return Some(node);
        }
        self.index.producer(value).map(|n| self.index.node(n))
    }

    fn constant(&self, value: &str) -> Option<Tensor> {
        constant(self.index, value)
    }
}

/// A constant as f64: floats as they are, integers (shapes, axes) exactly.
fn constant(index: &Constants, value: &str) -> Option<Tensor> {
    let t = index.constant(value)?;
    let external = &index.model.external;
    match tensor::float_type(&t) {
        Ok(_) => tensor::read_f64(&t, external).ok(),
        Err(_) => tensor::read_i64(&t, external)
            .ok()
            .map(|v| v.mapv(|x| x as f64)),
    }
}

/// The graph as the patch leaves it, with the fold's new tensors.
struct Patched<'a, 'i, 'm> {
    index: &'a Constants<'i, 'm>,
    patch: &'a Patch,
    /// Outputs of the nodes written in place of others.
    written: HashMap<&'a str, &'a NodeProto>,
    new: HashMap<String, Tensor>,
}

impl Graph for Patched<'_, '_, '_> {
    fn producer(&self, value: &str) -> Option<&NodeProto> {
        if let Some(node) = self.written.get(value) {
            return Some(node);
        }
        let n = self.index.producer(value)?;
        let gone = self.patch.removed_nodes.contains(&n) || self.patch.replaced.contains_key(&n);
        (!gone).then(|| self.index.node(n))
    }

    fn constant(&self, value: &str) -> Option<Tensor> {
        match self.new.get(value) {
            Some(t) => Some(t.clone()),
            None => constant(self.index, value),
        }
    }
}

/// Checks fold `plan` as written (`produced`: every row of its weight, and its bias) against
/// the original; an error names the fold.
pub fn check(
    index: &Constants,
    patch: &Patch,
    plan: &LinearPlan,
    produced: &Produced,
    tolerance: Option<f64>,
) -> crate::Result<Deviation> {
    let failure = |reason: String| crate::Error::Verify {
        block: plan.name.clone(),
        reason,
    };
    let x = input::uniform(&plan.source_shape, seed(&plan.name));
    let given = HashMap::from([(plan.source.clone(), x)]);
    let graph = Original::new(index, plan);
    let mut original = dense::Evaluator::new(&graph, &given);
    let want: Vec<Tensor> = (plan.ends.iter())
        .map(|end| original.value(end))
        .collect::<Result<_, _>>()
        .map_err(|e| failure(format!("the original could not be evaluated: {e}")))?;
    let weight = produced.sampled()?;
    if weight.shape() != plan.weight_dims.as_slice() {
        return Err(failure(format!(
            "the weight written has dims {:?}, planned {:?}",
            weight.shape(),
            plan.weight_dims
        )));
    }
    let new = HashMap::from([
        (format!("{}.weight", plan.node_name), weight),
        (format!("{}.bias", plan.node_name), produced.bias()?),
    ]);
    let written = patch
        .replaced
        .values()
        .flatten()
        .flat_map(|node| node.output.iter().map(move |o| (o.as_str(), node)))
        .collect();
    let patched = Patched {
        index,
        patch,
        written,
        new,
    };
    let mut fused = dense::Evaluator::new(&patched, &given);
    let mut got = Vec::with_capacity(want.len());
    for (end, want) in plan.ends.iter().zip(&want) {
        let value = fused
            .value(end)
            .map_err(|e| failure(format!("the fused model could not be evaluated: {e}")))?;
        if want.shape() != value.shape() {
            return Err(failure(format!(
                "the original computes shape {:?} for '{end}', the fused model {:?}",
                want.shape(),
                value.shape()
            )));
        }
        got.push(value);
    }
    let pairs = want
        .iter()
        .zip(&got)
        .flat_map(|(w, g)| w.iter().zip(g.iter()));
    let limit = tolerance.unwrap_or_else(|| default_tolerance(plan.dtype));
    Deviation::between(pairs)
        .within(limit, plan.op())
        .map_err(failure)
}
