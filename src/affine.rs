//! The fold algebra: an *affine convolution* `y = W ⊛ x + b` with its geometry (strides, pads,
//! dilations, groups), as a plain value with no protobuf in it. Every branch of a block is one;
//! a BatchNormalization after a conv is a per-channel scale and shift; an identity branch is a
//! 1-tap kernel with ones on the (grouped) diagonal; a sum of branches embeds every kernel into
//! one that covers them all, at the offset their pads dictate. All arithmetic is in f64.
//!
//! A [`Layout`] is the same thing without the numbers (channels, kernel, geometry): planning
//! uses it to know every fused tensor's size before computing any, so that the output can be
//! streamed.

use std::fmt;

use ndarray::{Array1, ArrayD, IxDyn, Slice};

/// Strides, dilations, pads and group count of a convolution over `rank` spatial axes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pads_begin: Vec<usize>,
    pub pads_end: Vec<usize>,
    pub group: usize,
}

impl Geometry {
    /// Stride 1, dilation 1, no padding.
    pub fn unit(rank: usize, group: usize) -> Geometry {
        Geometry {
            strides: vec![1; rank],
            dilations: vec![1; rank],
            pads_begin: vec![0; rank],
            pads_end: vec![0; rank],
            group,
        }
    }

    /// Number of spatial axes.
    pub fn rank(&self) -> usize {
        self.strides.len()
    }
}

/// Why branches cannot be summed into one convolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlgebraError {
    /// Branches convolve over different numbers of spatial axes.
    Rank { left: usize, right: usize },
    /// Branches have different group counts.
    Group { left: usize, right: usize },
    /// Branches produce different numbers of channels.
    OutChannels { left: usize, right: usize },
    /// Branches read different numbers of input channels per group.
    InChannels { left: usize, right: usize },
    /// Branches step over the input differently.
    Stride {
        axis: usize,
        left: usize,
        right: usize,
    },
    /// A branch's pad offset is not a whole number of (dilated) taps.
    Misaligned { axis: usize },
    /// Branches produce outputs of different sizes on an axis (at the input size, when known).
    OutputSize { axis: usize, size: Option<usize> },
    /// A per-channel scale or shift has the wrong length.
    ChannelParams { expected: usize, got: usize },
    /// The summed kernel's extent or pads on an axis do not fit in a machine word (hostile
    /// dilations or pads).
    TooLarge { axis: usize },
    /// Nothing to sum.
    Empty,
}

impl fmt::Display for AlgebraError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlgebraError::Rank { left, right } => {
                write!(f, "branches have {left} and {right} spatial axes")
            }
            AlgebraError::Group { left, right } => {
                write!(f, "branches use group={left} and group={right}")
            }
            AlgebraError::OutChannels { left, right } => {
                write!(f, "branches produce {left} and {right} channels")
            }
            AlgebraError::InChannels { left, right } => write!(
                f,
                "branches read {left} and {right} input channels per group"
            ),
            AlgebraError::Stride { axis, left, right } => write!(
                f,
                "branches use strides {left} and {right} on spatial axis {axis}"
            ),
            AlgebraError::Misaligned { axis } => write!(
                f,
                "branch pads on spatial axis {axis} do not align to whole kernel taps"
            ),
            AlgebraError::OutputSize {
                axis,
                size: Some(n),
            } => write!(
                f,
                "branches produce different output sizes on spatial axis {axis} at its size {n} \
                 (pads disagree)"
            ),
            AlgebraError::OutputSize { axis, size: None } => write!(
                f,
                "branches produce different output sizes on spatial axis {axis} (pads disagree, \
                 and the input's size, which decides whether they agree, is not static)"
            ),
            AlgebraError::ChannelParams { expected, got } => write!(
                f,
                "per-channel parameters have {got} values for {expected} channels"
            ),
            AlgebraError::Empty => write!(f, "no branch to sum"),
            AlgebraError::TooLarge { axis } => write!(
                f,
                "the summed kernel on spatial axis {axis} would be too large (dilations or pads \
                 out of proportion)"
            ),
        }
    }
}

/// The shape of an affine convolution: `[out_channels, in_per_group, kernel…]` and geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub out_channels: usize,
    pub in_per_group: usize,
    pub kernel: Vec<usize>,
    pub geometry: Geometry,
}

