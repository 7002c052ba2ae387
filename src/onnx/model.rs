//! A loaded model: the input's bytes (memory-mapped), the wire-level layout of the model and its
//! main graph, and decoded copies of the graph's nodes, initializers and value infos. Tensor bytes
//! are not copied: decoded `raw_data` points into the map. Nothing here is ever modified; the
//! writer splices a new file from these byte ranges.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message;

use super::external::ExternalStore;
use super::map::{Mapped, map_file};
use super::proto::{
    FunctionProto, NodeProto, OperatorSetIdProto, SparseTensorProto, TensorProto,
    TrainingInfoProto, ValueInfoProto,
};
use super::wire::{self, Field};
use crate::error::{Error, Result};

/// ModelProto field numbers we look at.
pub(crate) mod model_field {
    pub const IR_VERSION: u32 = 1;
    pub const GRAPH: u32 = 7;
    pub const OPSET_IMPORT: u32 = 8;
    pub const TRAINING_INFO: u32 = 20;
    pub const FUNCTIONS: u32 = 25;
}

/// GraphProto field numbers we look at.
pub(crate) mod graph_field {
    pub const NODE: u32 = 1;
    pub const INITIALIZER: u32 = 5;
    pub const INPUT: u32 = 11;
    pub const OUTPUT: u32 = 12;
    pub const VALUE_INFO: u32 = 13;
    pub const SPARSE_INITIALIZER: u32 = 15;
}

/// What one field of the main graph is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphItem {
    Node(usize),
    Initializer(usize),
    ValueInfo(usize),
    Input(usize),
    SparseInitializer(usize),
    /// Outputs, name, doc string and anything else: always copied through.
    Other,
}

/// A model read from disk.
#[derive(Debug)]
pub struct Model {
    /// The file the model came from.
    pub path: PathBuf,
    /// The whole file.
    pub bytes: Bytes,
    /// Fields of the ModelProto, in file order.
    pub fields: Vec<Field>,
    /// Index into `fields` of the (single) graph field.
    pub graph_field: usize,
    /// Fields of the main GraphProto, in file order, offsets relative to `bytes`.
    pub graph_fields: Vec<(Field, GraphItem)>,
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    pub value_info: Vec<ValueInfoProto>,
    pub inputs: Vec<ValueInfoProto>,
    pub outputs: Vec<ValueInfoProto>,
    /// The main graph's sparse initializers (passed through; never folded).
    pub sparse_initializers: Vec<SparseTensorProto>,
    /// The model's functions and training-info entries (passed through; walked for tensors).
    pub functions: Vec<FunctionProto>,
    pub training_info: Vec<TrainingInfoProto>,
    pub opset_import: Vec<OperatorSetIdProto>,
    /// `ModelProto.ir_version`, when present.
    pub ir_version: Option<i64>,
    /// Files holding external tensor data, mapped.
    pub external: ExternalStore,
    /// The open input file and its map, when read from disk (copies and page release use them).
    pub mapped: Option<Mapped>,
}

impl Model {
    /// Memory-maps `path` and reads the model's layout.
    pub fn open(path: &Path) -> Result<Model> {
        let mapped = map_file(path)?;
        let bytes = mapped.as_ref().map_or_else(Bytes::new, Mapped::bytes);
        let dir = path.parent().unwrap_or(Path::new(""));
        let mut model = Model::from_bytes(path, bytes, Some(dir)).map_err(|e| e.in_file(path))?;
        model.mapped = mapped;
        Ok(model)
    }

    /// Lets go of the mapped pages of the model and its external data (see [`Mapped::release`]).
    pub fn release_pages(&self) {
        self.mapped.iter().for_each(Mapped::release);
        self.external.release_pages();
    }

    /// Lets go of the mapped pages under `bytes` (tensor data of this model or its external
    /// data; see [`Mapped::release_range`]).
    pub fn release(&self, bytes: &[u8]) {
        self.mapped.iter().for_each(|m| m.release_range(bytes));
        self.external.release(bytes);
    }

