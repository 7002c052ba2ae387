//! Where a tensor's features lie as it flows through operators that only move its elements
//! (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity) or average over its other axes
//! (AveragePool without padding, GlobalAveragePool, ReduceMean): a per-feature scale and shift
//! commutes with all of them, so it can be moved across them onto a Linear or Conv weight. A
//! reshape that mixes the feature axis with another (`[2, 8, 12] → [2, 12, 8]`) moves features
//! to other elements: there the trail ends. Shapes are static (see [`crate::shapes`]).

use ndarray::{ArrayD, IxDyn};

use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

/// A tensor's static shape and the axis its features lie along.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    pub shape: Vec<usize>,
    pub axis: usize,
}

/// How an operator treats the elements of its first input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Motion {
    /// It only moves them (a view): undone by another view, it changes nothing.
    View,
    /// It averages them over axes other than the features'.
    Average,
}

impl Features {
    /// Features along `axis` of a tensor of `shape`.
    pub fn new(shape: Vec<usize>, axis: usize) -> Option<Features> {
        (axis < shape.len()).then_some(Features { shape, axis })
    }

    /// How many features there are.
    pub fn count(&self) -> usize {
        self.shape[self.axis]
    }

    /// The features of `node`'s output (shape `out`) when `node` reads this tensor as its first
    /// input and keeps every element's feature, with how it treats the elements; `None` when it
    /// mixes features or is no such operator.
    pub fn through(&self, node: &NodeProto, out: &[usize]) -> Option<(Features, Motion)> {
        let view = |f: Option<Features>| f.map(|f| (f, Motion::View));
        match node.op_type() {
            "Identity" => view(Some(self.clone())).filter(|(f, _)| f.shape == out),
            "Transpose" => {
                let perm: Vec<usize> = match attr::ints(node, "perm") {
                    Some(p) => p
                        .iter()
                        .map(|&a| usize::try_from(a).ok())
                        .collect::<Option<_>>()?,
                    None => (0..self.shape.len()).rev().collect(),
                };
                let axis = perm.iter().position(|&a| a == self.axis)?;
                view(Features::new(out.to_vec(), axis))
            }
            "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => view(self.reshaped(out)),
            "GlobalAveragePool" if self.axis == 1 && out.len() == self.shape.len() => {
                Some((Features::new(out.to_vec(), 1)?, Motion::Average))
            }
            "AveragePool" if self.axis == 1 && !padded(node) => {
                Some((Features::new(out.to_vec(), 1)?, Motion::Average))
            }
            _ => None,
        }
    }

    /// The features after a row-major reshape to `out`: the axis of `out` that has as many
    /// elements as the features and as many after it as the feature axis had.
    fn reshaped(&self, out: &[usize]) -> Option<Features> {
        let inner: usize = self.shape[self.axis + 1..].iter().product();
        let count = self.count();
        if out.iter().product::<usize>() != self.shape.iter().product::<usize>() {
            return None;
        }
        (0..out.len())
            .find(|&b| out[b] == count && out[b + 1..].iter().product::<usize>() == inner)
            .and_then(|b| Features::new(out.to_vec(), b))
    }

    /// The features after a ReduceMean over `axes` (non-negative) with `keepdims`, to a tensor of
    /// shape `out`; `None` when the features themselves are averaged.
    pub fn reduced(&self, axes: &[usize], keepdims: bool, out: &[usize]) -> Option<Features> {
        if axes.contains(&self.axis) {
            return None;
        }
        let axis = match keepdims {
            true => self.axis,
            false => self.axis - axes.iter().filter(|&&a| a < self.axis).count(),
        };
        Features::new(out.to_vec(), axis).filter(|f| f.count() == self.count())
    }
}

/// Whether a pooling node pads (padding makes an average of shifted values shift less at the
/// borders: no longer a per-feature shift).
fn padded(node: &NodeProto) -> bool {
    let explicit = attr::ints(node, "pads").is_some_and(|p| p.iter().any(|&v| v != 0));
    let auto = attr::string(node, "auto_pad").is_some_and(|a| a != "NOTSET" && a != "VALID");
    explicit || auto || attr::int(node, "ceil_mode").unwrap_or(0) != 0
}