impl Layout {
    /// Input channels (C = C/group · group).
    pub fn in_channels(&self) -> usize {
        self.in_per_group * self.geometry.group
    }

    /// The weight's dims.
    pub fn weight_dims(&self) -> Vec<usize> {
        let mut dims = vec![self.out_channels, self.in_per_group];
        dims.extend(&self.kernel);
        dims
    }

    /// The identity on `channels` channels as a 1-tap convolution with `group` groups.
    pub fn identity(channels: usize, group: usize, rank: usize) -> Layout {
        Layout {
            out_channels: channels,
            in_per_group: channels / group.max(1),
            kernel: vec![1; rank],
            geometry: Geometry::unit(rank, group),
        }
    }

    /// The layout after spreading taps to dilations `to` (see [`AffineConv::spread`]); 1-tap
    /// axes just take `to`.
    pub(crate) fn spread(&self, to: &[usize]) -> Result<Layout, AlgebraError> {
        let mut out = self.clone();
        for (axis, &t) in to.iter().enumerate() {
            let k = self.kernel[axis];
            if k > 1 {
                out.kernel[axis] = (self.geometry.dilations[axis] / t.max(1))
                    .checked_mul(k - 1)
                    .and_then(|v| v.checked_add(1))
                    .ok_or(AlgebraError::TooLarge { axis })?;
            }
            out.geometry.dilations[axis] = t;
        }
        Ok(out)
    }

    /// Per axis, the dilation every branch can be spread to: the greatest common divisor of the
    /// dilations of the branches wider than one tap.
    pub(crate) fn common_dilations(terms: &[Layout]) -> Vec<usize> {
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let rank = terms.first().map_or(0, |t| t.kernel.len());
        (0..rank)
            .map(|axis| {
                terms
                    .iter()
                    .filter(|t| t.kernel[axis] > 1)
                    .map(|t| t.geometry.dilations[axis].max(1))
                    .fold(0, gcd)
                    .max(1)
            })
            .collect()
    }

    /// The layout of the sum of `terms` (already spread to one dilation per axis) and where each
    /// term's kernel sits in it. Branches must produce outputs of one size: for any input size
    /// when their pads agree; where they do not, at the input's spatial size `sizes` (when
    /// known), and the sum then holds for inputs of that size (or the same size modulo the
    /// stride) only.
    pub(crate) fn sum_plan(
        terms: &[Layout],
        sizes: Option<&[usize]>,
    ) -> Result<(Layout, Vec<Vec<usize>>), AlgebraError> {
        let first = terms.first().ok_or(AlgebraError::Empty)?;
        let rank = first.kernel.len();
        for t in &terms[1..] {
            check_compatible(first, t)?;
        }
        let mut target = Geometry {
            strides: first.geometry.strides.clone(),
            dilations: vec![1; rank],
            pads_begin: vec![0; rank],
            pads_end: vec![0; rank],
            group: first.geometry.group,
        };
        let mut kernel = vec![0; rank];
        let mut offsets = vec![vec![0; rank]; terms.len()];
        for axis in 0..rank {
            let d = terms
                .iter()
                .find(|t| t.kernel[axis] > 1)
                .map_or(1, |t| t.geometry.dilations[axis].max(1));
            let begin = terms
                .iter()
                .map(|t| t.geometry.pads_begin[axis])
                .max()
                .unwrap_or(0);
            // In i128 with checks: pads and dilations come from the model and may be huge.
            let too_large = AlgebraError::TooLarge { axis };
            let span = |k: usize| (d as i128).checked_mul(k as i128 - 1);
            let extra = |t: &Layout| {
                let g = &t.geometry;
                span(t.kernel[axis])
                    .map(|s| g.pads_begin[axis] as i128 + g.pads_end[axis] as i128 - s)
                    .ok_or(too_large.clone())
            };
            // Each branch's outputs: (size + extra − 1) / stride + 1; one extra fits all sizes.
            let extras: Vec<i128> = terms.iter().map(extra).collect::<Result<_, _>>()?;
            let e = extras.iter().copied().max().unwrap_or(0);
            if extras.iter().any(|&x| x != e) {
                let size = sizes.and_then(|s| s.get(axis)).copied();
                let stride = first.geometry.strides[axis].max(1) as i128;
                let outputs = |x: i128| {
                    let span = size? as i128 + x - 1;
                    (span >= 0).then(|| span / stride)
                };
                if size.is_none() || extras.iter().any(|&x| outputs(x) != outputs(e)) {
                    return Err(AlgebraError::OutputSize { axis, size });
                }
            }
            for (i, t) in terms.iter().enumerate() {
                let shift = begin - t.geometry.pads_begin[axis];
                if shift % d != 0 {
                    return Err(AlgebraError::Misaligned { axis });
                }
                offsets[i][axis] = shift / d;
                let reach = offsets[i][axis]
                    .checked_add(t.kernel[axis])
                    .ok_or(too_large.clone())?;
                kernel[axis] = kernel[axis].max(reach);
            }
            target.dilations[axis] = d;
            target.pads_begin[axis] = begin;
            let end = span(kernel[axis])
                .and_then(|s| (e + s).checked_sub(begin as i128))
                .ok_or(too_large)?;
            target.pads_end[axis] =
                usize::try_from(end).map_err(|_| AlgebraError::OutputSize { axis, size: None })?;
        }
        let layout = Layout {
            out_channels: first.out_channels,
            in_per_group: first.in_per_group,
            kernel,
            geometry: target,
        };
        Ok((layout, offsets))
    }

