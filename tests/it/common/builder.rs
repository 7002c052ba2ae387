//! Builds small ONNX models by hand (with the crate's generated protobuf types), for graph-shape
//! tests: "this graph becomes that graph". Weights and statistics are deterministic pseudo-random.

use onnx_repvgg::onnx::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    ValueInfoProto,
};
use prost::Message;

/// A model under construction. Values are named `v0`, `v1`, …
pub struct Builder {
    pub graph: GraphProto,
    next: usize,
    seed: u64,
}

pub use onnx_repvgg::onnx::attr::{
    new_float as float, new_int as int, new_ints, new_string as string,
};

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    new_ints(name, v.iter().copied())
}

/// A float32 value of shape `shape`.
pub fn value_info(name: &str, shape: &[i64]) -> ValueInfoProto {
    onnx_repvgg::onnx::info::tensor(name, 1, shape)
}

/// Convolution settings of [`Builder::conv`].
#[derive(Clone, Copy)]
pub struct ConvSpec {
    pub out: usize,
    pub inp: usize,
    pub k: [usize; 2],
    pub pads: [i64; 4],
    pub stride: i64,
    pub group: usize,
    pub bias: bool,
}

impl ConvSpec {
    pub fn k3(inp: usize, out: usize) -> ConvSpec {
        ConvSpec {
            out,
            inp,
            k: [3, 3],
            pads: [1; 4],
            stride: 1,
            group: 1,
            bias: false,
        }
    }
    pub fn k1(inp: usize, out: usize) -> ConvSpec {
        ConvSpec {
            out,
            inp,
            k: [1, 1],
            pads: [0; 4],
            stride: 1,
            group: 1,
            bias: false,
        }
    }
}

impl Builder {
    /// A graph with one float input `x` of `shape`.
    pub fn new(shape: &[i64]) -> Builder {
        let graph = GraphProto {
            name: Some("test".into()),
            input: vec![value_info("x", shape)],
            ..Default::default()
        };
        Builder {
            graph,
            next: 0,
            seed: 1,
        }
    }

    /// Another sequence of pseudo-random weights and statistics.
    pub fn seeded(mut self, seed: u64) -> Builder {
        self.seed = seed.wrapping_mul(2).wrapping_add(1);
        self
    }

    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("v{}", self.next)
    }

    fn values(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.seed = self
                    .seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                lo + (hi - lo) * ((self.seed >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    /// Adds an initializer with random values in [lo, hi).
    pub fn init(&mut self, dims: &[usize], lo: f32, hi: f32) -> String {
        let name = format!("w{}", self.graph.initializer.len());
        let n = dims.iter().product();
        let data = self.values(n, lo, hi);
        self.graph.initializer.push(TensorProto {
            name: Some(name.clone()),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(1),
            float_data: data,
            ..Default::default()
        });
        name
    }

    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh();
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

    pub fn conv(&mut self, x: &str, s: ConvSpec) -> String {
        let w = self.init(&[s.out, s.inp / s.group, s.k[0], s.k[1]], -0.5, 0.5);
        let mut inputs = vec![x.to_string(), w];
        if s.bias {
            inputs.push(self.init(&[s.out], -0.5, 0.5));
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.node(
            "Conv",
            &refs,
            vec![
                ints("kernel_shape", &[s.k[0] as i64, s.k[1] as i64]),
                ints("pads", &s.pads),
                ints("strides", &[s.stride, s.stride]),
                int("group", s.group as i64),
            ],
        )
    }

    /// A Conv with `auto_pad` instead of pads.
    pub fn conv_auto_pad(
        &mut self,
        x: &str,
        inp: usize,
        out: usize,
        k: usize,
        auto_pad: &str,
    ) -> String {
        let w = self.init(&[out, inp, k, k], -0.5, 0.5);
        self.node("Conv", &[x, &w], vec![string("auto_pad", auto_pad)])
    }

    pub fn bn(&mut self, x: &str, ch: usize, epsilon: f32) -> String {
        let scale = self.init(&[ch], 0.5, 1.5);
        let bias = self.init(&[ch], -0.3, 0.3);
        let mean = self.init(&[ch], -0.5, 0.5);
        let var = self.init(&[ch], 0.5, 2.0);
        self.node(
            "BatchNormalization",
            &[x, &scale, &bias, &mean, &var],
            vec![float("epsilon", epsilon)],
        )
    }

    /// A constant initializer with the given values.
    pub fn constant(&mut self, dims: &[usize], values: Vec<f32>) -> String {
        let name = format!("c{}", self.graph.initializer.len());
        self.graph.initializer.push(TensorProto {
            name: Some(name.clone()),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(1),
            float_data: values,
            ..Default::default()
        });
        name
    }

    /// A Conv of any rank: weight `[out, inp/group, k…]`, symmetric pads, given dilation.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_nd(
        &mut self,
        x: &str,
        out: usize,
        inp: usize,
        k: &[usize],
        pad: i64,
        dilation: i64,
        group: usize,
    ) -> String {
        let mut dims = vec![out, inp / group];
        dims.extend(k);
        let w = self.init(&dims, -0.5, 0.5);
        let rank = k.len();
        self.node(
            "Conv",
            &[x, &w],
            vec![
                ints("pads", &vec![pad; 2 * rank]),
                ints("dilations", &vec![dilation; rank]),
                int("group", group as i64),
            ],
        )
    }

    /// A Conv with explicit per-axis pads `[begin…, end…]` and a bias.
    pub fn conv_pads(
        &mut self,
        x: &str,
        out: usize,
        inp: usize,
        k: [usize; 2],
        pads: [i64; 4],
    ) -> String {
        let w = self.init(&[out, inp, k[0], k[1]], -0.5, 0.5);
        let b = self.init(&[out], -0.5, 0.5);
        self.node("Conv", &[x, &w, &b], vec![ints("pads", &pads)])
    }

    pub fn avg_pool(&mut self, x: &str, k: i64, pad: i64, count_include_pad: i64) -> String {
        self.node(
            "AveragePool",
            &[x],
            vec![
                ints("kernel_shape", &[k, k]),
                ints("pads", &[pad; 4]),
                int("count_include_pad", count_include_pad),
            ],
        )
    }

    pub fn output(&mut self, name: &str, shape: &[i64]) {
        self.graph.output.push(value_info(name, shape));
    }

    /// Serializes the model (IR 8, opset 17).
    pub fn build(&self) -> Vec<u8> {
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            producer_name: Some("onnx-repvgg tests".into()),
            graph: Some(self.graph.clone()),
            ..Default::default()
        }
        .encode_to_vec()
    }
}
