//! Structurally valid models with hostile details: a RepVGG-style block (Conv branches with or
//! without BatchNormalization, an AveragePool branch, an identity, per-channel operations after
//! the sum) whose geometry, attributes, statistics and tensors are chosen by the fuzzer —
//! kernel sizes (zero included), pads (asymmetric, negative, huge), strides, dilations, groups,
//! channel counts, zero/negative/NaN/infinite variance and epsilon, dims that disagree with the
//! data, missing or dangling inputs, attributes of the wrong type, float16/bfloat16/float64 and
//! non-float weights. Built as a ModelProto with prost, encoded, and fused.
//!
//! Invariants: nothing panics (errors are fine), and a successful fusion is idempotent.

#![no_main]

use arbitrary::Arbitrary;
use half::{bf16, f16};
use libfuzzer_sys::fuzz_target;
use onnx_repvgg::onnx::attr;
use onnx_repvgg::onnx::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, tensor_shape_proto, type_proto,
};
use onnx_repvgg::{Options, fuse_model, inspect_model};
use prost::Message;

// ---------------------------------------------------------------------------------------------
// What the fuzzer chooses.

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Num {
    Small(u8),
    Negative(u8),
    Medium(u16),
    Huge(u8),
}

impl Num {
    fn value(self) -> i64 {
        match self {
            Num::Small(v) => (v % 10) as i64,
            Num::Negative(v) => -((v % 4) as i64) - 1,
            Num::Medium(v) => v as i64,
            Num::Huge(v) => [
                i32::MAX as i64,
                1 << 31,
                1 << 32,
                1 << 40,
                1 << 62,
                i64::MAX,
                i64::MIN,
                i64::MAX / 2 + 1,
            ][v as usize % 8],
        }
    }
}

/// An INTS attribute.
#[derive(Arbitrary, Debug, Clone)]
enum Ints {
    Absent,
    /// One value per spatial axis (the right length).
    Fill(Num),
    /// Any list.
    List(Vec<Num>),
    Empty,
    /// An INT where INTS belongs.
    WrongType(Num),
}

/// Conv/AveragePool pads.
#[derive(Arbitrary, Debug, Clone)]
enum Pads {
    Absent,
    /// `same` padding for the kernel, as a correct export writes it.
    Natural,
    Symmetric(Num),
    /// `[begin…, end…]`, one value per entry.
    Asymmetric(Vec<Num>),
    /// The natural pads with one entry changed.
    Nudged(u8, Num),
    Empty,
    WrongType(Num),
}

/// An INT attribute.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Int {
    Absent,
    Value(Num),
    /// group = input channels (depthwise).
    Depthwise,
    /// A FLOAT where INT belongs.
    WrongType(Num),
    /// The right type code, the value in the wrong field.
    WrongField(Num),
}

#[derive(Arbitrary, Debug, Clone)]
enum AutoPad {
    NotSet,
    Valid,
    SameUpper,
    SameLower,
    Garbage(String),
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum DType {
    F32,
    F16,
    Bf16,
    F64,
    Other(i8),
}

impl DType {
    fn code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::F16 => 10,
            DType::Bf16 => 16,
            DType::F64 => 11,
            DType::Other(c) => c as i32,
        }
    }
}

/// How a constant reaches the node that reads it.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Source {
    Initializer,
    ConstantNode,
    /// An initializer through an Identity node.
    Identity,
    /// An initializer of another shape through Reshape.
    Reshape,
    /// A graph input: not a constant.
    GraphInput,
    /// An initializer that is also a graph input (overridable).
    OverridableInput,
    /// The input slot is empty.
    Missing,
    /// A name nothing produces.
    Dangling,
    /// Produced at run time from x.
    Computed,
}

/// How a tensor's values are stored.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Storage {
    Raw,
    Typed,
    /// Both raw_data and the typed field.
    Both,
    /// No data at all.
    Empty,
    /// An external-data reference (the in-memory API has no directory to read it from).
    External,
}

