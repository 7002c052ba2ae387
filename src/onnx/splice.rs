//! Writing a patched model without re-encoding what did not change, and without holding it in
//! memory. The output is planned as a list of actions — copy this byte range of the input, write
//! these few encoded bytes, write the data of that new tensor — whose lengths are all known
//! before anything is computed, so protobuf's length prefixes can be written first. Then the
//! actions run in order: untouched ranges are copied file to file by the kernel
//! (`copy_file_range`), and each block's fused tensors are computed, written and dropped one
//! block at a time. Untouched nodes, tensors, metadata and fields unknown to our schema come out
//! byte for byte. With external data, tensor bytes go to one sidecar (offsets aligned to 4 KiB)
//! and each such tensor's `external_data` entries are rewritten in place of the old ones.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;

use bytes::Bytes;
use prost::Message;

use super::external::is_external;
use super::model::{GraphItem, Model, graph_field, model_field};
use super::proto::{StringStringEntryProto, TensorProto};
use super::wire::{self, bytes_field_len, put_bytes_field, put_varint_field};
use crate::error::{Error, Result};
use crate::patch::{NewTensor, Patch};

/// TensorProto field numbers the splice rewrites.
mod tensor_field {
    pub const RAW_DATA: u32 = 9;
    pub const EXTERNAL_DATA: u32 = 13;
    pub const DATA_LOCATION: u32 = 14;
}

/// Where sidecar tensors start: a multiple of this.
pub const ALIGNMENT: usize = 4096;

/// Tensors smaller than this stay inline even when a sidecar is written.
pub const EXTERNAL_THRESHOLD: usize = 1024;

/// Protobuf's hard limit for one message.
pub const PROTOBUF_LIMIT: u64 = i32::MAX as u64;

/// How the output stores tensor data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataLayout {
    /// Everything stays where it is: inline tensors inline (the input has no external data).
    Inline,
    /// Tensor data goes to a sidecar named `location` (relative to the output's directory):
    /// external tensors of the input, new tensors of at least [`EXTERNAL_THRESHOLD`] bytes and,
    /// with `move_inline`, inline tensors of that size too.
    Sidecar { location: String, move_inline: bool },
}

/// Where copied bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// The input model file.
    Model,
    /// An external data file of the input, by location.
    External(String),
}

/// What to put next into which file.
#[derive(Debug)]
enum Piece {
    Copy(Source, Range<usize>),
    Bytes(Vec<u8>),
    Zeros(usize),
    /// The data of new tensor `i` of the patch.
    Data(usize),
}

#[derive(Debug)]
enum Action {
    Model(Piece),
    Sidecar(Piece),
}

/// The planned output: the actions, and the sizes of the files they make.
#[derive(Debug)]
pub struct Output {
    actions: Vec<Action>,
    pub model_len: u64,
    /// The sidecar's size, when one is written.
    pub sidecar_len: Option<u64>,
}

impl Output {
    /// The patch's plans in the order their data is written.
    pub fn block_order(&self, patch: &Patch) -> Vec<usize> {
        self.actions
            .iter()
            .filter_map(|a| match a {
                Action::Model(Piece::Data(i)) | Action::Sidecar(Piece::Data(i)) => {
                    patch.new_tensors.get(*i)
                }
                _ => None,
            })
            .filter(|t| t.slot == 0)
            .map(|t| t.plan)
            .collect()
    }
}

