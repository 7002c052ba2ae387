//! What replaces what: the changes a fusion makes to the main graph, as data — nodes replaced
//! and removed, initializers, value_info entries and graph inputs dropped, new tensors known by
//! name, shape and type (their data is computed only when written). [`crate::rewrite`] builds a
//! patch from the plans; [`crate::onnx::splice`] applies it to the bytes. Neither knows the other.

use std::collections::{HashMap, HashSet};

use crate::onnx::proto::{NodeProto, TensorProto, ValueInfoProto};
use crate::tensor::FloatType;

/// The changes to a model's main graph.
#[derive(Debug, Default)]
pub struct Patch {
    /// Node index → the nodes written in its place (a fused node, a kept node reading another
    /// value, or a MatMul and its bias Add).
    pub replaced: HashMap<usize, Vec<NodeProto>>,
    /// Nodes dropped without replacement.
    pub removed_nodes: HashSet<usize>,
    pub removed_initializers: HashSet<usize>,
    pub removed_value_info: HashSet<usize>,
    /// Graph inputs dropped with their initializer (IR < 4 lists every initializer as an input).
    pub removed_inputs: HashSet<usize>,
    /// Initializers to append, in order: each block's fused weight and bias, computed only when
    /// written.
    pub new_tensors: Vec<NewTensor>,
    /// Graph inputs to append, in order (the new initializers, for IR < 4 models).
    pub new_inputs: Vec<ValueInfoProto>,
}

impl Patch {
    /// Whether the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.replaced.is_empty()
            && self.removed_nodes.is_empty()
            && self.removed_initializers.is_empty()
            && self.removed_value_info.is_empty()
            && self.removed_inputs.is_empty()
            && self.new_tensors.is_empty()
            && self.new_inputs.is_empty()
    }
}

/// A fused tensor: known by name, shape and type when planned; its data is computed when written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: FloatType,
    /// The plan whose fold produces it.
    pub plan: usize,
    /// Its place among that plan's tensors (0 weight, 1 bias).
    pub slot: usize,
}

impl NewTensor {
    /// Its number of elements.
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Bytes of its data.
    pub fn data_len(&self) -> usize {
        self.elements() * self.dtype.size()
    }

    /// The initializer without its data.
    pub fn header(&self) -> TensorProto {
        TensorProto {
            name: Some(self.name.clone()),
            dims: self.dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(self.dtype.code()),
            ..Default::default()
        }
    }

    /// The initializer with `data`.
    pub fn with_data(&self, data: bytes::Bytes) -> TensorProto {
        TensorProto {
            raw_data: Some(data),
            ..self.header()
        }
    }
}
