//! The direct convolution both sides of the check run (the original's Conv nodes and the fused
//! Conv): the input under the kernel gathered per block of output positions in the weights'
//! layout, so that each sampled output channel is one contiguous dot product per position.

use ndarray::{ArrayD, IxDyn};

use super::window::{ints_or, pads};
use super::{CHECK_ELEMENTS, CHECK_WORK};
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;
use crate::tensor::{self, FloatType};

/// Values of gathered input a convolution of the check holds at a time (2 MB of f64).
const PATCH_VALUES: usize = 1 << 18;

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
pub(super) struct Weight<'a> {
    pub(super) dims: &'a [usize],
    pub(super) values: Values<'a>,
    pub(super) whole: bool,
}

/// For each output position and kernel tap, the flat input position it reads (`None`: padding).
pub(super) type TapTable = Vec<Vec<Option<usize>>>;

/// The [`TapTable`] of a convolution or pooling, and the output's spatial shape.
pub(super) fn taps(
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
pub(super) fn conv(
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
#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Axis;

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
