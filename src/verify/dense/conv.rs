//! `Conv` and `ConvTranspose` of any spatial rank, as direct loops over output (or input)
//! positions and kernel taps, and the window attributes they share with `AveragePool`
//! (`strides`, `dilations`, `pads`, `auto_pad`), read here as the ONNX definitions state them.
//!
//! Conv: `Y[n, m, o] = B[m] + Σ_c Σ_t X[n, g·C/G + c, o·s + t·d − pad_begin] · W[m, c, t]` over
//! the input positions inside the input, for `m` in group `g`; output size
//! `⌊(in + pad_begin + pad_end − ((k − 1)·d + 1)) / s⌋ + 1`.
//!
//! ConvTranspose (weight `[C, M/G, k…]`): each input position `i` adds
//! `X[n, g·C/G + c, i] · W[g·C/G + c, m, t]` to output position `i·s + t·d − pad_begin` of
//! channel `g·M/G + m`; output size `s·(in − 1) + output_padding + (k − 1)·d + 1 − pad_begin −
//! pad_end`.

use super::{Inputs, Tensor, charge, elements, flat, from_vec};
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

/// Largest stride, dilation, pad or output padding evaluated (larger ones are hostile: no real
/// model has them, and the arithmetic on them stays far from overflow below it).
const MAX_ATTRIBUTE: i64 = 1 << 24;

/// A kernel's window on the input: per spatial axis, its stride, dilation and pads.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Window {
    pub(super) strides: Vec<i64>,
    pub(super) dilations: Vec<i64>,
    pub(super) begin: Vec<i64>,
    pub(super) end: Vec<i64>,
}

/// The INTS attribute `name`: `len` values within `least..=MAX_ATTRIBUTE`, `default` each when
/// absent.
pub(super) fn per_axis(
    node: &NodeProto,
    name: &str,
    len: usize,
    default: i64,
    least: i64,
) -> Result<Vec<i64>, String> {
    let Some(values) = attr::ints(node, name) else {
        return Ok(vec![default; len]);
    };
    if values.len() != len {
        return Err(format!("{name} {values:?} should have {len} values"));
    }
    if let Some(v) = values
        .iter()
        .find(|&&v| !(least..=MAX_ATTRIBUTE).contains(&v))
    {
        return Err(format!("{name} {values:?}: {v} is out of range"));
    }
    Ok(values.to_vec())
}

/// The window of a Conv or AveragePool with kernel `kernel` on an input of `spatial` size.
/// `auto_pad` SAME_UPPER / SAME_LOWER pad so that the output is `⌈in / s⌉` long, the odd unit of
/// padding at the end (UPPER) or at the beginning (LOWER).
pub(super) fn window(
    node: &NodeProto,
    kernel: &[usize],
    spatial: &[usize],
) -> Result<Window, String> {
    let rank = kernel.len();
    let strides = per_axis(node, "strides", rank, 1, 1)?;
    let dilations = per_axis(node, "dilations", rank, 1, 1)?;
    let auto_pad = attr::string(node, "auto_pad").unwrap_or_default();
    let (begin, end) = match auto_pad.as_str() {
        "" | "NOTSET" => {
            let pads = per_axis(node, "pads", 2 * rank, 0, 0)?;
            (pads[..rank].to_vec(), pads[rank..].to_vec())
        }
        "VALID" => (vec![0; rank], vec![0; rank]),
        same @ ("SAME_UPPER" | "SAME_LOWER") => {
            let (mut begin, mut end) = (vec![0; rank], vec![0; rank]);
            for a in 0..rank {
                let (input, s) = (spatial[a] as i64, strides[a]);
                let out = (input + s - 1) / s;
                let extent = (kernel[a] as i64 - 1) * dilations[a] + 1;
                let total = ((out - 1) * s + extent - input).max(0);
                let (small, large) = (total / 2, total - total / 2);
                (begin[a], end[a]) = if same == "SAME_UPPER" {
                    (small, large)
                } else {
                    (large, small)
                };
            }
            (begin, end)
        }
        other => return Err(format!("auto_pad '{other}' is not defined")),
    };
    Ok(Window {
        strides,
        dilations,
        begin,
        end,
    })
}

