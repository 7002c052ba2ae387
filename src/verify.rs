//! Proof by evaluation: every fused block is checked numerically before anything is written.
//! The *original* subgraph is run node by node from the block's input to its output — following
//! the graph's own edges and each operator's ONNX definition (Conv, BatchNormalization, Add, Sub,
//! Sum, Mul, Div, AveragePool, Identity and constant subgraphs) — and compared with the new Conv
//! run on the weights exactly as written. Nothing here uses the fold algebra: the reference is a
//! direct convolution over an index table, in f64.
//!
//! To stay cheap on wide blocks, the comparison covers a seeded sample of output channels (all of
//! them up to [`CHANNELS`]) over every input channel, on a seeded random input just wide enough
//! that every tap meets data at some output and padding at another, as at the kernel's width.

use std::collections::HashMap;

use ndarray::{ArrayD, Axis, IxDyn};

use crate::affine::Layout;
use crate::constant::Constants;
use crate::graph::is_default_domain;
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;
use crate::pattern::Block;
use crate::tensor::{self, FloatType};

/// Output channels compared per block (all of them when there are no more).
pub const CHANNELS: usize = 64;

/// Most input elements, and most (output position, kernel tap) pairs of one operator, a check
/// evaluates: beyond, the block's geometry is out of all proportion (hostile dilations or pads)
/// and the check refuses rather than exhaust memory. (A 31×31 kernel needs 2^20.)
pub const CHECK_ELEMENTS: usize = 1 << 22;

/// Most work one convolution of a check may take, in (output position, tap, input channel)
/// triples times sampled output channels (input channels counted as at least 8: below that the
/// table dominates). Wide blocks sample fewer than [`CHANNELS`] output channels to stay under
/// it; one channel over it is a block out of all proportion, and the check refuses.
pub const CHECK_WORK: usize = 1 << 26;

/// Values of gathered input a convolution of the check holds at a time (2 MB of f64).
const PATCH_VALUES: usize = 1 << 18;

/// Default relative tolerance for weights of element type `ty` (of the largest reference value).
pub fn default_tolerance(ty: FloatType) -> f64 {
    match ty {
        FloatType::F64 => 1e-9,
        FloatType::F32 => 1e-5,
        FloatType::F16 => 1e-2,
        FloatType::Bf16 => 5e-2,
    }
}

/// How far a fused block is from its original subgraph.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deviation {
    /// Largest absolute difference.
    pub abs: f64,
    /// `abs` over the largest absolute reference value.
    pub rel: f64,
}

/// Weight values, decoded or as stored (little-endian `FloatType`, decoded a row at a time as a
/// convolution needs it, so that no decoded copy of many rows is ever made).
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    Decoded(&'a [f64]),
    Stored(&'a [u8], FloatType),
}

impl Values<'_> {
    fn len(&self) -> usize {
        match self {
            Values::Decoded(v) => v.len(),
            Values::Stored(bytes, ty) => bytes.len() / ty.size(),
        }
    }

    /// Values `start..start + len`: borrowed, or decoded into `buffer`.
    #[inline(always)]
    fn get<'b>(&'b self, start: usize, len: usize, buffer: &'b mut Vec<f64>) -> &'b [f64] {
        match *self {
            Values::Decoded(v) => &v[start..start + len],
            Values::Stored(bytes, ty) => {
                buffer.clear();
                let size = ty.size();
                tensor::decode_into(&bytes[start * size..(start + len) * size], ty, buffer);
                buffer
            }
        }
    }
}

/// A convolution weight as the check reads it: its dims `[O, C/group, k…]` and the values of its
/// rows, either every row (`whole`) or just those of the sampled output channels, in order.
#[derive(Debug, Clone, Copy)]
struct Weight<'a> {
    dims: &'a [usize],
    values: Values<'a>,
    whole: bool,
}

/// An activation: `[1, channels, spatial…]`, where `channels` lists which of the tensor's
/// channels are held (`None`: all of them).
#[derive(Debug, Clone)]
struct Act {
    data: ArrayD<f64>,
    channels: Option<Vec<usize>>,
}

/// What the fused Conv of a block must reproduce: the check's input and the original subgraph's
/// output on it, for the sampled output channels. Computed from the original alone, so it can be
/// ready before the fused weights are.
pub struct Expected {
    x: ArrayD<f64>,
    want: ArrayD<f64>,
    /// The output channels compared (see [`sample`]).
    sample: Vec<usize>,
}

