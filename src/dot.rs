//! Pictures of the block structure: a Graphviz DOT graph (built with petgraph) of the model, or
//! of one block, before fusion and after, side by side. Before: every operator, the nodes of a
//! block filled in one colour, identity branches drawn bold and labelled; after: each folded
//! block as the one Conv that replaces it. Read-only: the "after" side is drawn from the plans.

use std::collections::HashMap;
use std::fmt::Write as _;

use petgraph::dot::{Config, Dot};
use petgraph::graph::{DiGraph, NodeIndex};

use crate::constant::Constants;
use crate::error::{Error, Result};
use crate::onnx::attr;
use crate::pattern::Term;
use crate::plan::Analysis;

/// Fill colours of blocks, in turn.
const PALETTE: &[&str] = &[
    "#cfe2f3", "#d9ead3", "#fff2cc", "#f4cccc", "#d9d2e9", "#fce5cd",
];

/// What a drawn node is.
#[derive(Debug, Clone)]
struct Shape {
    label: String,
    /// Graphviz attributes besides the label.
    style: String,
}

/// How an edge is drawn: its label and attributes.
#[derive(Debug, Clone, Default)]
struct Line {
    label: String,
    style: String,
}

/// Draws the model (or the block named `only`) before and after fusion.
pub fn draw(index: &Constants, analysis: &Analysis, only: Option<&str>) -> Result<String> {
    let mut picture = Picture::default();
    let blocks = analysis.blocks();
    if let Some(name) = only
        && !blocks.iter().any(|(_, b, _)| *b == name)
    {
        let known: Vec<&str> = blocks.iter().map(|(_, b, _)| *b).collect();
        return Err(Error::Graph(format!(
            "no block named '{name}' (blocks: {})",
            known.join(", ")
        )));
    }
    picture.side(index, analysis, only, false);
    picture.side(index, analysis, only, true);
    let dot = Dot::with_attr_getters(
        &picture.graph,
        &[Config::EdgeNoLabel, Config::NodeNoLabel],
        &|_, e| {
            let line = e.weight();
            format!("label={} {}", quote(&line.label), line.style)
        },
        &|_, (_, shape)| format!("label={} {}", quote(&shape.label), shape.style),
    );
    // Graph-wide defaults go right after the opening brace.
    let text = format!("{dot:?}");
    Ok(text.replacen(
        "{\n",
        "{\n    node [fontname=\"Helvetica\" fontsize=11]\n    edge [fontname=\"Helvetica\" fontsize=9]\n",
        1,
    ))
}

/// A DOT string literal.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Default)]
struct Picture {
    graph: DiGraph<Shape, Line>,
}

