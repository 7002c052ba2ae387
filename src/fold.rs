//! Folding a matched block into one affine convolution: each branch becomes an [`AffineConv`]
//! (Conv weights and bias, then the BatchNormalization as a per-channel scale and shift; the
//! identity as a grouped diagonal kernel), and the branches are summed. Geometry comes from the
//! Conv attributes (ONNX Conv v1/v11/v22) and the BatchNormalization epsilon is read, never
//! assumed. Anything that makes a fold inexact is a named reason to skip the block.

use ndarray::Array1;

use crate::affine::{AffineConv, Geometry};
use crate::error::Error;
use crate::graph::GraphIndex;
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;
use crate::pattern::{Block, Branch};
use crate::tensor::{self, FloatType};

/// A block folded into one convolution, with the element type to write it in.
#[derive(Debug, Clone)]
pub struct Folded {
    pub conv: AffineConv,
    pub dtype: FloatType,
}

/// Why a block was not folded.
#[derive(Debug)]
pub enum FoldError {
    /// The block is valid but cannot be folded exactly; the reason is for people.
    Skip(String),
    /// The model itself is broken (bad tensor data, impossible statistics).
    Invalid(Error),
}

impl From<Error> for FoldError {
    fn from(e: Error) -> Self {
        FoldError::Invalid(e)
    }
}

fn skip<T>(reason: impl Into<String>) -> Result<T, FoldError> {
    Err(FoldError::Skip(reason.into()))
}

/// Folds every branch of `block` and sums them.
pub fn fold(index: &GraphIndex, block: &Block) -> Result<Folded, FoldError> {
    let mut terms = Vec::with_capacity(block.branches.len());
    let mut dtype = None;
    let mut first_conv: Option<(usize, usize, Vec<usize>, usize)> = None;
    for branch in &block.branches {
        let Branch::Conv { conv, bn } = *branch else {
            continue;
        };
        let (term, ty) = conv_term(index, conv)?;
        dtype.get_or_insert(ty);
        first_conv.get_or_insert((
            term.in_channels(),
            term.out_channels(),
            term.geometry.strides.clone(),
            term.geometry.group,
        ));
        terms.push(match bn {
            Some(bn) => apply_bn(index, bn, term)?,
            None => term,
        });
    }
    let (Some(dtype), Some((c_in, c_out, strides, group))) = (dtype, first_conv) else {
        return skip("no Conv branch");
    };
    for branch in &block.branches {
        let Branch::Identity { bn } = *branch else {
            continue;
        };
        if c_in != c_out {
            return skip(format!(
                "identity branch needs as many input as output channels ({c_in} → {c_out})"
            ));
        }
        if strides.iter().any(|&s| s != 1) {
            return skip(format!(
                "identity branch needs stride 1 (strides {strides:?})"
            ));
        }
        let term = AffineConv::identity(c_in, group, strides.len());
        terms.push(match bn {
            Some(bn) => apply_bn(index, bn, term)?,
            None => term,
        });
    }
    let conv = AffineConv::sum(&terms).map_err(|e| FoldError::Skip(e.to_string()))?;
    Ok(Folded { conv, dtype })
}

/// A Conv node as an affine convolution, with its weight's element type.
fn conv_term(index: &GraphIndex, i: usize) -> Result<(AffineConv, FloatType), FoldError> {
    let node = index.node(i);
    let name = node.name();
    let Some(w_name) = node.input.get(1) else {
        return skip(format!("Conv '{name}' has no weight input"));
    };
    let Some(w) = index.constant(w_name) else {
        return skip(format!(
            "Conv '{name}': weight '{w_name}' is not a constant"
        ));
    };
    let Ok(dtype) = tensor::float_type(w) else {
        return skip(format!(
            "Conv '{name}': weight '{w_name}' has data type {}, not a float type",
            w.data_type()
        ));
    };
    let weight = tensor::read_f64(w, &index.model.external)?;
    let rank = weight.ndim().saturating_sub(2);
    if rank == 0 {
        return skip(format!(
            "Conv '{name}': weight '{w_name}' has {} dims",
            weight.ndim()
        ));
    }
    let out_channels = weight.shape()[0];
    let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
        None => Array1::zeros(out_channels),
        Some(b_name) => {
            let Some(b) = index.constant(b_name) else {
                return skip(format!("Conv '{name}': bias '{b_name}' is not a constant"));
            };
            let bias = tensor::read_f64(b, &index.model.external)?;
            if bias.shape() != [out_channels] {
                return skip(format!(
                    "Conv '{name}': bias '{b_name}' has shape {:?} for {out_channels} channels",
                    bias.shape()
                ));
            }
            Array1::from_iter(bias.iter().copied())
        }
    };
    let geometry = geometry(node, weight.shape())
        .map_err(|r| FoldError::Skip(format!("Conv '{name}': {r}")))?;
    if out_channels % geometry.group != 0 {
        return skip(format!(
            "Conv '{name}': {out_channels} output channels do not split into {} groups",
            geometry.group
        ));
    }
    Ok((
        AffineConv {
            weight,
            bias,
            geometry,
        },
        dtype,
    ))
}

