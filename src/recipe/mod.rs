//! A fused kernel as a recipe instead of numbers: which source kernels (stored Conv weights, the
//! identity, an average) land on which taps of the fused kernel, times which per-channel factor.
//! The branches' algebra (scale and shift, negation, spreading taps, summing) acts on the recipe
//! alone; the weights are read once, when a row of output channels is written, in one pass from
//! the stored bytes to the output's bytes. [`spec::DenseConv`] is the same algebra on
//! dense numbers; the two agree to the last bit but for f64 rounding (tested below).

pub mod scaled;
pub mod spec;

use std::ops::Range;

use crate::layout::{AlgebraError, Layout};
use crate::tensor::{self, Data, FloatType};

/// Where a part's values come from, per output channel `o` and input channel `i` (of its group).
#[derive(Debug, Clone)]
pub enum Source {
    /// A stored kernel `[O, C/group, k…]`: row `o`.
    Weights(Data),
    /// `x` itself: 1 where `i = o mod C/group`, one tap.
    Identity,
    /// An average pool: 1 at every tap where `i = o mod C/group` (the factor holds 1/taps).
    Mean,
}

/// One source's share of the fused kernel.
#[derive(Debug, Clone)]
pub struct Part {
    pub source: Source,
    /// For each tap of the source kernel (flattened), its flat index in the fused kernel.
    pub taps: Vec<usize>,
    /// Per output channel.
    pub factor: Vec<f64>,
}

/// `y = (Σ parts) ⊛ x + bias`, with the fused layout.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub layout: Layout,
    pub parts: Vec<Part>,
    pub bias: Vec<f64>,
}

/// For half precision: the largest value written and the largest change rounding made.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rounding {
    pub largest: f64,
    pub rounded: f64,
}

impl Recipe {
    /// A source whose kernel has the layout's shape, every channel once.
    pub fn leaf(layout: Layout, source: Source, factor: f64, bias: Vec<f64>) -> Recipe {
        let taps = (0..layout.kernel.iter().product()).collect();
        let factor = vec![factor; layout.out_channels];
        Recipe {
            layout,
            parts: vec![Part {
                source,
                taps,
                factor,
            }],
            bias,
        }
    }

    /// `y ↦ y·scale + shift` per output channel.
    pub fn scale_shift(mut self, scale: &[f64], shift: &[f64]) -> Result<Recipe, AlgebraError> {
        self.layout.check_channels(scale, shift)?;
        for part in &mut self.parts {
            part.factor.iter_mut().zip(scale).for_each(|(f, s)| *f *= s);
        }
        for ((b, s), t) in self.bias.iter_mut().zip(scale).zip(shift) {
            *b = *b * s + t;
        }
        Ok(self)
    }

    /// `−y`.
    pub fn negate(mut self) -> Recipe {
        for part in &mut self.parts {
            part.factor.iter_mut().for_each(|f| *f = -*f);
        }
        self.bias.iter_mut().for_each(|b| *b = -*b);
        self
    }

    /// Spreads the taps to dilations `to` (see [`spec::DenseConv::spread`]).
    fn spread(self, to: &[usize]) -> Result<Recipe, AlgebraError> {
        let layout = self.layout.spread(to)?;
        let from = &self.layout;
        let step: Vec<usize> = (0..to.len())
            .map(|a| match from.kernel[a] > 1 {
                true => from.geometry.dilations[a] / to[a].max(1),
                false => 1,
            })
            .collect();
        let parts = remap(self.parts, &from.kernel, &layout.kernel, |a, p| p * step[a]);
        Ok(Recipe {
            layout,
            parts,
            bias: self.bias,
        })
    }

    /// Sums branches that read the same input into one convolution.
    pub fn sum(terms: Vec<Recipe>) -> Result<Recipe, AlgebraError> {
        Recipe::sum_at(terms, None)
    }

