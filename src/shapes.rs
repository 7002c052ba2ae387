//! Static shapes of a graph's values for one stated input size, for counting FLOPs: the graph
//! inputs' declared numbers (batch 1, spatial axes as stated), propagated through the operators
//! whose output shape follows from their inputs — Conv and pooling, global pooling, element-wise
//! and broadcasting operators, Flatten, Gemm, Concat. Without a stated size, declared shapes
//! (value_info) are used where propagation does not reach. What stays unknown is `None`.

use std::collections::HashMap;

use crate::constant::broadcast_shape as broadcast;
use crate::geometry::Window;
use crate::graph::GraphIndex;
use crate::onnx::attr;
use crate::onnx::proto::{NodeProto, tensor_shape_proto, type_proto};

/// Operators whose output has the shape of their first input.
const SAME_SHAPE: &[&str] = &[
    "Abs",
    "BatchNormalization",
    "Cast",
    "Celu",
    "Clip",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "Gelu",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "InstanceNormalization",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "LRN",
    "Mish",
    "Neg",
    "PRelu",
    "Relu",
    "Selu",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Softsign",
    "Sqrt",
    "Tanh",
    "ThresholdedRelu",
];

/// Operators whose output is the broadcast of their inputs.
const BROADCAST: &[&str] = &[
    "Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean",
];

/// The shapes found.
#[derive(Debug, Clone, Default)]
pub struct Shapes {
    known: HashMap<String, Vec<usize>>,
    /// The shape of the first graph input, as used.
    pub input: Option<Vec<usize>>,
}

impl Shapes {
    /// Propagates shapes from the graph inputs; `spatial` states their spatial sizes (every axis
    /// after the channels), overriding what the model declares.
    pub fn infer(index: &GraphIndex, spatial: Option<&[usize]>) -> Shapes {
        let model = index.model;
        let mut shapes = Shapes::default();
        for input in &model.inputs {
            if index.declared_constant(input.name()).is_some() {
                continue;
            }
            if let Some(shape) = input_shape(input, spatial) {
                shapes.input.get_or_insert_with(|| shape.clone());
                shapes.known.insert(input.name().to_string(), shape);
            }
        }
        // Nodes are stored in topological order; a second pass catches graphs that are not.
        for _ in 0..2 {
            for node in &model.nodes {
                let Some(out) = node.output.first().filter(|o| !o.is_empty()) else {
                    continue;
                };
                if shapes.known.contains_key(out) {
                    continue;
                }
                let shape = shapes
                    .propagate(index, node)
                    .or_else(|| spatial.is_none().then(|| index.static_shape(out)).flatten());
                if let Some(shape) = shape {
                    shapes.known.insert(out.clone(), shape);
                }
            }
        }
        shapes
    }

    /// The shape of `value`, when known.
    pub fn get(&self, index: &GraphIndex, value: &str) -> Option<Vec<usize>> {
        match self.known.get(value) {
            Some(s) => Some(s.clone()),
            None => index
                .declared_tensor(value)
                .and_then(|t| t.dims.iter().map(|&d| usize::try_from(d).ok()).collect()),
        }
    }

    fn propagate(&self, index: &GraphIndex, node: &NodeProto) -> Option<Vec<usize>> {
        let op = node.op_type();
        let input = |i: usize| self.get(index, node.input.get(i)?);
        match op {
            _ if SAME_SHAPE.contains(&op) => input(0),
            _ if BROADCAST.contains(&op) => {
                let all: Option<Vec<Vec<usize>>> = (0..node.input.len()).map(input).collect();
                all?.into_iter()
                    .try_fold(Vec::new(), |a, b| broadcast(&a, &b))
            }
            "Conv" => {
                let x = input(0)?;
                let w = input(1)?;
                let mut out = window(node, &x, Some(w.get(2..)?))?;
                out[1] = w[0];
                Some(out)
            }
            "MaxPool" | "AveragePool" | "LpPool" => window(node, &input(0)?, None),
            "GlobalAveragePool" | "GlobalMaxPool" => {
                let x = input(0)?;
                Some(
                    x.iter()
                        .enumerate()
                        .map(|(a, &d)| if a < 2 { d } else { 1 })
                        .collect(),
                )
            }
            "Flatten" => {
                let x = input(0)?;
                let axis = attr::int(node, "axis").unwrap_or(1);
                let axis = if axis < 0 {
                    x.len() as i64 + axis
                } else {
                    axis
                };
                let axis = usize::try_from(axis).ok().filter(|&a| a <= x.len())?;
                let product = |d: &[usize]| d.iter().try_fold(1usize, |p, &v| p.checked_mul(v));
                Some(vec![product(&x[..axis])?, product(&x[axis..])?])
            }
            "Gemm" => {
                let (a, b) = (input(0)?, input(1)?);
                let trans = |name| attr::int(node, name).unwrap_or(0) != 0;
                let rows = if trans("transA") {
                    a.get(1)?
                } else {
                    a.first()?
                };
                let cols = if trans("transB") {
                    b.first()?
                } else {
                    b.get(1)?
                };
                Some(vec![*rows, *cols])
            }
            "Concat" => {
                let all: Vec<Vec<usize>> =
                    (0..node.input.len()).map(input).collect::<Option<_>>()?;
                let first = all.first()?.clone();
                let axis = attr::int(node, "axis")?;
                let axis = if axis < 0 {
                    first.len() as i64 + axis
                } else {
                    axis
                };
                let axis = usize::try_from(axis).ok().filter(|&a| a < first.len())?;
                let mut out = first;
                out[axis] = all
                    .iter()
                    .try_fold(0usize, |sum, s| sum.checked_add(*s.get(axis)?))?;
                Some(out)
            }
            _ => None,
        }
    }
}

/// A graph input's shape: batch 1 when symbolic, spatial axes from `spatial` when stated.
fn input_shape(
    input: &crate::onnx::proto::ValueInfoProto,
    spatial: Option<&[usize]>,
) -> Option<Vec<usize>> {
    let type_proto::Value::TensorType(t) = input.r#type.as_ref()?.value.as_ref()? else {
        return None;
    };
    let dims = &t.shape.as_ref()?.dim;
    let declared = |a: usize| match dims[a].value {
        Some(tensor_shape_proto::dimension::Value::DimValue(v)) => usize::try_from(v).ok(),
        _ => None,
    };
    (0..dims.len())
        .map(|a| match (a, spatial) {
            (0, _) => Some(declared(0).unwrap_or(1)),
            (1, _) => declared(1),
            (_, Some(s)) => s.get(a - 2).or(s.last()).copied(),
            (_, None) => declared(a),
        })
        .collect()
}

/// The output shape of a sliding window (Conv with a weight of spatial extent `kernel`, or
/// pooling) over `x`.
fn window(node: &NodeProto, x: &[usize], kernel: Option<&[usize]>) -> Option<Vec<usize>> {
    let window = Window::of(node, kernel).ok()?;
    let mut out = x.get(..2)?.to_vec();
    out.extend(window.output_size(x.get(2..)?)?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast(&[1, 8, 4, 4], &[8, 1, 1]), Some(vec![1, 8, 4, 4]));
        assert_eq!(broadcast(&[], &[3]), Some(vec![3]));
        assert_eq!(broadcast(&[2, 3], &[4, 3]), None);
    }
}