/// Plans the output of `model` with `patch` applied.
pub fn plan(model: &Model, patch: &Patch, layout: &DataLayout) -> Result<Output> {
    if patch.is_empty() && *layout == DataLayout::Inline {
        return Ok(Output {
            actions: vec![Action::Model(Piece::Copy(
                Source::Model,
                0..model.bytes.len(),
            ))],
            model_len: model.bytes.len() as u64,
            sidecar_len: None,
        });
    }
    let mut graph = Planner::new(layout);
    let bytes = &model.bytes;
    let last_initializer = model
        .graph_fields
        .iter()
        .rposition(|(_, item)| matches!(item, GraphItem::Initializer(_)));
    let last_input = model
        .graph_fields
        .iter()
        .rposition(|(_, item)| matches!(item, GraphItem::Input(_)));
    let move_inline = matches!(
        layout,
        DataLayout::Sidecar {
            move_inline: true,
            ..
        }
    );
    // Tensors outside the main graph's initializers (`Constant` nodes, nested graphs, sparse
    // initializers, functions) that keep their data externally move to the sidecar too: the
    // messages holding them are rewritten at the wire level, everything else in them kept.
    let nested = graph.sidecar.is_some() && model.has_nested_external_data();
    for (pos, (field, item)) in model.graph_fields.iter().enumerate() {
        match *item {
            GraphItem::Node(i) if patch.removed_nodes.contains(&i) => {}
            GraphItem::Node(i) => match patch.replaced.get(&i) {
                Some(nodes) => nodes
                    .iter()
                    .for_each(|node| graph.field(graph_field::NODE, node.encode_to_vec())),
                None if nested => graph.nested(model, Kind::Node, field)?,
                None => graph.copy(field.whole.clone()),
            },
            GraphItem::SparseInitializer(_) if nested => {
                graph.nested(model, Kind::Sparse, field)?
            }
            GraphItem::Initializer(i) if patch.removed_initializers.contains(&i) => {}
            GraphItem::Initializer(i) => {
                let t = &model.initializers[i];
                let payload = &bytes[field.payload.clone()];
                if graph.sidecar.is_some() && is_external(t) {
                    let (location, range) = model.external.range(t)?;
                    graph.relocate(payload, t, Source::External(location), range)?;
                } else if graph.sidecar.is_some() && move_inline && inline_raw(t).is_some() {
                    let range = raw_range(bytes, field.payload.clone(), t)?;
                    graph.relocate(payload, t, Source::Model, range)?;
                } else {
                    graph.copy(field.whole.clone());
                }
            }
            GraphItem::ValueInfo(i) if patch.removed_value_info.contains(&i) => {}
            GraphItem::Input(i) if patch.removed_inputs.contains(&i) => {}
            _ => graph.copy(field.whole.clone()),
        }
        if Some(pos) == last_input {
            for v in &patch.new_inputs {
                graph.field(graph_field::INPUT, v.encode_to_vec());
            }
        }
        if Some(pos) == last_initializer {
            graph.new_tensors(&patch.new_tensors);
        }
    }
    if last_initializer.is_none() {
        graph.new_tensors(&patch.new_tensors);
    }
    let mut actions = Vec::with_capacity(graph.actions.len() + model.fields.len() + 1);
    let mut model_len = 0u64;
    // Model-level fields with external tensors (functions, training info): their sidecar data
    // follows the graph's, whatever their place in the file.
    let mut outer = Planner {
        actions: Vec::new(),
        model_len: 0,
        sidecar: graph.sidecar.take(),
    };
    for (i, field) in model.fields.iter().enumerate() {
        let kind = match field.number {
            model_field::FUNCTIONS => Some(Kind::Function),
            model_field::TRAINING_INFO => Some(Kind::Training),
            _ => None,
        };
        let relocated = match kind {
            Some(kind) if nested => {
                outer.relocated(model, kind, &model.bytes[field.payload.clone()])?
            }
            _ => None,
        };
        if let Some(payload) = relocated {
            let mut bytes = Vec::with_capacity(payload.len() + 8);
            put_bytes_field(&mut bytes, field.number, &payload);
            model_len += bytes.len() as u64;
            actions.push(Action::Model(Piece::Bytes(bytes)));
        } else if i == model.graph_field {
            let mut header = Vec::new();
            prost::encoding::encode_key(
                model_field::GRAPH,
                prost::encoding::WireType::LengthDelimited,
                &mut header,
            );
            prost::encoding::encode_varint(graph.model_len, &mut header);
            model_len += header.len() as u64 + graph.model_len;
            actions.push(Action::Model(Piece::Bytes(header)));
            actions.append(&mut graph.actions);
        } else {
            model_len += field.whole.len() as u64;
            actions.push(Action::Model(Piece::Copy(
                Source::Model,
                field.whole.clone(),
            )));
        }
    }
    actions.append(&mut outer.actions);
    Ok(Output {
        actions,
        model_len,
        sidecar_len: outer.sidecar.map(|s| s.len as u64),
    })
}

/// What a message is, for finding the tensors nested in it.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Graph,
    Node,
    Attribute,
    Sparse,
    Tensor,
    Function,
    Training,
}

impl Kind {
    /// The kind of message field `number` of this kind holds, where it may hold tensors.
    fn child(self, number: u32) -> Option<Kind> {
        Some(match (self, number) {
            (Kind::Graph, 1) | (Kind::Function, 7) => Kind::Node,
            (Kind::Graph, 5) | (Kind::Attribute, 5 | 10) | (Kind::Sparse, 1 | 2) => Kind::Tensor,
            (Kind::Graph, 15) | (Kind::Attribute, 22 | 23) => Kind::Sparse,
            (Kind::Node, 5) | (Kind::Function, 11) => Kind::Attribute,
            (Kind::Attribute, 6 | 11) | (Kind::Training, 1 | 2) => Kind::Graph,
            _ => return None,
        })
    }
}

