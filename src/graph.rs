//! A read-only index over the main graph: who produces and who consumes each value, which values
//! are declared constants (initializers that are not graph inputs, or `Constant` nodes), and the
//! checks that make the graph safe to rewrite (no dangling reference, no value produced twice, no
//! cycle). Values computed by constant subgraphs are [`crate::constant`]'s business, above this.

use std::collections::{HashMap, HashSet};

use petgraph::graph::DiGraph;

use crate::error::{Error, Result};
use crate::onnx::Model;
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto, tensor_shape_proto, type_proto};

/// Producer/consumer index of a model's main graph.
#[derive(Debug)]
pub struct GraphIndex<'m> {
    pub model: &'m Model,
    producer: HashMap<&'m str, usize>,
    consumers: HashMap<&'m str, Vec<usize>>,
    outputs: HashSet<&'m str>,
    inputs: HashSet<&'m str>,
    initializers: HashMap<&'m str, usize>,
    sparse: HashSet<&'m str>,
}

impl<'m> GraphIndex<'m> {
    /// Indexes the main graph and checks that it is a well-formed DAG.
    pub fn new(model: &'m Model) -> Result<GraphIndex<'m>> {
        let inputs: HashSet<&str> = model.inputs.iter().map(|v| v.name()).collect();
        let outputs: HashSet<&str> = model.outputs.iter().map(|v| v.name()).collect();
        let mut initializers = HashMap::new();
        for (i, t) in model.initializers.iter().enumerate() {
            if initializers.insert(t.name(), i).is_some() {
                return Err(Error::Graph(format!(
                    "initializer '{}' is defined twice",
                    t.name()
                )));
            }
        }
        // Sparse initializers define values too; they are passed through, never folded.
        let mut sparse = HashSet::new();
        for t in &model.sparse_initializers {
            let name = t.values.as_ref().map_or("", |v| v.name());
            if initializers.contains_key(name) || !sparse.insert(name) {
                return Err(Error::Graph(format!(
                    "sparse initializer '{name}' is defined twice"
                )));
            }
        }
        let mut producer = HashMap::new();
        for (i, node) in model.nodes.iter().enumerate() {
            for out in node.output.iter().filter(|o| !o.is_empty()) {
                if producer.insert(out.as_str(), i).is_some()
                    || initializers.contains_key(out.as_str())
                    || sparse.contains(out.as_str())
                {
                    return Err(Error::Graph(format!(
                        "value '{out}' is produced twice (node '{}')",
                        node.name()
                    )));
                }
            }
        }
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, node) in model.nodes.iter().enumerate() {
            for name in node.input.iter().filter(|n| !n.is_empty()) {
                let known = producer.contains_key(name.as_str())
                    || initializers.contains_key(name.as_str())
                    || sparse.contains(name.as_str())
                    || inputs.contains(name.as_str());
                if !known {
                    return Err(Error::Graph(format!(
                        "node '{}' ({}) reads '{name}', which nothing produces",
                        node.name(),
                        node.op_type()
                    )));
                }
                consumers.entry(name.as_str()).or_default().push(i);
            }
            for name in outer_references(node) {
                consumers.entry(name).or_default().push(i);
            }
        }
        for out in &outputs {
            let known = producer.contains_key(out)
                || initializers.contains_key(out)
                || sparse.contains(out)
                || inputs.contains(out);
            if !known {
                return Err(Error::Graph(format!(
                    "graph output '{out}' is never produced"
                )));
            }
        }
        let index = GraphIndex {
            model,
            producer,
            consumers,
            outputs,
            inputs,
            initializers,
            sparse,
        };
        index.check_acyclic()?;
        // The rules the output is held to (single assignment, nothing read undefined), on the
        // graphs nested in nodes and on functions too: a model broken before we touch it is
        // the model's fault.
        let main = crate::onnx::audit::Graph {
            inputs: &model.inputs,
            initializers: &model.initializers,
            sparse_initializers: &model.sparse_initializers,
            nodes: &model.nodes,
            outputs: &model.outputs,
        };
        crate::onnx::audit::structure(main, &model.functions).map_err(Error::Graph)?;
        Ok(index)
    }

    fn check_acyclic(&self) -> Result<()> {
        let mut g = DiGraph::<(), ()>::with_capacity(self.model.nodes.len(), 0);
        let ids: Vec<_> = (0..self.model.nodes.len())
            .map(|_| g.add_node(()))
            .collect();
        for (name, users) in &self.consumers {
            if let Some(&p) = self.producer.get(name) {
                for &u in users {
                    g.add_edge(ids[p], ids[u], ());
                }
            }
        }
        petgraph::algo::toposort(&g, None)
            .map(|_| ())
            .map_err(|cycle| {
                let node = &self.model.nodes[cycle.node_id().index()];
                Error::Graph(format!(
                    "the graph has a cycle through node '{}' ({})",
                    node.name(),
                    node.op_type()
                ))
            })
    }

