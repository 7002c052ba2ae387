//! Linear folds: per-feature scales and shifts — BatchNormalization, or `Mul`/`Div`/`Add`/`Sub`
//! by a constant with one value per feature — folded into the weight and bias of a linear
//! operator beside them:
//!
//! - *after* a `Gemm`, a `MatMul` (its bias `Add` included) or a `ConvTranspose`, on its output
//!   features (pulled into it), through operators that only move elements (Reshape, Flatten,
//!   Transpose, …: those that cancel out go too);
//! - *before* a `Gemm`, a `MatMul` or an unpadded `Conv`, on its input features (pushed into
//!   every one it reaches), through those and through averages over other axes (pooling,
//!   `ReduceMean`); a scale met on the way composes;
//! - and `Gemm(x, W1, b1) + Gemm(x, W2, b2)` (then `/ 2`) on one input becomes one Gemm.
//!
//! Exact only where it is: statistics in training mode, weights that are no constants, a reshape
//! that mixes the feature axis with another, a value also used elsewhere, padding before a
//! Conv: each stays, and every BatchNormalization that stays says why. Read-only: returns plans.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use crate::constant::Constants;
use crate::error::{Error, Result};
use crate::features::{Features, Motion, cancel};
use crate::fold::{self, FoldError, FoldOptions};
use crate::geometry::Window;
use crate::graph::is_default_domain;
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;
use crate::shapes::Shapes;
use crate::tensor::{self, FloatType};

/// Most weights, and most input elements, of a fold: its check evaluates it whole.
pub const MAX_CHECKED: usize = 1 << 22;

/// A per-feature `y = x·scale + shift`.
#[derive(Debug, Clone, PartialEq)]
pub struct Affine {
    pub scale: Vec<f64>,
    pub shift: Vec<f64>,
}

impl Affine {
    /// The identity on `n` features.
    pub fn identity(n: usize) -> Affine {
        Affine {
            scale: vec![1.0; n],
            shift: vec![0.0; n],
        }
    }

    /// `then ∘ self`: this one first.
    pub fn then(&self, then: &Affine) -> Affine {
        Affine {
            scale: self
                .scale
                .iter()
                .zip(&then.scale)
                .map(|(a, b)| a * b)
                .collect(),
            shift: (self.shift.iter().zip(&then.scale).zip(&then.shift))
                .map(|((s, t), u)| s * t + u)
                .collect(),
        }
    }
}

/// The linear operator a fold rewrites, and how its weight's axes hold the features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `Gemm(A, B, C)`: the weight is B (`[out, in]` with `transB`, else `[in, out]`).
    Gemm { trans_a: bool, trans_b: bool },
    /// `MatMul(x, W)`, W `[in, out]`.
    MatMul,
    /// `Conv(x, W)`, W `[out, in/group, k…]`, unpadded (input side only).
    Conv { group: usize },
    /// `ConvTranspose(x, W)`, W `[in, out/group, k…]` (output side only).
    ConvTranspose { group: usize },
}

impl Kind {
    /// Whether the weight's first axis holds the output features (else the input features).
    pub fn rows_are_outputs(self) -> bool {
        matches!(self, Kind::Gemm { trans_b: true, .. } | Kind::Conv { .. })
    }

    /// Groups the channels split into (1 for Gemm and MatMul).
    pub fn group(self) -> usize {
        match self {
            Kind::Conv { group } | Kind::ConvTranspose { group } => group,
            _ => 1,
        }
    }

    /// A label for people (`Gemm`, `MatMul`, `Conv`, `ConvTranspose`).
    pub fn op(self) -> &'static str {
        match self {
            Kind::Gemm { .. } => "Gemm",
            Kind::MatMul => "MatMul",
            Kind::Conv { .. } => "Conv",
            Kind::ConvTranspose { .. } => "ConvTranspose",
        }
    }
}

/// One linear operator of a fold (several when heads on one input are summed).
#[derive(Debug, Clone)]
pub struct Head {
    pub node: usize,
    /// The weight (a constant) and the bias (Gemm's C, a Conv's or ConvTranspose's B), if any.
    pub weight: String,
    pub bias: Option<String>,
    /// Gemm's `alpha` and `beta` (1 otherwise).
    pub alpha: f64,
    pub beta: f64,
    /// What was pushed into its input features, if anything.
    pub pre: Option<Affine>,
}