impl Window {
    /// The output size of a kernel `kernel` sliding over `spatial` (an error when the kernel does
    /// not fit the padded input).
    pub(super) fn output(&self, kernel: &[usize], spatial: &[usize]) -> Result<Vec<usize>, String> {
        let mut out = Vec::with_capacity(kernel.len());
        for (a, (&k, &input)) in kernel.iter().zip(spatial).enumerate() {
            let padded = input as i64 + self.begin[a] + self.end[a];
            let extent = (k as i64 - 1) * self.dilations[a] + 1;
            if padded < extent {
                return Err(format!(
                    "the kernel spans {extent} on axis {a}, over the padded input's {padded}"
                ));
            }
            out.push(((padded - extent) / self.strides[a] + 1) as usize);
        }
        Ok(out)
    }

    /// `at · stride + tap · dilation − pad` on every axis, flattened in `extent` (`None`:
    /// outside it): in a convolution or pooling, the input position tap `tap` reads at output
    /// position `at`; in a transposed convolution, the output position input position `at`
    /// reaches through tap `tap`.
    #[inline]
    pub(super) fn place(&self, at: &[usize], tap: &[usize], extent: &[usize]) -> Option<usize> {
        let mut flat = 0usize;
        for a in 0..extent.len() {
            let i =
                at[a] as i64 * self.strides[a] + tap[a] as i64 * self.dilations[a] - self.begin[a];
            if i < 0 || i >= extent[a] as i64 {
                return None;
            }
            flat = flat * extent[a] + i as usize;
        }
        Some(flat)
    }
}

/// Steps the multi-index `index` to the next one in row-major order within `shape`.
#[inline]
pub(super) fn step(index: &mut [usize], shape: &[usize]) {
    for a in (0..index.len()).rev() {
        index[a] += 1;
        if index[a] < shape[a] {
            return;
        }
        index[a] = 0;
    }
}

/// The shapes of a convolution's input `[N, C, spatial…]` and weight `[W0, W1, k…]`, checked
/// against each other and against the `group` and `kernel_shape` attributes.
struct Operands<'t> {
    x: &'t Tensor,
    w: &'t Tensor,
    group: usize,
    kernel: Vec<usize>,
}

fn operands<'t>(node: &NodeProto, inputs: &'t Inputs) -> Result<Operands<'t>, String> {
    let (x, w) = (inputs.get(0)?, inputs.get(1)?);
    if x.ndim() < 3 || w.ndim() != x.ndim() {
        return Err(format!(
            "input of shape {:?} and weight of shape {:?}: ranks must agree, at least 3",
            x.shape(),
            w.shape()
        ));
    }
    let group = attr::int(node, "group").unwrap_or(1);
    if !(1..=MAX_ATTRIBUTE).contains(&group) {
        return Err(format!("group {group} is out of range"));
    }
    let kernel = w.shape()[2..].to_vec();
    if kernel.contains(&0) {
        return Err(format!("weight of shape {:?} is empty", w.shape()));
    }
    if let Some(k) = attr::ints(node, "kernel_shape")
        && !k.iter().map(|&v| v as usize).eq(kernel.iter().copied())
    {
        return Err(format!(
            "kernel_shape {k:?} differs from the weight's {kernel:?}"
        ));
    }
    Ok(Operands {
        x,
        w,
        group: group as usize,
        kernel,
    })
}

/// The optional bias (input 2): `[channels]`.
fn bias<'t>(inputs: &'t Inputs, channels: usize) -> Result<Option<&'t [f64]>, String> {
    match inputs.optional(2) {
        None => Ok(None),
        Some(b) if b.shape() == [channels] => flat(b).map(Some),
        Some(b) => Err(format!(
            "bias of shape {:?} does not match {channels} output channels",
            b.shape()
        )),
    }
}

