//! Elementwise operators: `Add`, `Sub`, `Mul`, `Div` and `Sum` with numpy's multidirectional
//! broadcasting (ONNX "Broadcasting in ONNX"), the unary `Neg`, `Relu`, `Sigmoid`, `Erf`,
//! `HardSwish`, and `BatchNormalization` in inference mode.

use ndarray::{IxDyn, Zip};

use super::{Inputs, Tensor, elements, flag};
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

/// The shape `a` and `b` broadcast to: aligned on the right, each pair of dims equal or one of
/// them 1.
pub(super) fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| {
        (i + s.len())
            .checked_sub(rank)
            .map_or(1, |j| s.get(j).copied().unwrap_or(1))
    };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        })
        .collect()
}

/// `f` elementwise on `a` and `b` broadcast together.
pub(super) fn broadcast(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f64, f64) -> f64,
) -> Result<Tensor, String> {
    let shape = broadcast_shape(a.shape(), b.shape())?;
    elements(&shape)?;
    let unfit = || {
        format!(
            "shapes {:?} and {:?} do not broadcast",
            a.shape(),
            b.shape()
        )
    };
    let av = a.broadcast(IxDyn(&shape)).ok_or_else(unfit)?;
    let bv = b.broadcast(IxDyn(&shape)).ok_or_else(unfit)?;
    Ok(Zip::from(&av).and(&bv).map_collect(|&x, &y| f(x, y)))
}

/// `Add`, `Sub`, `Mul`, `Div` (two inputs) and `Sum` (one or more).
pub(super) fn binary(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let op = node.op_type();
    if op == "Sum" {
        let mut acc = inputs.get(0)?.clone();
        for i in 1..inputs.len() {
            acc = broadcast(&acc, inputs.get(i)?, |x, y| x + y)?;
        }
        return Ok(acc);
    }
    if inputs.len() != 2 {
        return Err(format!("{} inputs where 2 are expected", inputs.len()));
    }
    let (a, b) = (inputs.get(0)?, inputs.get(1)?);
    match op {
        "Add" => broadcast(a, b, |x, y| x + y),
        "Sub" => broadcast(a, b, |x, y| x - y),
        "Mul" => broadcast(a, b, |x, y| x * y),
        _ => broadcast(a, b, |x, y| x / y),
    }
}

/// `Neg`, `Relu`, `Sigmoid`, `Erf`, `HardSwish`.
pub(super) fn unary(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let x = inputs.get(0)?;
    let f: fn(f64) -> f64 = match node.op_type() {
        "Neg" => |v| -v,
        // NaN stays NaN (f64::max would drop it).
        "Relu" => |v| if v < 0.0 { 0.0 } else { v },
        "Sigmoid" => sigmoid,
        "Erf" => erf,
        // y = x · max(0, min(1, x/6 + 1/2)).
        _ => |v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0),
    };
    Ok(x.mapv(f))
}

fn sigmoid(v: f64) -> f64 {
    if v >= 0.0 {
        1.0 / (1.0 + (-v).exp())
    } else {
        let e = v.exp();
        e / (1.0 + e)
    }
}

/// The error function, to f64 precision: `2/√π · e^(−x²) · Σ (2x²)^n x / (1·3·…·(2n+1))`
/// (Abramowitz & Stegun 7.1.6: positive terms, no cancellation); ±1 beyond |x| = 6, where
/// erfc < 3e-17.
pub(super) fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x.abs() >= 6.0 {
        return x.signum();
    }
    let two_x2 = 2.0 * x * x;
    let (mut term, mut sum) = (x, x);
    for n in 1..1000 {
        term *= two_x2 / (2 * n + 1) as f64;
        sum += term;
        if term.abs() <= sum.abs() * 1e-17 {
            break;
        }
    }
    std::f64::consts::FRAC_2_SQRT_PI * (-x * x).exp() * sum
}

/// `BatchNormalization` in inference mode: `y = scale · (x − mean) / √(var + epsilon) + B`,
/// per channel on axis 1 of an input of rank ≥ 2.
pub(super) fn batch_normalization(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    if flag(node, "training_mode", false)? {
        return Err("training_mode=1 is not evaluated".into());
    }
    if attr::int(node, "spatial").is_some_and(|s| s != 1) {
        return Err("spatial=0 (per-activation statistics) is not evaluated".into());
    }
    let x = inputs.get(0)?;
    if x.ndim() < 2 {
        return Err(format!(
            "input of shape {:?} has no channel axis",
            x.shape()
        ));
    }
    let channels = x.shape()[1];
    let mut params = Vec::with_capacity(4);
    for (i, name) in [(1, "scale"), (2, "B"), (3, "mean"), (4, "var")] {
        let p = inputs.get(i)?;
        if p.shape() != [channels] {
            return Err(format!(
                "{name} of shape {:?} does not match {channels} channels",
                p.shape()
            ));
        }
        params.push(p.iter().copied().collect::<Vec<f64>>());
    }
    let epsilon = attr::float(node, "epsilon").unwrap_or(1e-5) as f64;
    let (scale, bias, mean, var) = (&params[0], &params[1], &params[2], &params[3]);
    let mut y = x.clone();
    for (c, mut plane) in y.axis_iter_mut(ndarray::Axis(1)).enumerate() {
        let factor = scale[c] / (var[c] + epsilon).sqrt();
        plane.mapv_inplace(|v| (v - mean[c]) * factor + bias[c]);
    }
    Ok(y)
}