/// Reads strides, dilations, pads (or auto_pad) and group of a Conv whose weight has `shape`.
fn geometry(node: &NodeProto, shape: &[usize]) -> Result<Geometry, String> {
    let kernel = &shape[2..];
    let rank = kernel.len();
    let positive = |name: &str| -> Result<Vec<usize>, String> {
        match attr::ints(node, name) {
            None => Ok(vec![1; rank]),
            Some(v) if v.len() == rank && v.iter().all(|&x| x >= 1) => {
                Ok(v.iter().map(|&x| x as usize).collect())
            }
            Some(v) => Err(format!("{name} {v:?} do not fit a {rank}-D kernel")),
        }
    };
    let strides = positive("strides")?;
    let dilations = positive("dilations")?;
    if let Some(ks) = attr::ints(node, "kernel_shape")
        && (ks.len() != rank || ks.iter().zip(kernel).any(|(&a, &b)| a != b as i64))
    {
        return Err(format!(
            "kernel_shape {ks:?} disagrees with the weight's {kernel:?}"
        ));
    }
    let group = match attr::int(node, "group").unwrap_or(1) {
        g if g >= 1 => g as usize,
        g => return Err(format!("group {g} is not positive")),
    };
    let auto_pad = attr::string(node, "auto_pad").unwrap_or_default();
    let (pads_begin, pads_end) = match auto_pad.as_str() {
        "" | "NOTSET" => match attr::ints(node, "pads") {
            None => (vec![0; rank], vec![0; rank]),
            Some(p) if p.len() == 2 * rank && p.iter().all(|&x| x >= 0) => {
                let p: Vec<usize> = p.iter().map(|&x| x as usize).collect();
                (p[..rank].to_vec(), p[rank..].to_vec())
            }
            Some(p) => return Err(format!("pads {p:?} do not fit a {rank}-D kernel")),
        },
        "VALID" => (vec![0; rank], vec![0; rank]),
        "SAME_UPPER" | "SAME_LOWER" => {
            if strides.iter().any(|&s| s != 1) {
                return Err(format!(
                    "auto_pad={auto_pad} with stride > 1 depends on the input size"
                ));
            }
            let total: Vec<usize> = (0..rank).map(|a| dilations[a] * (kernel[a] - 1)).collect();
            let small: Vec<usize> = total.iter().map(|t| t / 2).collect();
            let large: Vec<usize> = total.iter().zip(&small).map(|(t, s)| t - s).collect();
            if auto_pad == "SAME_UPPER" {
                (small, large)
            } else {
                (large, small)
            }
        }
        other => return Err(format!("unknown auto_pad '{other}'")),
    };
    Ok(Geometry {
        strides,
        dilations,
        pads_begin,
        pads_end,
        group,
    })
}

/// Applies BatchNormalization `i` (inference semantics) after `term`.
fn apply_bn(index: &GraphIndex, i: usize, term: AffineConv) -> Result<AffineConv, FoldError> {
    let (scale, shift) = bn_scale_shift(index, i)?;
    let name = index.node(i).name();
    term.scale_shift(
        scale.as_slice().unwrap_or(&[]),
        shift.as_slice().unwrap_or(&[]),
    )
    .map_err(|e| FoldError::Skip(format!("BatchNormalization '{name}': {e}")))
}

/// `t = γ / sqrt(σ² + ε)` and `β − μ·t` of an inference-mode BatchNormalization.
fn bn_scale_shift(index: &GraphIndex, i: usize) -> Result<(Array1<f64>, Array1<f64>), FoldError> {
    let node = index.node(i);
    let name = node.name();
    let training = attr::int(node, "training_mode") == Some(1)
        || node.output.iter().skip(1).any(|o| !o.is_empty())
        || (index.model.default_opset().is_some_and(|v| v < 7)
            && attr::int(node, "is_test") != Some(1));
    if training {
        return skip(format!(
            "BatchNormalization '{name}' runs in training mode (the export ran the model in \
             train mode and updated its running statistics): re-export after model.eval()"
        ));
    }
    if attr::int(node, "spatial") == Some(0) {
        return skip(format!("BatchNormalization '{name}' has spatial=0"));
    }
    let epsilon = attr::float(node, "epsilon").unwrap_or(1e-5) as f64;
    let mut params = Vec::with_capacity(4);
    for (slot, what) in [(1, "scale"), (2, "B"), (3, "mean"), (4, "var")] {
        let Some(v) = node.input.get(slot).filter(|v| !v.is_empty()) else {
            return skip(format!("BatchNormalization '{name}' has no {what} input"));
        };
        let Some(t) = index.constant(v) else {
            return skip(format!(
                "BatchNormalization '{name}': {what} '{v}' is not a constant"
            ));
        };
        let values = tensor::read_f64(t, &index.model.external)?;
        if values.ndim() != 1 {
            return skip(format!(
                "BatchNormalization '{name}': {what} '{v}' is not 1-D"
            ));
        }
        if values.iter().any(|x| !x.is_finite()) {
            return Err(Error::tensor(
                v,
                format!("{what} of BatchNormalization '{name}' is not finite"),
            )
            .into());
        }
        params.push((v, Array1::from_iter(values.iter().copied())));
    }
    let [(_, gamma), (_, beta), (_, mean), (var_name, var)] = params
        .try_into()
        .map_err(|_| FoldError::Skip("BatchNormalization parameters".into()))?;
    let n = gamma.len();
    if [beta.len(), mean.len(), var.len()].iter().any(|&l| l != n) {
        return skip(format!(
            "BatchNormalization '{name}': parameters have different lengths"
        ));
    }
    if var.iter().any(|&v| v + epsilon <= 0.0) {
        return Err(Error::tensor(
            var_name,
            format!("variance of BatchNormalization '{name}' is negative"),
        )
        .into());
    }
    let scale = Array1::from_iter((0..n).map(|c| gamma[c] / (var[c] + epsilon).sqrt()));
    let shift = Array1::from_iter((0..n).map(|c| beta[c] - mean[c] * scale[c]));
    Ok((scale, shift))
}