pub(super) fn conv(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let Operands {
        x,
        w,
        group,
        kernel,
    } = operands(node, inputs)?;
    let (n, c, spatial) = (x.shape()[0], x.shape()[1], &x.shape()[2..]);
    let (m, per_group) = (w.shape()[0], w.shape()[1]);
    if per_group.checked_mul(group) != Some(c) || !m.is_multiple_of(group) {
        return Err(format!(
            "input of shape {:?}, weight of shape {:?} and group {group} do not fit",
            x.shape(),
            w.shape()
        ));
    }
    let window = window(node, &kernel, spatial)?;
    let out = window.output(&kernel, spatial)?;
    let mut shape = vec![n, m];
    shape.extend(&out);
    let count = elements(&shape)?;
    let (positions, taps): (usize, usize) = (out.iter().product(), kernel.iter().product());
    // The loops visit every (group, position, tap), with or without channels.
    charge(&[n, m.max(group), positions, taps, per_group.max(1)])?;
    let (xs, ws, b) = (flat(x)?, flat(w)?, bias(inputs, m)?);
    let (plane, out_per_group) = (spatial.iter().product::<usize>(), m / group);
    let mut y = vec![0.0; count];
    let rank = kernel.len();
    for i in 0..n {
        for g in 0..group {
            let x_group = (i * c + g * per_group) * plane;
            // Odometers: `taps` steps bring `tap` back to zeros.
            let (mut at, mut tap) = (vec![0; rank], vec![0; rank]);
            for pos in 0..positions {
                for t in 0..taps {
                    if let Some(source) = window.place(&at, &tap, spatial) {
                        for o in g * out_per_group..(g + 1) * out_per_group {
                            let w_row = o * per_group * taps + t;
                            let sum: f64 = (0..per_group)
                                .map(|ch| xs[x_group + ch * plane + source] * ws[w_row + ch * taps])
                                .sum();
                            y[(i * m + o) * positions + pos] += sum;
                        }
                    }
                    step(&mut tap, &kernel);
                }
                step(&mut at, &out);
            }
        }
    }
    add_bias(&mut y, b, positions);
    from_vec(&shape, y)
}

pub(super) fn conv_transpose(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let Operands {
        x,
        w,
        group,
        kernel,
    } = operands(node, inputs)?;
    if attr::ints(node, "output_shape").is_some() {
        return Err("output_shape is not evaluated (give pads and output_padding)".into());
    }
    let auto_pad = attr::string(node, "auto_pad").unwrap_or_default();
    if !matches!(auto_pad.as_str(), "" | "NOTSET" | "VALID") {
        return Err(format!(
            "auto_pad '{auto_pad}' is not evaluated (runtimes disagree on where SAME pads go)"
        ));
    }
    let (n, c, spatial) = (x.shape()[0], x.shape()[1], &x.shape()[2..]);
    let (w_in, per_group) = (w.shape()[0], w.shape()[1]);
    if w_in != c || !c.is_multiple_of(group) {
        return Err(format!(
            "input of shape {:?}, weight of shape {:?} and group {group} do not fit",
            x.shape(),
            w.shape()
        ));
    }
    let rank = kernel.len();
    let window = window(node, &kernel, spatial)?;
    let output_padding = per_axis(node, "output_padding", rank, 0, 0)?;
    let mut out = Vec::with_capacity(rank);
    for a in 0..rank {
        let size = window.strides[a] * (spatial[a] as i64 - 1)
            + output_padding[a]
            + (kernel[a] as i64 - 1) * window.dilations[a]
            + 1
            - window.begin[a]
            - window.end[a];
        if size < 1 {
            return Err(format!("the output would be {size} long on axis {a}"));
        }
        out.push(size as usize);
    }
    let m = per_group
        .checked_mul(group)
        .ok_or("too many output channels")?;
    let mut shape = vec![n, m];
    shape.extend(&out);
    let count = elements(&shape)?;
    let (plane, taps): (usize, usize) = (spatial.iter().product(), kernel.iter().product());
    let positions: usize = out.iter().product();
    charge(&[n, c.max(group), plane, taps, per_group.max(1)])?;
    let (xs, ws, b) = (flat(x)?, flat(w)?, bias(inputs, m)?);
    let in_per_group = c / group;
    let mut y = vec![0.0; count];
    for i in 0..n {
        for g in 0..group {
            let (mut at, mut tap) = (vec![0; rank], vec![0; rank]);
            for pos in 0..plane {
                for t in 0..taps {
                    if let Some(target) = window.place(&at, &tap, &out) {
                        for ch in g * in_per_group..(g + 1) * in_per_group {
                            let v = xs[(i * c + ch) * plane + pos];
                            for o in 0..per_group {
                                let weight = ws[(ch * per_group + o) * taps + t];
                                y[(i * m + g * per_group + o) * positions + target] += v * weight;
                            }
                        }
                    }
                    step(&mut tap, &kernel);
                }
                step(&mut at, spatial);
            }
        }
    }
    add_bias(&mut y, b, positions);
    from_vec(&shape, y)
}

/// Adds `bias[channel]` to every position of each channel of `y` (`[N, M, positions]`, flat).
fn add_bias(y: &mut [f64], bias: Option<&[f64]>, positions: usize) {
    let Some(bias) = bias else { return };
    for (plane, &b) in y.chunks_mut(positions.max(1)).zip(bias.iter().cycle()) {
        plane.iter_mut().for_each(|v| *v += b);
    }
}