    /// [`Recipe::sum`] on an input of spatial size `sizes` (branches whose pads disagree must give outputs of one size at `sizes`).
    pub fn sum_at(terms: Vec<Recipe>, sizes: Option<&[usize]>) -> Result<Recipe, AlgebraError> {
        let layouts: Vec<Layout> = terms.iter().map(|t| t.layout.clone()).collect();
        Layout::check_ranks(&layouts)?;
        let common = Layout::common_dilations(&layouts);
        let spread: Vec<Recipe> = terms
            .into_iter()
            .map(|t| t.spread(&common))
            .collect::<Result<_, _>>()?;
        let layouts: Vec<Layout> = spread.iter().map(|t| t.layout.clone()).collect();
        let (target, offsets) = Layout::sum_plan(&layouts, sizes)?;
        let mut parts = Vec::new();
        let mut bias = vec![0.0; target.out_channels];
        for (term, offset) in spread.into_iter().zip(&offsets) {
            let moved = remap(term.parts, &term.layout.kernel, &target.kernel, |a, p| {
                p + offset[a]
            });
            parts.extend(moved);
            bias.iter_mut().zip(&term.bias).for_each(|(b, t)| *b += t);
        }
        // The part that covers the whole kernel goes first: it starts each row.
        let plane: usize = target.kernel.iter().product();
        if let Some(full) = parts.iter().position(|p| covers(p, plane)) {
            parts[..=full].rotate_right(1);
        }
        Ok(Recipe {
            layout: target,
            parts,
            bias,
        })
    }

    #[inline(always)]
    fn encode_rows_here(
        &self,
        rows: Range<usize>,
        ty: FloatType,
        out: &mut [u8],
        acc: &mut Vec<f64>,
        scratch: &mut Vec<f64>,
    ) -> Rounding {
        let mut rounding = Rounding::default();
        let half = matches!(ty, FloatType::F16 | FloatType::Bf16);
        let plane: usize = self.layout.kernel.iter().product::<usize>().max(1);
        let in_pg = self.layout.in_per_group;
        let row_bytes = self.row_len() * ty.size();
        // The first part starts each row when it covers the whole kernel (see `sum`).
        let (start, rest) = match self.parts.split_first() {
            Some((first, rest)) if covers(first, plane) => (Some(first), rest),
            _ => (None, &self.parts[..]),
        };
        // A row goes through `acc` a tile of input channels at a time, small enough to stay in
        // the first-level cache between reading the sources and encoding.
        let tile = (TILE_VALUES / plane).max(1);
        let widest = tile.min(in_pg);
        let longest = self.parts.iter().map(|p| p.taps.len()).max().unwrap_or(0);
        if acc.len() < widest * plane {
            acc.resize(widest * plane, 0.0);
        }
        if scratch.len() < widest * longest {
            scratch.resize(widest * longest, 0.0);
        }
        let plane_bytes = plane * ty.size();
        for (o, out) in rows.zip(out.chunks_exact_mut(row_bytes.max(1))) {
            for first in (0..in_pg).step_by(tile) {
                let channels = first..(first + tile).min(in_pg);
                let acc = &mut acc[..channels.len() * plane];
                self.tile(o, channels.clone(), plane, start, rest, acc, scratch);
                let out = &mut out[channels.start * plane_bytes..channels.end * plane_bytes];
                tensor::encode_to(acc, ty, out);
                if half {
                    rounding.merge(ty, acc);
                }
            }
            if half {
                rounding.merge(ty, &self.bias[o..=o]);
            }
        }
        rounding
    }

    /// Input channels `channels` of output channel `o` of the fused kernel, into `acc`: `start`
    /// (a part covering the whole kernel) written, or zeros, then the `rest` added at their taps.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn tile(
        &self,
        o: usize,
        channels: Range<usize>,
        plane: usize,
        start: Option<&Part>,
        rest: &[Part],
        acc: &mut [f64],
        scratch: &mut [f64],
    ) {
        let in_pg = self.layout.in_per_group;
        // Values `channels` of row `o` of a source with `taps` taps per input channel.
        let range = |taps: usize| {
            let row = o * in_pg * taps;
            row + channels.start * taps..row + channels.end * taps
        };
        match start.map(|p| (&p.source, p.factor[o])) {
            Some((Source::Weights(data), f)) => data.read_scaled(range(plane), f, acc),
            _ => acc.fill(0.0),
        }
        for part in rest {
            let f = part.factor[o];
            match &part.source {
                Source::Weights(data) => {
                    let taps = part.taps.len();
                    let scratch = &mut scratch[..channels.len() * taps];
                    data.read_scaled(range(taps), f, scratch);
                    let planes = acc.chunks_exact_mut(plane);
                    for (dst, src) in planes.zip(scratch.chunks_exact(taps.max(1))) {
                        for (&tap, &v) in part.taps.iter().zip(src) {
                            dst[tap] += v;
                        }
                    }
                }
                Source::Identity | Source::Mean => {
                    let c = o % in_pg.max(1);
                    if channels.contains(&c) {
                        let at = (c - channels.start) * plane;
                        part.taps.iter().for_each(|&tap| acc[at + tap] += f);
                    }
                }
            }
        }
    }
}

