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
//!
//! The check reads the Conv and pooling attributes on its own (`window.rs`), not through
//! [`crate::geometry`] as the fold does: it is the independent oracle, and shares neither the
//! algebra nor the reading of the attributes with what it checks.
//!
//! - `input.rs`: how wide the check's random input is;
//! - `reference.rs`: the original subgraph evaluated by each operator's definition;
//! - `conv.rs`: the direct convolution both sides run;
//! - `linear.rs`: the check of a linear fold, the original and the patched graph evaluated
//!   densely (`dense.rs`);
//! - `window.rs`: pads and attribute defaults, as the ONNX operators define them.

mod conv;
mod dense;
mod input;
mod linear;
mod reference;
mod window;

pub use conv::Values;
pub use linear::check as linear;

use ndarray::ArrayD;

use crate::constant::Constants;
use crate::layout::Layout;
use crate::onnx::proto::NodeProto;
use crate::pattern::Block;
use crate::tensor::FloatType;
use conv::{Weight, conv};

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

impl Deviation {
    /// Over pairs of (reference, fused) values: the largest absolute difference, and that over
    /// the largest absolute reference value.
    fn between<'v>(pairs: impl Iterator<Item = (&'v f64, &'v f64)>) -> Deviation {
        let (abs, scale) = pairs.fold((0.0f64, 0.0f64), |(abs, scale), (a, b)| {
            (abs.max((a - b).abs()), scale.max(a.abs()))
        });
        Deviation {
            abs,
            rel: if scale > 0.0 { abs / scale } else { abs },
        }
    }

    /// The deviation, or why it is over `limit` (relative) for the fused `op`.
    fn within(self, limit: f64, op: &str) -> Result<Deviation, String> {
        match self.rel.is_nan() || self.rel > limit {
            true => Err(format!(
                "the fused {op} differs from the original by {:.3e} relative ({:.3e} \
                 absolute), over the tolerance {limit:.1e}",
                self.rel, self.abs
            )),
            false => Ok(self),
        }
    }
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
    let x = input::random(node, dims, sized, seed)?;
    let want = reference::evaluate(index, (input, output), &x, &sample)?;
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
    Ok(Deviation::between(want.iter().zip(got.iter())))
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
    deviation
        .within(limit, "Conv")
        .map_err(|e| failure(subject, e))
}
