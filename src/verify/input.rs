//! How wide the check's random input is: as wide as the dilated kernel, with padding every output
//! position sees a different mix of border and data (corners, edges, centre); narrower when that
//! still puts every tap on data at some position and on the border at another (a 3x3 with pad
//! 1: 2x2 instead of 3x3, a third of the work); and, for a fold that holds at one input size
//! only, with that size's remainder modulo the stride.

use ndarray::{ArrayD, IxDyn};

use super::CHECK_ELEMENTS;
use super::window::ints_or;
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

/// The check's seeded random input (values in [-1, 1)) for a fused Conv `node` with weight
/// `dims`; `sized` is the input size the fold holds at, if only one.
pub(super) fn random(
    node: &NodeProto,
    dims: &[usize],
    sized: Option<&[usize]>,
    seed: u64,
) -> Result<ArrayD<f64>, String> {
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
    Ok(uniform(&shape, seed))
}

/// Values uniform in [-1, 1) of `shape`, the same for the same seed.
pub(super) fn uniform(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    ArrayD::from_shape_fn(IxDyn(shape), |_| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
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
}
