//! The original subgraph evaluated node by node from the block's input to its output, following
//! the graph's own edges and each operator's ONNX definition (Conv, BatchNormalization, Add, Sub,
//! Sum, Mul, Div, AveragePool, Identity and constant subgraphs), in f64, for the sampled output
//! channels only where that is exact.

use std::collections::HashMap;

use ndarray::{ArrayD, Axis, IxDyn};

use super::conv::{Values, Weight, conv, taps};
use super::window::{ints_or, pads};
use crate::constant::Constants;
use crate::graph::is_default_domain;
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;
use crate::tensor;

/// The original subgraph from `input` to `output` run on `x`, for the output channels `sample`.
pub(super) fn evaluate(
    index: &Constants,
    (input, output): (&str, &str),
    x: &ArrayD<f64>,
    sample: &[usize],
) -> Result<ArrayD<f64>, String> {
    let mut reference = Reference {
        index,
        input,
        x: Act {
            data: x.clone(),
            channels: None,
        },
        sample,
        memo: HashMap::new(),
    };
    let want = reference.value(output, 0)?;
    select(&want, sample)
}

/// An activation: `[1, channels, spatial…]`, where `channels` lists which of the tensor's
/// channels are held (`None`: all of them).
#[derive(Debug, Clone)]
struct Act {
    data: ArrayD<f64>,
    channels: Option<Vec<usize>>,
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
