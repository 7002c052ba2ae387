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
//!
//! - `finder.rs`: the walk's state, and what it reads off nodes (scales, linear operators);
//! - `pull.rs`: scales after a linear operator, pulled into it;
//! - `push.rs`: scales before linear operators, pushed into each one they reach;
//! - `plans.rs`: pulls and pushes made plans, summed heads merged, what stays.

mod finder;
mod plans;
mod pull;
mod push;

use crate::tensor::FloatType;

pub use finder::analyse;

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
}

impl LinearPlan {
    /// The node the fused node takes the place of: the first head's.
    pub fn at(&self) -> usize {
        self.heads[0].node
    }

    /// The output and the input features (see [`features_of`]).
    pub fn features(&self) -> (usize, usize) {
        features_of(self.kind, &self.weight_dims)
    }
    /// Whether the fused operator needs a bias: some head has one, or a shift was folded in
    /// (before the operator or after it). Without, none is written.
    pub fn has_bias(&self) -> bool {
        let shifts = |a: &Affine| a.shift.iter().any(|&s| s != 0.0);
        self.heads
            .iter()
            .any(|h| h.bias.is_some() || h.pre.as_ref().is_some_and(shifts))
            || shifts(&self.post)
    }

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