/// The check's input for a fused Conv `node` with weight `dims`, and the original subgraph (from
/// `input` to `output`) run on it for the output channels `sample`. `sized` is the input's
/// spatial size when the fold holds at that size only: the check's input then has the same
/// size modulo the stride on every axis (pads of `auto_pad=SAME_*` with strides, and whether
/// branches with different pads give outputs of one size, depend on nothing else).
fn expect(
    index: &Constants,
    (input, output): (&str, &str),
    node: &NodeProto,
    dims: &[usize],
    (sample, seed): (Vec<usize>, u64),
    sized: Option<&[usize]>,
) -> Result<Expected, String> {
    if dims.len() < 3 {
        return Err("the fused weight has fewer than 3 dims".into());
    }
    let per_group = dims[1];
    let group = attr::int(node, "group").unwrap_or(1).max(1) as usize;
    let kernel = &dims[2..];
    let dilations = ints_or(node, "dilations", 1, kernel.len());
    let strides = ints_or(node, "strides", 1, kernel.len());
    let pads = attr::ints(node, "pads").filter(|p| p.len() == 2 * kernel.len());
    let explicit = attr::string(node, "auto_pad").is_none_or(|a| a == "NOTSET");
    // As wide as the dilated kernel, with padding every output position sees a different mix of
    // border and data (corners, edges, centre); narrower when that still puts every tap on data
    // at some position and on the border at another (a 3x3 with pad 1: 2x2 instead of 3x3, a
    // third of the work).
    let spatial: Vec<usize> = (0..kernel.len())
        .map(|a| {
            let d = dilations.get(a).copied().unwrap_or(1);
            let extent = d.checked_mul(kernel[a].saturating_sub(1))?.checked_add(1)?;
            let geometry = Axis1 {
                taps: kernel[a],
                dilation: d,
                stride: strides.get(a).copied().unwrap_or(1).max(1),
                begin: pads.as_ref().map_or(0, |p| p[a].max(0) as usize),
                end: pads
                    .as_ref()
                    .map_or(0, |p| p[a + kernel.len()].max(0) as usize),
            };
            let width = match explicit {
                true => geometry.narrowest(extent),
                false => extent,
            };
            Some(match sized.and_then(|n| n.get(a)) {
                Some(&n) => {
                    let stride = geometry.stride;
                    width + (n % stride + stride - width % stride) % stride
                }
                None => width,
            })
        })
        .collect::<Option<_>>()
        .ok_or("the dilated kernel is too large to check")?;
    let mut shape = vec![1, per_group.saturating_mul(group)];
    shape.extend(&spatial);
    let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if elements.is_none_or(|n| n > CHECK_ELEMENTS) {
        return Err(format!("the check's input {shape:?} would be too large"));
    }
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let x = ArrayD::from_shape_fn(IxDyn(&shape), |_| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    });
    let mut reference = Reference {
        index,
        input,
        x: Act {
            data: x.clone(),
            channels: None,
        },
        sample: &sample,
        memo: HashMap::new(),
    };
    let want = reference.value(output, 0)?;
    let want = select(&want, &sample)?;
    Ok(Expected { x, want, sample })
}

/// How far the fused Conv `node` (weight `dims`), as written — `rows` of the sampled output
/// channels, in order, and `bias` — is from what the original computed.
fn deviation(
    expected: &Expected,
    node: &NodeProto,
    dims: &[usize],
    rows: Values,
    bias: &ArrayD<f64>,
) -> Result<Deviation, String> {
    let weight = Weight {
        dims,
        values: rows,
        whole: false,
    };
    let (x, want) = (&expected.x, &expected.want);
    let got = conv(node, x, &weight, Some(bias), &expected.sample)?;
    if want.shape() != got.shape() {
        return Err(format!(
            "the original computes shape {:?}, the fused Conv {:?}",
            want.shape(),
            got.shape()
        ));
    }
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let abs = want
        .iter()
        .zip(got.iter())
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    Ok(Deviation {
        abs,
        rel: if scale > 0.0 { abs / scale } else { abs },
    })
}

/// One spatial axis of a convolution, to size the check's input.
struct Axis1 {
    taps: usize,
    dilation: usize,
    stride: usize,
    begin: usize,
    end: usize,
}

impl Axis1 {
    /// For an input `n` wide: per tap, whether it reads data at some output position and
    /// whether it reads the border at some position (`None`: no output at all).
    fn coverage(&self, n: usize) -> Option<Vec<(bool, bool)>> {
        let span = self.dilation.checked_mul(self.taps.saturating_sub(1))?;
        let padded = n.checked_add(self.begin)?.checked_add(self.end)?;
        let outputs = padded.checked_sub(span + 1)? / self.stride + 1;
        let taps = (0..self.taps).map(|t| {
            let read = (0..outputs).map(|p| (p * self.stride + t * self.dilation) as i128);
            let inside = |i: i128| (self.begin as i128..(self.begin + n) as i128).contains(&i);
            let (mut data, mut border) = (false, false);
            for i in read {
                (data, border) = (data || inside(i), border || !inside(i));
            }
            (data, border)
        });
        Some(taps.collect())
    }

    /// The narrowest input (at most `extent`) whose taps meet data and border as at `extent`;
    /// `extent` itself for large kernels or pads wider than the kernel (hostile geometry, which
    /// the check's own limits deal with).
    fn narrowest(&self, extent: usize) -> usize {
        if extent > 64 || self.begin >= extent || self.end >= extent {
            return extent;
        }
        let want = self.coverage(extent);
        (1..extent)
            .find(|&n| want.is_some() && self.coverage(n) == want)
            .unwrap_or(extent)
    }
}

