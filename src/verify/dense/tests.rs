//! Every operator against tract on small seeded models built with the crate's own protobuf
//! types (one tract run per model, every output compared), then errors: what the evaluator
//! must refuse, with the node named, and never a panic.

use std::collections::HashMap;

use prost::Message;

use super::*;
use crate::onnx::attr::{new_float, new_int, new_ints, new_string};
use crate::onnx::proto::{
    AttributeProto, GraphProto, ModelProto, OperatorSetIdProto, TensorProto, ValueInfoProto,
};

/// Largest difference from tract, over the largest absolute value tract computes (tract runs in
/// f32 on the same f32 values; the evaluator in f64).
const TOLERANCE: f64 = 1e-6;

/// tract's Erf is Abramowitz & Stegun 7.1.28 evaluated in f32 (`1 − (1 + Σ aᵢxⁱ)^−16`, error
/// 3e-7 by the formula, about 1e-6 once rounded): the evaluator's Erf is exact to f64 (see
/// `erf_matches_known_values`), so it is compared with tract's within this.
const TRACT_ERF_TOLERANCE: f64 = 3e-6;

/// A small model under construction: its graph, the values the evaluator is given (the graph's
/// inputs) and its constants (the initializers), each as tract sees it (rounded to f32).
struct Case {
    graph: GraphProto,
    opset: i64,
    state: u64,
    given: HashMap<String, Tensor>,
    constants: HashMap<String, Tensor>,
    producers: HashMap<String, usize>,
}

impl Graph for Case {
    fn producer(&self, value: &str) -> Option<&NodeProto> {
        self.producers.get(value).map(|&i| &self.graph.node[i])
    }

    fn constant(&self, value: &str) -> Option<Tensor> {
        self.constants.get(value).cloned()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    new_ints(name, values.iter().copied())
}

impl Case {
    fn new(opset: i64) -> Case {
        Case {
            graph: GraphProto {
                name: Some("dense".into()),
                ..Default::default()
            },
            opset,
            state: 0x9e37_79b9_7f4a_7c15 ^ opset as u64,
            given: HashMap::new(),
            constants: HashMap::new(),
            producers: HashMap::new(),
        }
    }

    /// Seeded values in `[lo, hi)`, rounded to f32.
    fn random(&mut self, shape: &[usize], lo: f64, hi: f64) -> Tensor {
        Tensor::from_shape_fn(IxDyn(shape), |_| {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let unit = (self.state >> 11) as f64 / (1u64 << 53) as f64;
            (lo + (hi - lo) * unit) as f32 as f64
        })
    }

    /// A graph input of `shape`, random in `[lo, hi)`.
    fn input_in(&mut self, shape: &[usize], lo: f64, hi: f64) -> String {
        let name = format!("x{}", self.graph.input.len());
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        self.graph
            .input
            .push(crate::onnx::info::tensor(&name, 1, &dims));
        let values = self.random(shape, lo, hi);
        self.given.insert(name.clone(), values);
        name
    }

    fn input(&mut self, shape: &[usize]) -> String {
        self.input_in(shape, -1.0, 1.0)
    }

    /// A float initializer of `shape`, random in `[lo, hi)`.
    fn weight_in(&mut self, shape: &[usize], lo: f64, hi: f64) -> String {
        let name = format!("w{}", self.graph.initializer.len());
        let values = self.random(shape, lo, hi);
        self.graph.initializer.push(TensorProto {
            name: Some(name.clone()),
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type: Some(1),
            float_data: values.iter().map(|&v| v as f32).collect(),
            ..Default::default()
        });
        self.constants.insert(name.clone(), values);
        name
    }

    fn weight(&mut self, shape: &[usize]) -> String {
        self.weight_in(shape, -1.0, 1.0)
    }

    /// A 1-D int64 initializer.
    fn ints(&mut self, values: &[i64]) -> String {
        let name = format!("w{}", self.graph.initializer.len());
        self.graph.initializer.push(TensorProto {
            name: Some(name.clone()),
            dims: vec![values.len() as i64],
            data_type: Some(7),
            int64_data: values.to_vec(),
            ..Default::default()
        });
        let floats = values.iter().map(|&v| v as f64).collect();
        let tensor = Tensor::from_shape_vec(IxDyn(&[values.len()]), floats).unwrap();
        self.constants.insert(name.clone(), tensor);
        name
    }

    /// A node of `op` on `inputs`; its output's name.
    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = format!("y{}", self.graph.node.len());
        self.producers.insert(out.clone(), self.graph.node.len());
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: Some(format!("{op}_{}", self.graph.node.len())),
            op_type: Some(op.into()),
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    fn evaluate(&self, value: &str) -> Result<Tensor, String> {
        evaluate(self, &self.given, value)
    }