/// A fused weight computed row by row (output channels, or a linear weight's first axis) from
/// the stored bytes, as the producer folds it: a block's [`Recipe`], or a linear fold's
/// [`scaled::Scaled`].
pub trait Rows: Send + Sync {
    /// Values per row.
    fn row_len(&self) -> usize;

    /// The fused bias, one value per output channel or feature.
    fn bias(&self) -> &[f64];

    /// Computes rows `rows` in f64 and encodes them as `ty` into `out` (exactly `rows` ×
    /// [`Rows::row_len`] values long); `acc` and `scratch` are reused buffers.
    fn encode_rows(
        &self,
        rows: Range<usize>,
        ty: FloatType,
        out: &mut [u8],
        acc: &mut Vec<f64>,
        scratch: &mut Vec<f64>,
    ) -> Rounding;

    /// The stored bytes of rows `rows` of every stored weight read (to let their pages go once
    /// written).
    fn stored_rows(&self, rows: Range<usize>) -> Vec<&[u8]>;
}

impl Rows for Recipe {
    /// The stored bytes of output channels `rows` of each stored kernel the recipe reads.
    fn stored_rows(&self, rows: Range<usize>) -> Vec<&[u8]> {
        let in_pg = self.layout.in_per_group;
        let stored = self.parts.iter().filter_map(|part| match &part.source {
            Source::Weights(Data::Raw(bytes, ty)) => {
                let row = in_pg * part.taps.len() * ty.size();
                bytes.get(rows.start * row..rows.end * row)
            }
            _ => None,
        });
        stored.collect()
    }

    /// Values per output channel: `C/group · taps`.
    fn row_len(&self) -> usize {
        self.layout.in_per_group * self.layout.kernel.iter().product::<usize>()
    }

    fn encode_rows(
        &self,
        rows: Range<usize>,
        ty: FloatType,
        out: &mut [u8],
        acc: &mut Vec<f64>,
        scratch: &mut Vec<f64>,
    ) -> Rounding {
        crate::simd::with_avx2(
            #[inline(always)]
            || self.encode_rows_here(rows, ty, out, acc, scratch),
        )
    }

    fn bias(&self) -> &[f64] {
        &self.bias
    }
}

/// Values of a row computed at a time (see [`Recipe::encode_rows`]): 16 KB of f64.
const TILE_VALUES: usize = 2048;

/// Whether a part holds stored weights for every tap of the kernel, in order.
fn covers(part: &Part, plane: usize) -> bool {
    matches!(part.source, Source::Weights(_))
        && part.taps.len() == plane
        && part.taps.iter().enumerate().all(|(i, &t)| i == t)
}

/// Moves every part's taps from kernel `from` to kernel `to`, axis position `p` to `at(axis, p)`.
fn remap(
    mut parts: Vec<Part>,
    from: &[usize],
    to: &[usize],
    at: impl Fn(usize, usize) -> usize,
) -> Vec<Part> {
    if from == to && (0..from.len()).all(|a| (0..from[a]).all(|p| at(a, p) == p)) {
        return parts;
    }
    let moved = |flat: usize| {
        let mut rest = flat;
        let mut pos = vec![0; from.len()];
        for a in (0..from.len()).rev() {
            pos[a] = at(a, rest % from[a].max(1));
            rest /= from[a].max(1);
        }
        pos.iter().zip(to).fold(0, |acc, (&p, &k)| acc * k + p)
    };
    for part in &mut parts {
        part.taps.iter_mut().for_each(|t| *t = moved(*t));
    }
    parts
}

impl Rounding {
    /// Both roundings' worst: that of values written in two parts.
    pub fn combine(self, other: Rounding) -> Rounding {
        Rounding {
            largest: self.largest.max(other.largest),
            rounded: self.rounded.max(other.rounded),
        }
    }

    /// The largest change rounding made, relative to the largest value written.
    pub fn relative(&self) -> f64 {
        self.rounded / self.largest.max(f64::MIN_POSITIVE)
    }

    pub(crate) fn merge(&mut self, ty: FloatType, values: &[f64]) {
        for &v in values {
            self.largest = self.largest.max(v.abs());
            self.rounded = self.rounded.max((ty.round(v) - v).abs());
        }
    }
}

