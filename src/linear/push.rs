//! Scales before linear operators (Gemm, MatMul, unpadded Conv) on their input features,
//! pushed into every one they reach — through views and averages over other axes; further
//! scales on the way compose — or into none.

use std::collections::HashSet;

use super::finder::{Finder, Push, Stop, VIEWS, perm_of};
use super::{Affine, Kind, Rewire};
use crate::error::Result;
use crate::features::{Features, Motion};
use crate::graph::is_default_domain;

/// Where a push is going: the linear operators it reached (with what reaches each and where it
/// began), the kept nodes reading past what goes, and what goes.
struct Trail<'t> {
    reached: &'t mut Vec<(usize, Affine, String)>,
    rewired: &'t mut Vec<Rewire>,
    removed: &'t mut Vec<usize>,
}

impl Finder<'_, '_, '_> {
    /// Tries to push scale node `n` into every linear operator it reaches.
    pub(super) fn push(&mut self, n: usize) -> Result<()> {
        if self.taken.contains(&n) {
            return Ok(());
        }
        let node = self.node(n);
        let is_scale = matches!(
            node.op_type(),
            "BatchNormalization" | "Mul" | "Div" | "Add" | "Sub"
        );
        if !is_scale || !is_default_domain(node) {
            return Ok(());
        }
        let data = self.data_slot(n);
        let Some(x) = node.input.get(data).filter(|v| !v.is_empty()).cloned() else {
            return Ok(());
        };
        let Some(shape) = self.shape(&x) else {
            if node.op_type() == "BatchNormalization" {
                self.reasons.borrow_mut().entry(n).or_insert(format!(
                    "the shape of '{x}' is not static (a symbolic size): where its features go \
                     cannot be followed"
                ));
            }
            return Ok(());
        };
        // The feature axis: a BatchNormalization's is 1; a constant's is where it has more than
        // one value. A scale the same for all (one value, `x + x`) is one per feature on any
        // axis: the last (a MatMul's or Gemm's) is tried, then 1 (a Conv's).
        let axes = match node.op_type() {
            "BatchNormalization" => vec![1],
            _ => {
                let other = &node.input[1 - data];
                let dims = match other == &x {
                    true => Some(Vec::new()),
                    false => self.index.tensor_dims(other),
                };
                let Some(dims) = dims else {
                    return Ok(());
                };
                let offset = shape.len().saturating_sub(dims.len());
                match dims.iter().position(|&d| d > 1) {
                    Some(j) => vec![offset + j],
                    None => {
                        let mut axes = vec![shape.len().saturating_sub(1), 1];
                        axes.dedup();
                        axes
                    }
                }
            }
        };
        let out = node.output[0].clone();
        let mut found = None;
        for axis in axes {
            let Some(f) = Features::new(shape.clone(), axis) else {
                continue;
            };
            let affine = match self.scale_of(n, &x, &f) {
                Ok(Some(a)) => a,
                Ok(None) => continue,
                Err(stop) => return stop.settle(&self.training),
            };
            let (mut reached, mut rewired, mut removed) = (Vec::new(), Vec::new(), vec![n]);
            let mut trail = Trail {
                reached: &mut reached,
                rewired: &mut rewired,
                removed: &mut removed,
            };
            match self.follow(&out, &x, f, affine, &mut trail, 0) {
                Ok(()) if !reached.is_empty() => {
                    found = Some((reached, rewired, removed));
                    break;
                }
                Ok(()) => {}
                Err(Stop::Reason(reason)) => {
                    if self.node(n).op_type() == "BatchNormalization" {
                        self.reasons.borrow_mut().entry(n).or_insert(reason);
                    }
                }
                Err(stop) => return stop.settle(&self.training),
            }
        }
        let Some((mut reached, mut rewired, mut removed)) = found else {
            return Ok(());
        };
        if let Some((before, after)) = self.transposes_around(&x, &rewired, &reached) {
            // `Transpose → scale → Transpose` back: all three go, the linear nodes read what
            // the first one read.
            let start = self.node(before).input[0].clone();
            removed.extend([before, after]);
            rewired.clear();
            reached
                .iter_mut()
                .for_each(|(_, _, s)| s.clone_from(&start));
        }
        self.taken.extend(&removed);
        self.pushes.push(Push {
            removed,
            reached,
            rewired,
        });
        self.rebuild_pre();
        Ok(())
    }

    /// A Transpose before the scale reading `x` (read by it alone) and the Transpose back
    /// after it (the one kept node reading past the scale, read only by the linear nodes
    /// reached): the two, which cancel out.
    fn transposes_around(
        &self,
        x: &str,
        rewired: &[Rewire],
        reached: &[(usize, Affine, String)],
    ) -> Option<(usize, usize)> {
        let [rewire] = rewired else {
            return None;
        };
        let before = self.index.producer(x)?;
        let after = rewire.node;
        let [_] = self.index.readers(x)[..] else {
            return None;
        };
        let transpose = |n: usize| {
            let node = self.node(n);
            (node.op_type() == "Transpose" && is_default_domain(node) && !self.taken.contains(&n))
                .then(|| self.shape(&node.output[0]))
                .flatten()
                .map(|shape| perm_of(node, shape.len()).unwrap_or_default())
        };
        let (p, q) = (transpose(before)?, transpose(after)?);
        let inverse = p.len() == q.len()
            && (0..p.len()).all(|a| q.get(a).and_then(|&b| p.get(b)) == Some(&a));
        let out = &self.node(after).output[0];
        let linear: HashSet<usize> = reached.iter().map(|(l, _, _)| *l).collect();
        let only_linear = !self.index.is_output(out)
            && self.index.consumers(out).iter().all(|c| linear.contains(c));
        let x_kept = self.index.is_output(x);
        (inverse && only_linear && !x_kept && rewire.value == x).then_some((before, after))
    }

    /// `pre` from `pushes`.
    pub(super) fn rebuild_pre(&mut self) {
        self.pre.clear();
        for push in &self.pushes {
            for (linear, affine, source) in &push.reached {
                let entry = self.pre.entry(*linear).or_insert((
                    Affine::identity(affine.scale.len()),
                    source.clone(),
                    Vec::new(),
                ));
                entry.0 = entry.0.then(affine);
                entry.1 = source.clone();
                entry.2.extend(push.removed.iter().copied());
            }
        }
    }

    /// Follows `value` (features `f`, carrying `affine` pushed from upstream, which began at
    /// `source`) to every consumer: views and averages pass it on, further scales compose, linear
    /// operators absorb it; anything else stops the push.
    fn follow(
        &mut self,
        value: &str,
        source: &str,
        f: Features,
        affine: Affine,
        trail: &mut Trail,
        depth: usize,
    ) -> Result<(), Stop> {
        if depth > 64 {
            return Err(Stop::Reason("the scale reaches too far to follow".into()));
        }
        if self.index.is_output(value) {
            return Err(Stop::Reason(format!("'{value}' is a graph output")));
        }
        let users = self.index.readers(value);
        if users.is_empty() {
            return Err(Stop::Reason(format!("nothing reads '{value}'")));
        }
        for c in users {
            // A linear node whose output side folds takes its input side too.
            let pulled = self.pulled.iter().any(|p| p.node == c);
            if self.taken.contains(&c) && !pulled {
                return Err(Stop::Reason(format!(
                    "'{value}' is also read by '{}', folded otherwise",
                    self.node(c).name()
                )));
            }
            let node = self.node(c);
            let slot = node.input.iter().position(|v| v == value).unwrap_or(0);
            // Absorbed by a linear operator reading it as its data.
            if slot == 0
                && let Some(kind) = self.linear_kind(c, true)?
            {
                let contracted = match kind {
                    Kind::Gemm { trans_a: true, .. } => 0,
                    Kind::Gemm { .. } => 1,
                    Kind::MatMul => f.shape.len().saturating_sub(1),
                    Kind::Conv { .. } => 1,
                    Kind::ConvTranspose { .. } => return Err(Stop::Reason("ConvTranspose".into())),
                };
                if f.axis != contracted && f.count() > 1 {
                    return Err(Stop::Reason(format!(
                        "'{}' ({}) sums over axis {contracted} of {:?}, the features are on \
                         axis {}",
                        node.name(),
                        node.op_type(),
                        f.shape,
                        f.axis
                    )));
                }
                trail.reached.push((c, affine.clone(), source.to_string()));
                continue;
            }
            let Some(next) = node.output.first().filter(|o| !o.is_empty()).cloned() else {
                return Err(Stop::Reason(format!("'{}' has no output", node.name())));
            };
            // A further scale composes.
            if let Some(more) = self.scale_of(c, value, &f)? {
                trail.removed.push(c);
                self.follow(
                    &next,
                    source,
                    f.clone(),
                    affine.then(&more),
                    trail,
                    depth + 1,
                )?;
                continue;
            }
            let Some(out_shape) = self.shape(&next) else {
                return Err(Stop::Reason(format!("the shape of '{next}' is not static")));
            };
            let through = match node.op_type() {
                "ReduceMean" => self.reduce_axes(c, f.shape.len()).and_then(|(axes, keep)| {
                    f.reduced(&axes, keep, &out_shape)
                        .map(|g| (g, Motion::Average))
                }),
                _ => f.through(node, &out_shape),
            };
            let Some((g, _)) = through.filter(|_| slot == 0) else {
                let why = match VIEWS.contains(&node.op_type()) && slot == 0 {
                    true => "which mixes the feature axis with another",
                    false => "which a per-feature scale cannot pass",
                };
                return Err(Stop::Reason(format!(
                    "'{value}' is read by '{}' ({}), {why}",
                    node.name(),
                    node.op_type()
                )));
            };
            // The first kept node on the way reads past what goes.
            if trail
                .removed
                .iter()
                .any(|&r| self.node(r).output[0] == value)
            {
                trail.rewired.push(Rewire {
                    node: c,
                    slot,
                    value: self.settle(value, trail.removed),
                });
            }
            self.follow(&next, source, g, affine.clone(), trail, depth + 1)?;
        }
        Ok(())
    }
}