    /// The model with `outputs` as its outputs, serialized.
    fn model(&self, outputs: &[&str]) -> Vec<u8> {
        let mut graph = self.graph.clone();
        graph.output = outputs
            .iter()
            .map(|o| ValueInfoProto {
                name: Some(o.to_string()),
                ..Default::default()
            })
            .collect();
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(self.opset),
            }],
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Runs the model in tract and compares each of `outputs` with the evaluator's.
    fn check(&self, outputs: &[&str]) {
        self.check_within(outputs, TOLERANCE)
    }

    /// [`Self::check`] within `tolerance`.
    fn check_within(&self, outputs: &[&str], tolerance: f64) {
        let given: Vec<&Tensor> = self
            .graph
            .input
            .iter()
            .map(|i| &self.given[i.name()])
            .collect();
        let want = tract::run(&self.model(outputs), &given);
        for (name, (shape, want)) in outputs.iter().zip(want) {
            let node = &self.graph.node[self.producers[*name]];
            let what = format!("{} '{}'", node.op_type(), node.name());
            let got = self
                .evaluate(name)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(got.shape(), shape.as_slice(), "{what}: shape");
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
            let (at, diff) = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .enumerate()
                .fold((0, 0.0f64), |m, (i, d)| if d > m.1 { (i, d) } else { m });
            assert!(
                diff / scale <= tolerance,
                "{what}: element {at} differs by {diff:.3e} ({:.3e} relative): {} vs tract {}",
                diff / scale,
                got.iter().nth(at).unwrap(),
                want[at]
            );
        }
    }
}

/// tract, kept in its own module: its prelude has a `Tensor` of its own.
mod tract {
    use tract_onnx::prelude::*;

    /// Each output's shape and values, the model run in tract on `inputs` (as f32).
    pub(super) fn run(model: &[u8], inputs: &[&super::Tensor]) -> Vec<(Vec<usize>, Vec<f64>)> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut &model[..])
            .unwrap_or_else(|e| panic!("tract load: {e:?}"));
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .unwrap_or_else(|e| panic!("tract plan: {e:?}"));
        let inputs: TVec<TValue> = inputs
            .iter()
            .map(|t| {
                let values: Vec<f32> = t.iter().map(|&v| v as f32).collect();
                let array = tract_ndarray::ArrayD::from_shape_vec(t.shape(), values).unwrap();
                array.into_tvalue()
            })
            .collect();
        let outputs = plan
            .run(inputs)
            .unwrap_or_else(|e| panic!("tract run: {e:?}"));
        outputs
            .iter()
            .map(|t| {
                let t = t.cast_to::<f64>().unwrap();
                let view = t.to_plain_array_view::<f64>().unwrap();
                (view.shape().to_vec(), view.iter().copied().collect())
            })
            .collect()
    }
}

#[test]
fn broadcasting_follows_numpy() {
    let mut c = Case::new(17);
    let a = c.input(&[2, 3, 4]);
    let b = c.input(&[4]);
    let add = c.node("Add", &[&a, &b], vec![]);
    let (p, q) = (c.input(&[2, 1, 4]), c.input(&[3, 1]));
    let sub = c.node("Sub", &[&p, &q], vec![]);
    let (s, m) = (c.input(&[]), c.input(&[2, 3]));
    let mul = c.node("Mul", &[&s, &m], vec![]);
    let (n, d) = (c.input(&[1, 3, 1]), c.input_in(&[2, 1, 5], 0.5, 1.5));
    let div = c.node("Div", &[&n, &d], vec![]);
    let k = c.weight(&[3, 1]);
    let constant_first = c.node("Sub", &[&k, &a], vec![]);
    let (u, v) = (c.input(&[3, 1]), c.input(&[1, 4]));
    let sum = c.node("Sum", &[&u, &v, &b], vec![]);
    let neg = c.node("Neg", &[&sum], vec![]);
    c.check(&[&add, &sub, &mul, &div, &constant_first, &sum, &neg]);
}

#[test]
fn unary_operators() {
    let mut c = Case::new(17);
    let x = c.input_in(&[2, 3, 7], -5.0, 5.0);
    let outs: Vec<String> = ["Relu", "Sigmoid", "HardSwish", "Identity", "Neg"]
        .iter()
        .map(|op| c.node(op, &[&x], vec![]))
        .collect();
    c.check(&outs.iter().map(String::as_str).collect::<Vec<_>>());
    let erf = c.node("Erf", &[&x], vec![]);
    c.check_within(&[&erf], TRACT_ERF_TOLERANCE);
}

#[test]
fn erf_matches_known_values() {
    // erf to 16 digits (Wolfram Alpha), and its odd symmetry and limits.
    for (x, want) in [
        (0.1, 0.1124629160182849),
        (0.5, 0.5204998778130465),
        (1.0, 0.8427007929497149),
        (2.0, 0.9953222650189527),
        (3.0, 0.9999779095030014),
        (5.0, 0.9999999999984626),
    ] {
        let got = elementwise::erf(x);
        assert!((got - want).abs() < 1e-15, "erf({x}) = {got}, not {want}");
        assert_eq!(elementwise::erf(-x), -got);
    }
    assert_eq!(elementwise::erf(0.0), 0.0);
    assert_eq!(elementwise::erf(40.0), 1.0);
    assert!(elementwise::erf(f64::NAN).is_nan());
}

