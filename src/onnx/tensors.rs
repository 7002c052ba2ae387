//! Every tensor a model holds, wherever it lives: initializers and sparse initializers of the
//! main graph and of every graph nested in node attributes (`If`/`Loop`/`Scan` bodies), tensor
//! attributes (`Constant`'s `value`, and any other), function bodies and training-info graphs.
//! External data, path safety, name collection and the output invariant all walk these same
//! places, so none of them can miss one.

use super::proto::{
    AttributeProto, FunctionProto, GraphProto, NodeProto, SparseTensorProto, TensorProto,
    TrainingInfoProto,
};

/// Calls `f` on every tensor inside `node`'s attributes, nested graphs included.
pub fn in_node<'a>(node: &'a NodeProto, f: &mut impl FnMut(&'a TensorProto)) {
    for a in &node.attribute {
        in_attribute(a, f);
    }
}

/// Calls `f` on every tensor of an attribute: its tensors, sparse tensors and graphs.
pub fn in_attribute<'a>(a: &'a AttributeProto, f: &mut impl FnMut(&'a TensorProto)) {
    a.t.iter().chain(&a.tensors).for_each(&mut *f);
    for s in a.sparse_tensor.iter().chain(&a.sparse_tensors) {
        in_sparse(s, f);
    }
    for g in a.g.iter().chain(&a.graphs) {
        in_graph(g, f);
    }
}

/// Calls `f` on every tensor of a graph: initializers, sparse initializers and its nodes'.
pub fn in_graph<'a>(g: &'a GraphProto, f: &mut impl FnMut(&'a TensorProto)) {
    g.initializer.iter().for_each(&mut *f);
    for s in &g.sparse_initializer {
        in_sparse(s, f);
    }
    for n in &g.node {
        in_node(n, f);
    }
}

/// Calls `f` on the values and indices of a sparse tensor.
pub fn in_sparse<'a>(s: &'a SparseTensorProto, f: &mut impl FnMut(&'a TensorProto)) {
    s.values.iter().chain(&s.indices).for_each(f);
}

/// Calls `f` on every tensor of a function: its nodes' and its attributes' default values.
pub fn in_function<'a>(func: &'a FunctionProto, f: &mut impl FnMut(&'a TensorProto)) {
    for n in &func.node {
        in_node(n, f);
    }
    for a in &func.attribute_proto {
        in_attribute(a, f);
    }
}

/// Calls `f` on every tensor of a training-info entry's graphs.
pub fn in_training<'a>(t: &'a TrainingInfoProto, f: &mut impl FnMut(&'a TensorProto)) {
    for g in t.initialization.iter().chain(&t.algorithm) {
        in_graph(g, f);
    }
}

/// The graphs nested directly in a node's attributes (`If` branches, `Loop`/`Scan` bodies).
pub fn subgraphs(node: &NodeProto) -> impl Iterator<Item = &GraphProto> {
    node.attribute
        .iter()
        .flat_map(|a| a.g.iter().chain(&a.graphs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str) -> TensorProto {
        TensorProto {
            name: Some(name.into()),
            ..Default::default()
        }
    }

    #[test]
    fn finds_tensors_at_every_depth() {
        let inner = GraphProto {
            initializer: vec![tensor("inner_init")],
            sparse_initializer: vec![SparseTensorProto {
                values: Some(tensor("sparse_values")),
                indices: Some(tensor("sparse_indices")),
                dims: vec![],
            }],
            node: vec![NodeProto {
                attribute: vec![AttributeProto {
                    t: Some(tensor("constant_in_branch")),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let node = NodeProto {
            attribute: vec![
                AttributeProto {
                    g: Some(inner),
                    ..Default::default()
                },
                AttributeProto {
                    tensors: vec![tensor("listed")],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mut names = Vec::new();
        in_node(&node, &mut |t| names.push(t.name().to_string()));
        names.sort();
        assert_eq!(
            names,
            [
                "constant_in_branch",
                "inner_init",
                "listed",
                "sparse_indices",
                "sparse_values"
            ]
        );
        assert_eq!(subgraphs(&node).count(), 1);
    }
}