#[cfg(test)]
mod tests {
    //! The recipe against [`DenseConv`], the same algebra on dense numbers (itself checked
    //! against a direct convolution): same branches, same operations, same fused kernel.
    use ndarray::{Array1, ArrayD, IxDyn};

    use super::spec::DenseConv;
    use super::*;
    use crate::layout::Geometry;

    fn geometry(pads: &[usize], dilations: &[usize], group: usize) -> Geometry {
        Geometry {
            strides: vec![1; pads.len()],
            dilations: dilations.to_vec(),
            pads_begin: pads.to_vec(),
            pads_end: pads.to_vec(),
            group,
        }
    }

    /// The same random branch both ways.
    fn branch(
        o: usize,
        per_group: usize,
        kernel: &[usize],
        g: Geometry,
        seed: u64,
    ) -> (DenseConv, Recipe) {
        let mut dims = vec![o, per_group];
        dims.extend(kernel);
        let n: usize = dims.iter().product();
        let mut state = seed * 2654435761 + 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let values: Vec<f64> = (0..n).map(|_| next()).collect();
        let bias: Vec<f64> = (0..o).map(|_| next()).collect();
        let affine = DenseConv {
            weight: ArrayD::from_shape_vec(IxDyn(&dims), values.clone()).unwrap(),
            bias: Array1::from(bias.clone()),
            geometry: g,
        };
        let source = Source::Weights(Data::Values(values.into()));
        let recipe = Recipe::leaf(affine.layout(), source, 1.0, bias);
        (affine, recipe)
    }

    fn params(o: usize, seed: f64) -> (Vec<f64>, Vec<f64>) {
        let scale = (0..o).map(|c| 0.5 + seed + c as f64 * 0.1).collect();
        let shift = (0..o).map(|c| seed - c as f64 * 0.01).collect();
        (scale, shift)
    }