/// Whether a serialized TensorProto says its data is external (read at the wire level, so that
/// inline data is never decoded).
fn says_external(payload: &[u8]) -> bool {
    wire::scan(payload, 0).is_ok_and(|fields| {
        fields.iter().any(|f| {
            f.number == tensor_field::DATA_LOCATION
                && f.varint(payload) == Some(super::external::EXTERNAL as u64)
        })
    })
}

/// Inline `raw_data` big enough to be worth moving to a sidecar.
fn inline_raw(t: &TensorProto) -> Option<&Bytes> {
    t.raw_data
        .as_ref()
        .filter(|r| r.len() >= EXTERNAL_THRESHOLD && !is_external(t))
}

/// Where an inline tensor's `raw_data` lies in the model file.
fn raw_range(bytes: &Bytes, payload: Range<usize>, t: &TensorProto) -> Result<Range<usize>> {
    wire::scan(&bytes[payload.clone()], payload.start)
        .map_err(|e| Error::tensor(t.name(), e))?
        .into_iter()
        .rfind(|f| f.number == tensor_field::RAW_DATA)
        .map(|f| f.payload)
        .ok_or_else(|| Error::tensor(t.name(), "no raw_data"))
}

/// The sidecar being laid out.
struct SidecarPlan {
    location: String,
    len: usize,
}

struct Planner {
    actions: Vec<Action>,
    model_len: u64,
    sidecar: Option<SidecarPlan>,
}

impl Planner {
    fn new(layout: &DataLayout) -> Planner {
        Planner {
            actions: Vec::new(),
            model_len: 0,
            sidecar: match layout {
                DataLayout::Inline => None,
                DataLayout::Sidecar { location, .. } => Some(SidecarPlan {
                    location: location.clone(),
                    len: 0,
                }),
            },
        }
    }

    fn copy(&mut self, range: Range<usize>) {
        self.model_len += range.len() as u64;
        self.actions
            .push(Action::Model(Piece::Copy(Source::Model, range)));
    }

    fn bytes(&mut self, bytes: Vec<u8>) {
        self.model_len += bytes.len() as u64;
        self.actions.push(Action::Model(Piece::Bytes(bytes)));
    }

    fn field(&mut self, number: u32, payload: Vec<u8>) {
        let mut out = Vec::with_capacity(payload.len() + 8);
        put_bytes_field(&mut out, number, &payload);
        self.bytes(out);
    }

    /// Reserves `len` bytes at the next aligned offset of the sidecar; returns the offset.
    fn reserve(&mut self, len: usize) -> usize {
        let side = self.sidecar.as_mut().expect("sidecar planned");
        let offset = side.len.next_multiple_of(ALIGNMENT);
        let pad = offset - side.len;
        side.len = offset + len;
        if pad > 0 {
            self.actions.push(Action::Sidecar(Piece::Zeros(pad)));
        }
        offset
    }

    /// An initializer whose data moves to the sidecar: its other fields kept in order, its
    /// location entries rewritten.
    fn relocate(
        &mut self,
        payload: &[u8],
        t: &TensorProto,
        source: Source,
        range: Range<usize>,
    ) -> Result<()> {
        let header = self.moved(payload, t, source, range)?;
        self.field(graph_field::INITIALIZER, header);
        Ok(())
    }

    /// Reserves sidecar space for a tensor's data, plans its copy there, and returns the
    /// tensor's payload pointing to it.
    fn moved(
        &mut self,
        payload: &[u8],
        t: &TensorProto,
        source: Source,
        range: Range<usize>,
    ) -> Result<Vec<u8>> {
        let offset = self.reserve(range.len());
        self.actions
            .push(Action::Sidecar(Piece::Copy(source, range.clone())));
        let location = self
            .sidecar
            .as_ref()
            .map(|s| s.location.clone())
            .unwrap_or_default();
        relocated_header(payload, t, &location, offset, range.len())
    }

    /// A main-graph field of `kind`: rewritten when tensors inside it move to the sidecar,
    /// copied byte for byte otherwise.
    fn nested(&mut self, model: &Model, kind: Kind, field: &wire::Field) -> Result<()> {
        match self.relocated(model, kind, &model.bytes[field.payload.clone()])? {
            Some(payload) => self.field(field.number, payload),
            None => self.copy(field.whole.clone()),
        }
        Ok(())
    }

