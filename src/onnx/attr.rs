//! Typed access to node attributes by name.

use super::proto::{AttributeProto, NodeProto};

fn find<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name() == name)
}

/// An INT attribute.
pub fn int(node: &NodeProto, name: &str) -> Option<i64> {
    find(node, name).and_then(|a| a.i)
}

/// A FLOAT attribute.
pub fn float(node: &NodeProto, name: &str) -> Option<f32> {
    find(node, name).and_then(|a| a.f)
}

/// An INTS attribute (present but empty counts as absent).
pub fn ints<'a>(node: &'a NodeProto, name: &str) -> Option<&'a [i64]> {
    find(node, name)
        .map(|a| a.ints.as_slice())
        .filter(|v| !v.is_empty())
}

/// A STRING attribute, as UTF-8 (lossy).
pub fn string(node: &NodeProto, name: &str) -> Option<String> {
    find(node, name)
        .and_then(|a| a.s.as_ref())
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

/// A node metadata property.
pub fn metadata<'a>(node: &'a NodeProto, key: &str) -> Option<&'a str> {
    node.metadata_props
        .iter()
        .find(|p| p.key() == key)
        .map(|p| p.value())
}

/// Builds an INT attribute.
pub fn new_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(2),
        i: Some(value),
        ..Default::default()
    }
}

/// Builds an INTS attribute.
pub fn new_ints(name: &str, values: impl IntoIterator<Item = i64>) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(7),
        ints: values.into_iter().collect(),
        ..Default::default()
    }
}

/// Builds a FLOAT attribute.
pub fn new_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(1),
        f: Some(value),
        ..Default::default()
    }
}

/// Builds a STRING attribute.
pub fn new_string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(3),
        s: Some(value.as_bytes().to_vec().into()),
        ..Default::default()
    }
}

/// Builds a GRAPH attribute.
pub fn new_graph(name: &str, graph: super::proto::GraphProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(5),
        g: Some(graph),
        ..Default::default()
    }
}

/// Builds a TENSOR attribute.
pub fn new_tensor(name: &str, tensor: super::proto::TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(4),
        t: Some(tensor),
        ..Default::default()
    }
}