    /// The node at index `i`.
    pub fn node(&self, i: usize) -> &'m NodeProto {
        &self.model.nodes[i]
    }

    /// The node producing `value`, if any.
    pub fn producer(&self, value: &str) -> Option<usize> {
        self.producer.get(value).copied()
    }

    /// Every use of `value` by a node (one entry per input slot, plus subgraph references).
    pub fn consumers(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The nodes that read `value`, each once (a node reading it in two slots, as `x + x`, is
    /// one reader), in graph order.
    pub fn readers(&self, value: &str) -> Vec<usize> {
        let mut readers = self.consumers(value).to_vec();
        readers.dedup();
        readers
    }

    /// Whether `value` is a sparse initializer of the main graph.
    pub fn is_sparse(&self, value: &str) -> bool {
        self.sparse.contains(value)
    }

    /// Whether `value` is a graph output.
    pub fn is_output(&self, value: &str) -> bool {
        self.outputs.contains(value)
    }

    /// Whether `value` is used exactly once, by a node, and is not a graph output: the condition
    /// for a tensor inside a block that the fold removes.
    pub fn is_internal(&self, value: &str) -> bool {
        self.consumers(value).len() == 1 && !self.is_output(value)
    }

    /// Whether `value` is a graph input that a caller may feed (an initializer listed as an
    /// input is a default value, except in IR < 4 models where every initializer was listed).
    pub fn is_overridable_input(&self, value: &str) -> bool {
        self.inputs.contains(value)
            && !(self.initializers.contains_key(value)
                && self.model.initializers_listed_as_inputs())
    }

    /// A constant stored as such: an initializer that is not an overridable graph input, or the
    /// `value` tensor of a `Constant` node.
    pub fn declared_constant(&self, value: &str) -> Option<&'m TensorProto> {
        if self.is_overridable_input(value) {
            return None;
        }
        self.declared_tensor(value)
    }

    /// The shape of `value` when every dimension is declared as a number.
    pub fn static_shape(&self, value: &str) -> Option<Vec<usize>> {
        if let Some(t) = self.declared_tensor(value) {
            return t.dims.iter().map(|&d| usize::try_from(d).ok()).collect();
        }
        let m = self.model;
        let info = m
            .inputs
            .iter()
            .chain(&m.outputs)
            .chain(&m.value_info)
            .find(|v| v.name() == value)?;
        let type_proto::Value::TensorType(t) = info.r#type.as_ref()?.value.as_ref()? else {
            return None;
        };
        t.shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(tensor_shape_proto::dimension::Value::DimValue(v)) => usize::try_from(v).ok(),
                _ => None,
            })
            .collect()
    }

    /// The element type of `value`, from its constant or its declared type.
    pub fn elem_type(&self, value: &str) -> Option<i32> {
        if let Some(t) = self.declared_tensor(value) {
            return t.data_type;
        }
        let m = self.model;
        m.inputs
            .iter()
            .chain(&m.outputs)
            .chain(&m.value_info)
            .find(|v| v.name() == value)
            .and_then(|v| match v.r#type.as_ref()?.value.as_ref()? {
                type_proto::Value::TensorType(t) => t.elem_type,
                _ => None,
            })
    }

    /// The tensor an initializer or `Constant` node declares for `value`, constant or not (for
    /// describing shapes).
    pub fn declared_tensor(&self, value: &str) -> Option<&'m TensorProto> {
        if let Some(&i) = self.initializers.get(value) {
            return Some(&self.model.initializers[i]);
        }
        let node = self.node(self.producer(value)?);
        if node.op_type() != "Constant" || !is_default_domain(node) {
            return None;
        }
        node.attribute
            .iter()
            .find(|a| a.name() == "value")
            .and_then(|a| a.t.as_ref())
    }

    /// Follows `Identity` nodes upstream from `value` to the value they copy.
    pub fn through_identity<'a>(&self, value: &'a str) -> &'a str
    where
        'm: 'a,
    {
        self.through_identity_shared(value).0
    }

    /// Like [`Self::through_identity`], and also names the first value on the way (`value`
    /// itself included) that is not internal, if any: such a chain cannot be removed with its
    /// consumer.
    pub fn through_identity_shared<'a>(&self, value: &'a str) -> (&'a str, Option<&'a str>)
    where
        'm: 'a,
    {
        let mut shared = (!self.is_internal(value)).then_some(value);
        let mut value = value;
        while let Some(node) = self.producer(value).map(|i| self.node(i)) {
            if node.op_type() != "Identity" || !is_default_domain(node) || node.input.is_empty() {
                break;
            }
            value = &node.input[0];
            if shared.is_none() && !self.is_internal(value) {
                shared = Some(value);
            }
        }
        (value, shared)
    }
}

/// Whether the node belongs to the default ONNX operator set.
pub fn is_default_domain(node: &NodeProto) -> bool {
    matches!(node.domain(), "" | "ai.onnx")
}

/// Names a node's subgraphs read from the enclosing scope (conservatively: every value their
/// nodes read, and their outputs).
fn outer_references(node: &NodeProto) -> Vec<&str> {
    let mut names = Vec::new();
    for attr in &node.attribute {
        for g in attr.g.iter().chain(attr.graphs.iter()) {
            collect_graph_references(g, &mut names);
        }
    }
    names
}

fn collect_graph_references<'a>(g: &'a GraphProto, names: &mut Vec<&'a str>) {
    for node in &g.node {
        names.extend(node.input.iter().map(String::as_str));
        names.extend(outer_references(node));
    }
    names.extend(g.output.iter().map(|o| o.name()));
}
