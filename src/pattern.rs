//! Finding blocks: maximal trees of `Add`/`Sum` whose leaves all read one tensor x, each leaf a
//! Conv of x (optionally followed by BatchNormalization), a BatchNormalization of x, or x itself,
//! `Identity` nodes looked through. Read-only: returns candidates, never touches the model.
//! Whether a candidate's numbers can be folded is decided later, in `fold`.

use crate::graph::{GraphIndex, is_default_domain};

/// One summand of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    /// `Conv(x)`, optionally followed by `BatchNormalization`.
    Conv { conv: usize, bn: Option<usize> },
    /// `x` itself, or `BatchNormalization(x)`.
    Identity { bn: Option<usize> },
}

/// A tree of sums over branches that read one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The outermost sum node; the fused Conv takes its place and its output name.
    pub root: usize,
    /// The value every branch reads.
    pub input: String,
    /// The summands, in the order they appear in the tree.
    pub branches: Vec<Branch>,
    /// The sum nodes of the tree, root first.
    pub sums: Vec<usize>,
}

impl Block {
    /// The value the block produces (the root sum's output).
    pub fn output<'a>(&self, index: &GraphIndex<'a>) -> &'a str {
        &index.node(self.root).output[0]
    }

    /// Every node the fold replaces: sums, convs and batch norms of the branches.
    pub fn nodes(&self) -> Vec<usize> {
        let mut nodes = self.sums.clone();
        for b in &self.branches {
            match *b {
                Branch::Conv { conv, bn } => nodes.extend([Some(conv), bn].into_iter().flatten()),
                Branch::Identity { bn } => nodes.extend(bn),
            }
        }
        nodes
    }

    /// Whether one of the branches is the identity (raw or through a BatchNormalization).
    pub fn has_identity(&self) -> bool {
        self.branches
            .iter()
            .any(|b| matches!(b, Branch::Identity { .. }))
    }
}

/// A block as found; `blocked` says why its structure already rules out folding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub block: Block,
    pub blocked: Option<String>,
}

/// Every candidate block of the graph, in node order of their roots.
pub fn find_blocks(index: &GraphIndex) -> Vec<Candidate> {
    let mut found = Vec::new();
    for i in 0..index.model.nodes.len() {
        if is_sum(index, i) && parent_sum(index, i).is_none() {
            match_tree(index, i, &mut found);
        }
    }
    found.sort_by_key(|c| c.block.root);
    found
}

fn is_sum(index: &GraphIndex, i: usize) -> bool {
    let node = index.node(i);
    is_default_domain(node) && matches!(node.op_type(), "Add" | "Sum") && node.output.len() == 1
}

fn is_op(index: &GraphIndex, i: usize, op: &str) -> bool {
    let node = index.node(i);
    is_default_domain(node) && node.op_type() == op
}

/// The sum node that alone consumes sum node `i`'s output (through Identity nodes), if any.
fn parent_sum(index: &GraphIndex, i: usize) -> Option<usize> {
    let mut value = index.node(i).output.first()?.as_str();
    loop {
        if !index.is_internal(value) {
            return None;
        }
        let user = index.consumers(value)[0];
        if is_sum(index, user) {
            return Some(user);
        }
        if !is_op(index, user, "Identity") {
            return None;
        }
        value = index.node(user).output.first()?.as_str();
    }
}

/// Matches the tree rooted at sum node `root`; where it is no block, tries its sub-trees.
fn match_tree(index: &GraphIndex, root: usize, found: &mut Vec<Candidate>) {
    let mut sums = Vec::new();
    let mut leaves = Vec::new();
    collect(index, root, &mut sums, &mut leaves);
    let before = found.len();
    match assign(index, root, &sums, &leaves) {
        Assignment::Block(c) => found.push(c),
        Assignment::None { near_miss } => {
            for &child in &sums[1..] {
                if parent_sum(index, child) == Some(root) {
                    match_tree(index, child, found);
                }
            }
            if found.len() == before {
                found.extend(near_miss);
            }
        }
    }
}

