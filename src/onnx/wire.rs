//! Protobuf wire-level scanning: the fields of one message as byte ranges, without decoding
//! them. This is what lets untouched parts of a model (and fields our schema does not know) pass
//! through byte for byte. Encoding primitives come from `prost::encoding`.

use std::ops::Range;

use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

/// One field occurrence of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Field number from the tag.
    pub number: u32,
    /// Wire type from the tag.
    pub wire_type: WireType,
    /// The whole field (tag, length prefix and payload), relative to the scanned buffer's base.
    pub whole: Range<usize>,
    /// For length-delimited fields the payload; for others the value bytes.
    pub payload: Range<usize>,
}

impl Field {
    /// The varint value of a varint field, read from `buf` (the scanned buffer).
    pub fn varint(&self, buf: &[u8]) -> Option<u64> {
        if self.wire_type != WireType::Varint {
            return None;
        }
        decode_varint(&mut &buf[self.payload.clone()]).ok()
    }
}

/// Splits `buf` (a serialized message) into its fields. Offsets are shifted by `base`, so that
/// fields of nested messages can be expressed relative to the whole file.
pub fn scan(buf: &[u8], base: usize) -> Result<Vec<Field>, String> {
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let mut rest = &buf[pos..];
        let (number, wire_type) = decode_key(&mut rest)
            .map_err(|e| format!("bad field tag at byte {}: {e}", base + start))?;
        let value_start = buf.len() - rest.len();
        let (payload_start, payload_len) = match wire_type {
            WireType::Varint => {
                decode_varint(&mut rest)
                    .map_err(|e| format!("bad varint at byte {}: {e}", base + value_start))?;
                (value_start, buf.len() - rest.len() - value_start)
            }
            WireType::SixtyFourBit => (value_start, 8),
            WireType::ThirtyTwoBit => (value_start, 4),
            WireType::LengthDelimited => {
                let len = decode_varint(&mut rest)
                    .map_err(|e| format!("bad length at byte {}: {e}", base + value_start))?;
                let len = usize::try_from(len).map_err(|_| format!("length {len} too large"))?;
                (buf.len() - rest.len(), len)
            }
            WireType::StartGroup | WireType::EndGroup => {
                return Err(format!(
                    "field {number} at byte {} uses the deprecated group encoding",
                    base + start
                ));
            }
        };
        let end = payload_start
            .checked_add(payload_len)
            .filter(|&end| end <= buf.len())
            .ok_or_else(|| {
                format!(
                    "field {number} at byte {} runs past the end of its message (truncated?)",
                    base + start
                )
            })?;
        fields.push(Field {
            number,
            wire_type,
            whole: base + start..base + end,
            payload: base + payload_start..base + end,
        });
        pos = end;
    }
    Ok(fields)
}

/// Appends a length-delimited field with the given payload.
pub fn put_bytes_field(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// Appends a varint field.
pub fn put_varint_field(out: &mut Vec<u8>, number: u32, value: u64) {
    encode_key(number, WireType::Varint, out);
    encode_varint(value, out);
}

/// The number of bytes a length-delimited field with a payload of `len` bytes takes.
pub fn bytes_field_len(number: u32, len: usize) -> usize {
    prost::encoding::key_len(number) + prost::encoding::encoded_len_varint(len as u64) + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_every_wire_type_and_keeps_ranges() {
        let mut buf = Vec::new();
        put_varint_field(&mut buf, 1, 300);
        put_bytes_field(&mut buf, 7, b"hello");
        encode_key(3, WireType::ThirtyTwoBit, &mut buf);
        buf.extend_from_slice(&[1, 2, 3, 4]);
        encode_key(4, WireType::SixtyFourBit, &mut buf);
        buf.extend_from_slice(&[0; 8]);
        let fields = scan(&buf, 10).unwrap();
        assert_eq!(fields.len(), 4);
        assert_eq!(fields[0].number, 1);
        assert_eq!(fields[0].whole, 10..13);
        assert_eq!(fields[1].number, 7);
        assert_eq!(
            &buf[fields[1].payload.start - 10..fields[1].payload.end - 10],
            b"hello"
        );
        assert_eq!(fields[2].payload.len(), 4);
        assert_eq!(fields[3].whole.end, 10 + buf.len());
        let unshifted = scan(&buf, 0).unwrap();
        assert_eq!(unshifted[0].varint(&buf), Some(300));
        assert_eq!(unshifted[1].varint(&buf), None);
    }

    #[test]
    fn truncated_payload_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        put_bytes_field(&mut buf, 7, b"hello");
        for cut in 0..buf.len() {
            let r = scan(&buf[..cut], 0);
            assert!(cut == 0 || r.is_err(), "cut {cut} accepted");
        }
    }

    #[test]
    fn groups_are_refused() {
        let mut buf = Vec::new();
        encode_key(2, WireType::StartGroup, &mut buf);
        assert!(scan(&buf, 0).unwrap_err().contains("group"));
    }
}
