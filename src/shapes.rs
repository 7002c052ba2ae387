//! Static shapes of a graph's values for one stated input size, for counting FLOPs: the graph
//! inputs' declared numbers (batch 1, spatial axes as stated), propagated through the operators
//! whose output shape follows from their inputs — Conv and pooling, global pooling, element-wise
//! and broadcasting operators, Flatten, Gemm, Concat. Without a stated size, declared shapes
//! (value_info) are used where propagation does not reach. What stays unknown is `None`.

use std::collections::HashMap;

use crate::constant::Constants;
use crate::constant::broadcast_shape as broadcast;
use crate::geometry::Window;
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
    pub fn infer(index: &Constants, spatial: Option<&[usize]>) -> Shapes {
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
                if node.op_type() == "Split" {
                    let parts = shapes.split(index, node).unwrap_or_default();
                    for (name, shape) in node.output.iter().zip(parts) {
                        shapes.known.insert(name.clone(), shape);
                    }
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
    pub fn get(&self, index: &Constants, value: &str) -> Option<Vec<usize>> {
        match self.known.get(value) {
            Some(s) => Some(s.clone()),
            None => index
                .tensor_dims(value)
                .and_then(|dims| dims.iter().map(|&d| usize::try_from(d).ok()).collect()),
        }
    }

    /// The integers of a constant 1-D input (a Reshape target, axes), or of a `Shape` node's
    /// output when the shape it reads is known.
    fn ints(&self, index: &Constants, value: &str) -> Option<Vec<i64>> {
        if let Some(t) = index.constant(value) {
            let values = crate::tensor::read_i64(&t, &index.model.external).ok()?;
            return Some(values.iter().copied().collect());
        }
        let node = index.node(index.producer(value)?);
        let input = |i: usize| self.ints(index, node.input.get(i).filter(|v| !v.is_empty())?);
        match node.op_type() {
            "Shape" => {}
            "Cast" | "Identity" | "Squeeze" | "Unsqueeze" => return input(0),
            "Concat" => {
                let parts: Option<Vec<Vec<i64>>> = (0..node.input.len()).map(input).collect();
                return Some(parts?.concat());
            }
            "Gather" if attr::int(node, "axis").unwrap_or(0) == 0 => {
                let data = input(0)?;
                let n = data.len() as i64;
                let indices = input(1)?;
                let picked = indices.iter().map(|&i| {
                    let i = if i < 0 { i + n } else { i };
                    usize::try_from(i).ok().and_then(|i| data.get(i).copied())
                });
                return picked.collect();
            }
            op @ ("Add" | "Sub" | "Mul" | "Div") => {
                let (a, b) = (input(0)?, input(1)?);
                let n = a.len().max(b.len());
                let at = |v: &[i64], i: usize| if v.len() == 1 { v[0] } else { v[i] };
                if (a.len() != n && a.len() != 1) || (b.len() != n && b.len() != 1) {
                    return None;
                }
                return (0..n)
                    .map(|i| {
                        let (x, y) = (at(&a, i), at(&b, i));
                        match op {
                            "Add" => x.checked_add(y),
                            "Sub" => x.checked_sub(y),
                            "Mul" => x.checked_mul(y),
                            _ => x.checked_div(y),
                        }
                    })
                    .collect();
            }
            "Slice" => {
                let data = input(0)?;
                let kept = self.slice(index, node, &[data.len()])?;
                let start = self.ints(index, node.input.get(1)?)?;
                let step = match node.input.get(4) {
                    Some(v) if !v.is_empty() => self.ints(index, v)?,
                    _ => vec![1],
                };
                let n = data.len() as i64;
                let (start, step) = (*start.first()?, *step.first()?);
                let first = if start < 0 { start + n } else { start };
                let first = first.clamp(0, if step > 0 { n } else { n - 1 });
                return (0..kept[0] as i64)
                    .map(|k| data.get(usize::try_from(first + k * step).ok()?).copied())
                    .collect();
            }
            _ => return None,
        }
        let shape = self.get(index, node.input.first()?)?;
        let rank = shape.len() as i64;
        let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
        let start = clamp(attr::int(node, "start").unwrap_or(0));
        let end = clamp(attr::int(node, "end").unwrap_or(rank));
        let dims = shape.get(start..end.max(start))?;
        Some(dims.iter().map(|&d| d as i64).collect())
    }

    /// Axes given as an attribute (older opsets) or as input `slot` (newer ones), made
    /// non-negative for `rank`.
    pub(crate) fn axes(
        &self,
        index: &Constants,
        node: &NodeProto,
        slot: usize,
        rank: usize,
    ) -> Option<Vec<usize>> {
        let axes = match attr::ints(node, "axes") {
            Some(a) => a.to_vec(),
            None => self.ints(index, node.input.get(slot).filter(|v| !v.is_empty())?)?,
        };
        axes.iter()
            .map(|&a| wrap(a, rank).filter(|&a| a < rank))
            .collect()
    }

    /// The shapes of a Split's outputs: sizes from the `split` input or attribute, else equal
    /// parts (the last smaller, as opset 18 allows).
    fn split(&self, index: &Constants, node: &NodeProto) -> Option<Vec<Vec<usize>>> {
        let x = self.get(index, node.input.first()?)?;
        let axis = wrap(attr::int(node, "axis").unwrap_or(0), x.len()).filter(|&a| a < x.len())?;
        let parts = node.output.len();
        let sizes: Vec<usize> = match attr::ints(node, "split") {
            Some(s) => s
                .iter()
                .map(|&v| usize::try_from(v).ok())
                .collect::<Option<_>>()?,
            None => match node.input.get(1).filter(|v| !v.is_empty()) {
                Some(v) => self
                    .ints(index, v)?
                    .iter()
                    .map(|&v| usize::try_from(v).ok())
                    .collect::<Option<_>>()?,
                None => {
                    let each = x[axis].div_ceil(parts.max(1));
                    (0..parts)
                        .map(|i| each.min(x[axis].saturating_sub(i * each)))
                        .collect()
                }
            },
        };
        if sizes.len() != parts || sizes.iter().sum::<usize>() != x[axis] {
            return None;
        }
        let shape = |size: usize| {
            let mut s = x.clone();
            s[axis] = size;
            s
        };
        Some(sizes.into_iter().map(shape).collect())
    }

    /// The shape a Slice of `x` gives: starts, ends, axes and steps as inputs (opset 10 on) or
    /// attributes.
    fn slice(&self, index: &Constants, node: &NodeProto, x: &[usize]) -> Option<Vec<usize>> {
        let rank = x.len() as i64;
        let list = |slot: usize, name: &str| -> Option<Option<Vec<i64>>> {
            if let Some(a) = attr::ints(node, name) {
                return Some(Some(a.to_vec()));
            }
            match node.input.get(slot).filter(|v| !v.is_empty()) {
                Some(v) => self.ints(index, v).map(Some),
                None => Some(None),
            }
        };
        let starts = list(1, "starts")??;
        let ends = list(2, "ends")??;
        let axes = list(3, "axes")?.unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = list(4, "steps")?.unwrap_or_else(|| vec![1; starts.len()]);
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return None;
        }
        let mut out = x.to_vec();
        for k in 0..starts.len() {
            let a = if axes[k] < 0 { axes[k] + rank } else { axes[k] };
            let a = usize::try_from(a).ok().filter(|&a| a < x.len())?;
            let dim = x[a] as i64;
            let step = steps[k];
            let wrap = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
            let len = match step {
                0 => return None,
                s if s > 0 => {
                    let start = wrap(starts[k]).clamp(0, dim);
                    let end = wrap(ends[k]).clamp(0, dim);
                    ((end - start).max(0) + s - 1) / s
                }
                s => {
                    let start = wrap(starts[k]).clamp(0, dim - 1);
                    let end = wrap(ends[k]).clamp(-1, dim - 1);
                    ((start - end).max(0) - s - 1) / -s
                }
            };
            out[a] = len as usize;
        }
        Some(out)
    }

    fn propagate(&self, index: &Constants, node: &NodeProto) -> Option<Vec<usize>> {
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
                let axis = wrap(axis, x.len()).filter(|&a| a <= x.len())?;
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
            "Reshape" => {
                let x = input(0)?;
                let target = self.ints(index, node.input.get(1)?)?;
                reshape(&x, &target, attr::int(node, "allowzero").unwrap_or(0) != 0)
            }
            "Transpose" => {
                let x = input(0)?;
                let perm: Vec<usize> = match attr::ints(node, "perm") {
                    Some(p) => p
                        .iter()
                        .map(|&a| usize::try_from(a).ok())
                        .collect::<Option<_>>()?,
                    None => (0..x.len()).rev().collect(),
                };
                perm.iter().map(|&a| x.get(a).copied()).collect()
            }
            "MatMul" => matmul(&input(0)?, &input(1)?),
            "ReduceMean" | "ReduceSum" => {
                let x = input(0)?;
                let keep = attr::int(node, "keepdims").unwrap_or(1) != 0;
                let axes = match self.axes(index, node, 1, x.len()) {
                    Some(a) => a,
                    None if node.input.get(1).is_none_or(|v| v.is_empty()) => {
                        (0..x.len()).collect()
                    }
                    None => return None,
                };
                let dims = x.iter().enumerate();
                Some(match keep {
                    true => dims
                        .map(|(a, &d)| if axes.contains(&a) { 1 } else { d })
                        .collect(),
                    false => dims
                        .filter(|(a, _)| !axes.contains(a))
                        .map(|(_, &d)| d)
                        .collect(),
                })
            }
            "Squeeze" => {
                let x = input(0)?;
                let axes = self.axes(index, node, 1, x.len());
                let dims = x.iter().enumerate();
                Some(match axes {
                    Some(axes) => dims
                        .filter(|(a, _)| !axes.contains(a))
                        .map(|(_, &d)| d)
                        .collect(),
                    None => dims.filter(|(_, d)| **d != 1).map(|(_, &d)| d).collect(),
                })
            }
            "Unsqueeze" => {
                let x = input(0)?;
                let rank = x.len()
                    + attr::ints(node, "axes").map_or_else(
                        || self.ints(index, node.input.get(1)?).map(|a| a.len()),
                        |a| Some(a.len()),
                    )?;
                let mut axes = self.axes(index, node, 1, rank)?;
                axes.sort_unstable();
                let mut out = x.clone();
                for a in axes {
                    (a <= out.len()).then(|| out.insert(a, 1))?;
                }
                Some(out)
            }
            "ConvTranspose" => {
                let x = input(0)?;
                let w = input(1)?;
                let window = Window::of(node, Some(w.get(2..)?)).ok()?;
                let (begin, end) = window.pads(None).ok()?;
                let extra = attr::ints(node, "output_padding").unwrap_or(&[]);
                let mut out = vec![*x.first()?, w.get(1)?.checked_mul(window.group)?];
                for a in 0..window.rank() {
                    let size = x
                        .get(a + 2)?
                        .checked_sub(1)?
                        .checked_mul(window.strides[a])?;
                    let extent = window.dilations[a].checked_mul(window.kernel[a] - 1)? + 1;
                    let padding = extra.get(a).map_or(0, |&p| p.max(0) as usize);
                    let full = size.checked_add(extent)?.checked_add(padding)?;
                    out.push(full.checked_sub(begin[a] + end[a])?);
                }
                Some(out)
            }
            "Shape" => Some(vec![self.ints(index, node.output.first()?)?.len()]),
            "Slice" => self.slice(index, node, &input(0)?),
            "Gather" => {
                let (x, indices) = (input(0)?, input(1)?);
                let axis = attr::int(node, "axis").unwrap_or(0);
                let axis = wrap(axis, x.len()).filter(|&a| a < x.len())?;
                Some([&x[..axis], &indices, &x[axis + 1..]].concat())
            }
            "Concat" => {
                let all: Vec<Vec<usize>> =
                    (0..node.input.len()).map(input).collect::<Option<_>>()?;
                let first = all.first()?.clone();
                let axis =
                    wrap(attr::int(node, "axis")?, first.len()).filter(|&a| a < first.len())?;
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

/// An axis attribute made non-negative for `rank` (negative ones count from the end); the
/// caller bounds it.
fn wrap(axis: i64, rank: usize) -> Option<usize> {
    usize::try_from(if axis < 0 { axis + rank as i64 } else { axis }).ok()
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

/// The shape `x` takes under a Reshape to `target` (0 copies a dim unless `allowzero`, one -1
/// is inferred), when the element counts agree.
fn reshape(x: &[usize], target: &[i64], allowzero: bool) -> Option<Vec<usize>> {
    let count: usize = x.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (a, &d) in target.iter().enumerate() {
        out.push(match d {
            0 if !allowzero => *x.get(a)?,
            -1 if infer.is_none() => {
                infer = Some(a);
                1
            }
            d => usize::try_from(d).ok()?,
        });
    }
    let known: usize = out.iter().product();
    if let Some(a) = infer {
        out[a] = count.checked_div(known).filter(|q| q * known == count)?;
    }
    (out.iter().product::<usize>() == count).then_some(out)
}

/// The shape of `MatMul(a, b)` (numpy: 1-D operands, batch dims broadcast).
fn matmul(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let (a2, b2): (Vec<usize>, Vec<usize>) = (
        if a.len() == 1 {
            vec![1, a[0]]
        } else {
            a.to_vec()
        },
        if b.len() == 1 {
            vec![b[0], 1]
        } else {
            b.to_vec()
        },
    );
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return None;
    }
    let mut out = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Some(out)
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
    fn reshapes_and_matmuls_follow_onnx() {
        assert_eq!(reshape(&[2, 5, 12], &[10, -1], false), Some(vec![10, 12]));
        assert_eq!(reshape(&[2, 5, 12], &[0, -1], false), Some(vec![2, 60]));
        assert_eq!(reshape(&[2, 5, 12], &[0, 60], true), None);
        assert_eq!(reshape(&[2, 5, 12], &[7, -1], false), None);
        assert_eq!(reshape(&[2, 5, 12], &[-1, -1], false), None);
        assert_eq!(matmul(&[1, 16, 32], &[32, 8]), Some(vec![1, 16, 8]));
        assert_eq!(matmul(&[3, 1, 4, 5], &[2, 5, 6]), Some(vec![3, 2, 4, 6]));
        assert_eq!(matmul(&[5], &[5, 6]), Some(vec![6]));
        assert_eq!(matmul(&[4, 5], &[6, 7]), None);
    }

    /// A model of `nodes` on input `x` of `shape`, with int64 initializers `ints`.
    fn model(shape: &[i64], ints: &[(&str, Vec<i64>)], nodes: Vec<NodeProto>) -> crate::Model {
        use crate::onnx::proto::{GraphProto, ModelProto, OperatorSetIdProto, TensorProto};
        use prost::Message;
        let initializer = ints
            .iter()
            .map(|(name, v)| TensorProto {
                name: Some(name.to_string()),
                dims: vec![v.len() as i64],
                data_type: Some(7),
                int64_data: v.clone(),
                ..Default::default()
            })
            .collect();
        let graph = GraphProto {
            node: nodes,
            input: vec![crate::onnx::info::tensor("x", 1, shape)],
            initializer,
            ..Default::default()
        };
        let model = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(graph),
            ..Default::default()
        };
        let bytes = model.encode_to_vec().into();
        crate::Model::from_bytes(std::path::Path::new("t.onnx"), bytes, None).unwrap()
    }

    fn node(
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attribute: Vec<crate::onnx::proto::AttributeProto>,
    ) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute,
            ..Default::default()
        }
    }

    /// Shapes through what exporters put around attention and reshapes: Split, Slice (negative
    /// and clamped bounds, steps), Gather, and Reshape targets computed from Shape with
    /// arithmetic, Gather, Concat and Unsqueeze.
    #[test]
    fn shapes_follow_slices_splits_and_shape_arithmetic() {
        let nodes = vec![
            node(
                "Split",
                &["x", "sizes"],
                &["a", "b"],
                vec![attr::new_int("axis", 1)],
            ),
            node(
                "Slice",
                &["x", "starts", "ends", "axes", "steps"],
                &["s"],
                vec![],
            ),
            node(
                "Gather",
                &["x", "one"],
                &["g"],
                vec![attr::new_int("axis", 2)],
            ),
            node("Shape", &["x"], &["shape"], vec![]),
            node("Gather", &["shape", "two"], &["h"], vec![]),
            node("Div", &["h", "two"], &["half"], vec![]),
            node("Mul", &["half", "two"], &["whole"], vec![]),
            node(
                "Concat",
                &["one", "whole", "minus"],
                &["target"],
                vec![attr::new_int("axis", 0)],
            ),
            node("Reshape", &["x", "target"], &["r"], vec![]),
        ];
        let ints = [
            ("sizes", vec![2, 4]),
            ("starts", vec![-1, 0]),
            ("ends", vec![-100, 100]),
            ("axes", vec![1, 3]),
            ("steps", vec![-2, 3]),
            ("one", vec![1]),
            ("two", vec![2]),
            ("minus", vec![-1]),
        ];
        let model = model(&[2, 6, 4, 10], &ints, nodes);
        let graph = crate::graph::GraphIndex::new(&model).unwrap();
        let index = Constants::new(&graph);
        let shapes = Shapes::infer(&index, None);
        let shape = |v: &str| shapes.get(&index, v);
        assert_eq!(shape("a"), Some(vec![2, 2, 4, 10]));
        assert_eq!(shape("b"), Some(vec![2, 4, 4, 10]));
        // Axis 1 from 5 down to 0 by 2 (3 values); axis 3 from 0 to 10 by 3 (4 values).
        assert_eq!(shape("s"), Some(vec![2, 3, 4, 4]));
        assert_eq!(shape("g"), Some(vec![2, 6, 1, 10]));
        assert_eq!(shape("r"), Some(vec![1, 4, 120]));
    }

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast(&[1, 8, 4, 4], &[8, 1, 1]), Some(vec![1, 8, 4, 4]));
        assert_eq!(broadcast(&[], &[3]), Some(vec![3]));
        assert_eq!(broadcast(&[2, 3], &[4, 3]), None);
    }
}
