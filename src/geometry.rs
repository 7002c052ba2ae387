//! The one reading of a sliding window's attributes — ONNX `Conv` (v1/v11/v22) and pooling:
//! kernel, `strides`, `dilations`, `pads` or `auto_pad`, `group`, `ceil_mode` — checked once and
//! resolved to explicit pads at an input size. The fold, shape propagation, the report and the
//! cost counts all read windows through [`Window`]; the numerical check (`verify`) reads the
//! attributes on its own, on purpose: it is the independent oracle.

use crate::layout::Geometry;
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

/// How a window pads its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Padding {
    /// `pads` (or none): begins and ends per spatial axis.
    Explicit { begin: Vec<usize>, end: Vec<usize> },
    /// `auto_pad=SAME_UPPER` / `SAME_LOWER`: as much as keeps `ceil(size / stride)` outputs, the
    /// odd one at the end (upper) or the beginning (lower).
    Same { upper: bool },
    /// `auto_pad=VALID`: none.
    Valid,
}

/// A Conv's or pooling node's window over `kernel.len()` spatial axes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub padding: Padding,
    pub group: usize,
    /// Pooling's `ceil_mode`: the last, partial window counts.
    pub ceil_mode: bool,
}

impl Window {
    /// Reads `node`'s window; `kernel` is the spatial extent of a Conv's weight (`kernel_shape`,
    /// when present, must agree) or, for pooling, `None` (then `kernel_shape` is it).
    pub fn of(node: &NodeProto, kernel: Option<&[usize]>) -> Result<Window, String> {
        let declared = attr::ints(node, "kernel_shape");
        let kernel: Vec<usize> = match (kernel, declared) {
            (Some(k), Some(ks))
                if ks.len() != k.len() || ks.iter().zip(k).any(|(&a, &b)| a != b as i64) =>
            {
                return Err(format!(
                    "kernel_shape {ks:?} disagrees with the weight's {k:?}"
                ));
            }
            (Some(k), _) => k.to_vec(),
            (None, Some(ks)) if ks.iter().all(|&k| k >= 1) => {
                ks.iter().map(|&k| k as usize).collect()
            }
            (None, Some(ks)) => return Err(format!("kernel_shape {ks:?} is not positive")),
            (None, None) => return Err("no kernel_shape".into()),
        };
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
        let group = match attr::int(node, "group").unwrap_or(1) {
            g if g >= 1 => g as usize,
            g => return Err(format!("group {g} is not positive")),
        };
        let auto_pad = attr::string(node, "auto_pad").unwrap_or_default();
        let padding = match auto_pad.as_str() {
            "" | "NOTSET" => match attr::ints(node, "pads") {
                None => Padding::Explicit {
                    begin: vec![0; rank],
                    end: vec![0; rank],
                },
                Some(p) if p.len() == 2 * rank && p.iter().all(|&x| x >= 0) => {
                    let p: Vec<usize> = p.iter().map(|&x| x as usize).collect();
                    Padding::Explicit {
                        begin: p[..rank].to_vec(),
                        end: p[rank..].to_vec(),
                    }
                }
                Some(p) => return Err(format!("pads {p:?} do not fit a {rank}-D kernel")),
            },
            "VALID" => Padding::Valid,
            "SAME_UPPER" => Padding::Same { upper: true },
            "SAME_LOWER" => Padding::Same { upper: false },
            other => return Err(format!("unknown auto_pad '{other}'")),
        };
        Ok(Window {
            kernel,
            strides,
            dilations,
            padding,
            group,
            ceil_mode: attr::int(node, "ceil_mode").unwrap_or(0) != 0,
        })
    }

    /// Number of spatial axes.
    pub fn rank(&self) -> usize {
        self.kernel.len()
    }

    /// The dilated kernel's extent on `axis`.
    fn extent(&self, axis: usize) -> Result<usize, String> {
        self.dilations[axis]
            .checked_mul(self.kernel[axis].saturating_sub(1))
            .and_then(|v| v.checked_add(1))
            .ok_or_else(|| format!("dilations {:?} are too large", self.dilations))
    }

    /// Begin and end pads on an input of spatial size `spatial` (when static): `SAME_*` with
    /// strides depends on it, and is an error without it.
    pub fn pads(&self, spatial: Option<&[usize]>) -> Result<(Vec<usize>, Vec<usize>), String> {
        let rank = self.rank();
        match &self.padding {
            Padding::Explicit { begin, end } => Ok((begin.clone(), end.clone())),
            Padding::Valid => Ok((vec![0; rank], vec![0; rank])),
            Padding::Same { upper } => {
                let total: Vec<usize> = if self.strides.iter().all(|&s| s == 1) {
                    (0..rank)
                        .map(|a| self.extent(a).map(|e| e - 1))
                        .collect::<Result<_, _>>()?
                } else {
                    let Some(sizes) = spatial.filter(|s| s.len() == rank) else {
                        let name = if *upper { "SAME_UPPER" } else { "SAME_LOWER" };
                        return Err(format!(
                            "auto_pad={name} with stride > 1 depends on the input size, which \
                             is not static here"
                        ));
                    };
                    (0..rank)
                        .map(|a| {
                            let stride = self.strides[a];
                            let out = sizes[a].div_ceil(stride);
                            let need = ((out.max(1) - 1) * stride).checked_add(self.extent(a)?);
                            need.map(|n| n.saturating_sub(sizes[a])).ok_or_else(|| {
                                format!("dilations {:?} are too large", self.dilations)
                            })
                        })
                        .collect::<Result<_, _>>()?
                };
                let small: Vec<usize> = total.iter().map(|t| t / 2).collect();
                let large: Vec<usize> = total.iter().zip(&small).map(|(t, s)| t - s).collect();
                Ok(if *upper {
                    (small, large)
                } else {
                    (large, small)
                })
            }
        }
    }