    /// Reads a model from bytes; `path` names the model in errors, `data_dir` is where its
    /// external data lives (`None`: the model must hold all its tensors).
    pub fn from_bytes(path: &Path, bytes: Bytes, data_dir: Option<&Path>) -> Result<Model> {
        let malformed = |reason: String| Error::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.is_empty() {
            return Err(malformed("the file is empty".into()));
        }
        let fields = wire::scan(&bytes, 0).map_err(malformed)?;
        let graphs: Vec<usize> = (0..fields.len())
            .filter(|&i| fields[i].number == model_field::GRAPH)
            .collect();
        let graph_field = match graphs.as_slice() {
            [one] => *one,
            [] => return Err(malformed("the model has no graph".into())),
            _ => return Err(malformed("the model has more than one graph field".into())),
        };
        let mut opset_import = Vec::new();
        let mut functions = Vec::new();
        let mut training_info = Vec::new();
        for f in &fields {
            match f.number {
                model_field::OPSET_IMPORT => {
                    opset_import.push(decode(&bytes, f, "opset_import").map_err(&malformed)?)
                }
                model_field::FUNCTIONS => {
                    functions.push(decode(&bytes, f, "function").map_err(&malformed)?)
                }
                model_field::TRAINING_INFO => {
                    training_info.push(decode(&bytes, f, "training_info").map_err(&malformed)?)
                }
                _ => {}
            }
        }
        let ir_version = fields
            .iter()
            .find(|f| f.number == model_field::IR_VERSION)
            .and_then(|f| f.varint(&bytes))
            .map(|v| v as i64);
        let graph = &fields[graph_field];
        let graph_bytes = &bytes[graph.payload.clone()];
        let mut model = Model {
            path: path.to_path_buf(),
            bytes: bytes.clone(),
            fields: fields.clone(),
            graph_field,
            graph_fields: Vec::new(),
            nodes: Vec::new(),
            initializers: Vec::new(),
            value_info: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            sparse_initializers: Vec::new(),
            functions,
            training_info,
            opset_import,
            ir_version,
            external: ExternalStore::default(),
            mapped: None,
        };
        let graph_fields = wire::scan(graph_bytes, graph.payload.start)
            .map_err(|e| malformed(format!("graph: {e}")))?;
        for f in graph_fields {
            let item = match f.number {
                graph_field::NODE => {
                    model
                        .nodes
                        .push(decode(&bytes, &f, "node").map_err(&malformed)?);
                    GraphItem::Node(model.nodes.len() - 1)
                }
                graph_field::INITIALIZER => {
                    model
                        .initializers
                        .push(decode(&bytes, &f, "initializer").map_err(&malformed)?);
                    GraphItem::Initializer(model.initializers.len() - 1)
                }
                graph_field::VALUE_INFO => {
                    model
                        .value_info
                        .push(decode(&bytes, &f, "value_info").map_err(&malformed)?);
                    GraphItem::ValueInfo(model.value_info.len() - 1)
                }
                graph_field::INPUT => {
                    model
                        .inputs
                        .push(decode(&bytes, &f, "input").map_err(&malformed)?);
                    GraphItem::Input(model.inputs.len() - 1)
                }
                graph_field::OUTPUT => {
                    model
                        .outputs
                        .push(decode(&bytes, &f, "output").map_err(&malformed)?);
                    GraphItem::Other
                }
                graph_field::SPARSE_INITIALIZER => {
                    let sparse = decode(&bytes, &f, "sparse_initializer").map_err(&malformed)?;
                    model.sparse_initializers.push(sparse);
                    GraphItem::SparseInitializer(model.sparse_initializers.len() - 1)
                }
                _ => GraphItem::Other,
            };
            model.graph_fields.push((f, item));
        }
        // Element counts (the product of each tensor's dims, negative dims counting 0) and their
        // total are counted in u64 downstream: dims whose counts cannot exist are refused here,
        // for every tensor wherever it lives, used or not.
        let mut total: u64 = 0;
        let mut overflow = None;
        model.each_tensor(&mut |t| {
            let count = t
                .dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d.max(0) as u64));
            match count.and_then(|c| total.checked_add(c)) {
                Some(sum) => total = sum,
                None => {
                    overflow.get_or_insert_with(|| {
                        format!("tensor '{}': dims {:?} overflow", t.name(), t.dims)
                    });
                }
            }
        });
        if let Some(reason) = overflow {
            return Err(malformed(reason));
        }
        let mut tensors = Vec::new();
        model.each_tensor(&mut |t| tensors.push(t));
        model.external = ExternalStore::open(data_dir, tensors)?;
        Ok(model)
    }

    /// Calls `f` on every tensor the model holds, wherever it lives (see [`super::tensors`]).
    pub fn each_tensor<'a>(&'a self, f: &mut impl FnMut(&'a TensorProto)) {
        self.initializers.iter().for_each(&mut *f);
        for s in &self.sparse_initializers {
            super::tensors::in_sparse(s, f);
        }
        for n in &self.nodes {
            super::tensors::in_node(n, f);
        }
        for func in &self.functions {
            super::tensors::in_function(func, f);
        }
        for t in &self.training_info {
            super::tensors::in_training(t, f);
        }
    }

    /// The version of the default-domain operator set, if imported.
    pub fn default_opset(&self) -> Option<i64> {
        self.opset_import
            .iter()
            .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
            .and_then(|o| o.version)
    }

    /// Whether initializers are listed among the graph inputs as a formality (IR version < 4,
    /// where every initializer had to be an input) rather than as overridable defaults.
    pub fn initializers_listed_as_inputs(&self) -> bool {
        self.ir_version.is_some_and(|v| v < 4)
    }

    /// Whether any tensor, wherever it lives, keeps its data in an external file.
    pub fn has_external_data(&self) -> bool {
        let mut external = false;
        self.each_tensor(&mut |t| external |= super::external::is_external(t));
        external
    }

    /// Whether a tensor outside the main graph's initializers keeps its data in an external
    /// file (a `Constant` node's, a nested graph's, a function's): the nodes and fields holding
    /// them must be rewritten to point into the output's sidecar.
    pub fn has_nested_external_data(&self) -> bool {
        let mut external = false;
        let mut check = |t: &TensorProto| external |= super::external::is_external(t);
        for s in &self.sparse_initializers {
            super::tensors::in_sparse(s, &mut check);
        }
        for n in &self.nodes {
            super::tensors::in_node(n, &mut check);
        }
        for func in &self.functions {
            super::tensors::in_function(func, &mut check);
        }
        for t in &self.training_info {
            super::tensors::in_training(t, &mut check);
        }
        external
    }
}

/// Decodes one length-delimited field of `bytes` as message `M`, sharing tensor bytes.
fn decode<M: Message + Default>(bytes: &Bytes, f: &Field, what: &str) -> Result<M, String> {
    if f.wire_type != prost::encoding::WireType::LengthDelimited {
        return Err(format!("{what} at byte {} is not a message", f.whole.start));
    }
    M::decode(bytes.slice(f.payload.clone()))
        .map_err(|e| format!("{what} at byte {}: {e}", f.whole.start))
}