fn ints_or(node: &NodeProto, name: &str, default: usize, rank: usize) -> Vec<usize> {
    attr::ints(node, name)
        .map(|v| v.iter().map(|&x| x.max(0) as usize).collect())
        .unwrap_or_else(|| vec![default; rank])
}

/// What a check is of: a block and the fused Conv planned for it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The block's name (errors name it; it seeds the sample).
    pub name: &'a str,
    pub block: &'a Block,
    /// The fused Conv's shape and geometry.
    pub layout: &'a Layout,
    /// The fused weights' element type (it sets the default tolerance).
    pub dtype: FloatType,
    /// The input size the fold holds for only, if any: the check's input keeps its remainder
    /// modulo the stride.
    pub sized: Option<&'a [usize]>,
}

/// The output channels the check of a fused Conv of `layout` for the block named `name`
/// compares (a seeded sample; all when few, fewer than [`CHANNELS`] when each costs much, see
/// [`CHECK_WORK`]).
pub fn sample(layout: &Layout, name: &str) -> Vec<usize> {
    let per_channel = work_per_channel(layout).unwrap_or(usize::MAX);
    let count = (CHECK_WORK / per_channel.max(1)).clamp(1, CHANNELS);
    sample_channels(layout.out_channels, seed(name), count)
}

/// The work of one output channel of the fused Conv on the check's input (as wide as the
/// dilated kernel), as [`CHECK_WORK`] counts it; `None` when it does not fit a word.
fn work_per_channel(layout: &Layout) -> Option<usize> {
    let g = &layout.geometry;
    let mut work = layout.in_per_group.max(8);
    for (a, &k) in layout.kernel.iter().enumerate() {
        let stride = g.strides.get(a).copied().unwrap_or(1).max(1);
        let pads = g.pads_begin.get(a)?.checked_add(*g.pads_end.get(a)?)?;
        let positions = pads / stride + 1;
        work = work.checked_mul(positions)?.checked_mul(k)?;
    }
    Some(work)
}

fn seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Up to `count` output channels, spread over all of them, the same for the same seed.
fn sample_channels(n: usize, seed: u64, count: usize) -> Vec<usize> {
    if n <= count {
        return (0..n).collect();
    }
    let mut picked: Vec<usize> = (0..count)
        .map(|i| (i * n / count + (seed as usize % (n / count).max(1))) % n)
        .collect();
    picked.sort_unstable();
    picked.dedup();
    picked
}

/// The activation holding exactly `channels` (of a full tensor or a superset).
fn select(a: &Act, channels: &[usize]) -> Result<ArrayD<f64>, String> {
    let positions: Vec<usize> = match &a.channels {
        None => channels.to_vec(),
        Some(held) => channels
            .iter()
            .map(|c| held.iter().position(|h| h == c))
            .collect::<Option<_>>()
            .ok_or("a channel the check needs was not computed")?,
    };
    if positions.iter().any(|&p| p >= a.data.shape()[1]) {
        return Err("channel out of range".into());
    }
    Ok(a.data.select(Axis(1), &positions))
}

struct Reference<'a, 'm> {
    index: &'a Constants<'a, 'm>,
    input: &'a str,
    x: Act,
    sample: &'a [usize],
    memo: HashMap<String, Act>,
}

impl Reference<'_, '_> {
    /// The activation `name`, computed from the block input through the graph's own nodes.
    fn value(&mut self, name: &str, depth: usize) -> Result<Act, String> {
        if name == self.input {
            return Ok(self.x.clone());
        }
        if let Some(a) = self.memo.get(name) {
            return Ok(a.clone());
        }
        if depth > 256 {
            return Err("the block is deeper than the check follows".into());
        }
        let index = self.index;
        let p = index
            .producer(name)
            .ok_or_else(|| format!("'{name}' is neither the block input nor computed"))?;
        let node = index.node(p);
        if !is_default_domain(node) {
            return Err(format!("node '{}' is not a standard operator", node.name()));
        }
        let result = self.apply(node, depth)?;
        self.memo.insert(name.to_string(), result.clone());
        Ok(result)
    }

    fn constant(&self, name: &str) -> Result<ArrayD<f64>, String> {
        let t = self
            .index
            .constant(name)
            .ok_or_else(|| format!("'{name}' is not a constant"))?;
        tensor::read_f64(&t, &self.index.model.external).map_err(|e| e.to_string())
    }

    /// Whether `name` is an activation (depends on the block input) rather than a constant.
    fn is_activation(&self, name: &str) -> bool {
        name == self.input || self.index.constant(name).is_none()
    }