    /// Branches over different numbers of spatial axes cannot be summed (checked before
    /// anything indexes an axis of one by another's rank).
    pub(crate) fn check_ranks(terms: &[Layout]) -> Result<(), AlgebraError> {
        let first = terms.first().ok_or(AlgebraError::Empty)?;
        for t in terms {
            let (left, right) = (first.kernel.len(), t.kernel.len());
            if left != right || t.geometry.rank() != right || t.geometry.dilations.len() != right {
                return Err(AlgebraError::Rank { left, right });
            }
        }
        Ok(())
    }

    /// The layout of the sum of `terms`, on an input of spatial size `sizes` when known (see
    /// [`Layout::sum_plan`]).
    pub fn sum(terms: &[Layout], sizes: Option<&[usize]>) -> Result<Layout, AlgebraError> {
        Layout::check_ranks(terms)?;
        let common = Layout::common_dilations(terms);
        let spread: Vec<Layout> = terms
            .iter()
            .map(|t| t.spread(&common))
            .collect::<Result<_, _>>()?;
        Layout::sum_plan(&spread, sizes).map(|(layout, _)| layout)
    }

    /// Checks a per-channel scale and shift against the layout.
    pub fn check_channels(&self, scale: &[f64], shift: &[f64]) -> Result<(), AlgebraError> {
        for got in [scale.len(), shift.len()] {
            if got != self.out_channels {
                return Err(AlgebraError::ChannelParams {
                    expected: self.out_channels,
                    got,
                });
            }
        }
        Ok(())
    }
}

fn check_compatible(a: &Layout, b: &Layout) -> Result<(), AlgebraError> {
    let (ga, gb) = (&a.geometry, &b.geometry);
    if ga.rank() != gb.rank() {
        return Err(AlgebraError::Rank {
            left: ga.rank(),
            right: gb.rank(),
        });
    }
    if ga.group != gb.group {
        return Err(AlgebraError::Group {
            left: ga.group,
            right: gb.group,
        });
    }
    if a.out_channels != b.out_channels {
        return Err(AlgebraError::OutChannels {
            left: a.out_channels,
            right: b.out_channels,
        });
    }
    if a.in_per_group != b.in_per_group {
        return Err(AlgebraError::InChannels {
            left: a.in_per_group,
            right: b.in_per_group,
        });
    }
    for axis in 0..ga.rank() {
        if ga.strides[axis] != gb.strides[axis] {
            return Err(AlgebraError::Stride {
                axis,
                left: ga.strides[axis],
                right: gb.strides[axis],
            });
        }
    }
    Ok(())
}

/// `y = W ⊛ x + b` with W of shape `[O, C/group, k_1, .., k_r]` and b of length O.
#[derive(Debug, Clone, PartialEq)]
pub struct AffineConv {
    pub weight: ArrayD<f64>,
    pub bias: Array1<f64>,
    pub geometry: Geometry,
}

