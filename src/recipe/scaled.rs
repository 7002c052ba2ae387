//! A linear fold's weight as a recipe: stored weights scaled element by element and summed —
//! `W'[r, c] = Σ_h W_h[r, c] · row_h[r] · cols_h[group(r)][c]` — where rows are the weight's
//! first axis, `c` runs over the rest of a row, and the factors carry the scales folded in on the
//! output features (after the operator) and the input features (before it), wherever the weight
//! keeps those (see [`crate::linear::Kind`]). The bias, which a shift before the operator
//! reaches only through the weights (`W·s`), is computed once, when the recipe is built; the
//! rows are computed when written, one pass from the stored bytes to the output's.

use std::ops::Range;

use super::{Rounding, Rows};
use crate::constant::Constants;
use crate::error::{Error, Result};
use crate::linear::{Affine, Kind, LinearPlan};
use crate::tensor::{self, Data, FloatType};

/// One head's stored weight and its factors.
#[derive(Debug, Clone)]
struct Part {
    data: Data,
    /// Per row.
    row: Vec<f64>,
    /// Per group of rows: per place in a row.
    cols: Vec<Vec<f64>>,
}

/// The fused weight of a [`LinearPlan`], row by row, and its bias.
#[derive(Debug, Clone)]
pub struct Scaled {
    row_len: usize,
    rows_per_group: usize,
    parts: Vec<Part>,
    /// The fused bias, one value per output feature.
    bias: Vec<f64>,
}

impl Scaled {
    /// Reads the plan's weights and biases and builds the recipe.
    pub fn build(index: &Constants, plan: &LinearPlan) -> Result<Scaled> {
        let dims = &plan.weight_dims;
        let rows = dims[0];
        let row_len: usize = dims[1..].iter().product();
        let taps: usize = dims.get(2..).map_or(1, |k| k.iter().product());
        let group = plan.kind.group().max(1);
        let rows_per_group = (rows / group).max(1);
        let (outs, ins) = plan.features();
        let mut parts = Vec::with_capacity(plan.heads.len());
        let mut pre_bias = vec![0.0; outs];
        for head in &plan.heads {
            let name = head.weight.as_str();
            let w = index
                .stored_constant(name)
                .ok_or_else(|| Error::tensor(name, "the weight is no longer a constant"))?;
            let data = tensor::data(&w, &index.model.external)?;
            let (wdims, _) = tensor::shape(&w)?;
            if wdims != *dims {
                return Err(Error::tensor(
                    name,
                    format!("dims {wdims:?}, planned {dims:?}"),
                ));
            }
            let identity = Affine::identity(ins);
            let pre = head.pre.as_ref().unwrap_or(&identity);
            if pre.scale.len() != ins {
                return Err(Error::tensor(
                    name,
                    "features do not match what reaches them",
                ));
            }
            // Where each place of a row of group `g` sits among the input or output features.
            let feature = |g: usize, c: usize| match plan.kind {
                Kind::Conv { .. } => g * (ins / group) + c / taps,
                Kind::ConvTranspose { .. } => g * (outs / group) + c / taps,
                _ => c,
            };
            let (row, cols): (Vec<f64>, Vec<Vec<f64>>) = match plan.kind.rows_are_outputs() {
                true => (
                    (0..rows).map(|r| head.alpha * plan.post.scale[r]).collect(),
                    (0..group)
                        .map(|g| (0..row_len).map(|c| pre.scale[feature(g, c)]).collect())
                        .collect(),
                ),
                false => (
                    (0..rows).map(|r| head.alpha * pre.scale[r]).collect(),
                    (0..group)
                        .map(|g| {
                            (0..row_len)
                                .map(|c| plan.post.scale[feature(g, c)])
                                .collect()
                        })
                        .collect(),
                ),
            };
            // What a shift before the operator adds to each output: the weights times it.
            if pre.shift.iter().any(|&s| s != 0.0) {
                let mut values = vec![0.0; row_len];
                for r in 0..rows {
                    data.read_scaled(r * row_len..(r + 1) * row_len, head.alpha, &mut values);
                    let g = r / rows_per_group;
                    for (c, &v) in values.iter().enumerate() {
                        let (out, input) = match plan.kind.rows_are_outputs() {
                            true => (r, feature(g, c)),
                            false => (feature(g, c), r),
                        };
                        pre_bias[out] += v * pre.shift[input];
                    }
                }
            }
            if let Some(bias) = &head.bias {
                let b = index
                    .constant(bias)
                    .ok_or_else(|| Error::tensor(bias, "the bias is no longer a constant"))?;
                let b = tensor::read_f64(&b, &index.model.external)?;
                let values: Vec<f64> = b.iter().copied().collect();
                match values.len() {
                    1 => pre_bias
                        .iter_mut()
                        .for_each(|v| *v += head.beta * values[0]),
                    n if n == outs => {
                        for (v, b) in pre_bias.iter_mut().zip(&values) {
                            *v += head.beta * b;
                        }
                    }
                    n => {
                        return Err(Error::tensor(
                            bias,
                            format!("{n} values for {outs} output features"),
                        ));
                    }
                }
            }
            parts.push(Part { data, row, cols });
        }
        let bias = (0..outs)
            .map(|o| pre_bias[o] * plan.post.scale[o] + plan.post.shift[o])
            .collect();
        Ok(Scaled {
            row_len,
            rows_per_group,
            parts,
            bias,
        })
    }
}

impl Rows for Scaled {
    /// Values per row (the weight's first axis).
    fn row_len(&self) -> usize {
        self.row_len
    }

    /// Computes rows `rows` in f64 and encodes them as `ty` into `out`; `acc` and `scratch` are
    /// reused buffers.
    fn encode_rows(
        &self,
        rows: Range<usize>,
        ty: FloatType,
        out: &mut [u8],
        acc: &mut Vec<f64>,
        scratch: &mut Vec<f64>,
    ) -> Rounding {
        let mut rounding = Rounding::default();
        let half = matches!(ty, FloatType::F16 | FloatType::Bf16);
        let n = self.row_len;
        acc.resize(n, 0.0);
        scratch.resize(n, 0.0);
        let row_bytes = n * ty.size();
        for (r, out) in rows.zip(out.chunks_exact_mut(row_bytes.max(1))) {
            let g = r / self.rows_per_group;
            acc.fill(0.0);
            for part in &self.parts {
                part.data
                    .read_scaled(r * n..(r + 1) * n, part.row[r], &mut scratch[..n]);
                let cols = &part.cols[g.min(part.cols.len() - 1)];
                for ((a, s), c) in acc.iter_mut().zip(scratch.iter()).zip(cols) {
                    *a += s * c;
                }
            }
            tensor::encode_to(&acc[..n], ty, out);
            if half {
                rounding.merge(ty, &acc[..n]);
            }
        }
        if half {
            rounding.merge(ty, &self.bias);
        }
        rounding
    }

    /// The stored bytes of rows `rows` of every weight the recipe reads.
    fn stored_rows(&self, rows: Range<usize>) -> Vec<&[u8]> {
        let n = self.row_len;
        let stored = self.parts.iter().filter_map(|p| match &p.data {
            Data::Raw(bytes, ty) => {
                let size = ty.size();
                bytes.get(rows.start * n * size..rows.end * n * size)
            }
            Data::Values(_) => None,
        });
        stored.collect()
    }

    fn bias(&self) -> &[f64] {
        &self.bias
    }
}