/// A linear operator (or a sum of them on one input) with the scales and shifts folded in.
#[derive(Debug, Clone)]
pub struct LinearPlan {
    /// Module path or the operator's name.
    pub name: String,
    /// The fused node's name; its tensors are `{node_name}.weight` and `.bias`.
    pub node_name: String,
    pub kind: Kind,
    pub heads: Vec<Head>,
    /// The value the fused node reads, and the one it produces.
    pub input: String,
    pub output: String,
    /// The value a check starts from: the fused node's input, or where what was pushed into it
    /// began.
    pub source: String,
    /// Its shape (a symbolic batch taken as 1), which the check's random input takes.
    pub source_shape: Vec<usize>,
    /// A MatMul of a matrix, written as a Gemm (bias included) rather than a MatMul and an Add.
    pub as_gemm: bool,
    /// The values the original and the fused graph both compute and must agree on: `output`,
    /// or, where views after it stay (and read past the scales that go), their outputs.
    pub ends: Vec<String>,
    /// Per output feature, after the heads' sum (bias `Add`s, BatchNormalization, scales).
    pub post: Affine,
    /// The node the fused node takes the place of (the first head's).
    pub at: usize,
    /// Nodes that go with this fold: the other heads, what was pulled, the sum, views that
    /// cancelled out.
    pub removed: Vec<usize>,
    /// Every BatchNormalization folded (pulled or pushed) into it.
    pub bns: Vec<usize>,
    /// The scales pushed into its input features (they go; one may reach several folds).
    pub pushed: Vec<usize>,
    /// The fused weight's dims and element type (the first head's).
    pub weight_dims: Vec<usize>,
    pub dtype: FloatType,
    pub out_features: usize,
    pub in_features: usize,
    pub options: FoldOptions,
}

impl LinearPlan {
    /// The operator written: that of the plan's kind, but `Gemm` for a MatMul of a matrix.
    pub fn op(&self) -> &'static str {
        match self.as_gemm {
            true => "Gemm",
            false => self.kind.op(),
        }
    }
}

/// A kept node reading another value in one input slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewire {
    pub node: usize,
    pub slot: usize,
    pub value: String,
}

/// Everything the linear analysis decided.
#[derive(Debug, Clone, Default)]
pub struct LinearAnalysis {
    pub plans: Vec<LinearPlan>,
    /// Scales and shifts pushed into the linear operators after them, which go.
    pub pushed: Vec<usize>,
    /// Kept nodes that read past a node that goes.
    pub rewired: Vec<Rewire>,
    /// Every BatchNormalization that stays (not in a convolution block either), with the reason.
    pub stays: Vec<(usize, String)>,
    /// BatchNormalization nodes in training mode beside a linear operator, which only
    /// `allow_training_bn` folds: an error of `fuse` otherwise.
    pub training: Vec<(usize, String)>,
}

/// What stops a fold: a reason for people, a BatchNormalization in training mode (an error
/// of the run unless allowed, as in a block), or a broken model.
enum Stop {
    Reason(String),
    Training(usize, String),
    Invalid(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Invalid(e)
    }
}

impl From<FoldError> for Stop {
    fn from(e: FoldError) -> Self {
        match e {
            FoldError::Skip(r) | FoldError::Training(r) => Stop::Reason(r),
            FoldError::Invalid(e) => Stop::Invalid(e),
        }
    }
}

impl Stop {
    /// A broken model stops everything; a training-mode BatchNormalization is remembered;
    /// any other reason only stops this fold.
    fn settle(self, training: &RefCell<Vec<(usize, String)>>) -> Result<()> {
        match self {
            Stop::Invalid(e) => Err(e),
            Stop::Training(n, reason) => {
                training.borrow_mut().push((n, reason));
                Ok(())
            }
            Stop::Reason(_) => Ok(()),
        }
    }
}

