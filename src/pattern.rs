//! Finding blocks: maximal expression trees over one input x in which every node is linear in x
//! up to a constant — sums (`Add`, `Sum`, `Sub` of branches), per-channel scales and shifts
//! (`BatchNormalization`, `Mul`/`Div`/`Add`/`Sub` with a constant) — and whose leaves are
//! `Conv(x)`, `AvgPool(x)` or x itself. `Identity` nodes are looked through. This covers RepVGG,
//! QARepVGG (BN after the sum), MobileOne, ACNet, large-kernel and dilated reparam, RepViT and
//! lone Conv→BN pairs alike. Read-only: returns candidates; whether their numbers fold exactly is
//! decided in `fold`.

use crate::constant::Constants;
use crate::graph::is_default_domain;

/// A per-output-channel operation applied to a term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelOp {
    /// `BatchNormalization(t)`.
    BatchNorm,
    /// `t · c`.
    Mul(String),
    /// `t / c`.
    Div(String),
    /// `t + c`.
    Add(String),
    /// `t − c`.
    Sub(String),
    /// `c − t`.
    SubFrom(String),
}

/// An affine function of the block input, as the graph computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    /// A value that is not expanded further; in a block it is the input x itself.
    Raw(String),
    /// `Conv(x)` (a leaf: its input is x).
    Conv(usize),
    /// `AvgPool(x)` (a leaf).
    AvgPool(usize),
    /// A per-channel operation of node `node` on `inner`.
    Channel {
        node: usize,
        op: ChannelOp,
        inner: Box<Term>,
    },
    /// The sum of `terms` (each with `true` when subtracted), computed by node `node`.
    Sum {
        node: usize,
        terms: Vec<(bool, Term)>,
    },
}

impl Term {
    /// Calls `f` on every leaf.
    pub fn leaves<'a>(&'a self, f: &mut impl FnMut(&'a Term)) {
        match self {
            Term::Channel { inner, .. } => inner.leaves(f),
            Term::Sum { terms, .. } => terms.iter().for_each(|(_, t)| t.leaves(f)),
            leaf => f(leaf),
        }
    }

    /// The node computing this term, if any.
    pub fn node(&self) -> Option<usize> {
        match *self {
            Term::Raw(_) => None,
            Term::Conv(n) | Term::AvgPool(n) => Some(n),
            Term::Channel { node, .. } | Term::Sum { node, .. } => Some(node),
        }
    }

    /// Every node of the tree.
    pub fn nodes(&self, out: &mut Vec<usize>) {
        out.extend(self.node());
        match self {
            Term::Channel { inner, .. } => inner.nodes(out),
            Term::Sum { terms, .. } => terms.iter().for_each(|(_, t)| t.nodes(out)),
            _ => {}
        }
    }
}

/// A tree whose leaves all read one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The tree's root node; the fused Conv takes its place and its output name.
    pub root: usize,
    /// The value every leaf reads.
    pub input: String,
    pub term: Term,
}

impl Block {
    /// The value the block produces (the root's output).
    pub fn output<'a>(&self, index: &crate::graph::GraphIndex<'a>) -> &'a str {
        &index.node(self.root).output[0]
    }

    /// Every node the fold replaces.
    pub fn nodes(&self) -> Vec<usize> {
        let mut nodes = Vec::new();
        self.term.nodes(&mut nodes);
        nodes
    }

    /// Conv leaves, in tree order.
    pub fn convs(&self) -> Vec<usize> {
        let mut convs = Vec::new();
        self.term.leaves(&mut |t| {
            if let Term::Conv(n) = t {
                convs.push(*n)
            }
        });
        convs
    }
}

/// A tree as found: a block, or why its structure already rules out folding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub block: Block,
    pub refusal: Option<Refusal>,
}

