//! `Gemm` (`Y = alpha · A' · B' + beta · C`, `transA`/`transB`, C broadcast unidirectionally to
//! [M, N]) and `MatMul` (numpy's matmul: 1-D operands promoted and the added axis removed,
//! batch axes broadcast).

use ndarray::{Array2, ArrayView2, Axis, Ix2, IxDyn};

use super::elementwise::broadcast_shape;
use super::{Inputs, Tensor, charge, elements, flag, from_vec};
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

/// `a · b` of two matrices, by the definition (`K` products summed in order).
fn product(a: ArrayView2<f64>, b: ArrayView2<f64>) -> Array2<f64> {
    let ((m, k), n) = (a.dim(), b.dim().1);
    Array2::from_shape_fn((m, n), |(i, j)| (0..k).map(|p| a[[i, p]] * b[[p, j]]).sum())
}

fn matrix<'t>(t: &'t Tensor, name: &str) -> Result<ArrayView2<'t, f64>, String> {
    t.view()
        .into_dimensionality::<Ix2>()
        .map_err(|_| format!("{name} of shape {:?} is not a matrix", t.shape()))
}

pub(super) fn gemm(node: &NodeProto, inputs: &Inputs) -> Result<Tensor, String> {
    let (a, b) = (matrix(inputs.get(0)?, "A")?, matrix(inputs.get(1)?, "B")?);
    let a = if flag(node, "transA", false)? {
        a.reversed_axes()
    } else {
        a
    };
    let b = if flag(node, "transB", false)? {
        b.reversed_axes()
    } else {
        b
    };
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    if k != k2 {
        return Err(format!(
            "A' is {m}×{k} and B' is {k2}×{n}: the inner dims differ"
        ));
    }
    elements(&[m, n])?;
    charge(&[m, n, k])?;
    let alpha = attr::float(node, "alpha").unwrap_or(1.0) as f64;
    let beta = attr::float(node, "beta").unwrap_or(1.0) as f64;
    let mut y = product(a, b) * alpha;
    if let Some(c) = inputs.optional(2) {
        let fits = c.ndim() <= 2;
        let cv = c
            .broadcast(IxDyn(&[m, n]))
            .filter(|_| fits)
            .ok_or_else(|| {
                format!(
                    "C of shape {:?} does not broadcast to [{m}, {n}]",
                    c.shape()
                )
            })?;
        y.zip_mut_with(&cv, |y, &c| *y += beta * c);
    }
    Ok(y.into_dyn())
}

pub(super) fn matmul(inputs: &Inputs) -> Result<Tensor, String> {
    let (a, b) = (inputs.get(0)?, inputs.get(1)?);
    if a.ndim() == 0 || b.ndim() == 0 {
        return Err("a scalar operand".into());
    }
    // 1-D operands: [K] is [1, K] on the left, [K, 1] on the right.
    let a_shape = match a.shape() {
        [k] => vec![1, *k],
        s => s.to_vec(),
    };
    let b_shape = match b.shape() {
        [k] => vec![*k, 1],
        s => s.to_vec(),
    };
    let (ra, rb) = (a_shape.len(), b_shape.len());
    let (m, k) = (a_shape[ra - 2], a_shape[ra - 1]);
    let (k2, n) = (b_shape[rb - 2], b_shape[rb - 1]);
    if k != k2 {
        return Err(format!(
            "shapes {:?} and {:?}: the inner dims differ",
            a.shape(),
            b.shape()
        ));
    }
    let batch = broadcast_shape(&a_shape[..ra - 2], &b_shape[..rb - 2])?;
    let count = elements(&batch)?;
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);
    elements(&out_shape)?;
    charge(&[count, m, n, k])?;
    // Both operands broadcast to the batch and flattened to [batch, rows, cols] (copies at
    // most the size of the result's inputs, which the checks above bound).
    let stack = |t: &Tensor, shape: &[usize], rows: usize, cols: usize| {
        let mut full = batch.clone();
        full.extend([rows, cols]);
        elements(&full)?;
        let promoted = t
            .to_shape(IxDyn(shape))
            .map_err(|e| e.to_string())?
            .into_owned();
        let wide = promoted
            .broadcast(IxDyn(&full))
            .ok_or("batch dims do not broadcast")?
            .to_owned();
        wide.into_shape_with_order(IxDyn(&[count, rows, cols]))
            .map_err(|e| e.to_string())
    };
    let a3 = stack(a, &a_shape, m, k)?;
    let b3 = stack(b, &b_shape, k, n)?;
    let mut values = Vec::with_capacity(count * m * n);
    for (x, y) in a3.axis_iter(Axis(0)).zip(b3.axis_iter(Axis(0))) {
        let (x, y) = (
            x.into_dimensionality::<Ix2>(),
            y.into_dimensionality::<Ix2>(),
        );
        let (x, y) = (x.map_err(|e| e.to_string())?, y.map_err(|e| e.to_string())?);
        values.extend(product(x, y).iter());
    }
    // Remove the axes the 1-D promotions added.
    let mut shape = batch;
    if a.ndim() > 1 {
        shape.push(m);
    }
    if b.ndim() > 1 {
        shape.push(n);
    }
    from_vec(&shape, values)
}