#[derive(Arbitrary, Debug, Clone)]
enum Dims {
    Natural,
    DropLast,
    AddOne(u8),
    /// The natural dims with one entry changed.
    Nudged(u8, Num),
    Custom(Vec<Num>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Special {
    NaN,
    Inf,
    NegInf,
    Zero,
    NegZero,
    MinusOne,
    Huge,
    Subnormal,
    Raw(f32),
}

impl Special {
    fn value(self) -> f64 {
        match self {
            Special::NaN => f64::NAN,
            Special::Inf => f64::INFINITY,
            Special::NegInf => f64::NEG_INFINITY,
            Special::Zero => 0.0,
            Special::NegZero => -0.0,
            Special::MinusOne => -1.0,
            Special::Huge => 6.0e4,
            Special::Subnormal => 1e-40,
            Special::Raw(v) => v as f64,
        }
    }
}

/// A constant tensor operand.
#[derive(Arbitrary, Debug, Clone)]
struct Param {
    source: Source,
    storage: Storage,
    dims: Dims,
    dtype: Option<DType>,
    /// Values replaced at some positions.
    special: Vec<(u8, Special)>,
    /// Every value the same special (e.g. a zero variance).
    all: Option<Special>,
}

/// The shape of a per-channel operand of Mul/Add/Sub/Div.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum ChannelShape {
    Vector,
    /// `[1, C, 1, …]`.
    Broadcast,
    /// `[C, 1, …]`.
    Trailing,
    Scalar,
    /// A value per spatial position: not per channel.
    Spatial,
}

#[derive(Arbitrary, Debug, Clone)]
enum Epsilon {
    Absent,
    Value(f32),
    Zero,
    Negative,
    NaN,
    Inf,
    WrongType,
}

#[derive(Arbitrary, Debug, Clone)]
struct Bn {
    params: [Param; 4],
    epsilon: Epsilon,
    /// Channels of the statistics (None: right).
    channels: Option<u8>,
    training_mode: Option<i64>,
    is_test: Option<i64>,
    spatial: Option<i64>,
    /// Training-mode outputs (running mean and variance).
    extra_outputs: bool,
    /// Inputs dropped from the end.
    drop_inputs: u8,
}

#[derive(Arbitrary, Debug, Clone)]
enum Reads {
    X,
    /// Relu(x): a branch reading another value.
    Other,
    /// The output of the previous branch: a sequential branch.
    Previous,
    Missing,
    Dangling,
}

#[derive(Arbitrary, Debug, Clone)]
struct ConvBranch {
    /// Output channels (None: as many as input channels).
    out_channels: Option<u8>,
    kernel: [u8; 3],
    pads: Pads,
    strides: Ints,
    dilations: Ints,
    group: Int,
    kernel_shape: Ints,
    auto_pad: Option<AutoPad>,
    weight: Param,
    bias: Option<Param>,
    bn: Option<Bn>,
    reads: Reads,
    /// Not the default domain.
    custom_domain: bool,
    /// Whole weight input missing (only x).
    no_weight: bool,
}

#[derive(Arbitrary, Debug, Clone)]
struct PoolBranch {
    kernel: Ints,
    pads: Pads,
    strides: Ints,
    dilations: Ints,
    count_include_pad: Option<i64>,
    ceil_mode: Option<i64>,
    auto_pad: Option<AutoPad>,
    bn: Option<Bn>,
}

#[derive(Arbitrary, Debug, Clone)]
enum Identity {
    None,
    Raw,
    /// Through an Identity node.
    Node,
    Bn(Bn),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Combine {
    AddChain,
    Sum,
    /// The last summand subtracted.
    SubLast,
}

#[derive(Arbitrary, Debug, Clone)]
enum Post {
    Bn(Bn),
    Mul(Param, ChannelShape),
    Div(Param, ChannelShape),
    Add(Param, ChannelShape),
    Sub(Param, ChannelShape),
    SubFrom(Param, ChannelShape),
    Identity,
    /// The sum also flows to Relu (a second consumer).
    Relu,
}

#[derive(Arbitrary, Debug, Clone)]
enum InputDecl {
    Exact,
    SymbolicBatch,
    NoShape,
    Wrong(Vec<Num>),
    NoType,
}

#[derive(Arbitrary, Debug, Clone)]
struct Case {
    /// Made well-formed before building (see [`well_formed`]). First, so that short inputs
    /// reach it.
    well_formed: bool,
    rank: u8,
    in_channels: u8,
    size: [u8; 3],
    input: InputDecl,
    dtype: DType,
    convs: Vec<ConvBranch>,
    pool: Option<PoolBranch>,
    identity: Identity,
    combine: Combine,
    post: Vec<Post>,
    /// An internal value also exposed as a graph output.
    extra_output: Option<u8>,
    opset: Option<Num>,
    ir_version: Option<u8>,
    seed: u64,
    allow_training_bn: bool,
    skip_verify: bool,
    tolerance: Option<f32>,
}

// ---------------------------------------------------------------------------------------------
// Building the model.

struct Model {
    graph: GraphProto,
    dtype: DType,
    seed: u64,
    next: usize,
    channels: usize,
    rank: usize,
}

fn ints_attr(out: &mut Vec<AttributeProto>, name: &str, spec: &Ints, rank: usize) {
    match spec {
        Ints::Absent => {}
        Ints::Fill(n) => out.push(attr::new_ints(name, vec![n.value(); rank])),
        Ints::List(v) => out.push(attr::new_ints(name, v.iter().take(8).map(|n| n.value()))),
        Ints::Empty => out.push(attr::new_ints(name, vec![])),
        Ints::WrongType(n) => out.push(attr::new_int(name, n.value())),
    }
}

fn pads_attr(out: &mut Vec<AttributeProto>, spec: &Pads, natural: &[i64]) {
    let rank = natural.len();
    let mut both: Vec<i64> = natural.iter().chain(natural).copied().collect();
    match spec {
        Pads::Absent => {}
        Pads::Natural => out.push(attr::new_ints("pads", both)),
        Pads::Symmetric(n) => out.push(attr::new_ints("pads", vec![n.value(); 2 * rank])),
        Pads::Asymmetric(v) => {
            out.push(attr::new_ints("pads", v.iter().take(8).map(|n| n.value())))
        }
        Pads::Nudged(i, n) => {
            if !both.is_empty() {
                let i = *i as usize % both.len();
                both[i] = n.value();
            }
            out.push(attr::new_ints("pads", both));
        }
        Pads::Empty => out.push(attr::new_ints("pads", vec![])),
        Pads::WrongType(n) => out.push(attr::new_int("pads", n.value())),
    }
}

fn int_attr(out: &mut Vec<AttributeProto>, name: &str, spec: Int, channels: usize) {
    match spec {
        Int::Absent => {}
        Int::Value(n) => out.push(attr::new_int(name, n.value())),
        Int::Depthwise => out.push(attr::new_int(name, channels as i64)),
        Int::WrongType(n) => out.push(attr::new_float(name, n.value() as f32)),
        Int::WrongField(n) => out.push(AttributeProto {
            name: Some(name.into()),
            r#type: Some(2),
            ints: vec![n.value()],
            ..Default::default()
        }),
    }
}

fn auto_pad_attr(out: &mut Vec<AttributeProto>, spec: &Option<AutoPad>) {
    let s = match spec {
        None => return,
        Some(AutoPad::NotSet) => "NOTSET",
        Some(AutoPad::Valid) => "VALID",
        Some(AutoPad::SameUpper) => "SAME_UPPER",
        Some(AutoPad::SameLower) => "SAME_LOWER",
        Some(AutoPad::Garbage(s)) => s.as_str(),
    };
    out.push(attr::new_string("auto_pad", s));
}

fn value_info(name: &str, elem: Option<i32>, shape: Option<Vec<Dim>>) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: elem.map(|elem| TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: shape.map(|dims| TensorShapeProto {
                    dim: dims
                        .into_iter()
                        .map(|d| tensor_shape_proto::Dimension {
                            value: Some(match d {
                                Dim::Value(v) => tensor_shape_proto::dimension::Value::DimValue(v),
                                Dim::Param(p) => {
                                    tensor_shape_proto::dimension::Value::DimParam(p.into())
                                }
                            }),
                            denotation: None,
                        })
                        .collect(),
                }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

enum Dim {
    Value(i64),
    Param(&'static str),
}

impl Model {
    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }

    fn values(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                self.seed = self
                    .seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                lo + (hi - lo) * ((self.seed >> 40) as f64 / (1u64 << 24) as f64)
            })
            .collect()
    }

    fn node(
        &mut self,
        op: &str,
        inputs: Vec<String>,
        attrs: Vec<AttributeProto>,
        domain: Option<&str>,
    ) -> String {
        let out = self.fresh("v");
        self.graph.node.push(NodeProto {
            input: inputs,
            output: vec![out.clone()],
            name: Some(format!("{op}_{}", self.graph.node.len())),
            op_type: Some(op.into()),
            domain: domain.map(str::to_string),
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    /// A tensor of `dims` with values in [lo, hi), stored as `p` says.
    fn tensor(&mut self, name: &str, dims: &[usize], lo: f64, hi: f64, p: &Param) -> TensorProto {
        let n: usize = dims.iter().product();
        let mut values = self.values(n, lo, hi);
        if let Some(all) = p.all {
            values.iter_mut().for_each(|v| *v = all.value());
        }
        for &(i, s) in p.special.iter().take(4) {
            if !values.is_empty() {
                let i = i as usize % values.len();
                values[i] = s.value();
            }
        }
        let dtype = p.dtype.unwrap_or(self.dtype);
        let mut declared: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        match &p.dims {
            Dims::Natural => {}
            Dims::DropLast => {
                declared.pop();
            }
            Dims::AddOne(d) => declared.push((*d % 4) as i64),
            Dims::Nudged(i, v) => {
                if !declared.is_empty() {
                    let i = *i as usize % declared.len();
                    declared[i] = v.value();
                }
            }
            Dims::Custom(v) => declared = v.iter().take(6).map(|n| n.value()).collect(),
        }
        let mut t = TensorProto {
            name: Some(name.into()),
            dims: declared,
            data_type: Some(dtype.code()),
            ..Default::default()
        };
        let raw = |t: &mut TensorProto| {
            let bytes: Vec<u8> = match dtype {
                DType::F32 | DType::Other(_) => values
                    .iter()
                    .flat_map(|&v| (v as f32).to_le_bytes())
                    .collect(),
                DType::F16 => values
                    .iter()
                    .flat_map(|&v| f16::from_f64(v).to_le_bytes())
                    .collect(),
                DType::Bf16 => values
                    .iter()
                    .flat_map(|&v| bf16::from_f64(v).to_le_bytes())
                    .collect(),
                DType::F64 => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
            };
            t.raw_data = Some(bytes.into());
        };
        let typed = |t: &mut TensorProto| match dtype {
            DType::F32 => t.float_data = values.iter().map(|&v| v as f32).collect(),
            DType::F64 => t.double_data = values.clone(),
            DType::F16 => {
                t.int32_data = values
                    .iter()
                    .map(|&v| f16::from_f64(v).to_bits() as i32)
                    .collect()
            }
            DType::Bf16 => {
                t.int32_data = values
                    .iter()
                    .map(|&v| bf16::from_f64(v).to_bits() as i32)
                    .collect()
            }
            DType::Other(_) => t.int64_data = values.iter().map(|&v| v as i64).collect(),
        };
        match p.storage {
            Storage::Raw => raw(&mut t),
            Storage::Typed => typed(&mut t),
            Storage::Both => {
                raw(&mut t);
                typed(&mut t);
            }
            Storage::Empty => {}
            Storage::External => {
                t.data_location = Some(1);
                t.external_data = vec![onnx_repvgg::onnx::proto::StringStringEntryProto {
                    key: Some("location".into()),
                    value: Some("weights.bin".into()),
                }];
            }
        }
        t
    }

    /// A constant operand named after `what`, reaching its reader as `p.source` says; returns
    /// the name the reader uses.
    fn param(&mut self, dims: &[usize], lo: f64, hi: f64, p: &Param) -> String {
        let name = self.fresh("c");
        match p.source {
            Source::Initializer => {
                let t = self.tensor(&name, dims, lo, hi, p);
                self.graph.initializer.push(t);
                name
            }
            Source::ConstantNode => {
                let t = self.tensor("value", dims, lo, hi, p);
                self.node(
                    "Constant",
                    vec![],
                    vec![AttributeProto {
                        name: Some("value".into()),
                        r#type: Some(4),
                        t: Some(t),
                        ..Default::default()
                    }],
                    None,
                )
            }
            Source::Identity => {
                let t = self.tensor(&name, dims, lo, hi, p);
                self.graph.initializer.push(t);
                self.node("Identity", vec![name], vec![], None)
            }
            Source::Reshape => {
                let n: usize = dims.iter().product();
                let t = self.tensor(&name, &[n], lo, hi, p);
                self.graph.initializer.push(t);
                let shape = self.fresh("s");
                self.graph.initializer.push(TensorProto {
                    name: Some(shape.clone()),
                    dims: vec![dims.len() as i64],
                    data_type: Some(7),
                    int64_data: dims.iter().map(|&d| d as i64).collect(),
                    ..Default::default()
                });
                self.node("Reshape", vec![name, shape], vec![], None)
            }
            Source::GraphInput => {
                let shape = dims.iter().map(|&d| Dim::Value(d as i64)).collect();
                self.graph.input.push(value_info(
                    &name,
                    Some(p.dtype.unwrap_or(self.dtype).code()),
                    Some(shape),
                ));
                name
            }
            Source::OverridableInput => {
                let t = self.tensor(&name, dims, lo, hi, p);
                self.graph.initializer.push(t);
                let shape = dims.iter().map(|&d| Dim::Value(d as i64)).collect();
                self.graph.input.push(value_info(
                    &name,
                    Some(p.dtype.unwrap_or(self.dtype).code()),
                    Some(shape),
                ));
                name
            }
            Source::Missing => String::new(),
            Source::Dangling => format!("{name}_nowhere"),
            Source::Computed => self.node("Relu", vec!["x".into()], vec![], None),
        }
    }

    fn bn(&mut self, x: String, b: &Bn) -> String {
        let ch = b.channels.map_or(self.channels, |c| c as usize % 10);
        let ranges = [(0.5, 1.5), (-0.3, 0.3), (-0.5, 0.5), (0.5, 2.0)];
        let mut inputs = vec![x];
        for (p, (lo, hi)) in b.params.iter().zip(ranges) {
            inputs.push(self.param(&[ch], lo, hi, p));
        }
        let keep = inputs.len() - (b.drop_inputs as usize % 5);
        inputs.truncate(keep);
        let mut attrs = Vec::new();
        match b.epsilon {
            Epsilon::Absent => {}
            Epsilon::Value(v) => attrs.push(attr::new_float("epsilon", v)),
            Epsilon::Zero => attrs.push(attr::new_float("epsilon", 0.0)),
            Epsilon::Negative => attrs.push(attr::new_float("epsilon", -1e-3)),
            Epsilon::NaN => attrs.push(attr::new_float("epsilon", f32::NAN)),
            Epsilon::Inf => attrs.push(attr::new_float("epsilon", f32::INFINITY)),
            Epsilon::WrongType => attrs.push(attr::new_int("epsilon", 1)),
        }
        if let Some(v) = b.training_mode {
            attrs.push(attr::new_int("training_mode", v));
        }
        if let Some(v) = b.is_test {
            attrs.push(attr::new_int("is_test", v));
        }
        if let Some(v) = b.spatial {
            attrs.push(attr::new_int("spatial", v));
        }
        let out = self.node("BatchNormalization", inputs, attrs, None);
        if b.extra_outputs {
            let (m, v) = (self.fresh("m"), self.fresh("v"));
            self.graph.node.last_mut().unwrap().output.extend([m, v]);
        }
        out
    }

    fn conv(&mut self, x: String, c: &ConvBranch) -> String {
        let rank = self.rank;
        let out = c.out_channels.map_or(self.channels, |o| o as usize % 9);
        let kernel: Vec<usize> = c.kernel[..rank].iter().map(|&k| k as usize % 6).collect();
        let group = match c.group {
            Int::Value(n) => n.value().clamp(1, 9) as usize,
            Int::Depthwise => self.channels,
            _ => 1,
        };
        let mut dims = vec![out, self.channels / group.max(1)];
        dims.extend(&kernel);
        let mut inputs = vec![x];
        if !c.no_weight {
            inputs.push(self.param(&dims, -0.5, 0.5, &c.weight));
            if let Some(b) = &c.bias {
                inputs.push(self.param(&[out], -0.5, 0.5, b));
            }
        }
        let dilation = match c.dilations {
            Ints::Fill(n) => n.value().clamp(1, 4),
            _ => 1,
        };
        let natural: Vec<i64> = kernel
            .iter()
            .map(|&k| dilation * (k as i64 - 1).max(0) / 2)
            .collect();
        let mut attrs = Vec::new();
        pads_attr(&mut attrs, &c.pads, &natural);
        ints_attr(&mut attrs, "strides", &c.strides, rank);
        ints_attr(&mut attrs, "dilations", &c.dilations, rank);
        match &c.kernel_shape {
            Ints::Absent => {}
            Ints::Fill(_) => attrs.push(attr::new_ints(
                "kernel_shape",
                kernel.iter().map(|&k| k as i64),
            )),
            other => ints_attr(&mut attrs, "kernel_shape", other, rank),
        }
        int_attr(&mut attrs, "group", c.group, self.channels);
        auto_pad_attr(&mut attrs, &c.auto_pad);
        let domain = c.custom_domain.then_some("com.example");
        let y = self.node("Conv", inputs, attrs, domain);
        match &c.bn {
            Some(b) => self.bn(y, b),
            None => y,
        }
    }

    fn pool(&mut self, x: String, p: &PoolBranch) -> String {
        let rank = self.rank;
        let mut attrs = Vec::new();
        match &p.kernel {
            Ints::Fill(n) => attrs.push(attr::new_ints(
                "kernel_shape",
                vec![n.value().rem_euclid(5) + 1; rank],
            )),
            other => ints_attr(&mut attrs, "kernel_shape", other, rank),
        }
        let k = match &p.kernel {
            Ints::Fill(n) => n.value().rem_euclid(5) + 1,
            _ => 3,
        };
        pads_attr(&mut attrs, &p.pads, &vec![(k - 1) / 2; rank]);
        ints_attr(&mut attrs, "strides", &p.strides, rank);
        ints_attr(&mut attrs, "dilations", &p.dilations, rank);
        if let Some(v) = p.count_include_pad {
            attrs.push(attr::new_int("count_include_pad", v));
        }
        if let Some(v) = p.ceil_mode {
            attrs.push(attr::new_int("ceil_mode", v));
        }
        auto_pad_attr(&mut attrs, &p.auto_pad);
        let y = self.node("AveragePool", vec![x], attrs, None);
        match &p.bn {
            Some(b) => self.bn(y, b),
            None => y,
        }
    }

    fn channel_param(&mut self, p: &Param, shape: ChannelShape, lo: f64, hi: f64) -> String {
        let c = self.channels;
        let dims: Vec<usize> = match shape {
            ChannelShape::Vector => vec![c],
            ChannelShape::Broadcast => {
                let mut d = vec![1, c];
                d.extend(std::iter::repeat_n(1, self.rank));
                d
            }
            ChannelShape::Trailing => {
                let mut d = vec![c];
                d.extend(std::iter::repeat_n(1, self.rank));
                d
            }
            ChannelShape::Scalar => vec![],
            ChannelShape::Spatial => vec![2; self.rank],
        };
        self.param(&dims, lo, hi, p)
    }
}

/// A valid constant operand: an initializer (raw or typed data) or a `Constant` node, with its
/// natural dims and values.
fn sane_param(p: &mut Param) {
    p.source = match p.source {
        Source::ConstantNode => Source::ConstantNode,
        Source::Identity => Source::Identity,
        _ => Source::Initializer,
    };
    p.storage = match p.storage {
        Storage::Typed => Storage::Typed,
        _ => Storage::Raw,
    };
    p.dims = Dims::Natural;
    p.dtype = None;
    p.special.clear();
    p.all = None;
}

fn sane_bn(b: &mut Bn) {
    b.params.iter_mut().for_each(sane_param);
    b.epsilon = match b.epsilon {
        Epsilon::Value(v) if v.is_finite() && v > 0.0 && v < 1.0 => Epsilon::Value(v),
        _ => Epsilon::Absent,
    };
    b.channels = None;
    b.training_mode = None;
    b.is_test = None;
    b.spatial = None;
    b.extra_outputs = false;
    b.drop_inputs = 0;
}

fn small(n: Num, modulus: i64) -> i64 {
    n.value().rem_euclid(modulus) + 1
}

/// Half of the inputs (`well_formed`) keep their geometry — kernel sizes, dilations, which branches,
/// what follows the sum, element type — but every attribute and tensor is made valid and
/// consistent: blocks that fold, so that the fold, the sum of spread and shifted kernels and the
/// verification see many branches, not only the reasons to skip them.
fn well_formed(case: &Case) -> Case {
    let mut case = case.clone();
    if !matches!(
        case.dtype,
        DType::F32 | DType::F16 | DType::Bf16 | DType::F64
    ) {
        case.dtype = DType::F32;
    }
    case.input = InputDecl::Exact;
    let stride = Num::Small((case.size[2] % 2 + 1) as u8);
    let group = match case.in_channels % 3 {
        0 => Int::Depthwise,
        _ => Int::Absent,
    };
    for c in &mut case.convs {
        c.out_channels = None;
        c.kernel = c.kernel.map(|k| k % 5 + 1);
        let dilation = match &c.dilations {
            Ints::Fill(n) => small(*n, 3),
            _ => 1,
        };
        c.dilations = Ints::Fill(Num::Small(dilation as u8));
        c.pads = Pads::Natural;
        c.strides = Ints::Fill(stride);
        c.group = group;
        c.kernel_shape = Ints::Absent;
        c.auto_pad = None;
        sane_param(&mut c.weight);
        c.bias.iter_mut().for_each(sane_param);
        c.bn.iter_mut().for_each(sane_bn);
        c.reads = Reads::X;
        c.custom_domain = false;
        c.no_weight = false;
    }
    if let Some(p) = &mut case.pool {
        let k = match &p.kernel {
            Ints::Fill(n) => small(*n, 2) * 2 - 1,
            _ => 3,
        };
        p.kernel = Ints::Fill(Num::Small((k - 1) as u8));
        p.pads = Pads::Natural;
        p.strides = Ints::Fill(stride);
        p.dilations = Ints::Absent;
        p.count_include_pad = Some(1);
        p.ceil_mode = None;
        p.auto_pad = None;
        p.bn.iter_mut().for_each(sane_bn);
    }
    match &mut case.identity {
        Identity::Bn(b) => sane_bn(b),
        _ => {}
    }
    for p in &mut case.post {
        match p {
            Post::Bn(b) => sane_bn(b),
            Post::Mul(p, s)
            | Post::Div(p, s)
            | Post::Add(p, s)
            | Post::Sub(p, s)
            | Post::SubFrom(p, s) => {
                sane_param(p);
                if matches!(s, ChannelShape::Spatial) {
                    *s = ChannelShape::Vector;
                }
            }
            Post::Identity | Post::Relu => {}
        }
    }
    case.extra_output = None;
    case.opset = None;
    case.ir_version = None;
    case.skip_verify = false;
    case.tolerance = None;
    case
}

fn build(case: &Case) -> (Vec<u8>, Options) {
    let sanitized;
    let case = if case.well_formed {
        sanitized = well_formed(case);
        &sanitized
    } else {
        case
    };
    let rank = [2, 2, 1, 3][case.rank as usize % 4];
    let channels = case.in_channels as usize % 8 + 1;
    let size: Vec<i64> = case.size[..rank]
        .iter()
        .map(|&s| (s % 9 + 1) as i64)
        .collect();
    let dtype = case.dtype;
    let mut m = Model {
        graph: GraphProto {
            name: Some("fuzz".into()),
            ..Default::default()
        },
        dtype,
        seed: case.seed | 1,
        next: 0,
        channels,
        rank,
    };
    let mut shape: Vec<Dim> = vec![Dim::Value(1), Dim::Value(channels as i64)];
    shape.extend(size.iter().map(|&s| Dim::Value(s)));
    let x = match &case.input {
        InputDecl::Exact => value_info("x", Some(dtype.code()), Some(shape)),
        InputDecl::SymbolicBatch => {
            shape[0] = Dim::Param("N");
            value_info("x", Some(dtype.code()), Some(shape))
        }
        InputDecl::NoShape => value_info("x", Some(dtype.code()), None),
        InputDecl::Wrong(v) => value_info(
            "x",
            Some(dtype.code()),
            Some(v.iter().take(6).map(|n| Dim::Value(n.value())).collect()),
        ),
        InputDecl::NoType => value_info("x", None, None),
    };
    m.graph.input.push(x);

    let mut summands = Vec::new();
    let mut previous = String::from("x");
    for c in case.convs.iter().take(4) {
        let reads = match c.reads {
            Reads::X => "x".to_string(),
            Reads::Other => m.node("Relu", vec!["x".into()], vec![], None),
            Reads::Previous => previous.clone(),
            Reads::Missing => String::new(),
            Reads::Dangling => "nowhere".to_string(),
        };
        let y = m.conv(reads, c);
        previous = y.clone();
        summands.push(y);
    }
    if let Some(p) = &case.pool {
        summands.push(m.pool("x".into(), p));
    }
    match &case.identity {
        Identity::None => {}
        Identity::Raw => summands.push("x".into()),
        Identity::Node => summands.push(m.node("Identity", vec!["x".into()], vec![], None)),
        Identity::Bn(b) => summands.push(m.bn("x".into(), b)),
    }
    let mut sum = match case.combine {
        Combine::Sum if summands.len() > 1 => m.node("Sum", summands.clone(), vec![], None),
        combine => {
            let mut acc = summands.first().cloned().unwrap_or_else(|| "x".into());
            let n = summands.len();
            for (i, s) in summands.iter().enumerate().skip(1) {
                let op = match combine {
                    Combine::SubLast if i == n - 1 => "Sub",
                    _ => "Add",
                };
                acc = m.node(op, vec![acc, s.clone()], vec![], None);
            }
            acc
        }
    };
    let mut extra = Vec::new();
    for p in case.post.iter().take(3) {
        sum = match p {
            Post::Bn(b) => m.bn(sum, b),
            Post::Mul(p, s) => {
                let c = m.channel_param(p, *s, 0.5, 1.5);
                m.node("Mul", vec![sum, c], vec![], None)
            }
            Post::Div(p, s) => {
                let c = m.channel_param(p, *s, 0.5, 1.5);
                m.node("Div", vec![sum, c], vec![], None)
            }
            Post::Add(p, s) => {
                let c = m.channel_param(p, *s, -0.5, 0.5);
                m.node("Add", vec![sum, c], vec![], None)
            }
            Post::Sub(p, s) => {
                let c = m.channel_param(p, *s, -0.5, 0.5);
                m.node("Sub", vec![sum, c], vec![], None)
            }
            Post::SubFrom(p, s) => {
                let c = m.channel_param(p, *s, -0.5, 0.5);
                m.node("Sub", vec![c, sum], vec![], None)
            }
            Post::Identity => m.node("Identity", vec![sum], vec![], None),
            Post::Relu => {
                extra.push(m.node("Relu", vec![sum.clone()], vec![], None));
                sum
            }
        };
    }
    m.graph
        .output
        .push(value_info(&sum, Some(dtype.code()), None));
    for e in extra {
        m.graph
            .output
            .push(value_info(&e, Some(dtype.code()), None));
    }
    if let Some(i) = case.extra_output {
        let outs: Vec<String> = m
            .graph
            .node
            .iter()
            .flat_map(|n| n.output.first().cloned())
            .collect();
        if !outs.is_empty() {
            let name = &outs[i as usize % outs.len()];
            if !m.graph.output.iter().any(|o| o.name() == name) {
                m.graph
                    .output
                    .push(value_info(name, Some(dtype.code()), None));
            }
        }
    }
    let model = ModelProto {
        ir_version: Some(case.ir_version.map_or(8, |v| (v % 12) as i64)),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(case.opset.map_or(17, Num::value)),
        }],
        producer_name: Some("onnx-repvgg fuzz".into()),
        graph: Some(m.graph),
        ..Default::default()
    };
    let options = Options {
        allow_training_bn: case.allow_training_bn,
        verify: !case.skip_verify,
        tolerance: case.tolerance.map(|t| t as f64),
        ..Options::default()
    };
    (model.encode_to_vec(), options)
}

/// `FUSE_STRUCTURED_DUMP=FILE`: also writes the model built from the input to FILE (to turn a
/// crash input into an ONNX file for testdata/fuzz/).
fn dump(bytes: &[u8]) {
    static PATH: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();
    if let Some(path) = PATH.get_or_init(|| std::env::var_os("FUSE_STRUCTURED_DUMP")) {
        std::fs::write(path, bytes).expect("write FUSE_STRUCTURED_DUMP");
    }
}

fuzz_target!(|case: Case| {
    let (bytes, options) = build(&case);
    dump(&bytes);
    let _ = inspect_model(&bytes, options);
    let Ok((deploy, _)) = fuse_model(&bytes, options) else {
        return;
    };
    match fuse_model(&deploy, options) {
        Ok((_, again)) => assert!(
            again.fused.is_empty(),
            "fusing the fused model again fused {} more block(s)",
            again.fused.len()
        ),
        Err(e) => panic!("the fused model does not fuse again: {e}"),
    }
});