    /// The window as the fold's [`Geometry`], its pads resolved at `spatial` (see
    /// [`Window::pads`]).
    pub fn geometry(&self, spatial: Option<&[usize]>) -> Result<Geometry, String> {
        let (pads_begin, pads_end) = self.pads(spatial)?;
        Ok(Geometry {
            strides: self.strides.clone(),
            dilations: self.dilations.clone(),
            pads_begin,
            pads_end,
            group: self.group,
        })
    }

    /// The output's spatial size on an input of spatial size `input`; `None` when the window
    /// does not fit or a count does not fit a word.
    pub fn output_size(&self, input: &[usize]) -> Option<Vec<usize>> {
        if input.len() != self.rank() {
            return None;
        }
        let (begin, end) = self.pads(Some(input)).ok()?;
        (0..self.rank())
            .map(|a| {
                let stride = self.strides[a];
                if let Padding::Same { .. } = self.padding {
                    return Some(input[a].div_ceil(stride));
                }
                let span = input[a]
                    .checked_add(begin[a])?
                    .checked_add(end[a])?
                    .checked_sub(self.extent(a).ok()?)?;
                Some(match self.ceil_mode {
                    true => span.div_ceil(stride) + 1,
                    false => span / stride + 1,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::attr::{new_int, new_ints, new_string};

    fn conv(attrs: Vec<crate::onnx::proto::AttributeProto>) -> NodeProto {
        NodeProto {
            op_type: Some("Conv".into()),
            attribute: attrs,
            ..Default::default()
        }
    }

    #[test]
    fn reads_and_resolves_every_padding() {
        let w = conv(vec![
            new_ints("strides", [2, 2]),
            new_ints("pads", [1, 0, 1, 2]),
            new_int("group", 4),
        ]);
        let w = Window::of(&w, Some(&[3, 3])).unwrap();
        assert_eq!(w.pads(None).unwrap(), (vec![1, 0], vec![1, 2]));
        assert_eq!(w.output_size(&[224, 224]), Some(vec![112, 112]));
        assert_eq!(w.group, 4);
        // SAME with strides: from the size's remainder modulo the stride.
        let same = conv(vec![
            new_string("auto_pad", "SAME_UPPER"),
            new_ints("strides", [2, 2]),
        ]);
        let same = Window::of(&same, Some(&[3, 3])).unwrap();
        assert!(same.pads(None).unwrap_err().contains("not static"));
        assert_eq!(
            same.pads(Some(&[32, 33])).unwrap(),
            (vec![0, 1], vec![1, 1])
        );
        assert_eq!(same.output_size(&[32, 33]), Some(vec![16, 17]));
        let lower = conv(vec![new_string("auto_pad", "SAME_LOWER")]);
        let lower = Window::of(&lower, Some(&[2])).unwrap();
        assert_eq!(lower.pads(None).unwrap(), (vec![1], vec![0]));
        let dilated = conv(vec![
            new_ints("dilations", [2, 2]),
            new_ints("pads", [2, 2, 2, 2]),
        ]);
        let dilated = Window::of(&dilated, Some(&[3, 3])).unwrap();
        assert_eq!(dilated.output_size(&[7, 9]), Some(vec![7, 9]));
        let unpadded = Window::of(&conv(vec![]), Some(&[3, 3])).unwrap();
        assert_eq!(unpadded.output_size(&[2, 2]), None);
        let valid = conv(vec![new_string("auto_pad", "VALID")]);
        let valid = Window::of(&valid, Some(&[3, 3])).unwrap();
        assert_eq!(valid.output_size(&[7, 2]), None);
        assert_eq!(valid.output_size(&[7, 3]), Some(vec![5, 1]));
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let bad = |attrs| Window::of(&conv(attrs), Some(&[3, 3])).unwrap_err();
        assert!(bad(vec![new_ints("strides", [0, 1])]).contains("strides"));
        assert!(bad(vec![new_ints("pads", [1, 1])]).contains("pads"));
        assert!(bad(vec![new_int("group", 0)]).contains("group"));
        assert!(bad(vec![new_ints("kernel_shape", [1, 1])]).contains("kernel_shape"));
        assert!(bad(vec![new_string("auto_pad", "MAYBE")]).contains("MAYBE"));
        let pool = NodeProto::default();
        assert!(Window::of(&pool, None).is_err());
        let huge = conv(vec![new_ints("dilations", [i64::MAX, 1])]);
        let huge = Window::of(&huge, Some(&[3, 3])).unwrap();
        assert_eq!(huge.output_size(&[8, 8]), None);
    }
}
