//! The shape of the fold algebra, with no numbers and no protobuf in it. Every branch of a block
//! is an *affine convolution* `y = W ⊛ x + b`; a [`Layout`] is its shape — channels, kernel and
//! [`Geometry`] (strides, pads, dilations, groups) — and this module decides how branches sum:
//! the dilation they are spread to, where each kernel sits in the one that covers them all, and
//! the pads of the result. Planning uses layouts to know every fused tensor's size before
//! computing any, so that the output can be streamed; [`crate::recipe`] puts the numbers in.

use std::fmt;

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

    /// The layout after spreading taps to dilations `to` (see [`crate::recipe::Recipe::spread`]); 1-tap
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

    /// The layout of the sum of `terms`, on an input of spatial size `sizes` when known:
    /// branches whose pads disagree must give outputs of one size there, and the sum then holds
    /// at that size only.
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
