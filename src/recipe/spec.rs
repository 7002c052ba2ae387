//! The specification of [`super::Recipe`]: the same fold algebra on dense f64 arrays — every
//! branch an explicit weight tensor and bias, scaled, shifted, spread, embedded and summed as
//! written in the README's *How the fold works*. The tool never runs it: it is tested against a
//! naive direct convolution written from the ONNX `Conv` definition (below), and the recipe is
//! tested against it (and benchmarked beside it).

use ndarray::{Array1, ArrayD, IxDyn, Slice};

use crate::layout::{AlgebraError, Geometry, Layout};

/// `y = W ⊛ x + b` with W of shape `[O, C/group, k_1, .., k_r]` and b of length O.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseConv {
    pub weight: ArrayD<f64>,
    pub bias: Array1<f64>,
    pub geometry: Geometry,
}

impl DenseConv {
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
    pub fn identity(channels: usize, group: usize, rank: usize) -> DenseConv {
        DenseConv::identity_rows(channels, group, rank, 0..channels)
    }

    /// The output channels `rows` of [`DenseConv::identity`].
    pub fn identity_rows(
        channels: usize,
        group: usize,
        rank: usize,
        rows: std::ops::Range<usize>,
    ) -> DenseConv {
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
        DenseConv {
            weight,
            bias: Array1::zeros(rows.len()),
            geometry: layout.geometry,
        }
    }

    /// Applies `y ↦ y·scale + shift` per output channel (a BatchNormalization, Mul or Add).
    pub fn scale_shift(mut self, scale: &[f64], shift: &[f64]) -> Result<DenseConv, AlgebraError> {
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
    pub fn negate(self) -> DenseConv {
        DenseConv {
            weight: -self.weight,
            bias: -self.bias,
            geometry: self.geometry,
        }
    }

    /// The same convolution with its taps spread to dilation `to` (which divides each current
    /// dilation of an axis wider than one tap): a kernel of extent k at dilation d becomes extent
    /// (d/to)(k−1)+1 at dilation `to`, zeros between the taps.
    pub fn spread(self, to: &[usize]) -> Result<DenseConv, AlgebraError> {
        let layout = self.layout().spread(to)?;
        if layout.kernel == self.kernel() {
            return Ok(DenseConv {
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
        Ok(DenseConv {
            weight,
            bias: self.bias,
            geometry: layout.geometry,
        })
    }

    /// Sums branches that read the same input into one convolution.
    pub fn sum(terms: Vec<DenseConv>) -> Result<DenseConv, AlgebraError> {
        DenseConv::sum_at(terms, None)
    }

    /// [`DenseConv::sum`] on an input of spatial size `sizes` (branches whose pads disagree must give outputs of one size at `sizes`).
    pub fn sum_at(
        terms: Vec<DenseConv>,
        sizes: Option<&[usize]>,
    ) -> Result<DenseConv, AlgebraError> {
        let layouts: Vec<Layout> = terms.iter().map(DenseConv::layout).collect();
        Layout::check_ranks(&layouts)?;
        let common = Layout::common_dilations(&layouts);
        let mut spread: Vec<DenseConv> = terms
            .into_iter()
            .map(|t| t.spread(&common))
            .collect::<Result<_, _>>()?;
        let layouts: Vec<Layout> = spread.iter().map(DenseConv::layout).collect();
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
        Ok(DenseConv {
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
    fn naive_conv2d(x: &ndarray::Array3<f64>, conv: &DenseConv) -> ndarray::Array3<f64> {
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
    ) -> DenseConv {
        let n = o * cg * k[0] * k[1];
        DenseConv {
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

    fn check_sum(branches: &[DenseConv], x: &ndarray::Array3<f64>) -> DenseConv {
        let fused = DenseConv::sum(branches.to_vec()).unwrap();
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
        let mut id = DenseConv::identity(4, 1, 2);
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
            let id = DenseConv::identity(8, group, 2);
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
                DenseConv::identity(4, 4, 2),
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
                DenseConv::identity(3, 1, 2),
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
            DenseConv::sum(vec![a.clone(), conv(4, 4, [1, 1], [0; 4], 2, 1, 1, 2)]),
            Err(AlgebraError::Stride { .. })
        ));
        assert!(matches!(
            DenseConv::sum(vec![a.clone(), conv(4, 2, [1, 1], [0; 4], 1, 1, 2, 2)]),
            Err(AlgebraError::Group { .. })
        ));
        assert!(matches!(
            DenseConv::sum(vec![
                a.clone(),
                conv(4, 4, [1, 1], [1, 1, 1, 1], 1, 1, 1, 2)
            ]),
            Err(AlgebraError::OutputSize { .. })
        ));

        assert!(matches!(
            a.clone().scale_shift(&[1.0], &[0.0]),
            Err(AlgebraError::ChannelParams { .. })
        ));
        assert_eq!(DenseConv::sum(vec![]), Err(AlgebraError::Empty));
    }
}