/// Whether the views `ops` (Transpose perms as `Some(perm)`, reshapes as `None`, each with its
/// output shape), applied in order to a tensor of `shape`, give back every element where it was.
pub fn cancel(shape: &[usize], ops: &[(Option<Vec<usize>>, Vec<usize>)]) -> bool {
    let n: usize = shape.iter().product();
    if n > 1 << 24 {
        return false;
    }
    let start = ArrayD::from_shape_vec(IxDyn(shape), (0..n).collect::<Vec<usize>>());
    let Ok(start) = start else { return false };
    let mut a = start.clone();
    for (perm, out) in ops {
        let moved = match perm {
            Some(perm) if perm.len() == a.ndim() => a
                .permuted_axes(IxDyn(perm))
                .as_standard_layout()
                .into_owned(),
            Some(_) => return false,
            None => a,
        };
        let flat: Vec<usize> = moved.iter().copied().collect();
        match ArrayD::from_shape_vec(IxDyn(out), flat) {
            Ok(next) => a = next,
            Err(_) => return false,
        }
    }
    a == start
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::attr::new_ints;

    fn node(op: &str, attrs: Vec<crate::onnx::proto::AttributeProto>) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            attribute: attrs,
            ..Default::default()
        }
    }

    #[test]
    fn reshapes_keep_features_only_when_they_stay_an_axis() {
        let tokens = Features::new(vec![2, 5, 12], 2).unwrap();
        let flat = tokens.through(&node("Reshape", vec![]), &[10, 12]).unwrap();
        assert_eq!(
            flat,
            (Features::new(vec![10, 12], 1).unwrap(), Motion::View)
        );
        // [2, 8, 12] read as [2, 12, 8]: the 12s are no longer the features.
        let mixed = Features::new(vec![2, 8, 12], 2).unwrap();
        assert_eq!(mixed.through(&node("Reshape", vec![]), &[2, 12, 8]), None);
        let t = node("Transpose", vec![new_ints("perm", [0, 2, 1])]);
        let moved = tokens.through(&t, &[2, 12, 5]).unwrap().0;
        assert_eq!(moved.axis, 1);
    }

    #[test]
    fn averages_keep_the_features_they_do_not_reduce() {
        let map = Features::new(vec![1, 16, 4, 4], 1).unwrap();
        let gap = map.through(&node("GlobalAveragePool", vec![]), &[1, 16, 1, 1]);
        assert_eq!(gap.unwrap().1, Motion::Average);
        assert_eq!(map.reduced(&[2, 3], false, &[1, 16]).unwrap().axis, 1);
        assert_eq!(map.reduced(&[2, 3], true, &[1, 16, 1, 1]).unwrap().axis, 1);
        let padded = node("AveragePool", vec![new_ints("pads", [1, 1, 1, 1])]);
        assert_eq!(map.through(&padded, &[1, 16, 4, 4]), None);
        // The features themselves averaged away.
        let tokens = Features::new(vec![1, 16, 8], 2).unwrap();
        assert_eq!(tokens.reduced(&[2], false, &[1, 16]), None);
        assert_eq!(tokens.reduced(&[1], false, &[1, 8]).unwrap().axis, 1);
    }

    #[test]
    fn views_cancel_only_when_every_element_is_back() {
        let flatten_back = [(None, vec![10, 12]), (None, vec![2, 5, 12])];
        assert!(cancel(&[2, 5, 12], &flatten_back));
        let swap = Some(vec![0, 2, 1]);
        assert!(cancel(
            &[2, 5, 12],
            &[
                (swap.clone(), vec![2, 12, 5]),
                (swap.clone(), vec![2, 5, 12])
            ]
        ));
        // Transposed, then reshaped back to the original shape: elements moved.
        assert!(!cancel(
            &[2, 3, 4],
            &[(swap, vec![2, 4, 3]), (None, vec![2, 3, 4])]
        ));
        assert!(!cancel(&[2, 5, 12], &[(None, vec![10, 12])]));
    }
}
