//! Averages: `AveragePool` (any spatial rank, `ceil_mode=0`, no dilations), `GlobalAveragePool`
//! and `ReduceMean` (axes as an attribute before opset 18, as input 1 from opset 18: both are
//! read, whichever the node has).

use ndarray::Axis;

use super::conv::{per_axis, step, window};
use super::{Inputs, Tensor, axes, charge, elements, flag, flat, from_vec, integers};
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

/// `AveragePool`: the mean of each window over the input positions inside it
/// (`count_include_pad=0`, the default) or over the whole kernel, padding counted as zeros
/// (`count_include_pad=1`).
pub(super) fn average_pool(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let x = inputs.get(0)?;
    let kernel = attr::ints(node, "kernel_shape").ok_or("kernel_shape is missing")?;
    let rank = kernel.len();
    if x.ndim() != rank + 2 {
        return Err(format!(
            "input of shape {:?} for kernel_shape {kernel:?}",
            x.shape()
        ));
    }
    let kernel: Vec<usize> = per_axis(node, "kernel_shape", rank, 1, 1)?
        .into_iter()
        .map(|k| k as usize)
        .collect();
    if attr::int(node, "ceil_mode").is_some_and(|c| c != 0) {
        return Err("ceil_mode=1 is not evaluated".into());
    }
    if per_axis(node, "dilations", rank, 1, 1)?
        .iter()
        .any(|&d| d != 1)
    {
        return Err("dilations are not evaluated".into());
    }
    let include_pad = flag(node, "count_include_pad", false)?;
    let (n, c, spatial) = (x.shape()[0], x.shape()[1], &x.shape()[2..]);
    let window = window(node, &kernel, spatial)?;
    let out = window.output(&kernel, spatial)?;
    let mut shape = vec![n, c];
    shape.extend(&out);
    let count = elements(&shape)?;
    // The kernel is an attribute: its size is bounded by nothing held, so counted with care.
    let taps = kernel.iter().try_fold(1usize, |t, &k| t.checked_mul(k));
    let taps = taps.ok_or_else(|| format!("kernel_shape {kernel:?} is too large"))?;
    let positions: usize = out.iter().product();
    charge(&[n, c, positions, taps])?;
    let (xs, plane) = (flat(x)?, spatial.iter().product::<usize>());
    let mut y = Vec::with_capacity(count);
    for channel in 0..n * c {
        let xs = &xs[channel * plane..(channel + 1) * plane];
        let (mut at, mut tap) = (vec![0; rank], vec![0; rank]);
        for _ in 0..positions {
            let (mut sum, mut inside) = (0.0, 0usize);
            for _ in 0..taps {
                if let Some(source) = window.place(&at, &tap, spatial) {
                    sum += xs[source];
                    inside += 1;
                }
                step(&mut tap, &kernel);
            }
            let divisor = if include_pad { taps } else { inside };
            if divisor == 0 {
                return Err(format!(
                    "a window at {at:?} lies wholly in the padding (count_include_pad=0)"
                ));
            }
            y.push(sum / divisor as f64);
            step(&mut at, &out);
        }
    }
    from_vec(&shape, y)
}

/// `GlobalAveragePool`: the mean over every spatial axis (kept, of size 1).
pub(super) fn global_average_pool(inputs: &Inputs) -> Result<Tensor, String> {
    let x = inputs.get(0)?;
    if x.ndim() < 2 {
        return Err(format!(
            "input of shape {:?} has no channel axis",
            x.shape()
        ));
    }
    let spatial: Vec<usize> = (2..x.ndim()).collect();
    mean(x, &spatial, true)
}

/// `ReduceMean` over `axes` (attribute, or input 1), `keepdims` (default 1); no axes reduce all
/// of them unless `noop_with_empty_axes=1`.
pub(super) fn reduce_mean(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let x = inputs.get(0)?;
    let listed = match (attr::ints(node, "axes"), inputs.optional(1)) {
        (Some(_), Some(_)) => return Err("axes given both as attribute and as input".into()),
        (Some(a), None) => a.to_vec(),
        (None, Some(t)) if t.ndim() == 1 => integers(t)?,
        (None, Some(t)) => return Err(format!("axes of shape {:?} are not 1-D", t.shape())),
        (None, None) => Vec::new(),
    };
    let keepdims = flag(node, "keepdims", true)?;
    if listed.is_empty() {
        if flag(node, "noop_with_empty_axes", false)? {
            return Ok(x.clone());
        }
        let all: Vec<usize> = (0..x.ndim()).collect();
        return mean(x, &all, keepdims);
    }
    mean(x, &axes(&listed, x.ndim())?, keepdims)
}

/// The mean of `x` over the distinct axes `over`, kept as size 1 when `keepdims`.
fn mean(x: &Tensor, over: &[usize], keepdims: bool) -> Result<Tensor, String> {
    let mut sorted = over.to_vec();
    sorted.sort_unstable();
    let mut y = x.clone();
    for &a in sorted.iter().rev() {
        y = y
            .mean_axis(Axis(a))
            .ok_or_else(|| format!("axis {a} of shape {:?} is empty", x.shape()))?;
    }
    if keepdims {
        for &a in &sorted {
            y.insert_axis_inplace(Axis(a));
        }
    }
    Ok(y)
}