/// Finds the linear folds of the graph, leaving alone the nodes of `claimed` (folded as
/// convolution blocks). Training-mode BatchNormalization next to a linear operator is an error
/// unless allowed, as in a block.
pub fn analyse(
    index: &Constants,
    shapes: &Shapes,
    claimed: &HashSet<usize>,
    options: FoldOptions,
) -> Result<LinearAnalysis> {
    let mut finder = Finder {
        index,
        shapes,
        options,
        claimed,
        taken: claimed.clone(),
        pulled: Vec::new(),
        pushes: Vec::new(),
        pre: HashMap::new(),
        reasons: RefCell::new(HashMap::new()),
        training: RefCell::new(Vec::new()),
    };
    let nodes = index.model.nodes.len();
    for n in 0..nodes {
        finder.pull(n)?;
    }
    for n in 0..nodes {
        finder.push(n)?;
    }
    finder.finish()
}

/// A pull found: the linear node, what it pulled, where its output ends.
struct Pulled {
    node: usize,
    post: Affine,
    output: String,
    removed: Vec<usize>,
    rewired: Vec<Rewire>,
    ends: Vec<String>,
    bns: Vec<usize>,
}

struct Finder<'a, 'i, 'm> {
    index: &'a Constants<'i, 'm>,
    shapes: &'a Shapes,
    options: FoldOptions,
    /// Nodes of the convolution blocks.
    claimed: &'a HashSet<usize>,
    /// Nodes some fold (or a convolution block) owns already.
    taken: HashSet<usize>,
    pulled: Vec<Pulled>,
    /// Every push found: scales that go into the linear operators after them.
    pushes: Vec<Push>,
    /// Linear node → what was pushed into its input features, the value pushes began at, and
    /// the scales pushed (from `pushes`).
    pre: HashMap<usize, (Affine, String, Vec<usize>)>,
    /// Why a BatchNormalization stays, from the first attempt that reached it.
    reasons: RefCell<HashMap<usize, String>>,
    /// BatchNormalization in training mode met beside a linear operator (not allowed).
    training: RefCell<Vec<(usize, String)>>,
}

