//! The output invariant, checked on the model as written before it is renamed into place: a
//! written model that breaks it is a bug of ours, never the user's, and is not published.
//!
//! - Single assignment: every value is defined once in its graph — as a graph input, an
//!   initializer, a sparse initializer or a node output — and no graph nested in it (`If`,
//!   `Loop`, `Scan` bodies) defines a name of an enclosing graph again; function bodies
//!   likewise within themselves. (Sibling subgraphs may reuse names, as ONNX allows.)
//! - Every value a node reads, and every graph output, is defined in its graph or an enclosing
//!   one: nothing reads a removed value.
//! - Every tensor with external data, wherever it lives, points into the sidecar this run wrote,
//!   within its length.
//!
//! Structure only: tensor data is never read, so this costs a decode of the headers. The same
//! structural rules are applied to the input ([`structure`]), so that a model broken before we
//! touched it is reported as the model's fault.

use std::collections::HashSet;

use bytes::Bytes;
use prost::Message;

use super::external::{ExternalRef, is_external};
use super::proto::{
    FunctionProto, GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto,
    ValueInfoProto,
};
use super::tensors;

/// The sidecar a run wrote: its location (relative to the model's folder) and length.
#[derive(Debug, Clone, Copy)]
pub struct Sidecar<'a> {
    pub location: &'a str,
    pub len: u64,
}

/// Checks the written model `bytes`; the error says which invariant broke, and where.
pub fn audit(bytes: Bytes, sidecar: Option<Sidecar>) -> Result<(), String> {
    let model =
        ModelProto::decode(bytes).map_err(|e| format!("the output does not decode: {e}"))?;
    let graph = model.graph.as_ref().ok_or("the output has no graph")?;
    structure(Graph::of(graph), &model.functions)?;
    let mut external = Ok(());
    let mut check = |t: &TensorProto| {
        if external.is_ok() && is_external(t) {
            external = check_location(t, sidecar);
        }
    };
    tensors::in_graph(graph, &mut check);
    for f in &model.functions {
        tensors::in_function(f, &mut check);
    }
    for t in &model.training_info {
        tensors::in_training(t, &mut check);
    }
    external
}

/// The parts of a graph the structural rules look at (a decoded `GraphProto`, or the main graph
/// of a loaded model, which keeps them apart).
#[derive(Debug, Clone, Copy)]
pub struct Graph<'a> {
    pub inputs: &'a [ValueInfoProto],
    pub initializers: &'a [TensorProto],
    pub sparse_initializers: &'a [SparseTensorProto],
    pub nodes: &'a [NodeProto],
    pub outputs: &'a [ValueInfoProto],
}

impl<'a> Graph<'a> {
    pub fn of(g: &'a GraphProto) -> Graph<'a> {
        Graph {
            inputs: &g.input,
            initializers: &g.initializer,
            sparse_initializers: &g.sparse_initializer,
            nodes: &g.node,
            outputs: &g.output,
        }
    }
}

/// The single-assignment and defined-before-read rules, on a main graph (at any depth of
/// nesting) and the model's functions.
pub fn structure(main: Graph, functions: &[FunctionProto]) -> Result<(), String> {
    check_graph(main, &HashSet::new(), "the main graph")?;
    functions.iter().try_for_each(check_function)
}

fn check_graph<'g>(g: Graph<'g>, outer: &HashSet<&'g str>, label: &str) -> Result<(), String> {
    let mut defined: HashSet<&'g str> = HashSet::new();
    let mut define = |name: &'g str, what: &str| -> Result<(), String> {
        if name.is_empty() {
            return Ok(());
        }
        if outer.contains(name) {
            return Err(format!(
                "'{name}' ({what} in {label}) is already defined by an enclosing graph"
            ));
        }
        if !defined.insert(name) {
            return Err(format!("'{name}' ({what} in {label}) is defined twice"));
        }
        Ok(())
    };
    // An initializer may also be listed as a graph input (a default the caller may override).
    let initializers: HashSet<&str> = g.initializers.iter().map(|t| t.name()).collect();
    for v in g.inputs.iter().filter(|v| !initializers.contains(v.name())) {
        define(v.name(), "graph input")?;
    }
    for t in g.initializers {
        define(t.name(), "initializer")?;
    }
    for s in g.sparse_initializers {
        define(
            s.values.as_ref().map_or("", |v| v.name()),
            "sparse initializer",
        )?;
    }
    for node in g.nodes {
        for output in &node.output {
            define(output, &format!("output of {}", describe(node)))?;
        }
    }
    let mut visible = outer.clone();
    visible.extend(&defined);
    for node in g.nodes {
        check_reads(&node.input, &visible, &describe(node), label)?;
        for sub in tensors::subgraphs(node) {
            let nested = format!("a graph nested in {}", describe(node));
            check_graph(Graph::of(sub), &visible, &nested)?;
        }
    }
    let outputs: Vec<String> = g.outputs.iter().map(|o| o.name().to_string()).collect();
    check_reads(&outputs, &visible, "a graph output", label)
}