impl Picture {
    /// Adds one side: the training structure, or the structure after fusion.
    fn side(&mut self, index: &Constants, analysis: &Analysis, only: Option<&str>, after: bool) {
        let model = index.model;
        // Which block each node belongs to, and the block's colour.
        let mut member: HashMap<usize, (usize, bool)> = HashMap::new();
        let mut fused_roots: HashMap<usize, usize> = HashMap::new();
        let all = analysis.blocks();
        for (k, (block, name, fused)) in all.iter().enumerate() {
            if only.is_some_and(|n| n != *name) {
                continue;
            }
            for n in block.nodes() {
                member.insert(n, (k, *fused));
            }
            if *fused {
                fused_roots.insert(block.root, k);
            }
        }
        let title = self.graph.add_node(Shape {
            label: match after {
                false => "training structure".into(),
                true => "after onnx-repvgg fuse".into(),
            },
            style: "shape=plaintext fontsize=14".into(),
        });
        // Nodes drawn, by ONNX node index; values, by the node that produces them.
        let mut drawn: HashMap<usize, NodeIndex> = HashMap::new();
        let mut producer: HashMap<&str, NodeIndex> = HashMap::new();
        let mut inputs: HashMap<String, NodeIndex> = HashMap::new();
        for (i, node) in model.nodes.iter().enumerate() {
            let block = member.get(&i).copied();
            if only.is_some() && block.is_none() {
                continue;
            }
            // Shape arithmetic and weight producers (all outputs constant) are not structure.
            let constant = node
                .output
                .iter()
                .all(|o| index.declared_constant(o).is_some() || index.constant(o).is_some());
            if block.is_none() && constant {
                continue;
            }
            let colour = |k: usize| PALETTE[k % PALETTE.len()];
            let shape = match block {
                Some((k, true)) if after => {
                    if !fused_roots.contains_key(&i) {
                        continue; // folded away
                    }
                    let plan = analysis.plans.iter().find(|p| p.block.root == i);
                    let kernel = plan.map_or(String::new(), |p| {
                        p.layout
                            .kernel
                            .iter()
                            .map(usize::to_string)
                            .collect::<Vec<_>>()
                            .join("x")
                    });
                    let name = plan.map_or("", |p| p.name.as_str());
                    Shape {
                        label: format!("Conv {kernel}\n{name} (fused)"),
                        style: format!(
                            "shape=box style=\"filled,bold\" fillcolor=\"{}\"",
                            colour(k)
                        ),
                    }
                }
                Some((k, _)) => Shape {
                    label: op_label(index, i),
                    style: format!("shape=box style=filled fillcolor=\"{}\"", colour(k)),
                },
                None => Shape {
                    label: op_label(index, i),
                    style: "shape=box".into(),
                },
            };
            let at = self.graph.add_node(shape);
            drawn.insert(i, at);
            for out in &node.output {
                producer.insert(out, at);
            }
        }
        // Edges: from the producer of each input (or a graph input) to the consumer. After
        // fusion, the fused Conv reads its block's input.
        let identities = identity_readers(analysis);
        let mut first = None;
        for (&i, &at) in drawn.iter().collect::<std::collections::BTreeMap<_, _>>() {
            let node = index.node(i);
            let fused = after && fused_roots.contains_key(&i);
            let reads: Vec<String> = match fused {
                true => analysis
                    .plans
                    .iter()
                    .find(|p| p.block.root == i)
                    .map(|p| vec![p.block.input.clone()])
                    .unwrap_or_default(),
                false => node.input.clone(),
            };
            let identity_input = match after {
                false => identities.get(&i),
                true => None,
            };
            for value in reads.iter().filter(|v| !v.is_empty()) {
                if index.declared_constant(value).is_some() || index.constant(value).is_some() {
                    continue;
                }
                let from = match producer.get(value.as_str()) {
                    Some(&p) => p,
                    None => *inputs.entry(value.clone()).or_insert_with(|| {
                        self.graph.add_node(Shape {
                            label: value.clone(),
                            style: "shape=ellipse".into(),
                        })
                    }),
                };
                let identity = identity_input.is_some_and(|input| input == value);
                let line = match identity {
                    true => Line {
                        label: "identity".into(),
                        style: "style=bold color=\"#cc0000\" fontcolor=\"#cc0000\"".into(),
                    },
                    false => Line::default(),
                };
                self.graph.add_edge(from, at, line);
            }
            first.get_or_insert(at);
        }
        // One block: its output value below it.
        if only.is_some() {
            for (block, _, _) in all.iter().filter(|(_, name, _)| only == Some(*name)) {
                if let Some(&root) = drawn.get(&block.root) {
                    let value = self.graph.add_node(Shape {
                        label: block.output(index).to_string(),
                        style: "shape=ellipse".into(),
                    });
                    self.graph.add_edge(root, value, Line::default());
                }
            }
        }
        // Values read from outside (graph inputs or, for one block, its input) sit under the
        // title.
        let tops: Vec<NodeIndex> = inputs.values().copied().chain(first).collect();
        for top in tops.into_iter().take(1) {
            self.graph.add_edge(
                title,
                top,
                Line {
                    label: String::new(),
                    style: "style=invis".into(),
                },
            );
        }
    }
}

/// The nodes that read a block's input as its identity branch (the sum itself, or the
/// per-channel node — the identity BatchNormalization — right on it), with that input.
fn identity_readers(analysis: &Analysis) -> HashMap<usize, String> {
    let mut readers = HashMap::new();
    let blocks = analysis
        .plans
        .iter()
        .map(|p| &p.block)
        .chain(analysis.skipped.iter().map(|s| &s.block));
    for block in blocks {
        visit(&block.term, &mut |t| match t {
            Term::Channel { node, inner, .. } if matches!(**inner, Term::Raw(_)) => {
                readers.insert(*node, block.input.clone());
            }
            Term::Sum { node, terms } if terms.iter().any(|(_, t)| matches!(t, Term::Raw(_))) => {
                readers.insert(*node, block.input.clone());
            }
            _ => {}
        });
    }
    readers
}

fn visit<'t>(term: &'t Term, f: &mut impl FnMut(&'t Term)) {
    f(term);
    match term {
        Term::Channel { inner, .. } => visit(inner, f),
        Term::Sum { terms, .. } => terms.iter().for_each(|(_, t)| visit(t, f)),
        _ => {}
    }
}

/// `Conv 3x3 s2 g2`, `BatchNormalization`, `Add`.
fn op_label(index: &Constants, i: usize) -> String {
    let node = index.node(i);
    let mut label = node.op_type().to_string();
    if node.op_type() == "Conv" {
        let dims = node
            .input
            .get(1)
            .and_then(|w| index.tensor_dims(w))
            .unwrap_or_default();
        if dims.len() > 2 {
            let kernel: Vec<String> = dims[2..].iter().map(i64::to_string).collect();
            let _ = write!(label, " {}", kernel.join("x"));
        }
        if let Some(s) = attr::ints(node, "strides").filter(|s| s.iter().any(|&v| v > 1)) {
            let _ = write!(label, " s{}", s[0]);
        }
        if let Some(g) = attr::int(node, "group").filter(|&g| g > 1) {
            let _ = write!(label, " g{g}");
        }
    }
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_escape_what_dot_needs() {
        assert_eq!(quote("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    }
}