/// Gathers the sum nodes of the tree and its leaf values (as the sums read them).
fn collect<'a>(index: &GraphIndex<'a>, i: usize, sums: &mut Vec<usize>, leaves: &mut Vec<&'a str>) {
    sums.push(i);
    for input in index.node(i).input.iter().filter(|v| !v.is_empty()) {
        let (source, shared) = index.through_identity_shared(input);
        match index.producer(source) {
            Some(p) if shared.is_none() && is_sum(index, p) && !sums.contains(&p) => {
                collect(index, p, sums, leaves)
            }
            _ => leaves.push(input),
        }
    }
}

/// One way of reading a leaf as a branch of input `x`.
struct Reading<'a> {
    x: &'a str,
    branch: Branch,
    /// A value on the branch that something outside the block also uses.
    shared: Option<&'a str>,
}

/// Every way `leaf` can be read: as x itself, as BatchNormalization(x), as [BN](Conv(x)).
fn readings<'a>(index: &GraphIndex<'a>, leaf: &'a str) -> Vec<Reading<'a>> {
    let (source, shared) = index.through_identity_shared(leaf);
    let mut found = vec![Reading {
        x: source,
        branch: Branch::Identity { bn: None },
        shared: None,
    }];
    let Some(p) = index.producer(source) else {
        return found;
    };
    let node = index.node(p);
    if is_op(index, p, "Conv") && !node.input.is_empty() {
        found.push(Reading {
            x: index.through_identity(&node.input[0]),
            branch: Branch::Conv { conv: p, bn: None },
            shared,
        });
    }
    if is_op(index, p, "BatchNormalization") && !node.input.is_empty() {
        let (bn_in, bn_in_shared) = index.through_identity_shared(&node.input[0]);
        found.push(Reading {
            x: bn_in,
            branch: Branch::Identity { bn: Some(p) },
            shared,
        });
        if let Some(c) = index.producer(bn_in).filter(|&c| is_op(index, c, "Conv"))
            && let Some(x) = index.node(c).input.first()
        {
            found.push(Reading {
                x: index.through_identity(x),
                branch: Branch::Conv {
                    conv: c,
                    bn: Some(p),
                },
                shared: shared.or(bn_in_shared),
            });
        }
    }
    found
}

enum Assignment {
    Block(Candidate),
    /// Not a block; `near_miss` is a blocked candidate when the tree looks like one.
    None {
        near_miss: Option<Candidate>,
    },
}

/// Picks the input x that every leaf can read, preferring conv readings.
fn assign(index: &GraphIndex, root: usize, sums: &[usize], leaves: &[&str]) -> Assignment {
    let options: Vec<Vec<Reading>> = leaves.iter().map(|l| readings(index, l)).collect();
    let mut xs: Vec<&str> = Vec::new();
    for r in options.iter().flatten() {
        if matches!(r.branch, Branch::Conv { .. }) && !xs.contains(&r.x) {
            xs.push(r.x);
        }
    }
    let mut near_miss: Option<(usize, Candidate)> = None;
    for x in xs {
        let mut branches = Vec::new();
        let mut shared = None;
        let mut stray = None;
        for (leaf, opts) in leaves.iter().zip(&options) {
            let best = opts
                .iter()
                .filter(|r| r.x == x)
                .max_by_key(|r| match r.branch {
                    Branch::Conv { .. } => 2,
                    Branch::Identity { bn: Some(_) } => 1,
                    Branch::Identity { bn: None } => 0,
                });
            match best {
                Some(r) => {
                    shared = shared.or(r.shared);
                    branches.push(r.branch);
                }
                None => stray = stray.or(Some(*leaf)),
            }
        }
        let block = Block {
            root,
            input: x.to_string(),
            branches,
            sums: sums.to_vec(),
        };
        let Some(stray) = stray else {
            let blocked = shared.map(|v| format!("'{v}' inside the block is also used elsewhere"));
            return Assignment::Block(Candidate { block, blocked });
        };
        let convs = block
            .branches
            .iter()
            .filter(|b| matches!(b, Branch::Conv { .. }))
            .count();
        if convs >= 2 && near_miss.as_ref().is_none_or(|(n, _)| convs > *n) {
            let blocked = Some(format!("summand '{stray}' does not read '{x}'"));
            near_miss = Some((convs, Candidate { block, blocked }));
        }
    }
    Assignment::None {
        near_miss: near_miss.map(|(_, c)| c),
    }
}