/// Why a tree that looks like a block cannot be folded as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Parallel branches of one input, but a value inside the tree is also used elsewhere, or
    /// a branch applies to a linear function of the input rather than the input itself.
    Blocked(String),
    /// Not a block at all: the summands read different tensors with a nonlinearity between
    /// them (a residual connection around Conv→ReLU→Conv, a transformer FFN).
    NotABlock(String),
}

/// Every candidate block of the graph, in node order of their roots.
pub fn find_blocks(index: &Constants) -> Vec<Candidate> {
    let mut found = Vec::new();
    for i in 0..index.model.nodes.len() {
        if expand(index, i).is_some() && parent(index, i).is_none() {
            match_tree(index, i, true, &mut found);
        }
    }
    found.sort_by_key(|c| c.block.root);
    found
}

/// How a node decomposes into children, if it is linear in them up to a constant.
enum Expansion<'a> {
    Channel(ChannelOp, &'a str),
    Sum(Vec<(bool, &'a str)>),
}

fn op_is(index: &Constants, i: usize, op: &str) -> bool {
    let node = index.node(i);
    is_default_domain(node) && node.op_type() == op
}

fn expand<'a>(index: &Constants<'_, 'a>, i: usize) -> Option<Expansion<'a>> {
    let node = index.node(i);
    if !is_default_domain(node) || node.output.is_empty() || other_outputs_used(index, i) {
        return None;
    }
    let inputs: Vec<&'a str> = node.input.iter().map(String::as_str).collect();
    let constant = |v: &str| index.constant(index.through_identity(v)).is_some();
    match (node.op_type(), inputs.as_slice()) {
        ("BatchNormalization", [x, ..]) if !x.is_empty() => {
            Some(Expansion::Channel(ChannelOp::BatchNorm, x))
        }
        ("Sum", terms) if !terms.is_empty() && !terms.iter().any(|t| constant(t)) => {
            Some(Expansion::Sum(terms.iter().map(|t| (false, *t)).collect()))
        }
        (op @ ("Add" | "Sub" | "Mul" | "Div"), [a, b]) => {
            let (ca, cb) = (constant(a), constant(b));
            let c = |v: &str| index.through_identity(v).to_string();
            match (op, ca, cb) {
                (_, true, true) => None,
                ("Add", false, false) => Some(Expansion::Sum(vec![(false, *a), (false, *b)])),
                ("Sub", false, false) => Some(Expansion::Sum(vec![(false, *a), (true, *b)])),
                ("Add", false, true) => Some(Expansion::Channel(ChannelOp::Add(c(b)), a)),
                ("Add", true, false) => Some(Expansion::Channel(ChannelOp::Add(c(a)), b)),
                ("Sub", false, true) => Some(Expansion::Channel(ChannelOp::Sub(c(b)), a)),
                ("Sub", true, false) => Some(Expansion::Channel(ChannelOp::SubFrom(c(a)), b)),
                ("Mul", false, true) => Some(Expansion::Channel(ChannelOp::Mul(c(b)), a)),
                ("Mul", true, false) => Some(Expansion::Channel(ChannelOp::Mul(c(a)), b)),
                ("Div", false, true) => Some(Expansion::Channel(ChannelOp::Div(c(b)), a)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether an output of node `i` beyond the first is read by a node or is a graph output (a
/// BatchNormalization's running statistics in training mode): the fold would remove it, so such
/// a node never goes inside a block.
fn other_outputs_used(index: &Constants, i: usize) -> bool {
    let outputs = index.node(i).output.iter().skip(1);
    outputs
        .filter(|o| !o.is_empty())
        .any(|o| !index.consumers(o).is_empty() || index.is_output(o))
}

/// The node that alone consumes node `i`'s output (through Identity nodes) and expands it.
fn parent(index: &Constants, i: usize) -> Option<usize> {
    let mut value = index.node(i).output.first()?.as_str();
    loop {
        if !index.is_internal(value) {
            return None;
        }
        let user = index.consumers(value)[0];
        if op_is(index, user, "Identity") {
            value = index.node(user).output.first()?.as_str();
            continue;
        }
        let reads = |v: &str| index.through_identity(v) == index.through_identity(value);
        let expands = match expand(index, user)? {
            Expansion::Channel(_, child) => reads(child),
            Expansion::Sum(children) => children.iter().any(|(_, c)| reads(c)),
        };
        return expands.then_some(user);
    }
}

/// The term computed by node `i`.
fn parse(index: &Constants, i: usize) -> Term {
    match expand(index, i) {
        Some(Expansion::Channel(op, child)) => Term::Channel {
            node: i,
            op,
            inner: Box::new(child_term(index, child)),
        },
        Some(Expansion::Sum(children)) => Term::Sum {
            node: i,
            terms: children
                .into_iter()
                .map(|(neg, c)| (neg, child_term(index, c)))
                .collect(),
        },
        None if other_outputs_used(index, i) => Term::Raw(index.node(i).output[0].clone()),
        None if op_is(index, i, "Conv") => Term::Conv(i),
        None if op_is(index, i, "AveragePool") => Term::AvgPool(i),
        None => Term::Raw(index.node(i).output[0].clone()),
    }
}

/// The term for input `value` of a tree node: expanded only along values used by the tree alone.
fn child_term(index: &Constants, value: &str) -> Term {
    let (source, shared) = index.through_identity_shared(value);
    match index.producer(source) {
        Some(p) if shared.is_none() => parse(index, p),
        _ => Term::Raw(source.to_string()),
    }
}

/// The input a leaf reads.
fn leaf_input<'a>(index: &Constants<'_, 'a>, leaf: &'a Term) -> Option<&'a str> {
    match leaf {
        Term::Raw(v) => Some(v),
        Term::Conv(n) | Term::AvgPool(n) => index
            .node(*n)
            .input
            .first()
            .map(|x| index.through_identity(x)),
        _ => None,
    }
}

/// Matches the tree rooted at node `root`; where it is no block, tries its sub-trees, and the
/// outermost tree that looks like a block is reported with the reason it is not one.
fn match_tree(index: &Constants, root: usize, outermost: bool, found: &mut Vec<Candidate>) {
    let term = parse(index, root);
    let mut reads: Vec<&str> = Vec::new();
    let mut convs = 0;
    term.leaves(&mut |leaf| {
        if matches!(leaf, Term::Conv(_) | Term::AvgPool(_)) {
            convs += matches!(leaf, Term::Conv(_)) as usize;
            reads.extend(leaf_input(index, leaf));
        }
    });
    let Some(&x) = reads.first() else {
        return;
    };
    let mut stray = None;
    term.leaves(&mut |leaf| {
        if stray.is_none() && leaf_input(index, leaf) != Some(x) {
            stray = Some(leaf);
        }
    });
    let Some(stray) = stray else {
        if convs > 0 {
            let block = Block {
                root,
                input: x.to_string(),
                term,
            };
            found.push(Candidate {
                block,
                refusal: None,
            });
        }
        return;
    };
    let mut looks = 0;
    term.leaves(&mut |leaf| {
        looks += match leaf {
            Term::Conv(_) => 1,
            Term::Raw(v) => index
                .producer(v)
                .is_some_and(|p| op_is(index, p, "Conv") || op_is(index, p, "BatchNormalization"))
                as usize,
            _ => 0,
        }
    });
    for child in children(&term) {
        if let Some(n) = child
            .node()
            .filter(|_| !matches!(child, Term::Conv(_) | Term::AvgPool(_)))
        {
            match_tree(index, n, false, found);
        }
    }
    if outermost && looks >= 2 {
        let refusal = Some(refusal(index, stray, x));
        let block = Block {
            root,
            input: x.to_string(),
            term,
        };
        found.push(Candidate { block, refusal });
    }
}

fn children(term: &Term) -> Vec<&Term> {
    match term {
        Term::Channel { inner, .. } => vec![inner],
        Term::Sum { terms, .. } => terms.iter().map(|(_, t)| t).collect(),
        _ => Vec::new(),
    }
}

/// Why a leaf does not belong to the block reading `x`: a block's own structure gets in the
/// way when the leaf's value and `x` are linear functions one of the other; otherwise the tree
/// is no block at all.
fn refusal(index: &Constants, leaf: &Term, x: &str) -> Refusal {
    let value = match leaf {
        Term::Raw(v) => v.as_str(),
        _ => leaf_input(index, leaf).unwrap_or(""),
    };
    if !descends_linearly(index, value, x) && !descends_linearly(index, x, value) {
        return Refusal::NotABlock(format!(
            "not a re-parameterizable block: its summands read '{x}' and '{value}', which a \
             nonlinear operator separates (a residual connection, not parallel branches)"
        ));
    }
    Refusal::Blocked(match leaf {
        Term::Raw(v) => match index.producer(v) {
            Some(p) if index.consumers(v).len() > 1 || index.is_output(v) => {
                let op = index.node(p).op_type();
                format!("'{v}' ({op}) inside the block is also used elsewhere")
            }
            Some(p) if other_outputs_used(index, p) => {
                let node = index.node(p);
                format!(
                    "{} '{}' inside the block has other outputs in use (its running \
                     statistics, in training mode), which folding would remove",
                    node.op_type(),
                    node.name()
                )
            }
            _ => format!("summand '{v}' is computed from '{x}', not '{x}' itself"),
        },
        Term::Conv(n) | Term::AvgPool(n) => {
            let node = index.node(*n);
            format!(
                "branch '{}' ({}) applies to a function of '{x}', not to '{x}' itself \
                 (sequential branches, as in Diverse Branch Blocks, are not folded)",
                node.name(),
                node.op_type()
            )
        }
        _ => String::new(),
    })
}

/// Operators through which a value stays a linear function of another (what a sequential
/// branch may be made of); anything else — activations, normalizations over the data, maxima —
/// separates the two.
const LINEAR: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "CastLike",
    "Concat",
    "Conv",
    "ConvTranspose",
    "Div",
    "Expand",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "Identity",
    "MatMul",
    "Mul",
    "Neg",
    "Pad",
    "ReduceMean",
    "ReduceSum",
    "Reshape",
    "ScatterElements",
    "ScatterND",
    "Slice",
    "Split",
    "Squeeze",
    "Sub",
    "Sum",
    "Tile",
    "Transpose",
    "Unsqueeze",
    "Where",
];

/// Operators linear in each input only while the others are constants.
const PRODUCTS: &[&str] = &["Conv", "ConvTranspose", "Div", "Gemm", "MatMul", "Mul"];

/// Whether `value` is computed from `x` within a few dozen steps upstream, through
/// [`LINEAR`] operators only.
fn descends_linearly(index: &Constants, value: &str, x: &str) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut frontier = vec![value];
    for _ in 0..32 {
        let mut next = Vec::new();
        for v in frontier {
            if v == x {
                return true;
            }
            if !seen.insert(v) || seen.len() > 4096 {
                continue;
            }
            let Some(p) = index.producer(v) else {
                continue;
            };
            let node = index.node(p);
            // A product of two values that both vary (GELU's `x·Φ(x)`, attention) is no
            // linear function of either.
            let varying = || {
                let data = node.input.iter().filter(|i| !i.is_empty());
                data.filter(|i| index.constant(i).is_none()).count()
            };
            let product = PRODUCTS.contains(&node.op_type()) && varying() > 1;
            if is_default_domain(node) && LINEAR.contains(&node.op_type()) && !product {
                next.extend(
                    node.input
                        .iter()
                        .map(String::as_str)
                        .filter(|i| !i.is_empty()),
                );
            }
        }
        frontier = next;
    }
    false
}