    fn apply(&mut self, node: &NodeProto, depth: usize) -> Result<Act, String> {
        let input = |i: usize| node.input.get(i).map(String::as_str).unwrap_or("");
        match node.op_type() {
            "Identity" => self.value(input(0), depth + 1),
            "Conv" => {
                let x = self.value(input(0), depth + 1)?;
                if x.channels.is_some() {
                    return Err(format!("Conv '{}' reads a partial tensor", node.name()));
                }
                let sample = self.sample.to_vec();
                let weight = self
                    .index
                    .constant(input(1))
                    .ok_or_else(|| format!("weight '{}' is not a constant", input(1)))?;
                let external = &self.index.model.external;
                let (dims, _) = tensor::shape(&weight).map_err(|e| e.to_string())?;
                let data = tensor::data(&weight, external).map_err(|e| e.to_string())?;
                let values = match &data {
                    tensor::Data::Raw(bytes, ty) => Values::Stored(bytes, *ty),
                    tensor::Data::Values(values) => Values::Decoded(values),
                };
                let weight = Weight {
                    dims: &dims,
                    values,
                    whole: true,
                };
                let b = match input(2) {
                    "" => None,
                    name => Some(self.constant(name)?),
                };
                let data = conv(node, &x.data, &weight, b.as_ref(), &sample)?;
                Ok(Act {
                    data,
                    channels: Some(sample),
                })
            }
            "BatchNormalization" => {
                let x = self.value(input(0), depth + 1)?;
                let [gamma, beta, mean, var] = [1, 2, 3, 4].map(|i| {
                    self.constant(input(i))
                        .map(|a| a.iter().copied().collect::<Vec<f64>>())
                });
                let (gamma, beta, mean, var) = (gamma?, beta?, mean?, var?);
                let eps = attr::float(node, "epsilon").unwrap_or(1e-5) as f64;
                per_channel(x, |c, v| {
                    let (g, b, m, s) = (gamma.get(c)?, beta.get(c)?, mean.get(c)?, var.get(c)?);
                    Some(g * (v - m) / (s + eps).sqrt() + b)
                })
            }
            op @ ("Add" | "Sub" | "Mul" | "Div") => {
                let f = |a: f64, b: f64| match op {
                    "Add" => a + b,
                    "Sub" => a - b,
                    "Mul" => a * b,
                    _ => a / b,
                };
                self.binary(input(0), input(1), depth, f)
            }
            "Sum" => {
                let mut acc = self.value(input(0), depth + 1)?;
                for i in 1..node.input.len() {
                    let next = self.value(input(i), depth + 1)?;
                    acc = combine(&acc, &next, |a, b| a + b)?;
                }
                Ok(acc)
            }
            "AveragePool" => {
                let x = self.value(input(0), depth + 1)?;
                average_pool(node, x, self.sample)
            }
            op => Err(format!(
                "the check does not evaluate {op} ('{}')",
                node.name()
            )),
        }
    }

    /// An elementwise op of two inputs, either of which may be a constant broadcast per channel.
    fn binary(
        &mut self,
        a: &str,
        b: &str,
        depth: usize,
        f: impl Fn(f64, f64) -> f64,
    ) -> Result<Act, String> {
        match (self.is_activation(a), self.is_activation(b)) {
            (true, true) => {
                let (x, y) = (self.value(a, depth + 1)?, self.value(b, depth + 1)?);
                combine(&x, &y, f)
            }
            (true, false) => {
                let (x, k) = (self.value(a, depth + 1)?, self.constant(b)?);
                with_constant(x, &k, &f)
            }
            (false, true) => {
                let (k, y) = (self.constant(a)?, self.value(b, depth + 1)?);
                with_constant(y, &k, |v, c| f(c, v))
            }
            (false, false) => Err("an op of two constants inside the block".into()),
        }
    }
}

/// Applies `f(channel, value)` to every element.
fn per_channel(mut x: Act, f: impl Fn(usize, f64) -> Option<f64>) -> Result<Act, String> {
    let channels: Vec<usize> = match &x.channels {
        Some(c) => c.clone(),
        None => (0..x.data.shape()[1]).collect(),
    };
    for (pos, mut plane) in x.data.axis_iter_mut(Axis(1)).enumerate() {
        let c = channels[pos];
        for v in plane.iter_mut() {
            *v = f(c, *v).ok_or("a per-channel parameter is too short")?;
        }
    }
    Ok(x)
}

/// `f(activation, constant)` with the constant broadcast as ONNX does, on the held channels.
fn with_constant(x: Act, k: &ArrayD<f64>, f: impl Fn(f64, f64) -> f64) -> Result<Act, String> {
    let rank = x.data.ndim();
    if k.ndim() > rank {
        return Err("a constant of higher rank than the activation".into());
    }
    let mut dims = vec![1; rank - k.ndim()];
    dims.extend(k.shape());
    let k = k
        .to_shape(IxDyn(&dims))
        .map_err(|e| e.to_string())?
        .to_owned();
    let k = match (&x.channels, k.shape()[1]) {
        (Some(held), n) if n > 1 => k.select(Axis(1), held),
        _ => k,
    };
    let kb = k
        .broadcast(x.data.raw_dim())
        .ok_or("a constant that does not broadcast")?
        .to_owned();
    let data = ndarray::Zip::from(&x.data)
        .and(&kb)
        .map_collect(|&a, &b| f(a, b));
    Ok(Act {
        data,
        channels: x.channels,
    })
}