#[test]
fn batch_normalization_of_any_rank() {
    let mut c = Case::new(17);
    let mut outs = Vec::new();
    for shape in [&[3, 4][..], &[2, 4, 5], &[1, 4, 3, 2, 2]] {
        let x = c.input(shape);
        let scale = c.weight_in(&[4], 0.5, 1.5);
        let bias = c.weight(&[4]);
        let mean = c.weight(&[4]);
        let var = c.weight_in(&[4], 0.5, 2.0);
        let attrs = vec![new_float("epsilon", 1e-3)];
        outs.push(c.node(
            "BatchNormalization",
            &[&x, &scale, &bias, &mean, &var],
            attrs,
        ));
    }
    c.check(&outs.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn gemm_every_transposition_alpha_beta_and_c() {
    let (m, k, n) = (3, 5, 4);
    let mut c = Case::new(17);
    let mut outs = Vec::new();
    let c_shapes: [Option<&[usize]>; 6] = [
        None,
        Some(&[1, 4]),
        Some(&[4]),
        Some(&[3, 4]),
        Some(&[3, 1]),
        Some(&[]),
    ];
    for (i, (ta, tb)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
        let a = c.input(&if ta == 1 { [k, m] } else { [m, k] });
        let b = c.weight(&if tb == 1 { [n, k] } else { [k, n] });
        for (j, shape) in c_shapes.iter().enumerate() {
            let mut inputs = vec![a.clone(), b.clone()];
            if let Some(shape) = shape {
                inputs.push(c.weight(shape));
            }
            let mut attrs = vec![new_int("transA", ta), new_int("transB", tb)];
            if (i + j) % 2 == 1 {
                attrs.extend([new_float("alpha", 0.5), new_float("beta", -2.0)]);
            }
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            outs.push(c.node("Gemm", &refs, attrs));
        }
    }
    c.check(&outs.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn matmul_batches_and_vectors() {
    let mut c = Case::new(17);
    let mut outs = Vec::new();
    for (a, b) in [
        (&[3, 4][..], &[4, 2][..]),
        (&[2, 1, 3, 4], &[5, 4, 6]),
        (&[4], &[2, 4, 6]),
        (&[2, 3, 4], &[4]),
        (&[1, 2, 3, 4], &[2, 1, 4, 3]),
    ] {
        let x = c.input(a);
        let w = c.weight(b);
        outs.push(c.node("MatMul", &[&x, &w], vec![]));
    }
    c.check(&outs.iter().map(String::as_str).collect::<Vec<_>>());
    // Two vectors (tract refuses them): their dot product, a scalar.
    let (x, w) = (c.input(&[4]), c.weight(&[4]));
    let dot = c.node("MatMul", &[&x, &w], vec![]);
    let want: f64 = c.given[&x]
        .iter()
        .zip(&c.constants[&w])
        .map(|(a, b)| a * b)
        .sum();
    let got = c.evaluate(&dot).unwrap();
    assert_eq!(got.shape(), &[] as &[usize]);
    assert!((got.sum() - want).abs() < 1e-15);
}

#[test]
fn conv_of_every_rank_grouped_strided_dilated_and_padded() {
    let mut c = Case::new(17);
    let mut outs = Vec::new();
    // 1-D: stride, dilation, asymmetric pads, bias, batch of 2.
    let x = c.input(&[2, 3, 11]);
    let (w, b) = (c.weight(&[4, 3, 3]), c.weight(&[4]));
    let attrs = vec![
        ints("strides", &[2]),
        ints("dilations", &[2]),
        ints("pads", &[1, 2]),
    ];
    outs.push(c.node("Conv", &[&x, &w, &b], attrs));
    // 2-D grouped, per-axis strides and dilations, four different pads.
    let x = c.input(&[1, 4, 7, 6]);
    let (w, b) = (c.weight(&[6, 2, 3, 2]), c.weight(&[6]));
    let attrs = vec![
        new_int("group", 2),
        ints("kernel_shape", &[3, 2]),
        ints("strides", &[2, 1]),
        ints("dilations", &[1, 2]),
        ints("pads", &[0, 1, 2, 1]),
    ];
    outs.push(c.node("Conv", &[&x, &w, &b], attrs));
    // Depthwise.
    let x = c.input(&[1, 3, 5, 5]);
    let w = c.weight(&[3, 1, 3, 3]);
    let attrs = vec![new_int("group", 3), ints("pads", &[1, 1, 1, 1])];
    outs.push(c.node("Conv", &[&x, &w], attrs));
    // 3-D.
    let x = c.input(&[1, 2, 4, 5, 3]);
    let w = c.weight(&[2, 2, 2, 3, 2]);
    let attrs = vec![
        ints("strides", &[1, 2, 1]),
        ints("pads", &[1, 0, 1, 0, 1, 1]),
    ];
    outs.push(c.node("Conv", &[&x, &w], attrs));
    // auto_pad: an even kernel with stride 2 splits its padding unevenly.
    let x = c.input(&[1, 2, 7, 6]);
    let w = c.weight(&[3, 2, 4, 3]);
    for pad in ["SAME_UPPER", "SAME_LOWER", "VALID"] {
        let attrs = vec![new_string("auto_pad", pad), ints("strides", &[2, 2])];
        outs.push(c.node("Conv", &[&x, &w], attrs));
    }
    c.check(&outs.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn conv_transpose_with_output_padding() {
    let mut c = Case::new(17);
    let mut outs = Vec::new();
    let x = c.input(&[1, 2, 5]);
    let (w, b) = (c.weight(&[2, 3, 3]), c.weight(&[3]));
    let attrs = vec![
        ints("strides", &[2]),
        ints("pads", &[1, 0]),
        ints("output_padding", &[1]),
    ];
    outs.push(c.node("ConvTranspose", &[&x, &w, &b], attrs));
    // Grouped, per-axis strides and dilations, four different pads.
    let x = c.input(&[2, 4, 3, 4]);
    let (w, b) = (c.weight(&[4, 2, 3, 2]), c.weight(&[4]));
    let attrs = vec![
        new_int("group", 2),
        ints("strides", &[2, 3]),
        ints("dilations", &[2, 1]),
        ints("pads", &[1, 0, 0, 2]),
        ints("output_padding", &[1, 2]),
    ];
    outs.push(c.node("ConvTranspose", &[&x, &w, &b], attrs));
    // 3-D, VALID.
    let x = c.input(&[1, 2, 2, 3, 2]);
    let w = c.weight(&[2, 1, 2, 2, 3]);
    let attrs = vec![ints("strides", &[2, 1, 2]), new_string("auto_pad", "VALID")];
    outs.push(c.node("ConvTranspose", &[&x, &w], attrs));
    c.check(&outs.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn reshape_flatten_transpose() {
    let mut c = Case::new(17);
    let x = c.input(&[2, 3, 4]);
    let mut outs = Vec::new();
    for shape in [&[0, -1][..], &[-1, 2, 0], &[4, 6], &[24]] {
        let s = c.ints(shape);
        outs.push(c.node("Reshape", &[&x, &s], vec![]));
    }
    // The shape computed: Concat(Shape(x)[:1], [-1]).
    let head = c.node("Shape", &[&x], vec![new_int("end", 1)]);
    let rest = c.ints(&[-1]);
    let shape = c.node("Concat", &[&head, &rest], vec![new_int("axis", 0)]);
    outs.push(c.node("Reshape", &[&x, &shape], vec![]));
    let y = c.input(&[2, 3, 4, 5]);
    for axis in [-1, -3, 0, 2, 4] {
        outs.push(c.node("Flatten", &[&y], vec![new_int("axis", axis)]));
    }
    outs.push(c.node("Transpose", &[&y], vec![]));
    outs.push(c.node("Transpose", &[&y], vec![ints("perm", &[0, 2, 3, 1])]));
    outs.push(c.node("Transpose", &[&x], vec![ints("perm", &[1, 2, 0])]));
    c.check(&outs.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn squeeze_and_unsqueeze_axes_as_attribute_or_input() {
    // Before opset 13: attributes.
    let mut c = Case::new(11);
    let x = c.input(&[2, 1, 3, 1]);
    let squeezed = c.node("Squeeze", &[&x], vec![ints("axes", &[1, -1])]);
    let unsqueezed = c.node("Unsqueeze", &[&squeezed], vec![ints("axes", &[0, 3])]);
    c.check(&[&squeezed, &unsqueezed]);
    // No axes: every axis of size 1 (tract wants the attribute before opset 13).
    let all = c.node("Squeeze", &[&x], vec![]);
    assert_eq!(c.evaluate(&all).unwrap().shape(), &[2, 3]);
    // From opset 13: inputs.
    let mut c = Case::new(13);
    let x = c.input(&[2, 1, 3, 1]);
    let axes = c.ints(&[-1]);
    let squeezed = c.node("Squeeze", &[&x, &axes], vec![]);
    let all = c.node("Squeeze", &[&x], vec![]);
    let axes = c.ints(&[-1, 1]);
    let unsqueezed = c.node("Unsqueeze", &[&all, &axes], vec![]);
    c.check(&[&squeezed, &all, &unsqueezed]);
}

#[test]
fn reduce_mean_and_global_average_pool() {
    // Before opset 18: axes as an attribute.
    let mut c = Case::new(17);
    let x = c.input(&[2, 3, 4, 5]);
    let kept = c.node("ReduceMean", &[&x], vec![ints("axes", &[1, -1])]);
    let dropped = c.node(
        "ReduceMean",
        &[&x],
        vec![ints("axes", &[-1, 1]), new_int("keepdims", 0)],
    );
    let all = c.node("ReduceMean", &[&x], vec![new_int("keepdims", 0)]);
    let global = c.node("GlobalAveragePool", &[&x], vec![]);
    let x3 = c.input(&[2, 3, 7]);
    let global3 = c.node("GlobalAveragePool", &[&x3], vec![]);
    c.check(&[&kept, &dropped, &all, &global, &global3]);
    // From opset 18: axes as input 1.
    let mut c = Case::new(18);
    let x = c.input(&[2, 3, 4, 5]);
    let axes = c.ints(&[2, 0]);
    let dropped = c.node("ReduceMean", &[&x, &axes], vec![new_int("keepdims", 0)]);
    let kept = c.node("ReduceMean", &[&x, &axes], vec![]);
    c.check(&[&dropped, &kept]);
    let noop = c.node(
        "ReduceMean",
        &[&x],
        vec![new_int("noop_with_empty_axes", 1)],
    );
    assert_eq!(c.evaluate(&noop).unwrap(), c.given[&x]);
}

#[test]
fn average_pool_with_and_without_padding_counted() {
    let mut c = Case::new(17);
    let mut outs = Vec::new();
    let x = c.input(&[2, 3, 6, 5]);
    for include in [0, 1] {
        let attrs = vec![
            ints("kernel_shape", &[3, 2]),
            ints("strides", &[2, 1]),
            ints("pads", &[1, 0, 1, 1]),
            new_int("count_include_pad", include),
        ];
        outs.push(c.node("AveragePool", &[&x], attrs));
    }
    let x1 = c.input(&[1, 2, 7]);
    let attrs = vec![ints("kernel_shape", &[3]), ints("pads", &[1, 1])];
    outs.push(c.node("AveragePool", &[&x1], attrs));
    let x3 = c.input(&[1, 2, 4, 4, 5]);
    let attrs = vec![
        ints("kernel_shape", &[2, 2, 2]),
        ints("strides", &[2, 2, 2]),
    ];
    outs.push(c.node("AveragePool", &[&x3], attrs));
    let attrs = vec![
        ints("kernel_shape", &[3, 3]),
        ints("strides", &[2, 2]),
        new_string("auto_pad", "SAME_UPPER"),
    ];
    outs.push(c.node("AveragePool", &[&x], attrs));
    c.check(&outs.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn shape_slices_and_concat() {
    let mut c = Case::new(15);
    let x = c.input(&[2, 3, 4, 5]);
    let middle = c.node(
        "Shape",
        &[&x],
        vec![new_int("start", 1), new_int("end", -1)],
    );
    let tail = c.node("Shape", &[&x], vec![new_int("start", -2)]);
    let whole = c.node("Shape", &[&x], vec![]);
    let (a, b, d) = (
        c.input(&[2, 3, 1]),
        c.input(&[2, 3, 4]),
        c.weight(&[2, 3, 2]),
    );
    let last = c.node("Concat", &[&a, &b, &d], vec![new_int("axis", -1)]);
    let e = c.input(&[1, 3, 4]);
    let first = c.node("Concat", &[&b, &e], vec![new_int("axis", 0)]);
    c.check(&[&middle, &tail, &whole, &last, &first]);
}

/// The error of evaluating the single node `op` on inputs of `shapes` with `attrs`.
fn error_of(op: &str, shapes: &[&[usize]], attrs: Vec<AttributeProto>) -> String {
    let mut c = Case::new(17);
    let inputs: Vec<String> = shapes.iter().map(|s| c.input(s)).collect();
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let y = c.node(op, &refs, attrs);
    let e = c.evaluate(&y).expect_err("the node should be refused");
    assert!(e.contains(&format!("{op} '{op}_0'")), "{e}");
    e
}

#[test]
fn refuses_what_it_cannot_evaluate_naming_the_node() {
    assert!(error_of("LayerNormalization", &[&[2, 3]], vec![]).contains("not evaluated"));
    assert!(error_of("Add", &[&[2, 3], &[4]], vec![]).contains("do not broadcast"));
    assert!(error_of("MatMul", &[&[2, 3], &[4, 2]], vec![]).contains("inner dims"));
    assert!(error_of("Gemm", &[&[2, 3, 1], &[3, 2]], vec![]).contains("not a matrix"));
    let e = error_of("Conv", &[&[1, 4, 5, 5], &[2, 3, 3, 3]], vec![]);
    assert!(e.contains("do not fit"), "{e}");
    let e = error_of(
        "Conv",
        &[&[1, 3, 5], &[2, 3, 3]],
        vec![ints("pads", &[-1, 0])],
    );
    assert!(e.contains("out of range"), "{e}");
    let e = error_of("Conv", &[&[1, 3, 5], &[2, 3, 7]], vec![]);
    assert!(e.contains("over the padded input"), "{e}");
    let e = error_of(
        "ConvTranspose",
        &[&[1, 3, 5], &[3, 2, 3]],
        vec![ints("output_shape", &[9])],
    );
    assert!(e.contains("output_shape"), "{e}");
    let attrs = vec![ints("kernel_shape", &[2]), new_int("ceil_mode", 1)];
    assert!(error_of("AveragePool", &[&[1, 3, 5]], attrs).contains("ceil_mode"));
    let e = error_of("Transpose", &[&[2, 3]], vec![ints("perm", &[0, 0])]);
    assert!(e.contains("repeated"), "{e}");
    assert!(error_of("Flatten", &[&[2, 3]], vec![new_int("axis", 3)]).contains("out of range"));
    assert!(error_of("Concat", &[&[2, 3], &[2, 4]], vec![new_int("axis", 0)]).contains("concat"));
    let e = error_of("Squeeze", &[&[2, 3]], vec![ints("axes", &[1])]);
    assert!(e.contains("is not 1"), "{e}");
    let e = error_of(
        "BatchNormalization",
        &[&[1, 3], &[3], &[3], &[2], &[3]],
        vec![],
    );
    assert!(e.contains("mean of shape [2]"), "{e}");
}

#[test]
fn reshape_refusals_and_allowzero() {
    let mut c = Case::new(17);
    let x = c.input(&[2, 3]);
    let empty = c.input(&[0, 3]);
    let reshape = |c: &mut Case, x: &str, shape: &[i64], allowzero: i64| {
        let s = c.ints(shape);
        let y = c.node("Reshape", &[x, &s], vec![new_int("allowzero", allowzero)]);
        c.evaluate(&y)
    };
    let e = reshape(&mut c, &x, &[-1, -1], 0).unwrap_err();
    assert!(e.contains("two -1"), "{e}");
    let e = reshape(&mut c, &x, &[4, -1], 0).unwrap_err();
    assert!(e.contains("cannot hold"), "{e}");
    let e = reshape(&mut c, &x, &[0, 6], 1).unwrap_err();
    assert!(e.contains("do not fill"), "{e}");
    let e = reshape(&mut c, &x, &[0, -1], 1).unwrap_err();
    assert!(e.contains("both 0 and -1"), "{e}");
    // allowzero=1 keeps a literal 0; allowzero=0 copies the input's dim.
    let y = reshape(&mut c, &empty, &[3, 0], 1).unwrap();
    assert_eq!(y.shape(), &[3, 0]);
    let y = reshape(&mut c, &empty, &[0, 3, 1], 0).unwrap();
    assert_eq!(y.shape(), &[0, 3, 1]);
    let y = reshape(&mut c, &x, &[1, 0, 2], 0).unwrap();
    assert_eq!(y.shape(), &[1, 3, 2]);
}

#[test]
fn refuses_oversized_tensors_and_work() {
    let mut c = Case::new(17);
    let (a, b) = (c.input(&[4096, 1]), c.input(&[1, 4096]));
    let y = c.node("Add", &[&a, &b], vec![]);
    let e = c.evaluate(&y).unwrap_err();
    assert!(e.contains("Add 'Add_0'") && e.contains("elements"), "{e}");
    // 2^29 multiply-adds into a result of 2^19 elements.
    let mut c = Case::new(17);
    c.given
        .insert("a".into(), Tensor::zeros(IxDyn(&[512, 1024])));
    c.given
        .insert("b".into(), Tensor::zeros(IxDyn(&[1024, 1024])));
    let y = c.node("MatMul", &["a", "b"], vec![]);
    let e = c.evaluate(&y).unwrap_err();
    assert!(e.contains("multiply-adds"), "{e}");
    // A hostile Reshape, and a constant over the limit.
    let mut c = Case::new(17);
    let x = c.input(&[2]);
    let s = c.ints(&[1 << 40, 0, 1 << 40]);
    let y = c.node("Reshape", &[&x, &s], vec![new_int("allowzero", 1)]);
    assert!(c.evaluate(&y).unwrap_err().contains("elements"));
    // Empty, but with dims whose product is huge.
    let dims = [0, 1 << 20, 1 << 20];
    c.constants
        .insert("huge".into(), Tensor::zeros(IxDyn(&dims)));
    let y = c.node("Relu", &["huge"], vec![]);
    assert!(c.evaluate(&y).unwrap_err().contains("'huge'"));
}

#[test]
fn follows_the_graph_without_recursion_and_refuses_cycles() {
    // A chain longer than any recursion would allow, evaluated once per node.
    let mut c = Case::new(17);
    let mut v = c.input(&[2]);
    for _ in 0..3000 {
        v = c.node("Neg", &[&v], vec![]);
    }
    assert_eq!(c.evaluate(&v).unwrap(), c.given["x0"]);
    for _ in 0..MAX_NODES {
        v = c.node("Relu", &[&v], vec![]);
    }
    assert!(c.evaluate(&v).unwrap_err().contains("more than"));
    // A diamond: one value read twice, and two values from one evaluator.
    let mut c = Case::new(17);
    let x = c.input(&[3]);
    let a = c.node("Sigmoid", &[&x], vec![]);
    let b = c.node("Add", &[&a, &a], vec![]);
    let d = c.node("Mul", &[&b, &a], vec![]);
    let mut evaluator = Evaluator::new(&c, &c.given);
    let (d_value, a_value) = (evaluator.value(&d).unwrap(), evaluator.value(&a).unwrap());
    assert_eq!(d_value, a_value.mapv(|v| 2.0 * v * v));
    // A cycle, a value nothing computes, another domain, a second output.
    let mut c = Case::new(17);
    let x = c.input(&[3]);
    let a = c.node("Add", &[&x, "y1"], vec![]);
    let b = c.node("Relu", &[&a], vec![]);
    assert_eq!(b, "y1");
    assert!(c.evaluate(&b).unwrap_err().contains("cycle"));
    let y = c.node("Relu", &["nowhere"], vec![]);
    assert!(c.evaluate(&y).unwrap_err().contains("'nowhere'"));
    // An operator it does not run is refused before its inputs are looked for.
    let y = c.node("LayerNormalization", &["nowhere"], vec![]);
    let e = c.evaluate(&y).unwrap_err();
    assert!(e.contains("LayerNormalization 'LayerNormalization_"), "{e}");
    let y = c.node("Relu", &[&x], vec![]);
    c.graph.node.last_mut().unwrap().domain = Some("com.microsoft".into());
    assert!(c.evaluate(&y).unwrap_err().contains("domain"));
    let y = c.node("BatchNormalization", &[&x], vec![]);
    c.graph
        .node
        .last_mut()
        .unwrap()
        .output
        .insert(0, "first".into());
    assert!(c.evaluate(&y).unwrap_err().contains("output 1"));
}

/// Seeded random nodes of every operator, with hostile shapes and attributes: each must be
/// evaluated or refused, never panic.
#[test]
fn never_panics_on_hostile_nodes() {
    const INTS: &[i64] = &[-3, -2, -1, 0, 1, 2, 3, 1 << 40, i64::MIN, i64::MAX];
    const NAMES: &[&str] = &[
        "axis",
        "axes",
        "perm",
        "pads",
        "strides",
        "dilations",
        "group",
        "kernel_shape",
        "output_padding",
        "transA",
        "transB",
        "keepdims",
        "allowzero",
        "start",
        "end",
        "count_include_pad",
        "noop_with_empty_axes",
        "ceil_mode",
        "value_ints",
    ];
    let mut c = Case::new(17);
    let mut pick = |n: usize| {
        c.state ^= c.state << 13;
        c.state ^= c.state >> 7;
        c.state ^= c.state << 17;
        (c.state % n as u64) as usize
    };
    let mut cases = Vec::new();
    for _ in 0..600 {
        let op = OPERATORS[pick(OPERATORS.len())];
        let inputs: Vec<Vec<usize>> = (0..pick(6))
            .map(|_| (0..pick(5)).map(|_| pick(4)).collect())
            .collect();
        let mut attrs = Vec::new();
        for _ in 0..pick(4) {
            let name = NAMES[pick(NAMES.len())];
            let values: Vec<i64> = (0..pick(7)).map(|_| INTS[pick(INTS.len())]).collect();
            attrs.push(if pick(2) == 0 {
                new_int(name, values.first().copied().unwrap_or(0))
            } else {
                ints(name, &values)
            });
        }
        if pick(4) == 0 {
            let pads = ["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET", "bogus"];
            attrs.push(new_string("auto_pad", pads[pick(pads.len())]));
        }
        cases.push((op, inputs, attrs));
    }
    for (op, shapes, attrs) in cases {
        let mut c = Case::new(17);
        let names: Vec<String> = shapes.iter().map(|s| c.input(s)).collect();
        // Integer-valued inputs too, for shapes and axes.
        if let Some(first) = names.get(1) {
            let t = c.given[first].mapv(|v| (v * 3.0).round());
            c.given.insert(first.clone(), t);
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let y = c.node(op, &refs, attrs);
        let _ = c.evaluate(&y);
    }
}

/// A seeded integer in `lo..=hi`.
fn uniform(c: &mut Case, lo: i64, hi: i64) -> i64 {
    let unit = c.random(&[], 0.0, 1.0).sum();
    (lo + ((hi - lo + 1) as f64 * unit) as i64).min(hi)
}

/// A random window geometry of `rank` axes: kernel, strides, dilations and pads (or an
/// `auto_pad`), with the input size each axis needs for the kernel to fit.
fn random_window(c: &mut Case, rank: usize, dilated: bool) -> (Vec<usize>, Vec<AttributeProto>) {
    let kernel: Vec<i64> = (0..rank).map(|_| uniform(c, 1, 3)).collect();
    let strides: Vec<i64> = (0..rank).map(|_| uniform(c, 1, 3)).collect();
    let dilations: Vec<i64> = (0..rank)
        .map(|_| if dilated { uniform(c, 1, 2) } else { 1 })
        .collect();
    // Pads below the kernel: no pooling window lies wholly in the padding.
    let pads: Vec<i64> = (0..2 * rank)
        .map(|a| uniform(c, 0, (kernel[a % rank] - 1).min(2)))
        .collect();
    let spatial: Vec<usize> = (0..rank)
        .map(|a| {
            let extent = (kernel[a] - 1) * dilations[a] + 1;
            uniform(c, extent, extent + 4) as usize
        })
        .collect();
    let mut attrs = vec![
        ints("kernel_shape", &kernel),
        ints("strides", &strides),
        ints("dilations", &dilations),
    ];
    match uniform(c, 0, 5) {
        0 => attrs.push(new_string("auto_pad", "SAME_UPPER")),
        1 => attrs.push(new_string("auto_pad", "SAME_LOWER")),
        2 => attrs.push(new_string("auto_pad", "VALID")),
        _ => attrs.push(ints("pads", &pads)),
    }
    (spatial, attrs)
}

#[test]
fn random_geometries_agree_with_tract() {
    let mut c = Case::new(17);
    let mut outs = Vec::new();
    for i in 0..90 {
        let rank = 1 + i % 3;
        let (group, n) = (
            uniform(&mut c, 1, 3) as usize,
            uniform(&mut c, 1, 2) as usize,
        );
        let (per_in, per_out) = (
            uniform(&mut c, 1, 2) as usize,
            uniform(&mut c, 1, 2) as usize,
        );
        let (channels, outputs) = (group * per_in, group * per_out);
        match i / 3 % 3 {
            0 => {
                let (spatial, mut attrs) = random_window(&mut c, rank, true);
                attrs.push(new_int("group", group as i64));
                let x = c.input(&[&[n, channels][..], &spatial].concat());
                let kernel = kernel_of(&attrs);
                let w = c.weight(&[&[outputs, per_in][..], &kernel].concat());
                let mut inputs = vec![x, w];
                if i % 2 == 0 {
                    inputs.push(c.weight(&[outputs]));
                }
                let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                outs.push(c.node("Conv", &refs, attrs));
            }
            1 => {
                let (spatial, mut attrs) = random_window(&mut c, rank, true);
                // Explicit pads only (see `conv_transpose`), output padding below the stride.
                attrs.retain(|a| a.name() != "auto_pad");
                let (strides, kernel) = (ints_of(&attrs, "strides"), kernel_of(&attrs));
                let padding: Vec<i64> =
                    strides.iter().map(|&s| uniform(&mut c, 0, s - 1)).collect();
                attrs.push(ints("output_padding", &padding));
                attrs.push(new_int("group", group as i64));
                let x = c.input(&[&[n, channels][..], &spatial].concat());
                let w = c.weight(&[&[channels, per_out][..], &kernel].concat());
                let mut inputs = vec![x, w];
                if i % 2 == 0 {
                    inputs.push(c.weight(&[outputs]));
                }
                let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                outs.push(c.node("ConvTranspose", &refs, attrs));
            }
            _ => {
                let (spatial, mut attrs) = random_window(&mut c, rank, false);
                attrs.retain(|a| a.name() != "dilations");
                attrs.push(new_int("count_include_pad", i as i64 % 2));
                let x = c.input(&[&[n, channels][..], &spatial].concat());
                outs.push(c.node("AveragePool", &[&x], attrs));
            }
        }
    }
    c.check(&outs.iter().map(String::as_str).collect::<Vec<_>>());
}

fn ints_of(attrs: &[AttributeProto], name: &str) -> Vec<i64> {
    let found = attrs.iter().find(|a| a.name() == name);
    found.map(|a| a.ints.clone()).unwrap_or_default()
}

fn kernel_of(attrs: &[AttributeProto]) -> Vec<usize> {
    let kernel = ints_of(attrs, "kernel_shape");
    kernel.iter().map(|&k| k as usize).collect()
}

#[test]
fn constant_nodes() {
    let mut c = Case::new(17);
    let x = c.input(&[2, 3]);
    let tensor = crate::tensor::new_tensor(
        "k",
        &Tensor::from_shape_vec(IxDyn(&[3]), vec![0.5, -1.0, 2.0]).unwrap(),
        crate::tensor::FloatType::F32,
    );
    let k = c.node(
        "Constant",
        &[],
        vec![crate::onnx::attr::new_tensor("value", tensor)],
    );
    let sum = c.node("Add", &[&x, &k], vec![]);
    let shape = TensorProto {
        dims: vec![2],
        data_type: Some(7),
        int64_data: vec![3, -1],
        ..Default::default()
    };
    let s = c.node(
        "Constant",
        &[],
        vec![crate::onnx::attr::new_tensor("value", shape)],
    );
    let reshaped = c.node("Reshape", &[&x, &s], vec![]);
    c.check(&[&sum, &reshaped]);
    let v = c.node("Constant", &[], vec![ints("value_ints", &[4, 5])]);
    assert_eq!(
        c.evaluate(&v).unwrap().into_raw_vec_and_offset().0,
        [4.0, 5.0]
    );
    let v = c.node("Constant", &[], vec![new_float("value_float", 0.25)]);
    assert_eq!(c.evaluate(&v).unwrap().shape(), &[] as &[usize]);
    let v = c.node("Constant", &[], vec![new_string("value_string", "no")]);
    assert!(c.evaluate(&v).unwrap_err().contains("value_string"));
}