impl Finder<'_, '_, '_> {
    fn node(&self, n: usize) -> &NodeProto {
        self.index.node(n)
    }

    fn shape(&self, value: &str) -> Option<Vec<usize>> {
        self.shapes.get(self.index, value)
    }

    /// The only consumer of `value`, when it is used once (not a graph output); `Shape` nodes
    /// that read it are allowed beside (a reshape back to its shape reads them).
    fn sole_consumer(&self, value: &str) -> Option<usize> {
        if self.index.is_output(value) {
            return None;
        }
        let users: Vec<usize> = self
            .index
            .consumers(value)
            .iter()
            .copied()
            .filter(|&c| self.node(c).op_type() != "Shape")
            .collect();
        match users.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// Tries to pull the scales after linear node `n` into it.
    fn pull(&mut self, n: usize) -> Result<()> {
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
                scaled |= self.node(c).op_type() != "Add" || !scales.is_empty();
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
                    for &user in self.index.consumers(&scale.output[0]) {
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
        let &[k] = self.index.consumers(scaled) else {
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

    /// Past a run of removed scales: the first value upstream of `value` not produced by one.
    fn settle(&self, value: &str, removed: &[usize]) -> String {
        let mut value = value.to_string();
        while let Some(p) = self.index.producer(&value).filter(|p| removed.contains(p)) {
            value = self.node(p).input[self.data_slot(p)].clone();
        }
        value
    }

    /// Which input of scale node `c` carries the data (the other is its constant).
    fn data_slot(&self, c: usize) -> usize {
        let node = self.node(c);
        match node.op_type() {
            "BatchNormalization" => 0,
            _ => usize::from(self.index.constant(&node.input[0]).is_some()),
        }
    }

    /// The per-feature scale and shift node `c` applies to `value` (features `f`), when it is
    /// one: BatchNormalization on feature axis 1, or `Mul`/`Div`/`Add`/`Sub` by a constant with
    /// one value per feature (or one for all).
    fn scale_of(&self, c: usize, value: &str, f: &Features) -> Result<Option<Affine>, Stop> {
        let node = self.node(c);
        // A training-mode BatchNormalization lists its running statistics as more outputs:
        // they may be there, unread.
        let read = |o: &String| self.index.is_output(o) || !self.index.consumers(o).is_empty();
        if !is_default_domain(node) || node.output.iter().skip(1).any(read) {
            return Ok(None);
        }
        let n = f.count();
        match node.op_type() {
            "BatchNormalization" if node.input.first().map(String::as_str) == Some(value) => {
                if f.axis != 1 {
                    self.reasons.borrow_mut().entry(c).or_insert(format!(
                        "it normalizes axis 1 of {:?}, where the features of the linear \
                             operator beside it are not (axis {})",
                        f.shape, f.axis
                    ));
                    return Ok(None);
                }
                match fold::bn_scale_shift(self.index, c, n, self.options) {
                    Ok((scale, shift)) => Ok(Some(Affine { scale, shift })),
                    Err(FoldError::Training(reason)) => {
                        self.reasons.borrow_mut().entry(c).or_insert(reason.clone());
                        Err(Stop::Training(c, reason))
                    }
                    Err(e) => {
                        let stop = Stop::from(e);
                        if let Stop::Reason(r) = &stop {
                            self.reasons.borrow_mut().entry(c).or_insert(r.clone());
                        }
                        Err(stop)
                    }
                }
            }
            op @ ("Mul" | "Div" | "Add" | "Sub") if node.input.len() == 2 => {
                let (a, b) = (&node.input[0], &node.input[1]);
                let (constant, left) = match (a.as_str() == value, b.as_str() == value) {
                    (true, false) => (b, true),
                    (false, true) => (a, false),
                    _ => return Ok(None),
                };
                let Some(k) = self.per_feature(constant, f)? else {
                    return Ok(None);
                };
                let ones = vec![1.0; n];
                let zeros = vec![0.0; n];
                Ok(match (op, left) {
                    ("Mul", _) => Some(Affine {
                        scale: k,
                        shift: zeros,
                    }),
                    ("Div", true) if !k.contains(&0.0) => Some(Affine {
                        scale: k.iter().map(|v| 1.0 / v).collect(),
                        shift: zeros,
                    }),
                    ("Add", _) => Some(Affine {
                        scale: ones,
                        shift: k,
                    }),
                    ("Sub", true) => Some(Affine {
                        scale: ones,
                        shift: k.iter().map(|v| -v).collect(),
                    }),
                    ("Sub", false) => Some(Affine {
                        scale: vec![-1.0; n],
                        shift: k,
                    }),
                    _ => None,
                })
            }
            _ => Ok(None),
        }
    }

    /// A constant's values as one per feature of `f`: its shape (aligned to the right) must be 1
    /// on every axis but the features' (where it is 1 or the count).
    fn per_feature(&self, name: &str, f: &Features) -> Result<Option<Vec<f64>>, Stop> {
        let Some(t) = self.index.constant(name) else {
            return Ok(None);
        };
        let Ok(ty) = tensor::float_type(&t) else {
            return Ok(None);
        };
        let _ = ty;
        let values = tensor::read_f64(&t, &self.index.model.external)?;
        let dims = values.shape();
        let rank = f.shape.len();
        if dims.len() > rank {
            return Ok(None);
        }
        let offset = rank - dims.len();
        for (j, &d) in dims.iter().enumerate() {
            let axis = offset + j;
            let fits = d == 1 || (axis == f.axis && d == f.count());
            if !fits {
                return Ok(None);
            }
        }
        let v: Vec<f64> = values.iter().copied().collect();
        Ok(match v.len() {
            1 => Some(vec![v[0]; f.count()]),
            n if n == f.count() => Some(v),
            _ => None,
        })
    }

    /// The kind of linear operator node `n` is, when its weight is a stored constant and it can
    /// take a fold on its output side (`input_side` false) or its input side.
    fn linear_kind(&self, n: usize, input_side: bool) -> Result<Option<Kind>, Stop> {
        let node = self.node(n);
        if !is_default_domain(node) || node.input.len() < 2 {
            return Ok(None);
        }
        let weight = &node.input[1];
        let Some(w) = self.index.stored_constant(weight) else {
            return Ok(None);
        };
        if self.index.constant(&node.input[0]).is_some() || tensor::float_type(&w).is_err() {
            return Ok(None);
        }
        let (dims, _) = tensor::shape(&w)?;
        let bias = node.input.get(2).filter(|b| !b.is_empty());
        if bias.is_some_and(|b| self.index.constant(b).is_none()) {
            return Ok(None);
        }
        // A bias with one value per output feature, or one for all (no `[M, N]` Gemm C).
        if let Some(b) = bias
            && let Some(bdims) = self.index.tensor_dims(b)
            && bdims.iter().filter(|&&d| d != 1).count() > 1
        {
            return Ok(None);
        }
        let group = || attr::int(node, "group").unwrap_or(1).max(1) as usize;
        Ok(match node.op_type() {
            "Gemm" if dims.len() == 2 => Some(Kind::Gemm {
                trans_a: attr::int(node, "transA").unwrap_or(0) != 0,
                trans_b: attr::int(node, "transB").unwrap_or(0) != 0,
            }),
            "MatMul" if dims.len() == 2 => Some(Kind::MatMul),
            "Conv" if input_side && dims.len() >= 3 => {
                let spatial = self
                    .shape(&node.input[0])
                    .and_then(|s| s.get(2..).map(<[usize]>::to_vec));
                let window = Window::of(node, Some(&dims[2..])).map_err(Stop::Reason)?;
                let (begin, end) = window.pads(spatial.as_deref()).map_err(Stop::Reason)?;
                if begin.iter().chain(&end).any(|&p| p > 0) {
                    return Err(Stop::Reason(format!(
                        "Conv '{}' pads its input: the padded border would see the shift, not \
                         zero",
                        node.name()
                    )));
                }
                Some(Kind::Conv { group: group() })
            }
            "ConvTranspose" if !input_side && dims.len() >= 3 => {
                Some(Kind::ConvTranspose { group: group() })
            }
            _ => None,
        })
    }

    /// Tries to push scale node `n` into every linear operator it reaches.
    fn push(&mut self, n: usize) -> Result<()> {
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
            return Ok(());
        };
        // The feature axis: a BatchNormalization's is 1; a constant's is where it has more than
        // one value (or 1, for one value for all, taken as the channels of a feature map).
        let axis = match node.op_type() {
            "BatchNormalization" => 1,
            _ => {
                let other = &node.input[1 - data];
                let Some(dims) = self.index.tensor_dims(other) else {
                    return Ok(());
                };
                let offset = shape.len().saturating_sub(dims.len());
                match dims.iter().position(|&d| d > 1) {
                    Some(j) => offset + j,
                    None => return Ok(()),
                }
            }
        };
        let Some(f) = Features::new(shape, axis) else {
            return Ok(());
        };
        let affine = match self.scale_of(n, &x, &f) {
            Ok(Some(a)) => a,
            Ok(None) => return Ok(()),
            Err(stop) => return stop.settle(&self.training),
        };
        let mut reached = Vec::new();
        let mut rewired = Vec::new();
        let mut removed = vec![n];
        let out = node.output[0].clone();
        let mut trail = Trail {
            reached: &mut reached,
            rewired: &mut rewired,
            removed: &mut removed,
        };
        match self.follow(&out, &x, f, affine, &mut trail, 0) {
            Ok(()) => {}
            Err(Stop::Reason(reason)) => {
                if self.node(n).op_type() == "BatchNormalization" {
                    self.reasons.borrow_mut().entry(n).or_insert(reason);
                }
                return Ok(());
            }
            Err(stop) => return stop.settle(&self.training),
        }
        if reached.is_empty() {
            return Ok(());
        }
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
        let [_] = self.index.consumers(x) else {
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
    fn rebuild_pre(&mut self) {
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
        let users = self.index.consumers(value).to_vec();
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

    /// A ReduceMean's axes (non-negative, for `rank`) and `keepdims`.
    fn reduce_axes(&self, c: usize, rank: usize) -> Option<(Vec<usize>, bool)> {
        let node = self.node(c);
        let keep = attr::int(node, "keepdims").unwrap_or(1) != 0;
        let axes: Vec<i64> = match attr::ints(node, "axes") {
            Some(a) => a.to_vec(),
            None => {
                let t = self.index.constant(node.input.get(1)?)?;
                tensor::read_i64(&t, &self.index.model.external)
                    .ok()?
                    .iter()
                    .copied()
                    .collect()
            }
        };
        let axes = axes
            .iter()
            .map(|&a| usize::try_from(if a < 0 { a + rank as i64 } else { a }).ok())
            .collect::<Option<Vec<usize>>>()?;
        Some((axes, keep))
    }

    /// Turns pulls and pushes into plans, merging summed heads on one input.
    fn finish(mut self) -> Result<LinearAnalysis> {
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
        let (out_features, in_features) = features_of(kind, &dims);
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
                at: n,
                removed,
                bns,
                pushed,
                weight_dims: dims,
                dtype,
                out_features,
                in_features,
                options: self.options,
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

/// A push: the scales that go, the linear operators they reach (with what reaches each and the
/// value it began at), the kept nodes reading past them.
struct Push {
    removed: Vec<usize>,
    reached: Vec<(usize, Affine, String)>,
    rewired: Vec<Rewire>,
}

/// Where a push is going: the linear operators it reached (with what reaches each and where it
/// began), the kept nodes reading past what goes, and what goes.
struct Trail<'t> {
    reached: &'t mut Vec<(usize, Affine, String)>,
    rewired: &'t mut Vec<Rewire>,
    removed: &'t mut Vec<usize>,
}

/// Operators that only move elements (a scale passes them where they keep the feature axis).
const VIEWS: [&str; 6] = [
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
];

/// A node after a linear one: a scale or a view (with a Transpose's permutation), and its
/// output's shape.
type Step = (usize, Option<Vec<usize>>, Vec<usize>);

/// A Transpose's permutation (for [`cancel`]); `None` for every other view.
fn perm_of(node: &NodeProto, rank: usize) -> Option<Vec<usize>> {
    (node.op_type() == "Transpose").then(|| match attr::ints(node, "perm") {
        Some(p) => p.iter().map(|&a| a.max(0) as usize).collect(),
        None => (0..rank).rev().collect(),
    })
}

/// The output and input features of a weight of `kind` and `dims`.
pub fn features_of(kind: Kind, dims: &[usize]) -> (usize, usize) {
    match kind {
        Kind::Gemm { trans_b: true, .. } => (dims[0], dims[1]),
        Kind::Gemm { .. } | Kind::MatMul => (dims[1], dims[0]),
        Kind::Conv { group } => (dims[0], dims[1] * group),
        Kind::ConvTranspose { group } => (dims[1] * group, dims[0]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affines_compose_in_order() {
        let first = Affine {
            scale: vec![2.0, 3.0],
            shift: vec![1.0, -1.0],
        };
        let then = Affine {
            scale: vec![0.5, -1.0],
            shift: vec![4.0, 0.0],
        };
        // (x·2 + 1)·0.5 + 4 = x + 4.5; (x·3 − 1)·(−1) = −3x + 1.
        let both = first.then(&then);
        assert_eq!(both.scale, vec![1.0, -3.0]);
        assert_eq!(both.shift, vec![4.5, 1.0]);
        assert_eq!(Affine::identity(2).then(&first), first);
    }

    #[test]
    fn weights_hold_features_on_the_axes_onnx_defines() {
        let gemm = |trans_b| Kind::Gemm {
            trans_a: false,
            trans_b,
        };
        assert_eq!(features_of(gemm(true), &[10, 24]), (10, 24));
        assert_eq!(features_of(gemm(false), &[24, 10]), (10, 24));
        assert_eq!(features_of(Kind::MatMul, &[24, 10]), (10, 24));
        assert_eq!(features_of(Kind::Conv { group: 2 }, &[8, 6, 3, 3]), (8, 12));
        assert_eq!(
            features_of(Kind::ConvTranspose { group: 2 }, &[8, 3, 3, 3]),
            (6, 8)
        );
        assert!(gemm(true).rows_are_outputs() && Kind::Conv { group: 1 }.rows_are_outputs());
        assert!(!gemm(false).rows_are_outputs() && !Kind::MatMul.rows_are_outputs());
    }
}