/// `f` elementwise on two activations, restricted to the channels both hold.
fn combine(a: &Act, b: &Act, f: impl Fn(f64, f64) -> f64) -> Result<Act, String> {
    let channels = match (&a.channels, &b.channels) {
        (None, None) => None,
        (Some(c), _) | (None, Some(c)) => Some(c.clone()),
    };
    let (x, y) = match &channels {
        None => (a.data.clone(), b.data.clone()),
        Some(c) => (select(a, c)?, select(b, c)?),
    };
    if x.shape() != y.shape() {
        return Err(format!(
            "summands of shapes {:?} and {:?}",
            x.shape(),
            y.shape()
        ));
    }
    Ok(Act {
        data: ndarray::Zip::from(&x).and(&y).map_collect(|&p, &q| f(p, q)),
        channels,
    })
}

/// Begin and end pads of a Conv/AveragePool on an input of `spatial` size.
fn pads(
    node: &NodeProto,
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    spatial: &[usize],
) -> Result<(Vec<usize>, Vec<usize>), String> {
    let rank = kernel.len();
    let auto_pad = attr::string(node, "auto_pad").unwrap_or_default();
    match auto_pad.as_str() {
        "" | "NOTSET" => {
            let p = ints_or(node, "pads", 0, 2 * rank);
            if p.len() != 2 * rank {
                return Err("pads of the wrong length".into());
            }
            Ok((p[..rank].to_vec(), p[rank..].to_vec()))
        }
        "VALID" => Ok((vec![0; rank], vec![0; rank])),
        same @ ("SAME_UPPER" | "SAME_LOWER") => {
            let (mut begin, mut end) = (vec![0; rank], vec![0; rank]);
            for a in 0..rank {
                let stride = strides[a].max(1);
                let out = spatial[a].div_ceil(stride);
                let need = dilations[a]
                    .checked_mul(kernel[a].saturating_sub(1))
                    .and_then(|e| e.checked_add(out.saturating_sub(1) * stride + 1))
                    .ok_or("the dilated kernel is too large to check")?;
                let total = need.saturating_sub(spatial[a]);
                let (small, large) = (total / 2, total - total / 2);
                (begin[a], end[a]) = if same == "SAME_UPPER" {
                    (small, large)
                } else {
                    (large, small)
                };
            }
            Ok((begin, end))
        }
        other => Err(format!("auto_pad '{other}'")),
    }
}

/// For each output position and kernel tap, the flat input position it reads (`None`: padding).
type TapTable = Vec<Vec<Option<usize>>>;

/// The [`TapTable`] of a convolution or pooling, and the output's spatial shape.
fn taps(
    spatial: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    begin: &[usize],
    end: &[usize],
) -> Result<(TapTable, Vec<usize>), String> {
    let rank = spatial.len();
    let mut out_shape = Vec::with_capacity(rank);
    let too_large = || "the geometry is too large to check".to_string();
    for a in 0..rank {
        let padded = spatial[a]
            .checked_add(begin[a])
            .and_then(|p| p.checked_add(end[a]))
            .ok_or_else(too_large)?;
        let extent = dilations[a]
            .checked_mul(kernel[a].saturating_sub(1))
            .and_then(|e| e.checked_add(1))
            .ok_or_else(too_large)?;
        if padded < extent || strides[a] == 0 {
            return Err("the kernel is larger than the padded input".into());
        }
        out_shape.push((padded - extent) / strides[a] + 1);
    }
    let count = |dims: &[usize]| dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let (positions, tap_count) = match (count(&out_shape), count(kernel)) {
        (Some(p), Some(t)) if p.checked_mul(t).is_some_and(|n| n <= CHECK_ELEMENTS) => (p, t),
        _ => return Err(too_large()),
    };
    let mut table = Vec::with_capacity(positions);
    for pos in 0..positions {
        let out_idx = unravel(pos, &out_shape);
        let mut row = Vec::with_capacity(tap_count);
        for tap in 0..tap_count {
            let k_idx = unravel(tap, kernel);
            let mut flat = 0usize;
            let mut inside = true;
            for a in 0..rank {
                // In i128: the pads may be huge; positions and taps are bounded above.
                let i = out_idx[a] as i128 * strides[a] as i128
                    + k_idx[a] as i128 * dilations[a] as i128
                    - begin[a] as i128;
                if i < 0 || i >= spatial[a] as i128 {
                    inside = false;
                    break;
                }
                flat = flat * spatial[a] + i as usize;
            }
            row.push(inside.then_some(flat));
        }
        table.push(row);
    }
    Ok((table, out_shape))
}

fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for a in (0..shape.len()).rev() {
        idx[a] = i % shape[a];
        i /= shape[a];
    }
    idx
}

/// Direct convolution (ONNX Conv) of `x` `[1, C, spatial…]` for the output channels `outs` of the
/// weight `w`.
fn conv(
    node: &NodeProto,
    x: &ArrayD<f64>,
    w: &Weight,
    b: Option<&ArrayD<f64>>,
    outs: &[usize],
) -> Result<ArrayD<f64>, String> {
    crate::simd::with_avx2(
        #[inline(always)]
        || conv_here(node, x, w, b, outs),
    )
}

#[inline(always)]
fn conv_here(
    node: &NodeProto,
    x: &ArrayD<f64>,
    w: &Weight,
    b: Option<&ArrayD<f64>>,
    outs: &[usize],
) -> Result<ArrayD<f64>, String> {
    if w.dims.len() < 3 || x.ndim() != w.dims.len() {
        return Err("weight and input ranks disagree".into());
    }
    let (o, per_group, kernel) = (w.dims[0], w.dims[1], &w.dims[2..]);
    let rank = kernel.len();
    let spatial = &x.shape()[2..];
    let group = attr::int(node, "group").unwrap_or(1).max(1) as usize;
    if x.shape()[1] != per_group * group || !o.is_multiple_of(group) {
        return Err(format!(
            "Conv '{}': channels do not match its groups",
            node.name()
        ));
    }
    let row_len = kernel
        .iter()
        .try_fold(per_group, |n, &k| n.checked_mul(k))
        .ok_or("the weight is too large to check")?;
    let rows = if w.whole { o } else { outs.len() };
    if rows.checked_mul(row_len) != Some(w.values.len()) {
        return Err("the weight's values do not match its dims".into());
    }
    let strides = ints_or(node, "strides", 1, rank);
    let dilations = ints_or(node, "dilations", 1, rank);
    let (begin, end) = pads(node, kernel, &strides, &dilations, spatial)?;
    let (table, out_shape) = taps(spatial, kernel, &strides, &dilations, &begin, &end)?;
    let plane: usize = spatial.iter().product();
    let tap_count: usize = kernel.iter().product();
    let work = [tap_count, per_group.max(8), outs.len()]
        .iter()
        .try_fold(table.len(), |w, &f| w.checked_mul(f));
    if work.is_none_or(|w| w > CHECK_WORK) {
        return Err(format!(
            "Conv '{}' is too large to check ({} output positions × {tap_count} taps × {per_group} \
             input channels)",
            node.name(),
            table.len()
        ));
    }
    let x_std = x.as_standard_layout();
    let x_flat = x_std.as_slice().ok_or("input not contiguous")?;
    let mut shape = vec![1, outs.len()];
    shape.extend(&out_shape);
    if let Some(&oc) = outs.iter().find(|&&oc| oc >= o) {
        return Err(format!("output channel {oc} out of range"));
    }
    // The input under the kernel at each output position is gathered in the weights' own layout
    // ([channel of the group][tap], zero on the padding), so that a sampled channel's output
    // there is one contiguous dot product with its row of weights. Positions go in blocks whose
    // patches stay in cache, each row of weights read once per block.
    let positions = table.len();
    let per_block = (PATCH_VALUES / row_len.max(1)).clamp(1, positions.max(1));
    let mut y = vec![0.0; outs.len() * positions];
    let mut patches = vec![0.0; per_block * row_len];
    let mut decoded = Vec::with_capacity(row_len);
    for first in (0..positions).step_by(per_block) {
        let block = &table[first..(first + per_block).min(positions)];
        let mut gathered = None;
        for (row, &oc) in outs.iter().enumerate() {
            let at = if w.whole { oc } else { row } * row_len;
            let weights = w.values.get(at, row_len, &mut decoded);
            let g = oc / (o / group);
            if gathered != Some(g) {
                let x = &x_flat[g * per_group * plane..(g + 1) * per_group * plane];
                for (patch, taps) in patches.chunks_exact_mut(row_len.max(1)).zip(block) {
                    let planes = x.chunks_exact(plane.max(1));
                    for (under, x) in patch.chunks_exact_mut(tap_count.max(1)).zip(planes) {
                        for (v, flat) in under.iter_mut().zip(taps) {
                            *v = flat.map_or(0.0, |f| x[f]);
                        }
                    }
                }
                gathered = Some(g);
            }
            let bias = b.map_or(0.0, |b| b[[oc]]);
            let out = &mut y[row * positions + first..][..block.len()];
            for (y, patch) in out.iter_mut().zip(patches.chunks_exact(row_len.max(1))) {
                *y = bias + dot(weights, patch);
            }
        }
    }
    let y =
        ArrayD::from_shape_vec(IxDyn(&[outs.len(), positions]), y).map_err(|e| e.to_string())?;
    y.into_shape_with_order(IxDyn(&shape))
        .map_err(|e| e.to_string())
}