fn check_function(f: &FunctionProto) -> Result<(), String> {
    let label = format!("function '{}'", f.name());
    let graph = Graph {
        inputs: &[],
        initializers: &[],
        sparse_initializers: &[],
        nodes: &f.node,
        outputs: &[],
    };
    let inputs: HashSet<&str> = f.input.iter().map(String::as_str).collect();
    check_graph(graph, &inputs, &label)?;
    let mut visible = inputs;
    visible.extend(
        f.node
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str)),
    );
    check_reads(&f.output, &visible, "a function output", &label)
}

fn describe(node: &NodeProto) -> String {
    format!("node '{}' ({})", node.name(), node.op_type())
}

fn check_reads(
    names: &[String],
    visible: &HashSet<&str>,
    by: &str,
    label: &str,
) -> Result<(), String> {
    match names
        .iter()
        .find(|n| !n.is_empty() && !visible.contains(n.as_str()))
    {
        Some(name) => Err(format!(
            "{by} in {label} reads '{name}', which nothing defines"
        )),
        None => Ok(()),
    }
}

/// An external tensor must point into the sidecar written, within its length.
fn check_location(t: &TensorProto, sidecar: Option<Sidecar>) -> Result<(), String> {
    let name = t.name();
    let r = ExternalRef::of(t).map_err(|e| e.to_string())?;
    let Some(sidecar) = sidecar else {
        return Err(format!(
            "tensor '{name}' points to external data '{}', but no sidecar was written",
            r.location
        ));
    };
    if r.location != sidecar.location {
        return Err(format!(
            "tensor '{name}' points to '{}', not to the sidecar written ('{}')",
            r.location, sidecar.location
        ));
    }
    let end = r.length.and_then(|len| r.offset.checked_add(len));
    if end.is_none_or(|end| end > sidecar.len) {
        return Err(format!(
            "tensor '{name}' points past the end of the sidecar (offset {}, length {:?}, \
             sidecar {} bytes)",
            r.offset, r.length, sidecar.len
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{AttributeProto, StringStringEntryProto, TensorProto, ValueInfoProto};

    fn value(name: &str) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            name: Some(format!("{op}_{}", outputs.first().unwrap_or(&""))),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn model(graph: GraphProto) -> Bytes {
        ModelProto {
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    }

    fn graph(nodes: Vec<NodeProto>, outputs: &[&str]) -> GraphProto {
        GraphProto {
            input: vec![value("x")],
            node: nodes,
            output: outputs.iter().map(|o| value(o)).collect(),
            ..Default::default()
        }
    }

    /// A nested graph (no inputs, as an `If` branch).
    fn branch(nodes: Vec<NodeProto>, outputs: &[&str]) -> GraphProto {
        GraphProto {
            input: vec![],
            ..graph(nodes, outputs)
        }
    }

    fn with_body(op: &str, inputs: &[&str], outputs: &[&str], body: GraphProto) -> NodeProto {
        NodeProto {
            attribute: vec![AttributeProto {
                name: Some("then_branch".into()),
                g: Some(body),
                ..Default::default()
            }],
            ..node(op, inputs, outputs)
        }
    }

    fn external(name: &str, location: &str, offset: u64, length: u64) -> TensorProto {
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v),
        };
        TensorProto {
            name: Some(name.into()),
            data_location: Some(1),
            external_data: vec![
                entry("location", location.into()),
                entry("offset", offset.to_string()),
                entry("length", length.to_string()),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_broken_invariant_is_reported_as_ours() {
        let err = crate::Error::Internal("'a' is defined twice".into());
        assert_eq!(
            err.to_string(),
            "internal error: 'a' is defined twice; please report"
        );
    }

    #[test]
    fn a_sound_model_passes() {
        let body = branch(vec![node("Relu", &["a"], &["b"])], &["b"]);
        let g = graph(
            vec![
                node("Relu", &["x"], &["a"]),
                with_body("If", &["a"], &["c"], body),
            ],
            &["c"],
        );
        assert_eq!(audit(model(g), None), Ok(()));
    }

    #[test]
    fn a_name_defined_twice_in_a_graph_or_again_below_it_is_caught() {
        let g = graph(
            vec![node("Relu", &["x"], &["a"]), node("Relu", &["x"], &["a"])],
            &["a"],
        );
        assert!(audit(model(g), None).unwrap_err().contains("'a'"));
        // Inside a nested graph, a name of the outer graph…
        let body = branch(vec![node("Relu", &["x"], &["a"])], &["a"]);
        let g = graph(
            vec![
                node("Relu", &["x"], &["a"]),
                with_body("If", &["a"], &["c"], body),
            ],
            &["c"],
        );
        let err = audit(model(g), None).unwrap_err();
        assert!(err.contains("'a'") && err.contains("enclosing"), "{err}");
        // …and a nested graph's name reused outside it.
        let body = branch(vec![node("Relu", &["x"], &["w"])], &["w"]);
        let mut g = graph(vec![with_body("If", &["x"], &["c"], body)], &["c"]);
        g.initializer.push(TensorProto {
            name: Some("w".into()),
            ..Default::default()
        });
        g.node.insert(0, node("Relu", &["x"], &["unrelated"]));
        let err = audit(model(g), None).unwrap_err();
        assert!(err.contains("'w'"), "{err}");
        // Sibling graphs may reuse a name.
        let then = branch(vec![node("Relu", &["x"], &["t"])], &["t"]);
        let g = graph(
            vec![
                with_body("If", &["x"], &["c"], then.clone()),
                with_body("If", &["x"], &["d"], then),
            ],
            &["c", "d"],
        );
        assert_eq!(audit(model(g), None), Ok(()));
    }

    #[test]
    fn reading_what_nothing_defined_is_caught() {
        let g = graph(vec![node("Relu", &["gone"], &["a"])], &["a"]);
        assert!(audit(model(g), None).unwrap_err().contains("reads 'gone'"));
        let g = graph(vec![node("Relu", &["x"], &["a"])], &["removed"]);
        assert!(audit(model(g), None).unwrap_err().contains("graph output"));
        // Out of topological order is not this check's business (ONNX Runtime sorts; the
        // splice keeps the input's order).
        let g = graph(
            vec![node("Relu", &["a"], &["b"]), node("Relu", &["x"], &["a"])],
            &["b"],
        );
        assert_eq!(audit(model(g), None), Ok(()));
        // A nested graph reads the enclosing graph's values, not a sibling's.
        let then = branch(vec![node("Relu", &["a"], &["t"])], &["t"]);
        let other = branch(vec![node("Relu", &["t"], &["u"])], &["u"]);
        let g = graph(
            vec![
                node("Relu", &["x"], &["a"]),
                with_body("If", &["a"], &["c"], then),
                with_body("If", &["a"], &["d"], other),
            ],
            &["c", "d"],
        );
        assert!(audit(model(g), None).unwrap_err().contains("reads 't'"));
    }

    #[test]
    fn external_data_must_point_into_the_sidecar_written() {
        let sidecar = Some(Sidecar {
            location: "out.onnx.data",
            len: 4096,
        });
        let mut g = graph(vec![], &["x"]);
        g.initializer.push(external("w", "out.onnx.data", 0, 64));
        assert_eq!(audit(model(g.clone()), sidecar), Ok(()));
        assert!(audit(model(g), None).unwrap_err().contains("no sidecar"));
        // A Constant in a nested graph pointing at the input's data file.
        let mut body = branch(vec![], &["x"]);
        body.node.push(NodeProto {
            attribute: vec![AttributeProto {
                name: Some("value".into()),
                t: Some(external("k", "train.onnx.data", 0, 64)),
                ..Default::default()
            }],
            ..node("Constant", &[], &["k"])
        });
        let g = graph(vec![with_body("If", &["x"], &["c"], body)], &["c"]);
        let err = audit(model(g), sidecar).unwrap_err();
        assert!(err.contains("train.onnx.data"), "{err}");
        let mut g = graph(vec![], &["x"]);
        g.initializer.push(external("w", "out.onnx.data", 4090, 64));
        assert!(
            audit(model(g), sidecar)
                .unwrap_err()
                .contains("past the end")
        );
    }
}
