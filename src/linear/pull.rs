//! Scales after a linear operator (Gemm, MatMul with its bias, ConvTranspose) on its output
//! features, through the views exporters put around them, pulled into it: the views that cancel
//! out (or end in a Reshape) go too; otherwise they stay and read past the scales.

use std::collections::HashSet;

use super::finder::{Finder, Pulled, Step, Stop, perm_of};
use super::{Affine, Kind, Rewire};
use crate::error::Result;
use crate::features::{Features, Motion, cancel};
use crate::onnx::attr;
use crate::tensor;

impl Finder<'_, '_, '_> {
    /// Tries to pull the scales after linear node `n` into it.
    pub(super) fn pull(&mut self, n: usize) -> Result<()> {
        if self.taken.contains(&n) {
            return Ok(());
        }
        match self.try_pull(n) {
            Ok(Some(p)) => {
                self.taken.insert(n);
                self.taken.extend(&p.removed);
                self.pulled.push(p);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(stop) => stop.settle(&self.training),
        }
    }

    fn try_pull(&self, n: usize) -> Result<Option<Pulled>, Stop> {
        let node = self.node(n);
        let Some(kind) = self.linear_kind(n, false)? else {
            return Ok(None);
        };
        let Some(out) = node.output.first().filter(|o| !o.is_empty()) else {
            return Ok(None);
        };
        let Some(shape) = self.shape(out) else {
            return Ok(None);
        };
        let axis = match kind {
            Kind::Gemm { .. } | Kind::ConvTranspose { .. } => 1,
            _ => shape.len().saturating_sub(1),
        };
        let Some(start) = Features::new(shape, axis) else {
            return Ok(None);
        };
        let features = start.count();
        // Walk the chain of per-feature scales and views after the node.
        let mut value = out.clone();
        let mut here = start.clone();
        let mut post = Affine::identity(features);
        let mut steps: Vec<Step> = Vec::new();
        let mut scales: Vec<usize> = Vec::new();
        let mut scaled = false;
        while let Some(c) = self.sole_consumer(&value) {
            if self.taken.contains(&c) {
                break;
            }
            let next = &self.node(c).output;
            let Some(next) = next.first().filter(|o| !o.is_empty()) else {
                break;
            };
            if let Some(affine) = self.scale_of(c, &value, &here)? {
                post = post.then(&affine);
                // A lone bias `Add` is no fold (a Linear's own bias stays as it is).
                scaled |= affine.scale.iter().any(|&s| s != 1.0) || !scales.is_empty();
                scales.push(c);
                steps.push((c, None, here.shape.clone()));
                value = next.clone();
                continue;
            }
            let Some(out_shape) = self.shape(next) else {
                break;
            };
            match here.through(self.node(c), &out_shape) {
                Some((f, Motion::View)) => {
                    steps.push((c, perm_of(self.node(c), here.shape.len()), out_shape));
                    here = f;
                    value = next.clone();
                }
                _ => break,
            }
        }
        let Some(last) = steps.iter().rposition(|(c, _, _)| scales.contains(c)) else {
            return Ok(None);
        };
        if !scaled {
            return Ok(None);
        }
        // The views up to the last scale, and any after it: cut where they all cancel.
        let views = |k: usize| -> Vec<(Option<Vec<usize>>, Vec<usize>)> {
            steps[..=k]
                .iter()
                .filter(|(c, _, _)| !scales.contains(c))
                .map(|(_, p, s)| (p.clone(), s.clone()))
                .collect()
        };
        // A removed value may still be read by `Shape` nodes, as long as what they compute
        // feeds removed nodes only.
        let gone_with = |k: usize| {
            let removed: HashSet<usize> = steps[..=k].iter().map(|(c, _, _)| *c).collect();
            let values = std::iter::once(out)
                .chain(steps[..k].iter().map(|(c, _, _)| &self.node(*c).output[0]));
            values.collect::<Vec<_>>().into_iter().all(|v| {
                self.index.consumers(v).iter().all(|&u| {
                    removed.contains(&u)
                        || self.node(u).output.iter().all(|o| {
                            self.index.consumers(o).iter().all(|w| removed.contains(w))
                                && !self.index.is_output(o)
                        })
                })
            })
        };
        let cut = (last..steps.len()).find(|&k| cancel(&start.shape, &views(k)) && gone_with(k));
        let merged = match cut {
            None => self
                .merged_reshape(&steps, last, &scales)
                .filter(|_| gone_with(last)),
            Some(_) => None,
        };
        let bns = scales
            .iter()
            .copied()
            .filter(|&c| self.node(c).op_type() == "BatchNormalization")
            .collect();
        let (removed, output, rewired) = match (cut, merged) {
            (Some(k), _) => {
                let removed: Vec<usize> = steps[..=k].iter().map(|(c, _, _)| *c).collect();
                let output = self.node(steps[k].0).output[0].clone();
                (removed, output, Vec::new())
            }
            // The final Reshape reads the linear node's output; all before it goes.
            (None, Some(reshape)) => {
                let removed: Vec<usize> = steps[..=last].iter().map(|(c, _, _)| *c).collect();
                let rewire = Rewire {
                    node: reshape,
                    slot: 0,
                    value: out.clone(),
                };
                (removed, out.clone(), vec![rewire])
            }
            // The views stay; the scales go, and whatever read them reads past them.
            (None, None) => {
                let mut rewired = Vec::new();
                for &c in &scales {
                    let scale = self.node(c);
                    let past = scale.input[self.data_slot(c)].clone();
                    for user in self.index.readers(&scale.output[0]) {
                        if scales.contains(&user) {
                            continue;
                        }
                        for (slot, v) in self.node(user).input.iter().enumerate() {
                            if *v == scale.output[0] {
                                rewired.push(Rewire {
                                    node: user,
                                    slot,
                                    value: self.settle(&past, &scales),
                                });
                            }
                        }
                    }
                }
                if scales
                    .iter()
                    .any(|&c| self.index.is_output(&self.node(c).output[0]))
                {
                    return Ok(None);
                }
                (scales.clone(), out.clone(), rewired)
            }
        };
        let mut ends: Vec<String> = rewired
            .iter()
            .map(|r| self.node(r.node).output[0].clone())
            .collect();
        ends.dedup();
        if ends.is_empty() {
            ends.push(output.clone());
        }
        Ok(Some(Pulled {
            node: n,
            post,
            output,
            removed,
            rewired,
            ends,
            bns,
        }))
    }

    /// Where the views and scales after a linear node up to the last scale (`steps[..=last]`)
    /// only reshape (Reshape, Flatten, Squeeze, Unsqueeze: elements keep their order) and the
    /// node after the last scale is a Reshape to an explicit shape: that Reshape, which then
    /// reads the linear node's output directly (a reshape of a reshape is the last one),
    /// everything before it gone.
    fn merged_reshape(&self, steps: &[Step], last: usize, scales: &[usize]) -> Option<usize> {
        const RESHAPES: [&str; 4] = ["Reshape", "Flatten", "Squeeze", "Unsqueeze"];
        let reshapes_only = steps[..=last]
            .iter()
            .all(|(c, _, _)| scales.contains(c) || RESHAPES.contains(&self.node(*c).op_type()));
        let scaled = &self.node(steps[last].0).output[0];
        let [k] = self.index.readers(scaled)[..] else {
            return None;
        };
        let node = self.node(k);
        if !reshapes_only || node.op_type() != "Reshape" || self.index.is_output(scaled) {
            return None;
        }
        let target = self.index.constant(node.input.get(1)?)?;
        let target = tensor::read_i64(&target, &self.index.model.external).ok()?;
        // `0` copies the input's dim (unless `allowzero`): it would read another input.
        let copies =
            attr::int(node, "allowzero").unwrap_or(0) == 0 && target.iter().any(|&d| d == 0);
        (!copies).then_some(k)
    }
}