impl AffineConv {
    /// Output channels (O).
    pub fn out_channels(&self) -> usize {
        self.weight.shape()[0]
    }

    /// Input channels (C = C/group · group).
    pub fn in_channels(&self) -> usize {
        self.weight.shape()[1] * self.geometry.group
    }

    /// Kernel extent per spatial axis.
    pub fn kernel(&self) -> &[usize] {
        &self.weight.shape()[2..]
    }

    /// Its shape.
    pub fn layout(&self) -> Layout {
        Layout {
            out_channels: self.out_channels(),
            in_per_group: self.weight.shape()[1],
            kernel: self.kernel().to_vec(),
            geometry: self.geometry.clone(),
        }
    }

    /// The identity on `channels` channels as a 1-tap convolution with `group` groups:
    /// `W[i, i mod (C/group), 0, ..] = 1`.
    pub fn identity(channels: usize, group: usize, rank: usize) -> AffineConv {
        AffineConv::identity_rows(channels, group, rank, 0..channels)
    }

    /// The output channels `rows` of [`AffineConv::identity`].
    pub fn identity_rows(
        channels: usize,
        group: usize,
        rank: usize,
        rows: std::ops::Range<usize>,
    ) -> AffineConv {
        let layout = Layout::identity(channels, group, rank);
        let per_group = layout.in_per_group.max(1);
        let mut dims = layout.weight_dims();
        dims[0] = rows.len();
        let mut weight = ArrayD::zeros(IxDyn(&dims));
        for i in rows.clone() {
            let mut idx = vec![i - rows.start, i % per_group];
            idx.extend(std::iter::repeat_n(0, rank));
            weight[IxDyn(&idx)] = 1.0;
        }
        AffineConv {
            weight,
            bias: Array1::zeros(rows.len()),
            geometry: layout.geometry,
        }
    }

    /// Applies `y ↦ y·scale + shift` per output channel (a BatchNormalization, Mul or Add).
    pub fn scale_shift(mut self, scale: &[f64], shift: &[f64]) -> Result<AffineConv, AlgebraError> {
        self.layout().check_channels(scale, shift)?;
        let per_channel = self.weight.len() / self.out_channels().max(1);
        if let Some(w) = self.weight.as_slice_mut() {
            for (c, row) in w.chunks_exact_mut(per_channel.max(1)).enumerate() {
                row.iter_mut().for_each(|v| *v *= scale[c]);
            }
        } else {
            for (c, mut w) in self.weight.outer_iter_mut().enumerate() {
                w *= scale[c];
            }
        }
        for (c, b) in self.bias.iter_mut().enumerate() {
            *b = *b * scale[c] + shift[c];
        }
        Ok(self)
    }

    /// `−y`: the branch subtracted.
    pub fn negate(self) -> AffineConv {
        AffineConv {
            weight: -self.weight,
            bias: -self.bias,
            geometry: self.geometry,
        }
    }

    /// The same convolution with its taps spread to dilation `to` (which divides each current
    /// dilation of an axis wider than one tap): a kernel of extent k at dilation d becomes extent
    /// (d/to)(k−1)+1 at dilation `to`, zeros between the taps.
    pub fn spread(self, to: &[usize]) -> Result<AffineConv, AlgebraError> {
        let layout = self.layout().spread(to)?;
        if layout.kernel == self.kernel() {
            return Ok(AffineConv {
                geometry: layout.geometry,
                ..self
            });
        }
        let factors: Vec<usize> = (0..to.len())
            .map(|a| {
                if self.kernel()[a] > 1 {
                    self.geometry.dilations[a] / to[a]
                } else {
                    1
                }
            })
            .collect();
        let mut weight = ArrayD::zeros(IxDyn(&layout.weight_dims()));
        weight
            .slice_each_axis_mut(|ax| {
                let i = ax.axis.index();
                if i < 2 {
                    Slice::from(..)
                } else {
                    Slice::from(..).step_by(factors[i - 2] as isize)
                }
            })
            .assign(&self.weight);
        Ok(AffineConv {
            weight,
            bias: self.bias,
            geometry: layout.geometry,
        })
    }

    /// Sums branches that read the same input into one convolution.
    pub fn sum(terms: Vec<AffineConv>) -> Result<AffineConv, AlgebraError> {
        AffineConv::sum_at(terms, None)
    }

