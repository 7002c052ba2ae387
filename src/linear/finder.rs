//! The walk's state — what is taken, pulled and pushed so far, why each BatchNormalization
//! stays — and what it reads off nodes: per-feature scales, linear operators, consumers.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use super::{Affine, Kind, LinearAnalysis, Rewire};
use crate::constant::Constants;
use crate::error::{Error, Result};
use crate::features::Features;
use crate::fold::{self, FoldError, FoldOptions};
use crate::geometry::Window;
use crate::graph::is_default_domain;
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;
use crate::shapes::Shapes;
use crate::tensor;

/// What stops a fold: a reason for people, a BatchNormalization in training mode (an error
/// of the run unless allowed, as in a block), or a broken model.
pub(super) enum Stop {
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
    pub(super) fn settle(self, training: &RefCell<Vec<(usize, String)>>) -> Result<()> {
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

pub(super) struct Finder<'a, 'i, 'm> {
    pub(super) index: &'a Constants<'i, 'm>,
    pub(super) shapes: &'a Shapes,
    pub(super) options: FoldOptions,
    /// Nodes of the convolution blocks.
    pub(super) claimed: &'a HashSet<usize>,
    /// Nodes some fold (or a convolution block) owns already.
    pub(super) taken: HashSet<usize>,
    pub(super) pulled: Vec<Pulled>,
    /// Every push found: scales that go into the linear operators after them.
    pub(super) pushes: Vec<Push>,
    /// Linear node → what was pushed into its input features, the value pushes began at, and
    /// the scales pushed (from `pushes`).
    pub(super) pre: HashMap<usize, (Affine, String, Vec<usize>)>,
    /// Why a BatchNormalization stays, from the first attempt that reached it.
    pub(super) reasons: RefCell<HashMap<usize, String>>,
    /// BatchNormalization in training mode met beside a linear operator (not allowed).
    pub(super) training: RefCell<Vec<(usize, String)>>,
}

impl Finder<'_, '_, '_> {
    pub(super) fn node(&self, n: usize) -> &NodeProto {
        self.index.node(n)
    }

    pub(super) fn shape(&self, value: &str) -> Option<Vec<usize>> {
        self.shapes.get(self.index, value)
    }

    /// The only consumer of `value`, when it is used once (not a graph output); `Shape` nodes
    /// that read it are allowed beside (a reshape back to its shape reads them).
    pub(super) fn sole_consumer(&self, value: &str) -> Option<usize> {
        if self.index.is_output(value) {
            return None;
        }
        let mut users = self.index.readers(value);
        users.retain(|&c| self.node(c).op_type() != "Shape");
        match users.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// Past a run of removed scales: the first value upstream of `value` not produced by one.
    pub(super) fn settle(&self, value: &str, removed: &[usize]) -> String {
        let mut value = value.to_string();
        while let Some(p) = self.index.producer(&value).filter(|p| removed.contains(p)) {
            value = self.node(p).input[self.data_slot(p)].clone();
        }
        value
    }

    /// Which input of scale node `c` carries the data (the other is its constant).
    pub(super) fn data_slot(&self, c: usize) -> usize {
        let node = self.node(c);
        match node.op_type() {
            "BatchNormalization" => 0,
            _ => usize::from(self.index.constant(&node.input[0]).is_some()),
        }
    }

    /// The per-feature scale and shift node `c` applies to `value` (features `f`), when it is
    /// one: BatchNormalization on feature axis 1, or `Mul`/`Div`/`Add`/`Sub` by a constant with
    /// one value per feature (or one for all).
    pub(super) fn scale_of(
        &self,
        c: usize,
        value: &str,
        f: &Features,
    ) -> Result<Option<Affine>, Stop> {
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
                    // `x + x`: twice `x`.
                    (true, true) if op == "Add" => {
                        return Ok(Some(Affine {
                            scale: vec![2.0; n],
                            shift: vec![0.0; n],
                        }));
                    }
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
        if tensor::float_type(&t).is_err() {
            return Ok(None);
        }
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
    pub(super) fn linear_kind(&self, n: usize, input_side: bool) -> Result<Option<Kind>, Stop> {
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

    /// A ReduceMean's axes (non-negative, for `rank`) and `keepdims`.
    pub(super) fn reduce_axes(&self, c: usize, rank: usize) -> Option<(Vec<usize>, bool)> {
        let node = self.node(c);
        let keep = attr::int(node, "keepdims").unwrap_or(1) != 0;
        Some((self.shapes.axes(self.index, node, 1, rank)?, keep))
    }
}

/// Operators that only move elements (a scale passes them where they keep the feature axis).
pub(super) const VIEWS: [&str; 6] = [
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
];

/// A node after a linear one: a scale or a view (with a Transpose's permutation), and its
/// output's shape.
pub(super) type Step = (usize, Option<Vec<usize>>, Vec<usize>);

/// A Transpose's permutation (for [`cancel`]); `None` for every other view.
pub(super) fn perm_of(node: &NodeProto, rank: usize) -> Option<Vec<usize>> {
    (node.op_type() == "Transpose").then(|| match attr::ints(node, "perm") {
        Some(p) => p.iter().map(|&a| a.max(0) as usize).collect(),
        None => (0..rank).rev().collect(),
    })
}

/// A pull found: the linear node, what it pulled, where its output ends.
pub(super) struct Pulled {
    pub(super) node: usize,
    pub(super) post: Affine,
    pub(super) output: String,
    pub(super) removed: Vec<usize>,
    pub(super) rewired: Vec<Rewire>,
    pub(super) ends: Vec<String>,
    pub(super) bns: Vec<usize>,
}

/// A push: the scales that go, the linear operators they reach (with what reaches each and the
/// value it began at), the kept nodes reading past them.
pub(super) struct Push {
    pub(super) removed: Vec<usize>,
    pub(super) reached: Vec<(usize, Affine, String)>,
    pub(super) rewired: Vec<Rewire>,
}