    /// Asserts the recipe writes the affine convolution's weights and bias.
    fn assert_same(recipe: &Recipe, affine: &DenseConv) {
        assert_eq!(recipe.layout, affine.layout());
        let o = recipe.layout.out_channels;
        let mut bytes = vec![0; o * recipe.row_len() * 8];
        let (mut acc, mut scratch) = (Vec::new(), Vec::new());
        recipe.encode_rows(0..o, FloatType::F64, &mut bytes, &mut acc, &mut scratch);
        let got = tensor::decode(&bytes, FloatType::F64);
        let want = affine.weight.as_standard_layout();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((g - w).abs() <= 1e-12 * (1.0 + w.abs()), "{g} != {w}");
        }
        for (g, w) in recipe.bias.iter().zip(affine.bias.iter()) {
            assert!((g - w).abs() <= 1e-12 * (1.0 + w.abs()), "bias {g} != {w}");
        }
    }

    #[test]
    fn repvgg_block_with_groups() {
        let (o, group) = (8, 2);
        let (a3, r3) = branch(o, 4, &[3, 3], geometry(&[1, 1], &[1, 1], group), 1);
        let (a1, r1) = branch(o, 4, &[1, 1], geometry(&[0, 0], &[1, 1], group), 2);
        let (s3, t3) = params(o, 0.1);
        let (s1, t1) = params(o, 0.2);
        let (si, ti) = params(o, 0.3);
        let ai = DenseConv::identity(o, group, 2);
        let ri = Recipe::leaf(
            Layout::identity(o, group, 2),
            Source::Identity,
            1.0,
            vec![0.0; o],
        );
        let affine = DenseConv::sum(vec![
            a3.scale_shift(&s3, &t3).unwrap(),
            a1.scale_shift(&s1, &t1).unwrap(),
            ai.scale_shift(&si, &ti).unwrap(),
        ])
        .unwrap();
        let recipe = Recipe::sum(vec![
            r1.scale_shift(&s1, &t1).unwrap(),
            r3.scale_shift(&s3, &t3).unwrap(),
            ri.scale_shift(&si, &ti).unwrap(),
        ])
        .unwrap();
        assert_same(&recipe, &affine);
    }

    #[test]
    fn dilated_and_asymmetric_branches_spread_and_shift() {
        let o = 3;
        let (a, ra) = branch(o, 2, &[3, 3], geometry(&[2, 2], &[2, 2], 1), 3);
        let (b, rb) = branch(o, 2, &[3, 3], geometry(&[1, 1], &[1, 1], 1), 4);
        let mut row = geometry(&[0, 1], &[1, 1], 1);
        row.pads_end = vec![0, 1];
        let (c, rc) = branch(o, 2, &[1, 3], row, 5);
        let mut wide = geometry(&[2, 0], &[2, 1], 1);
        wide.pads_end = vec![2, 0];
        let (d, rd) = branch(o, 2, &[3, 1], wide, 6);
        let affine = DenseConv::sum(vec![a, b.negate(), c, d]).unwrap();
        let recipe = Recipe::sum(vec![ra, rb.negate(), rc, rd]).unwrap();
        assert_eq!(affine.kernel(), &[5, 5]);
        assert_same(&recipe, &affine);
    }

    #[test]
    fn nested_sums_and_averages() {
        let o = 4;
        let (a, ra) = branch(o, 4, &[3, 3], geometry(&[1, 1], &[1, 1], 1), 7);
        let (b, rb) = branch(o, 4, &[1, 1], geometry(&[0, 0], &[1, 1], 1), 8);
        let layout = Layout {
            out_channels: o,
            in_per_group: o,
            kernel: vec![3, 3],
            geometry: geometry(&[1, 1], &[1, 1], 1),
        };
        let mut mean = ArrayD::zeros(IxDyn(&[o, o, 3, 3]));
        for c in 0..o {
            mean.slice_mut(ndarray::s![c, c, .., ..]).fill(1.0 / 9.0);
        }
        let am = DenseConv {
            weight: mean,
            bias: Array1::zeros(o),
            geometry: layout.geometry.clone(),
        };
        let rm = Recipe::leaf(layout, Source::Mean, 1.0 / 9.0, vec![0.0; o]);
        let (s, t) = params(o, 0.4);
        let inner = DenseConv::sum(vec![b, am])
            .unwrap()
            .scale_shift(&s, &t)
            .unwrap();
        let affine = DenseConv::sum(vec![inner, a]).unwrap();
        let inner = Recipe::sum(vec![rb, rm])
            .unwrap()
            .scale_shift(&s, &t)
            .unwrap();
        let recipe = Recipe::sum(vec![inner, ra]).unwrap();
        assert_same(&recipe, &affine);
    }

    /// The AVX2 build of the kernel writes the same bytes as the plain one, for every type.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_kernel_writes_the_same_bytes() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        // 240 input channels a group: two tiles of a row, the second one short.
        let (o, group) = (480, 2);
        let (_, r3) = branch(o, 240, &[3, 3], geometry(&[1, 1], &[1, 1], group), 10);
        let (_, r1) = branch(o, 240, &[1, 1], geometry(&[0, 0], &[1, 1], group), 11);
        let id = Recipe::leaf(
            Layout::identity(o, group, 2),
            Source::Identity,
            1.0,
            vec![0.0; o],
        );
        let (s, t) = params(o, 0.3);
        let recipe = Recipe::sum(vec![r3.scale_shift(&s, &t).unwrap(), r1, id.negate()]).unwrap();
        for ty in [
            FloatType::F32,
            FloatType::F64,
            FloatType::F16,
            FloatType::Bf16,
        ] {
            let len = o * recipe.row_len() * ty.size();
            let (mut plain, mut wide) = (vec![0; len], vec![1; len]);
            let (mut acc, mut scratch) = (Vec::new(), Vec::new());
            recipe.encode_rows_here(0..o, ty, &mut plain, &mut acc, &mut scratch);
            // The CPU has AVX2 (checked above): this runs the AVX2 build.
            recipe.encode_rows(0..o, ty, &mut wide, &mut acc, &mut scratch);
            assert!(plain == wide, "{}", ty.name());
        }
    }

    #[test]
    fn half_precision_reports_its_rounding() {
        let (_, r) = branch(2, 3, &[3, 3], geometry(&[1, 1], &[1, 1], 1), 9);
        let mut bytes = vec![0; 2 * 27 * 2];
        let (mut acc, mut scratch) = (Vec::new(), Vec::new());
        let rounding = r.encode_rows(0..2, FloatType::F16, &mut bytes, &mut acc, &mut scratch);
        // The buffer started as zeros: every weight was written.
        let written = tensor::decode(&bytes, FloatType::F16);
        assert!(written.iter().all(|&v| v != 0.0), "{written:?}");
        assert!(rounding.largest > 0.1 && rounding.largest <= 0.5);
        assert!(rounding.rounded > 0.0 && rounding.rounded < 1e-3);
    }
}