    /// [`AffineConv::sum`] on an input of spatial size `sizes` (see [`Layout::sum_plan`]).
    pub fn sum_at(
        terms: Vec<AffineConv>,
        sizes: Option<&[usize]>,
    ) -> Result<AffineConv, AlgebraError> {
        let layouts: Vec<Layout> = terms.iter().map(AffineConv::layout).collect();
        Layout::check_ranks(&layouts)?;
        let common = Layout::common_dilations(&layouts);
        let mut spread: Vec<AffineConv> = terms
            .into_iter()
            .map(|t| t.spread(&common))
            .collect::<Result<_, _>>()?;
        let layouts: Vec<Layout> = spread.iter().map(AffineConv::layout).collect();
        let (target, offsets) = Layout::sum_plan(&layouts, sizes)?;
        // A term that already has the target's shape is the accumulator: no zeroed copy of the
        // largest kernel.
        let full = spread
            .iter()
            .zip(&offsets)
            .position(|(t, o)| t.kernel() == target.kernel.as_slice() && o.iter().all(|&v| v == 0));
        let (weight, mut bias) = match full {
            Some(i) => {
                let t = spread.swap_remove(i);
                (t.weight, t.bias)
            }
            None => (
                ArrayD::zeros(IxDyn(&target.weight_dims())),
                Array1::zeros(target.out_channels),
            ),
        };
        let mut offsets = offsets;
        if let Some(i) = full {
            offsets.swap_remove(i);
        }
        let mut weight = if weight.is_standard_layout() {
            weight
        } else {
            weight.as_standard_layout().into_owned()
        };
        let target_plane: usize = target.kernel.iter().product();
        let Some(dst) = weight.as_slice_mut() else {
            unreachable!("a standard-layout array is contiguous");
        };
        for (t, offset) in spread.iter().zip(&offsets) {
            // Where each tap of the term's kernel lands in the target kernel.
            let taps: Vec<usize> = (0..t.kernel().iter().product())
                .map(|tap| {
                    let mut rest = tap;
                    let mut pos = vec![0; offset.len()];
                    for a in (0..offset.len()).rev() {
                        pos[a] = rest % t.kernel()[a] + offset[a];
                        rest /= t.kernel()[a];
                    }
                    pos.iter()
                        .zip(&target.kernel)
                        .fold(0, |flat, (&p, &k)| flat * k + p)
                })
                .collect();
            let src = t.weight.as_standard_layout();
            let src = src.as_slice().unwrap_or(&[]);
            for (dst_plane, src_plane) in dst
                .chunks_exact_mut(target_plane)
                .zip(src.chunks_exact(taps.len()))
            {
                for (&tap, &v) in taps.iter().zip(src_plane) {
                    dst_plane[tap] += v;
                }
            }
            bias += &t.bias;
        }
        Ok(AffineConv {
            weight,
            bias,
            geometry: target.geometry,
        })
    }
}

#[cfg(test)]
mod tests {
    //! The algebra is checked against a naive direct convolution written here from the ONNX
    //! Conv definition, never against itself.
    use super::*;