/// Dot product with sixteen running sums (four vectors of four: the adds need not wait on each
/// other; the order of additions is fixed).
#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    const LANES: usize = 16;
    let n = a.len().min(b.len());
    let (a16, a_tail) = a[..n].as_chunks::<LANES>();
    let (b16, b_tail) = b[..n].as_chunks::<LANES>();
    let mut sums = [0.0f64; LANES];
    for (x, y) in a16.iter().zip(b16) {
        for i in 0..LANES {
            sums[i] += x[i] * y[i];
        }
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            sums[i] += sums[i + width];
        }
    }
    sums[0] + a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum::<f64>()
}

/// ONNX AveragePool of the channels `outs` of `x` (or of those it holds).
fn average_pool(node: &NodeProto, x: Act, outs: &[usize]) -> Result<Act, String> {
    let kernel: Vec<usize> = attr::ints(node, "kernel_shape")
        .ok_or("AveragePool without kernel_shape")?
        .iter()
        .map(|&k| k.max(1) as usize)
        .collect();
    let rank = kernel.len();
    let spatial = x.data.shape()[2..].to_vec();
    let strides = ints_or(node, "strides", 1, rank);
    let dilations = ints_or(node, "dilations", 1, rank);
    let (begin, end) = pads(node, &kernel, &strides, &dilations, &spatial)?;
    let (table, out_shape) = taps(&spatial, &kernel, &strides, &dilations, &begin, &end)?;
    let include_pad = attr::int(node, "count_include_pad").unwrap_or(0) == 1;
    let channels: Vec<usize> = match &x.channels {
        Some(held) => held.clone(),
        None => outs.to_vec(),
    };
    let data = select(&x, &channels)?;
    let flat = data
        .to_shape(IxDyn(&[channels.len(), spatial.iter().product()]))
        .map_err(|e| e.to_string())?;
    let mut y = ArrayD::zeros(IxDyn(&[channels.len(), table.len()]));
    for c in 0..channels.len() {
        for (pos, taps) in table.iter().enumerate() {
            let inside: Vec<usize> = taps.iter().flatten().copied().collect();
            let divisor = if include_pad {
                taps.len()
            } else {
                inside.len().max(1)
            };
            y[[c, pos]] = inside.iter().map(|&i| flat[[c, i]]).sum::<f64>() / divisor as f64;
        }
    }
    let mut shape = vec![1, channels.len()];
    shape.extend(&out_shape);
    Ok(Act {
        data: y
            .into_shape_with_order(IxDyn(&shape))
            .map_err(|e| e.to_string())?,
        channels: Some(channels),
    })
}

/// Checks a block against its fused Conv as written (`rows`: the written weight rows of
/// [`sample`], `bias`: the written bias); an error names the block.
pub fn check(
    index: &Constants,
    subject: &Subject,
    node: &NodeProto,
    rows: &ArrayD<f64>,
    bias: &ArrayD<f64>,
    tolerance: Option<f64>,
) -> crate::Result<Deviation> {
    let expected = reference(index, subject, node)?;
    let rows = rows.as_standard_layout();
    let values = Values::Decoded(rows.as_slice().unwrap_or(&[]));
    compare(&expected, subject, node, values, bias, tolerance)
}

fn failure(subject: &Subject, reason: String) -> crate::Error {
    crate::Error::Verify {
        block: subject.name.to_string(),
        reason,
    }
}

/// The first half of [`check`], from the original alone: what the fused Conv `node` must
/// compute.
pub fn reference(
    index: &Constants,
    subject: &Subject,
    node: &NodeProto,
) -> crate::Result<Expected> {
    let dims = subject.layout.weight_dims();
    let ends = (subject.block.input.as_str(), subject.block.output(index));
    let sampled = (sample(subject.layout, subject.name), seed(subject.name));
    expect(index, ends, node, &dims, sampled, subject.sized)
        .map_err(|e| failure(subject, format!("the original could not be evaluated: {e}")))
}

