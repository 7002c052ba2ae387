//! Writing a patched model without re-encoding what did not change: the model and graph are
//! re-assembled field by field from the input's bytes, so untouched nodes, tensors, metadata and
//! fields unknown to our schema come out byte for byte. Only replaced nodes and new tensors are
//! encoded. With external data, tensor bytes go to one sidecar (offsets aligned to 4 KiB) and each
//! such tensor's `external_data` entries are rewritten in place of the old ones.

use bytes::Bytes;
use prost::Message;

use super::external::is_external;
use super::model::{GraphItem, Model, graph_field, model_field};
use super::proto::{StringStringEntryProto, TensorProto};
use super::wire::{self, put_bytes_field, put_varint_field};
use crate::error::{Error, Result};
use crate::rewrite::Patch;

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
pub const PROTOBUF_LIMIT: usize = i32::MAX as usize;

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

/// The bytes of the output model and of its sidecar, if any.
#[derive(Debug, Default)]
pub struct Spliced {
    pub model: Vec<u8>,
    pub sidecar: Option<Vec<u8>>,
}

/// Assembles the output model.
pub fn splice(model: &Model, patch: &Patch, layout: &DataLayout) -> Result<Spliced> {
    let mut sidecar = match layout {
        DataLayout::Inline => None,
        DataLayout::Sidecar { location, .. } => Some(Sidecar::new(location)),
    };
    let move_inline = matches!(
        layout,
        DataLayout::Sidecar {
            move_inline: true,
            ..
        }
    );
    let bytes = &model.bytes;
    let last_initializer = model
        .graph_fields
        .iter()
        .rposition(|(_, item)| matches!(item, GraphItem::Initializer(_)));
    let last_input = model
        .graph_fields
        .iter()
        .rposition(|(_, item)| matches!(item, GraphItem::Input(_)));
    let mut graph = Vec::with_capacity(model.fields[model.graph_field].payload.len());
    for (pos, (field, item)) in model.graph_fields.iter().enumerate() {
        match *item {
            GraphItem::Node(i) if patch.removed_nodes.contains(&i) => {}
            GraphItem::Node(i) => match patch.replaced.get(&i) {
                Some(node) => put_bytes_field(&mut graph, graph_field::NODE, &node.encode_to_vec()),
                None => graph.extend_from_slice(&bytes[field.whole.clone()]),
            },
            GraphItem::Initializer(i) if patch.removed_initializers.contains(&i) => {}
            GraphItem::Initializer(i) => {
                let t = &model.initializers[i];
                let payload = &bytes[field.payload.clone()];
                match sidecar.as_mut() {
                    Some(side) if is_external(t) => {
                        let data = model.external.bytes(t)?;
                        let rewritten = side.relocate(payload, t, &data)?;
                        put_bytes_field(&mut graph, graph_field::INITIALIZER, &rewritten);
                    }
                    Some(side) if move_inline && inline_raw(t).is_some() => {
                        let data = inline_raw(t).cloned().unwrap_or_default();
                        let rewritten = side.relocate(payload, t, &data)?;
                        put_bytes_field(&mut graph, graph_field::INITIALIZER, &rewritten);
                    }
                    _ => graph.extend_from_slice(&bytes[field.whole.clone()]),
                }
            }
            GraphItem::ValueInfo(i) if patch.removed_value_info.contains(&i) => {}
            GraphItem::Input(i) if patch.removed_inputs.contains(&i) => {}
            _ => graph.extend_from_slice(&bytes[field.whole.clone()]),
        }
        if Some(pos) == last_input {
            for v in &patch.new_inputs {
                put_bytes_field(&mut graph, graph_field::INPUT, &v.encode_to_vec());
            }
        }
        if Some(pos) == last_initializer {
            put_new_tensors(&mut graph, &patch.new_initializers, sidecar.as_mut())?;
        }
    }
    if last_initializer.is_none() {
        put_new_tensors(&mut graph, &patch.new_initializers, sidecar.as_mut())?;
    }
    let mut out = Vec::with_capacity(bytes.len());
    for (i, field) in model.fields.iter().enumerate() {
        if i == model.graph_field {
            put_bytes_field(&mut out, model_field::GRAPH, &graph);
        } else {
            out.extend_from_slice(&bytes[field.whole.clone()]);
        }
    }
    Ok(Spliced {
        model: out,
        sidecar: sidecar.map(|s| s.data),
    })
}

/// Inline `raw_data` big enough to be worth moving to a sidecar.
fn inline_raw(t: &TensorProto) -> Option<&Bytes> {
    t.raw_data
        .as_ref()
        .filter(|r| r.len() >= EXTERNAL_THRESHOLD && !is_external(t))
}

fn put_new_tensors(
    graph: &mut Vec<u8>,
    tensors: &[TensorProto],
    mut sidecar: Option<&mut Sidecar>,
) -> Result<()> {
    for t in tensors {
        let encoded = t.encode_to_vec();
        let payload = match (sidecar.as_deref_mut(), inline_raw(t)) {
            (Some(side), Some(data)) => side.relocate(&encoded, t, data)?,
            _ => encoded,
        };
        put_bytes_field(graph, graph_field::INITIALIZER, &payload);
    }
    Ok(())
}

/// The sidecar file being assembled.
struct Sidecar {
    location: String,
    data: Vec<u8>,
}

impl Sidecar {
    fn new(location: &str) -> Sidecar {
        Sidecar {
            location: location.to_string(),
            data: Vec::new(),
        }
    }

    /// Appends `data` at the next aligned offset and returns the tensor's payload re-written to
    /// point there: its fields copied in order except raw_data, external_data and data_location,
    /// then the new location entries (other external_data keys kept).
    fn relocate(&mut self, payload: &[u8], t: &TensorProto, data: &[u8]) -> Result<Vec<u8>> {
        let offset = self.data.len().next_multiple_of(ALIGNMENT);
        self.data.resize(offset, 0);
        self.data.extend_from_slice(data);
        let fields = wire::scan(payload, 0).map_err(|e| Error::tensor(t.name(), e))?;
        let mut out = Vec::with_capacity(payload.len() + 64);
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
        for (key, value) in [
            ("location", self.location.clone()),
            ("offset", offset.to_string()),
            ("length", data.len().to_string()),
        ] {
            let entry = StringStringEntryProto {
                key: Some(key.into()),
                value: Some(value),
            };
            put_bytes_field(
                &mut out,
                tensor_field::EXTERNAL_DATA,
                &entry.encode_to_vec(),
            );
        }
        put_varint_field(
            &mut out,
            tensor_field::DATA_LOCATION,
            super::external::EXTERNAL as u64,
        );
        Ok(out)
    }
}
