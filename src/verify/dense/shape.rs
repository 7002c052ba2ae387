//! Operators that move values without arithmetic: `Reshape`, `Flatten`, `Transpose`, `Squeeze`,
//! `Unsqueeze`, `Shape`, `Concat` (row-major order throughout, as ONNX defines them).

use ndarray::{ArrayView, Axis, IxDyn};

use super::{Inputs, Tensor, axes, axis, elements, flag, from_vec, integers};
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

/// `x`'s values in row-major order under the new shape `shape` (as many elements).
fn reshaped(x: &Tensor, shape: &[usize]) -> Result<Tensor, String> {
    let count = elements(shape)?;
    if count != x.len() {
        return Err(format!(
            "{} elements of shape {:?} do not fill shape {shape:?}",
            x.len(),
            x.shape()
        ));
    }
    from_vec(shape, x.iter().copied().collect())
}

/// `Reshape` to input 1: a 0 copies the input's dim at that position (a literal 0 with
/// `allowzero=1`), one -1 takes what the others leave.
pub(super) fn reshape(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let (x, target) = (inputs.get(0)?, inputs.get(1)?);
    if target.ndim() != 1 {
        return Err(format!("shape of shape {:?} is not 1-D", target.shape()));
    }
    let target = integers(target)?;
    let allowzero = flag(node, "allowzero", false)?;
    if allowzero && target.contains(&0) && target.contains(&-1) {
        return Err(format!(
            "shape {target:?} has both 0 and -1 with allowzero=1"
        ));
    }
    let mut shape = Vec::with_capacity(target.len());
    let mut inferred = None;
    for (i, &d) in target.iter().enumerate() {
        let dim = match d {
            -1 if inferred.is_some() => return Err(format!("shape {target:?} has two -1")),
            -1 => {
                inferred = Some(i);
                1
            }
            0 if !allowzero => *x.shape().get(i).ok_or_else(|| {
                format!(
                    "shape {target:?} copies dim {i} of an input of rank {}",
                    x.ndim()
                )
            })?,
            d if d < 0 => return Err(format!("shape {target:?} has the dim {d}")),
            d => usize::try_from(d).map_err(|e| e.to_string())?,
        };
        shape.push(dim);
    }
    if let Some(i) = inferred {
        let known = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        match known {
            Some(k) if k > 0 && x.len() % k == 0 => shape[i] = x.len() / k,
            _ => {
                return Err(format!(
                    "shape {target:?} cannot hold the {} elements of shape {:?}",
                    x.len(),
                    x.shape()
                ));
            }
        }
    }
    reshaped(x, &shape)
}

/// `Flatten` at `axis` (default 1, `-rank..=rank`): `[Π dims before, Π dims from]`.
pub(super) fn flatten(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let x = inputs.get(0)?;
    let r = x.ndim() as i64;
    let a = attr::int(node, "axis").unwrap_or(1);
    if !(-r..=r).contains(&a) {
        return Err(format!("axis {a} is out of range for rank {r}"));
    }
    let a = if a < 0 { a + r } else { a } as usize;
    let (before, after) = x.shape().split_at(a);
    reshaped(x, &[before.iter().product(), after.iter().product()])
}

/// `Transpose` by `perm` (default: the axes reversed).
pub(super) fn transpose(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let x = inputs.get(0)?;
    let rank = x.ndim();
    // `rank` distinct axes in `0..rank`: a permutation.
    let perm = match attr::ints(node, "perm") {
        None => (0..rank).rev().collect(),
        Some(p) if p.len() == rank && p.iter().all(|&a| a >= 0) => axes(p, rank)?,
        Some(p) => return Err(format!("perm {p:?} is not a permutation of rank {rank}")),
    };
    Ok(x.view().permuted_axes(IxDyn(&perm)).to_owned())
}

/// The axes of a `Squeeze`/`Unsqueeze`: the `axes` attribute (before opset 13) or input 1
/// (from opset 13), whichever the node has.
fn listed_axes(node: &NodeProto, inputs: &Inputs) -> Result<Option<Vec<i64>>, String> {
    match (attr::ints(node, "axes"), inputs.optional(1)) {
        (Some(_), Some(_)) => Err("axes given both as attribute and as input".into()),
        (Some(a), None) => Ok(Some(a.to_vec())),
        (None, Some(t)) if t.ndim() == 1 => integers(t).map(Some),
        (None, Some(t)) => Err(format!("axes of shape {:?} are not 1-D", t.shape())),
        (None, None) => Ok(None),
    }
}

/// `Squeeze` of the listed axes (each of size 1), or of every axis of size 1.
pub(super) fn squeeze(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let x = inputs.get(0)?;
    let dropped = match listed_axes(node, inputs)? {
        Some(listed) if !listed.is_empty() => axes(&listed, x.ndim())?,
        _ => (0..x.ndim()).filter(|&a| x.shape()[a] == 1).collect(),
    };
    if let Some(&a) = dropped.iter().find(|&&a| x.shape()[a] != 1) {
        return Err(format!("axis {a} of shape {:?} is not 1", x.shape()));
    }
    let shape: Vec<usize> = (0..x.ndim())
        .filter(|a| !dropped.contains(a))
        .map(|a| x.shape()[a])
        .collect();
    reshaped(x, &shape)
}

/// `Unsqueeze`: axes of size 1 inserted at the listed positions of the output.
pub(super) fn unsqueeze(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let x = inputs.get(0)?;
    let listed = listed_axes(node, inputs)?.ok_or("axes are missing")?;
    let rank = x.ndim() + listed.len();
    let inserted = axes(&listed, rank)?;
    let mut dims = x.shape().iter();
    let shape: Vec<usize> = (0..rank)
        .map(|a| match inserted.contains(&a) {
            true => Some(1),
            false => dims.next().copied(),
        })
        .collect::<Option<_>>()
        .ok_or("axes do not fit the rank")?;
    reshaped(x, &shape)
}

/// `Shape`: the input's dims `start..end` (negative counting from the end, clamped to the rank).
pub(super) fn shape(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let x = inputs.get(0)?;
    let r = x.ndim() as i64;
    let clamp = |v: i64| (if v < 0 { v.saturating_add(r) } else { v }).clamp(0, r) as usize;
    let start = clamp(attr::int(node, "start").unwrap_or(0));
    let end = clamp(attr::int(node, "end").unwrap_or(r));
    let dims: Vec<f64> = x.shape()[start..end.max(start)]
        .iter()
        .map(|&d| d as f64)
        .collect();
    from_vec(&[dims.len()], dims)
}

/// `Concat` on `axis` (`-rank..rank`): every input of one rank, equal dims off the axis.
pub(super) fn concat(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let parts: Vec<&Tensor> = (0..inputs.len())
        .map(|i| inputs.get(i))
        .collect::<Result<_, _>>()?;
    let first = parts.first().ok_or("no inputs")?;
    let a = axis(
        attr::int(node, "axis").ok_or("axis is missing")?,
        first.ndim(),
    )?;
    let mut shape = first.shape().to_vec();
    shape[a] = 0;
    for p in &parts {
        let fits = p.ndim() == first.ndim()
            && (0..p.ndim()).all(|i| i == a || p.shape()[i] == first.shape()[i]);
        if !fits {
            return Err(format!(
                "shapes {:?} and {:?} do not concatenate on axis {a}",
                first.shape(),
                p.shape()
            ));
        }
        shape[a] = shape[a].saturating_add(p.shape()[a]);
    }
    elements(&shape)?;
    let views: Vec<ArrayView<f64, IxDyn>> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(Axis(a), &views).map_err(|e| e.to_string())
}