    /// `payload`, a message of `kind`, with every external tensor inside it (at any depth)
    /// moved to the sidecar; `None` when it holds none. Fields are rewritten only on the way to
    /// such a tensor; all others are kept byte for byte.
    fn relocated(&mut self, model: &Model, kind: Kind, payload: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Kind::Tensor = kind {
            if !says_external(payload) {
                return Ok(None);
            }
            let t = TensorProto::decode(payload).map_err(|e| Error::Malformed {
                path: model.path.clone(),
                reason: format!("tensor: {e}"),
            })?;
            let (location, range) = model.external.range(&t)?;
            return self
                .moved(payload, &t, Source::External(location), range)
                .map(Some);
        }
        let fields = wire::scan(payload, 0).map_err(|reason| Error::Malformed {
            path: model.path.clone(),
            reason,
        })?;
        let mut changed: Vec<Option<Vec<u8>>> = Vec::with_capacity(fields.len());
        for f in &fields {
            let child = kind
                .child(f.number)
                .filter(|_| f.wire_type == prost::encoding::WireType::LengthDelimited);
            changed.push(match child {
                Some(child) => self.relocated(model, child, &payload[f.payload.clone()])?,
                None => None,
            });
        }
        if changed.iter().all(Option::is_none) {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(payload.len() + 64);
        for (f, new) in fields.iter().zip(changed) {
            match new {
                Some(new) => put_bytes_field(&mut out, f.number, &new),
                None => out.extend_from_slice(&payload[f.whole.clone()]),
            }
        }
        Ok(Some(out))
    }

    /// The fused tensors: headers now, data when the block is folded.
    fn new_tensors(&mut self, tensors: &[NewTensor]) {
        for (i, t) in tensors.iter().enumerate() {
            let header = t.header().encode_to_vec();
            let len = t.data_len();
            if self.sidecar.is_some() && len >= EXTERNAL_THRESHOLD {
                let offset = self.reserve(len);
                self.actions.push(Action::Sidecar(Piece::Data(i)));
                let location = self
                    .sidecar
                    .as_ref()
                    .map(|s| s.location.clone())
                    .unwrap_or_default();
                let mut payload = header;
                put_location(&mut payload, &location, offset, len);
                self.field(graph_field::INITIALIZER, payload);
            } else {
                let payload_len = header.len() + bytes_field_len(tensor_field::RAW_DATA, len);
                let mut prefix = Vec::with_capacity(header.len() + 16);
                prost::encoding::encode_key(
                    graph_field::INITIALIZER,
                    prost::encoding::WireType::LengthDelimited,
                    &mut prefix,
                );
                prost::encoding::encode_varint(payload_len as u64, &mut prefix);
                prefix.extend_from_slice(&header);
                prost::encoding::encode_key(
                    tensor_field::RAW_DATA,
                    prost::encoding::WireType::LengthDelimited,
                    &mut prefix,
                );
                prost::encoding::encode_varint(len as u64, &mut prefix);
                self.bytes(prefix);
                self.model_len += len as u64;
                self.actions.push(Action::Model(Piece::Data(i)));
            }
        }
    }
}

/// A tensor's payload with raw_data, external_data and data_location dropped (other
/// external_data keys kept), then the new location entries.
fn relocated_header(
    payload: &[u8],
    t: &TensorProto,
    location: &str,
    offset: usize,
    len: usize,
) -> Result<Vec<u8>> {
    let fields = wire::scan(payload, 0).map_err(|e| Error::tensor(t.name(), e))?;
    let mut out = Vec::with_capacity(payload.len().min(4096) + 64);
    for f in &fields {
        let keep = match f.number {
            tensor_field::RAW_DATA | tensor_field::DATA_LOCATION => false,
            tensor_field::EXTERNAL_DATA => {
                let entry = StringStringEntryProto::decode(&payload[f.payload.clone()])
                    .map_err(|e| Error::tensor(t.name(), e.to_string()))?;
                !matches!(entry.key(), "location" | "offset" | "length")
            }
            _ => true,
        };
        if keep {
            out.extend_from_slice(&payload[f.whole.clone()]);
        }
    }
    put_location(&mut out, location, offset, len);
    Ok(out)
}

fn put_location(out: &mut Vec<u8>, location: &str, offset: usize, len: usize) {
    for (key, value) in [
        ("location", location.to_string()),
        ("offset", offset.to_string()),
        ("length", len.to_string()),
    ] {
        let entry = StringStringEntryProto {
            key: Some(key.into()),
            value: Some(value),
        };
        put_bytes_field(out, tensor_field::EXTERNAL_DATA, &entry.encode_to_vec());
    }
    put_varint_field(
        out,
        tensor_field::DATA_LOCATION,
        super::external::EXTERNAL as u64,
    );
}

/// Where output goes: a file (written through a buffer; copies done by the kernel), memory, or
/// nowhere (a dry run).
pub enum Sink {
    File(BufWriter<File>),
    Memory(Vec<u8>),
    Discard,
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::File(w) => w.write_all(bytes),
            Sink::Memory(v) => {
                v.extend_from_slice(bytes);
                Ok(())
            }
            Sink::Discard => Ok(()),
        }
    }

    fn copy(
        &mut self,
        file: Option<&File>,
        bytes: &Bytes,
        range: Range<usize>,
    ) -> std::io::Result<()> {
        match (self, file) {
            (Sink::File(w), Some(file)) => {
                w.flush()?;
                let mut input = file;
                input.seek(SeekFrom::Start(range.start as u64))?;
                let copied = std::io::copy(&mut input.take(range.len() as u64), w.get_mut())?;
                if copied != range.len() as u64 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the input file changed while it was read",
                    ));
                }
                Ok(())
            }
            (sink, _) => {
                let slice = bytes.get(range).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "range past the end")
                })?;
                sink.write(slice)
            }
        }
    }

    /// Flushes a file sink.
    pub fn finish(&mut self) -> std::io::Result<()> {
        match self {
            Sink::File(w) => w.flush(),
            Sink::Memory(_) | Sink::Discard => Ok(()),
        }
    }
}