    /// Direct 2-D convolution of `x` [C, H, W] by `conv`, straight from the ONNX definition.
    fn naive_conv2d(x: &ndarray::Array3<f64>, conv: &AffineConv) -> ndarray::Array3<f64> {
        let g = &conv.geometry;
        let (c, h, w) = x.dim();
        let o = conv.out_channels();
        let (kh, kw) = (conv.kernel()[0], conv.kernel()[1]);
        let cg = c / g.group;
        let og = o / g.group;
        let oh = (h + g.pads_begin[0] + g.pads_end[0] - g.dilations[0] * (kh - 1) - 1)
            / g.strides[0]
            + 1;
        let ow = (w + g.pads_begin[1] + g.pads_end[1] - g.dilations[1] * (kw - 1) - 1)
            / g.strides[1]
            + 1;
        let mut y = ndarray::Array3::zeros((o, oh, ow));
        for oc in 0..o {
            let grp = oc / og;
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = conv.bias[oc];
                    for ic in 0..cg {
                        for a in 0..kh {
                            for b in 0..kw {
                                let yy = (i * g.strides[0] + a * g.dilations[0]) as i64
                                    - g.pads_begin[0] as i64;
                                let xx = (j * g.strides[1] + b * g.dilations[1]) as i64
                                    - g.pads_begin[1] as i64;
                                if yy < 0 || xx < 0 || yy >= h as i64 || xx >= w as i64 {
                                    continue;
                                }
                                acc += conv.weight[[oc, ic, a, b]]
                                    * x[[grp * cg + ic, yy as usize, xx as usize]];
                            }
                        }
                    }
                    y[[oc, i, j]] = acc;
                }
            }
        }
        y
    }

    /// Deterministic pseudo-random values (a tiny LCG, so the tests need no RNG crate).
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        o: usize,
        cg: usize,
        k: [usize; 2],
        pads: [usize; 4],
        stride: usize,
        dil: usize,
        group: usize,
        seed: u64,
    ) -> AffineConv {
        let n = o * cg * k[0] * k[1];
        AffineConv {
            weight: ArrayD::from_shape_vec(IxDyn(&[o, cg, k[0], k[1]]), values(n, seed)).unwrap(),
            bias: Array1::from(values(o, seed + 1)),
            geometry: Geometry {
                strides: vec![stride; 2],
                dilations: vec![dil; 2],
                pads_begin: vec![pads[0], pads[1]],
                pads_end: vec![pads[2], pads[3]],
                group,
            },
        }
    }

    fn input(c: usize, h: usize, w: usize) -> ndarray::Array3<f64> {
        ndarray::Array3::from_shape_vec((c, h, w), values(c * h * w, 99)).unwrap()
    }

    fn assert_close(a: &ndarray::Array3<f64>, b: &ndarray::Array3<f64>) {
        assert_eq!(a.dim(), b.dim());
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-12, "max abs difference {worst}");
    }

    fn check_sum(branches: &[AffineConv], x: &ndarray::Array3<f64>) -> AffineConv {
        let fused = AffineConv::sum(branches.to_vec()).unwrap();
        let mut expected = naive_conv2d(x, &branches[0]);
        for b in &branches[1..] {
            expected += &naive_conv2d(x, b);
        }
        assert_close(&naive_conv2d(x, &fused), &expected);
        fused
    }

    #[test]
    fn repvgg_block_with_identity() {
        let x = input(4, 6, 5);
        let mut id = AffineConv::identity(4, 1, 2);
        id = id
            .scale_shift(&[0.5, 2.0, -1.0, 3.0], &[0.1, 0.2, 0.3, 0.4])
            .unwrap();
        let fused = check_sum(
            &[
                conv(4, 4, [3, 3], [1, 1, 1, 1], 1, 1, 1, 1),
                conv(4, 4, [1, 1], [0; 4], 1, 1, 1, 2),
                id,
            ],
            &x,
        );
        assert_eq!(fused.kernel(), &[3, 3]);
        assert_eq!(fused.geometry.pads_begin, vec![1, 1]);
    }

    #[test]
    fn stride_two_block_without_identity() {
        let x = input(3, 7, 8);
        check_sum(
            &[
                conv(6, 3, [3, 3], [1, 1, 1, 1], 2, 1, 1, 3),
                conv(6, 3, [1, 1], [0; 4], 2, 1, 1, 4),
            ],
            &x,
        );
    }

    #[test]
    fn grouped_identity_uses_the_group_local_channel() {
        for group in [2, 4] {
            let x = input(8, 5, 5);
            let id = AffineConv::identity(8, group, 2);
            let fused = check_sum(
                &[
                    conv(8, 8 / group, [3, 3], [1, 1, 1, 1], 1, 1, group, 5),
                    conv(8, 8 / group, [1, 1], [0; 4], 1, 1, group, 6),
                    id,
                ],
                &x,
            );
            assert_eq!(fused.weight.shape(), &[8, 8 / group, 3, 3]);
        }
    }

    #[test]
    fn depthwise_identity() {
        let x = input(4, 5, 5);
        check_sum(
            &[
                conv(4, 1, [3, 3], [1, 1, 1, 1], 1, 1, 4, 7),
                AffineConv::identity(4, 4, 2),
            ],
            &x,
        );
    }

    #[test]
    fn dilated_kernel_with_one_by_one_and_identity() {
        let x = input(3, 9, 9);
        let mut one = conv(3, 3, [1, 1], [0; 4], 1, 1, 1, 8);
        one.geometry.dilations = vec![1, 1];
        check_sum(
            &[
                conv(3, 3, [3, 3], [2, 2, 2, 2], 1, 2, 1, 9),
                one,
                AffineConv::identity(3, 1, 2),
            ],
            &x,
        );
    }

    #[test]
    fn asymmetric_branches_embed_at_their_offsets() {
        let x = input(2, 6, 6);
        check_sum(
            &[
                conv(2, 2, [3, 3], [1, 1, 1, 1], 1, 1, 1, 10),
                conv(2, 2, [3, 1], [1, 0, 1, 0], 1, 1, 1, 11),
                conv(2, 2, [1, 3], [0, 1, 0, 1], 1, 1, 1, 12),
            ],
            &x,
        );
    }

    #[test]
    fn branches_of_different_dilations_are_spread_and_summed() {
        let x = input(2, 9, 9);
        for (d, p) in [(2, 2), (3, 3)] {
            let fused = check_sum(
                &[
                    conv(2, 2, [3, 3], [1, 1, 1, 1], 1, 1, 1, 16),
                    conv(2, 2, [3, 3], [p, p, p, p], 1, d, 1, 17),
                    conv(2, 2, [5, 5], [4, 4, 4, 4], 1, 2, 1, 18),
                ],
                &x,
            );
            assert_eq!(fused.geometry.dilations, vec![1, 1]);
        }
        // Dilations 2 and 4 share dilation 2: the target stays dilated.
        let fused = check_sum(
            &[
                conv(2, 2, [3, 3], [2, 2, 2, 2], 1, 2, 1, 19),
                conv(2, 2, [3, 3], [4, 4, 4, 4], 1, 4, 1, 20),
            ],
            &x,
        );
        assert_eq!(fused.geometry.dilations, vec![2, 2]);
        assert_eq!(fused.kernel(), &[5, 5]);
    }

    #[test]
    fn shifted_kernels_grow_the_target() {
        let x = input(2, 6, 6);
        let fused = check_sum(
            &[
                conv(2, 2, [3, 3], [1, 1, 1, 1], 1, 1, 1, 14),
                conv(2, 2, [3, 3], [0, 0, 2, 2], 1, 1, 1, 15),
            ],
            &x,
        );
        assert_eq!(fused.kernel(), &[4, 4]);
    }

    #[test]
    fn scale_shift_matches_batch_norm_after_conv() {
        let x = input(2, 4, 4);
        let c = conv(3, 2, [3, 3], [1, 1, 1, 1], 1, 1, 1, 13);
        let scale = [0.5, -1.5, 2.0];
        let shift = [1.0, 0.0, -0.25];
        let bn = c.clone().scale_shift(&scale, &shift).unwrap();
        let mut expected = naive_conv2d(&x, &c);
        for (ch, mut plane) in expected.outer_iter_mut().enumerate() {
            plane.mapv_inplace(|v| v * scale[ch] + shift[ch]);
        }
        assert_close(&naive_conv2d(&x, &bn), &expected);
    }

    #[test]
    fn refuses_what_is_not_one_convolution() {
        let a = conv(4, 4, [3, 3], [1, 1, 1, 1], 1, 1, 1, 1);
        assert!(matches!(
            AffineConv::sum(vec![a.clone(), conv(4, 4, [1, 1], [0; 4], 2, 1, 1, 2)]),
            Err(AlgebraError::Stride { .. })
        ));
        assert!(matches!(
            AffineConv::sum(vec![a.clone(), conv(4, 2, [1, 1], [0; 4], 1, 1, 2, 2)]),
            Err(AlgebraError::Group { .. })
        ));
        assert!(matches!(
            AffineConv::sum(vec![
                a.clone(),
                conv(4, 4, [1, 1], [1, 1, 1, 1], 1, 1, 1, 2)
            ]),
            Err(AlgebraError::OutputSize { .. })
        ));

        assert!(matches!(
            a.clone().scale_shift(&[1.0], &[0.0]),
            Err(AlgebraError::ChannelParams { .. })
        ));
        assert_eq!(AffineConv::sum(vec![]), Err(AlgebraError::Empty));
    }
}
