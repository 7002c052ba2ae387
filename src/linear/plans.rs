//! Pulls and pushes made plans: each linear node with what it pulled and what was pushed into
//! it, heads on one input summed, the scales after them taken in; a push none of whose
//! operators can be planned stays whole; every BatchNormalization left, with the reason.

use std::collections::HashSet;

use super::finder::{Finder, Pulled, Push};
use super::{Affine, Head, Kind, LinearAnalysis, LinearPlan, MAX_CHECKED, Rewire, features_of};
use crate::error::{Error, Result};
use crate::features::Features;
use crate::onnx::attr;
use crate::tensor;

impl Finder<'_, '_, '_> {
    /// Turns pulls and pushes into plans, merging summed heads on one input.
    pub(super) fn finish(mut self) -> Result<LinearAnalysis> {
        let mut training = self.training.take();
        training.sort_unstable();
        training.dedup_by_key(|(n, _)| *n);
        let pulled = std::mem::take(&mut self.pulled);
        // A push goes whole or not at all: when an operator it reaches cannot be planned after
        // all, it stays (and the plans are made again without it).
        let (plans, rewired) = loop {
            let (plans, rewired) = self.plan_all(&pulled)?;
            let planned: HashSet<usize> = plans
                .iter()
                .flat_map(|p| p.heads.iter().map(|h| h.node))
                .collect();
            let stuck = |push: &Push| push.reached.iter().any(|(l, _, _)| !planned.contains(l));
            if !self.pushes.iter().any(stuck) {
                break (plans, rewired);
            }
            for push in self.pushes.iter().filter(|p| stuck(p)) {
                for &n in &push.removed {
                    self.taken.remove(&n);
                    self.reasons.borrow_mut().entry(n).or_insert(
                        "the operator it reaches cannot take it (see the other folds)".into(),
                    );
                }
            }
            self.pushes.retain(|p| !stuck(p));
            self.rebuild_pre();
        };
        let mut analysis = LinearAnalysis {
            plans,
            pushed: self
                .pushes
                .iter()
                .flat_map(|p| p.removed.iter().copied())
                .collect(),
            rewired: self
                .pushes
                .iter()
                .flat_map(|p| p.rewired.iter().cloned())
                .collect(),
            training,
            ..LinearAnalysis::default()
        };
        analysis.rewired.extend(rewired);
        // Every BatchNormalization neither folded here nor in a convolution block stays.
        let folded: HashSet<usize> = analysis
            .plans
            .iter()
            .flat_map(|p| p.bns.iter().copied())
            .chain(analysis.pushed.iter().copied())
            .collect();
        for n in 0..self.index.model.nodes.len() {
            let node = self.node(n);
            if node.op_type() != "BatchNormalization"
                || folded.contains(&n)
                || self.claimed.contains(&n)
            {
                continue;
            }
            let reason = self.reasons.borrow().get(&n).cloned().unwrap_or_else(|| {
                "no Conv, Gemm, MatMul or ConvTranspose next to it takes it (its input and \
                 output are read by other operators)"
                    .into()
            });
            analysis.stays.push((n, reason));
        }
        Ok(analysis)
    }

    /// Plans every linear node that pulled or was pushed into, with the kept nodes its pull
    /// rewires.
    fn plan_all(&self, pulled: &[Pulled]) -> Result<(Vec<LinearPlan>, Vec<Rewire>)> {
        let mut linear: Vec<usize> = pulled.iter().map(|p| p.node).collect();
        linear.extend(self.pre.keys().copied());
        linear.sort_unstable();
        linear.dedup();
        let mut planned: HashSet<usize> = HashSet::new();
        let (mut plans, mut rewires) = (Vec::new(), Vec::new());
        for n in linear {
            if planned.contains(&n) {
                continue;
            }
            let pull = pulled.iter().find(|p| p.node == n);
            if let Some((plan, rewired)) = self.plan(n, pull, pulled)? {
                planned.extend(plan.heads.iter().map(|h| h.node));
                rewires.extend(rewired);
                plans.push(plan);
            }
        }
        Ok((plans, rewires))
    }

    /// The plan of linear node `n` (with what it pulled, and what was pushed into it), summed
    /// with the other heads on its input where its output meets theirs.
    fn plan(
        &self,
        n: usize,
        pull: Option<&Pulled>,
        pulled: &[Pulled],
    ) -> Result<Option<(LinearPlan, Vec<Rewire>)>> {
        let index = self.index;
        let node = self.node(n);
        let input_side = self.pre.contains_key(&n);
        let kind = match self.linear_kind(n, input_side) {
            Ok(Some(k)) => k,
            Ok(None) => return Ok(None),
            Err(stop) => return stop.settle(&self.training).map(|()| None),
        };
        let w = index
            .stored_constant(&node.input[1])
            .ok_or_else(|| Error::Graph("a weight vanished".into()))?;
        let (dims, _) = tensor::shape(&w)?;
        let dtype = tensor::float_type(&w)?;
        let (out_features, _) = features_of(kind, &dims);
        let head = |m: usize| -> Head {
            let node = index.node(m);
            Head {
                node: m,
                weight: node.input[1].clone(),
                bias: node.input.get(2).filter(|b| !b.is_empty()).cloned(),
                alpha: attr::float(node, "alpha").unwrap_or(1.0) as f64,
                beta: attr::float(node, "beta").unwrap_or(1.0) as f64,
                pre: self.pre.get(&m).map(|(a, _, _)| a.clone()),
            }
        };
        let mut heads = vec![head(n)];
        let mut removed = Vec::new();
        let mut rewired = Vec::new();
        let mut bns: Vec<usize> = Vec::new();
        let mut post = Affine::identity(out_features);
        let mut output = node.output[0].clone();
        let mut ends = Vec::new();
        if let Some(p) = pull {
            post = p.post.clone();
            output = p.output.clone();
            ends = p.ends.clone();
            removed.extend(&p.removed);
            rewired.extend(p.rewired.iter().cloned());
            bns.extend(&p.bns);
        }
        let input = self.effective_input(n);
        // Heads on the same input summed: `Add(h1, h2)` (then scales) after the outputs.
        if pull.is_none()
            && let Some(sum) = self.sole_consumer(&output)
            && self.node(sum).op_type() == "Add"
            && !self.taken.contains(&sum)
        {
            let other = self.node(sum).input.iter().find(|v| **v != output).cloned();
            let partner = other
                .as_deref()
                .and_then(|v| index.producer(v))
                .filter(|&m| m != n && !pulled.iter().any(|p| p.node == m));
            if let Some(m) = partner
                && self
                    .linear_kind(m, self.pre.contains_key(&m))
                    .ok()
                    .flatten()
                    == Some(kind)
                && self.effective_input(m) == input
                && index
                    .tensor_dims(&self.node(m).input[1])
                    .map(|d| d.iter().map(|&x| x as usize).collect::<Vec<_>>())
                    == Some(dims.clone())
                && self.sole_consumer(&self.node(m).output[0]) == Some(sum)
            {
                heads.push(head(m));
                removed.extend([m, sum]);
                output = self.node(sum).output[0].clone();
            }
        }
        // Scales after what is rewritten anyway (heads summed, then `/ 2`; a bias `Add` after
        // a MatMul scales were pushed into), on the last axis.
        let linear = matches!(kind, Kind::Gemm { .. } | Kind::MatMul);
        if pull.is_none()
            && linear
            && (heads.len() > 1 || input_side)
            && let Some(f) = self
                .shape(&output)
                .and_then(|s| Features::new(s.clone(), s.len().checked_sub(1)?))
        {
            let mut value = output.clone();
            while let Some(c) = self
                .sole_consumer(&value)
                .filter(|c| !self.taken.contains(c))
            {
                match self.scale_of(c, &value, &f) {
                    Ok(Some(a)) => {
                        post = post.then(&a);
                        removed.push(c);
                        if self.node(c).op_type() == "BatchNormalization" {
                            bns.push(c);
                        }
                        value = self.node(c).output[0].clone();
                    }
                    Ok(None) => break,
                    Err(stop) => {
                        stop.settle(&self.training)?;
                        break;
                    }
                }
            }
            output = value;
        }
        let mut pushed: Vec<usize> = heads
            .iter()
            .filter_map(|h| self.pre.get(&h.node))
            .flat_map(|(_, _, nodes)| nodes.iter().copied())
            .collect();
        pushed.sort_unstable();
        pushed.dedup();
        bns.extend(
            pushed
                .iter()
                .copied()
                .filter(|&b| self.node(b).op_type() == "BatchNormalization"),
        );
        bns.sort_unstable();
        bns.dedup();
        let source = heads
            .iter()
            .find_map(|h| self.pre.get(&h.node).map(|(_, s, _)| s.clone()))
            .unwrap_or_else(|| input.clone());
        // The check evaluates the original from `source` with every weight whole.
        let Some(source_shape) = self.shape(&source) else {
            return Ok(None);
        };
        let elements: usize = dims.iter().product();
        if elements > MAX_CHECKED || source_shape.iter().product::<usize>() > MAX_CHECKED {
            for &b in &bns {
                self.reasons.borrow_mut().entry(b).or_insert(format!(
                    "the fold beside it is too large to check ({elements} weights, input \
                     {source_shape:?})"
                ));
            }
            return Ok(None);
        }
        if ends.is_empty() {
            ends.push(output.clone());
        }
        let as_gemm = kind == Kind::MatMul && self.shape(&input).is_some_and(|s| s.len() == 2);
        let mut named: Vec<usize> = heads.iter().map(|h| h.node).collect();
        named.extend(&removed);
        let name = crate::naming::nodes_name(index, &named, n);
        Ok(Some((
            LinearPlan {
                name,
                node_name: String::new(),
                kind,
                heads,
                input,
                output,
                source,
                source_shape,
                as_gemm,
                ends,
                post,
                removed,
                bns,
                pushed,
                weight_dims: dims,
                dtype,
            },
            rewired,
        )))
    }

    /// What linear node `n` reads once the scales pushed into it are gone: its data input, or
    /// past the pushed scales right before it.
    fn effective_input(&self, n: usize) -> String {
        let mut value = self.node(n).input[0].clone();
        let pushed: Vec<usize> = self
            .pre
            .get(&n)
            .map(|(_, _, r)| r.clone())
            .unwrap_or_default();
        while let Some(p) = self.index.producer(&value).filter(|p| pushed.contains(p)) {
            value = self.node(p).input[self.data_slot(p)].clone();
        }
        value
    }
}