/// Computes a block's new tensors while they are written: `produce(plan, write)` hands the data
/// of the plan's first tensor (its weight) to `write`, in as many pieces as it likes, and returns
/// the data of its other tensors (the bias), which are written when their turn comes.
pub type Produce<'a> =
    dyn FnMut(usize, &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<Vec<Bytes>> + 'a;

/// Runs the planned actions.
pub fn write(
    output: &Output,
    model: &Model,
    patch: &Patch,
    model_sink: &mut Sink,
    mut sidecar_sink: Option<&mut Sink>,
    produce: &mut Produce,
) -> Result<()> {
    let io = |path: &std::path::Path, e: std::io::Error| Error::io(path, e);
    let mut current: Option<(usize, Vec<Bytes>)> = None;
    for action in &output.actions {
        let (sink, piece) = match action {
            Action::Model(p) => (&mut *model_sink, p),
            Action::Sidecar(p) => match sidecar_sink.as_deref_mut() {
                Some(s) => (s, p),
                None => {
                    return Err(Error::Graph(
                        "a sidecar was planned but none is written".into(),
                    ));
                }
            },
        };
        match piece {
            Piece::Copy(Source::Model, range) => sink
                .copy(
                    model.mapped.as_ref().map(|m| &m.file),
                    &model.bytes,
                    range.clone(),
                )
                .map_err(|e| io(&model.path, e))?,
            Piece::Copy(Source::External(location), range) => {
                let (file, bytes) = model.external.file(location)?;
                sink.copy(file, bytes, range.clone())
                    .map_err(|e| io(&model.path, e))?
            }
            Piece::Bytes(b) => sink.write(b).map_err(|e| io(&model.path, e))?,
            Piece::Zeros(n) => sink.write(&vec![0; *n]).map_err(|e| io(&model.path, e))?,
            Piece::Data(i) if patch.new_tensors[*i].slot == 0 => {
                let t = &patch.new_tensors[*i];
                let mut written = 0;
                let mut write = |chunk: &[u8]| {
                    written += chunk.len();
                    sink.write(chunk).map_err(|e| io(&model.path, e))
                };
                current = Some((t.plan, produce(t.plan, &mut write)?));
                if written != t.data_len() {
                    return Err(Error::tensor(
                        &t.name,
                        "its block produced data of the wrong size",
                    ));
                }
            }
            Piece::Data(i) => {
                let t = &patch.new_tensors[*i];
                let data = current
                    .as_ref()
                    .filter(|(plan, _)| *plan == t.plan)
                    .and_then(|(_, data)| data.get(t.slot - 1))
                    .ok_or_else(|| Error::tensor(&t.name, "its block produced no data for it"))?;
                if data.len() != t.data_len() {
                    return Err(Error::tensor(
                        &t.name,
                        "its block produced data of the wrong size",
                    ));
                }
                sink.write(data).map_err(|e| io(&model.path, e))?;
            }
        }
    }
    model_sink.finish().map_err(|e| io(&model.path, e))?;
    if let Some(s) = sidecar_sink {
        s.finish().map_err(|e| io(&model.path, e))?;
    }
    Ok(())
}