/// The second half of [`check`]: the fused Conv as written (`rows`: the written weight rows of
/// [`sample`], in that order) against `expected`.
pub fn compare(
    expected: &Expected,
    subject: &Subject,
    node: &NodeProto,
    rows: Values,
    bias: &ArrayD<f64>,
    tolerance: Option<f64>,
) -> crate::Result<Deviation> {
    let dims = subject.layout.weight_dims();
    let deviation = deviation(expected, node, &dims, rows, bias)
        .map_err(|e| failure(subject, format!("the original could not be evaluated: {e}")))?;
    let limit = tolerance.unwrap_or_else(|| default_tolerance(subject.dtype));
    if deviation.rel.is_nan() || deviation.rel > limit {
        return Err(failure(
            subject,
            format!(
                "the fused Conv differs from the original by {:.3e} relative ({:.3e} absolute), \
                 over the tolerance {limit:.1e}",
                deviation.rel, deviation.abs
            ),
        ));
    }
    Ok(deviation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_input_is_as_narrow_as_full_coverage_allows() {
        let axis = |taps, dilation, stride, begin, end| Axis1 {
            taps,
            dilation,
            stride,
            begin,
            end,
        };
        // 3x3 pad 1: 2 wide already puts every tap on data and on the border.
        assert_eq!(axis(3, 1, 1, 1, 1).narrowest(3), 2);
        // Stride 2: at 2 wide the middle tap would meet the border it never meets at 3.
        assert_eq!(axis(3, 1, 2, 1, 1).narrowest(3), 3);
        assert_eq!(axis(5, 1, 1, 2, 2).narrowest(5), 3);
        assert_eq!(axis(3, 2, 1, 2, 2).narrowest(5), 3);
        assert_eq!(axis(1, 1, 1, 0, 0).narrowest(1), 1);
        // No padding: the input must hold the whole kernel.
        assert_eq!(axis(3, 1, 1, 0, 0).narrowest(3), 3);
        // Two outputs: the corner taps meet data at one and the border at the other; the centre
        // tap meets data only, as it does at 3 wide.
        let corners = (true, true);
        let centre = (true, false);
        assert_eq!(
            axis(3, 1, 1, 1, 1).coverage(2),
            Some(vec![corners, centre, corners])
        );
        assert_eq!(
            axis(3, 1, 1, 1, 1).coverage(1).map(|c| c[0]),
            Some((false, true))
        );
    }

    /// The check's convolution against the ONNX definition spelled out as nested loops, on a
    /// grouped, strided, dilated, asymmetrically padded 2-D Conv, for a sample of channels.
    #[test]
    fn the_convolution_follows_the_onnx_definition() {
        let (c, o, group, k, size) = (6, 4, 2, [3, 2], [6, 5]);
        let (strides, dilations, pads) = ([2, 1], [1, 2], [1, 0, 2, 1]);
        let mut node = NodeProto {
            name: Some("conv".into()),
            op_type: Some("Conv".into()),
            ..Default::default()
        };
        node.attribute = vec![
            attr::new_int("group", group as i64),
            attr::new_ints("strides", strides.map(|v| v as i64)),
            attr::new_ints("dilations", dilations.map(|v| v as i64)),
            attr::new_ints("pads", pads.map(|v| v as i64)),
        ];
        let mut state = 7u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let pg = c / group;
        let x = ArrayD::from_shape_fn(IxDyn(&[1, c, size[0], size[1]]), |_| next());
        let w = ArrayD::from_shape_fn(IxDyn(&[o, pg, k[0], k[1]]), |_| next());
        let b = ArrayD::from_shape_fn(IxDyn(&[o]), |_| next());
        let outs = [1, 2, 3];
        let rows = w.select(Axis(0), &outs);
        let dims = [o, pg, k[0], k[1]];
        let sampled = Weight {
            dims: &dims,
            values: Values::Decoded(rows.as_slice().unwrap()),
            whole: false,
        };
        let got = conv(&node, &x, &sampled, Some(&b), &outs).unwrap();
        // Both builds of it (see `simd`) compute the same numbers, and so does the whole weight
        // as stored.
        let plain = conv_here(&node, &x, &sampled, Some(&b), &outs).unwrap();
        assert_eq!(got, plain);
        let stored = tensor::to_le_bytes(&w, FloatType::F64);
        let whole = Weight {
            dims: &dims,
            values: Values::Stored(&stored, FloatType::F64),
            whole: true,
        };
        assert_eq!(conv(&node, &x, &whole, Some(&b), &outs).unwrap(), got);
        let extent = |a: usize| {
            (size[a] + pads[a] + pads[a + 2] - dilations[a] * (k[a] - 1) - 1) / strides[a] + 1
        };
        let (h, wd) = (extent(0), extent(1));
        assert_eq!(got.shape(), &[1, outs.len(), h, wd]);
        for (r, &oc) in outs.iter().enumerate() {
            let first = oc / (o / group) * pg;
            for (i, j) in (0..h).flat_map(|i| (0..wd).map(move |j| (i, j))) {
                let mut want = b[[oc]];
                for (ic, ki, kj) in (0..pg).flat_map(|ic| {
                    (0..k[0]).flat_map(move |ki| (0..k[1]).map(move |kj| (ic, ki, kj)))
                }) {
                    let y = (i * strides[0] + ki * dilations[0]) as isize - pads[0] as isize;
                    let x_ = (j * strides[1] + kj * dilations[1]) as isize - pads[1] as isize;
                    if (0..size[0] as isize).contains(&y) && (0..size[1] as isize).contains(&x_) {
                        want += w[[oc, ic, ki, kj]] * x[[0, first + ic, y as usize, x_ as usize]];
                    }
                }
                let g = got[[0, r, i, j]];
                assert!(
                    (g - want).abs() < 1e-12,
                    "channel {oc} at ({i}, {j}): {g} != {want}"
                );
            }
        }
    }
}
