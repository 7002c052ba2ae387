//! TensorProto ⇄ `ndarray` for the floating-point types a fold can touch (FLOAT, FLOAT16,
//! BFLOAT16, DOUBLE). Data comes from `raw_data` (little-endian), the typed fields (`float_data`,
//! `double_data`, FLOAT16/BFLOAT16 bit patterns in `int32_data`) or external data. Declared dims
//! are checked against the bytes present before anything is allocated.

use bytes::Bytes;
use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::onnx::external::{ExternalStore, is_external};
use crate::onnx::proto::TensorProto;

/// A floating-point element type of ONNX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatType {
    F32,
    F16,
    Bf16,
    F64,
}

impl FloatType {
    /// From `TensorProto.DataType`; `None` for every non-float (or unknown) code.
    pub fn from_code(code: i32) -> Option<FloatType> {
        match code {
            1 => Some(FloatType::F32),
            10 => Some(FloatType::F16),
            11 => Some(FloatType::F64),
            16 => Some(FloatType::Bf16),
            _ => None,
        }
    }

    /// The `TensorProto.DataType` code.
    pub fn code(self) -> i32 {
        match self {
            FloatType::F32 => 1,
            FloatType::F16 => 10,
            FloatType::F64 => 11,
            FloatType::Bf16 => 16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::Bf16 => 2,
            FloatType::F64 => 8,
        }
    }

    /// The ONNX name of the type.
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::F64 => "float64",
            FloatType::Bf16 => "bfloat16",
        }
    }

    /// Rounds a value to this type and back, as writing and reading it would.
    pub fn round(self, v: f64) -> f64 {
        match self {
            FloatType::F32 => v as f32 as f64,
            FloatType::F16 => f16::from_f64(v).to_f64(),
            FloatType::Bf16 => bf16::from_f64(v).to_f64(),
            FloatType::F64 => v,
        }
    }
}

/// The tensor's dims as `usize`, refusing negative ones and products that overflow.
pub fn shape(t: &TensorProto) -> Result<(Vec<usize>, usize)> {
    let name = t.name.as_deref().unwrap_or("");
    let mut dims = Vec::with_capacity(t.dims.len());
    let mut count: usize = 1;
    for &d in &t.dims {
        let d = usize::try_from(d).map_err(|_| Error::tensor(name, format!("negative dim {d}")))?;
        count = count
            .checked_mul(d)
            .ok_or_else(|| Error::tensor(name, format!("dims {:?} overflow", t.dims)))?;
        dims.push(d);
    }
    Ok((dims, count))
}

/// The tensor's float type, or an error naming the unsupported type.
pub fn float_type(t: &TensorProto) -> Result<FloatType> {
    let code = t.data_type.unwrap_or(0);
    FloatType::from_code(code).ok_or_else(|| {
        Error::tensor(
            t.name.as_deref().unwrap_or(""),
            format!("data type {code} is not a floating-point type that can be folded"),
        )
    })
}

/// Refuses a data type that ONNX does not define (a malformed model, not merely an unfoldable
/// type such as int8).
pub fn check_known_type(t: &TensorProto) -> Result<()> {
    let code = t.data_type.unwrap_or(0);
    let defined = crate::onnx::proto::tensor_proto::DataType::try_from(code).is_ok();
    if code == 0 || !defined {
        return Err(Error::tensor(
            t.name.as_deref().unwrap_or(""),
            format!("unknown data type {code}"),
        ));
    }
    Ok(())
}

/// The tensor's little-endian data bytes — external or `raw_data` — or `None` when it keeps its
/// values in the typed fields (`float_data`, `int32_data`, …).
fn stored_bytes(t: &TensorProto, external: &ExternalStore, count: usize) -> Result<Option<Bytes>> {
    if is_external(t) {
        return external.bytes(t).map(Some);
    }
    Ok(t.raw_data.clone().filter(|r| !r.is_empty() || count == 0))
}

/// The tensor's stored data bytes (external or `raw_data`), if it has any.
pub fn stored(t: &TensorProto, external: &ExternalStore) -> Option<Bytes> {
    stored_bytes(t, external, 1).ok().flatten()
}

/// Checks that the tensor's data holds exactly what its dims and type need, without reading it.
pub fn check_data(t: &TensorProto, external: &ExternalStore) -> Result<()> {
    let name = t.name.as_deref().unwrap_or("");
    let (_, count) = shape(t)?;
    let code = t.data_type.unwrap_or(0);
    let size = match FloatType::from_code(code) {
        Some(ty) => ty.size(),
        None => return Ok(()),
    };
    let (present, unit) = if let Some(raw) = stored_bytes(t, external, count)? {
        (raw.len(), size)
    } else {
        let typed = match FloatType::from_code(code) {
            Some(FloatType::F32) => t.float_data.len(),
            Some(FloatType::F64) => t.double_data.len(),
            _ => t.int32_data.len(),
        };
        (typed, 1)
    };
    if count.checked_mul(unit) != Some(present) {
        return Err(Error::tensor(
            name,
            format!(
                "dims {:?} need {count} values but the data holds {present} {}",
                t.dims,
                if unit == 1 { "values" } else { "bytes" }
            ),
        ));
    }
    Ok(())
}

/// Reads a float tensor into f64.
pub fn read_f64(t: &TensorProto, external: &ExternalStore) -> Result<ArrayD<f64>> {
    let name = t.name.as_deref().unwrap_or("");
    let ty = float_type(t)?;
    let (dims, count) = shape(t)?;
    let values = match stored_bytes(t, external, count)? {
        Some(raw) => from_le_bytes(name, &raw, ty, count)?,
        None => from_typed_fields(t, ty, count)?,
    };
    ArrayD::from_shape_vec(IxDyn(&dims), values).map_err(|e| Error::tensor(name, e.to_string()))
}

/// A float tensor's values as stored, for reading row by row: its little-endian bytes (a view of
/// the mapped file, never copied) or, for tensors kept in the typed fields, the values decoded.
#[derive(Debug, Clone)]
pub enum Data {
    Raw(Bytes, FloatType),
    Values(std::sync::Arc<[f64]>),
}

impl Data {
    /// Values `range`, times `factor`, into `out` (exactly as long).
    #[inline(always)]
    pub fn read_scaled(&self, range: std::ops::Range<usize>, factor: f64, out: &mut [f64]) {
        match self {
            Data::Raw(bytes, ty) => {
                let bytes = &bytes[range.start * ty.size()..range.end * ty.size()];
                decode_scaled(bytes, *ty, factor, out)
            }
            Data::Values(values) => {
                let slots = out.iter_mut().zip(&values[range]);
                slots.for_each(|(d, v)| *d = v * factor);
            }
        }
    }
}

/// A float tensor's [`Data`], checked against its dims.
pub fn data(t: &TensorProto, external: &ExternalStore) -> Result<Data> {
    let name = t.name.as_deref().unwrap_or("");
    let ty = float_type(t)?;
    let (_, count) = shape(t)?;
    match stored_bytes(t, external, count)? {
        Some(raw) if count.checked_mul(ty.size()) == Some(raw.len()) => Ok(Data::Raw(raw, ty)),
        Some(raw) => Err(Error::tensor(
            name,
            format!(
                "dims need {count} values but the data holds {} bytes",
                raw.len()
            ),
        )),
        None => Ok(Data::Values(from_typed_fields(t, ty, count)?.into())),
    }
}

fn from_le_bytes(name: &str, raw: &Bytes, ty: FloatType, count: usize) -> Result<Vec<f64>> {
    let expected = count.checked_mul(ty.size());
    if expected != Some(raw.len()) {
        return Err(Error::tensor(
            name,
            format!(
                "dims need {count} {} values but the data holds {} bytes",
                ty.name(),
                raw.len()
            ),
        ));
    }
    let values = decode(raw, ty);
    Ok(values)
}

fn from_typed_fields(t: &TensorProto, ty: FloatType, count: usize) -> Result<Vec<f64>> {
    let name = t.name.as_deref().unwrap_or("");
    let (present, values): (usize, Vec<f64>) = match ty {
        FloatType::F32 => (
            t.float_data.len(),
            t.float_data.iter().map(|&v| v as f64).collect(),
        ),
        FloatType::F64 => (t.double_data.len(), t.double_data.clone()),
        FloatType::F16 => (
            t.int32_data.len(),
            t.int32_data
                .iter()
                .map(|&b| f16::from_bits(b as u16).to_f64())
                .collect(),
        ),
        FloatType::Bf16 => (
            t.int32_data.len(),
            t.int32_data
                .iter()
                .map(|&b| bf16::from_bits(b as u16).to_f64())
                .collect(),
        ),
    };
    if present != count {
        return Err(Error::tensor(
            name,
            format!("dims need {count} values but the tensor holds {present}"),
        ));
    }
    Ok(values)
}

/// Reads an integer tensor (INT64, INT32, INT16, INT8, UINT8, BOOL) into i64.
pub fn read_i64(t: &TensorProto, external: &ExternalStore) -> Result<ArrayD<i64>> {
    let name = t.name.as_deref().unwrap_or("");
    let code = t.data_type.unwrap_or(0);
    let size = match code {
        7 => 8,
        6 => 4,
        5 => 2,
        2 | 3 | 9 => 1,
        _ => {
            return Err(Error::tensor(
                name,
                format!("data type {code} is not an integer type"),
            ));
        }
    };
    let (dims, count) = shape(t)?;
    let raw = stored_bytes(t, external, count)?;
    let values: Vec<i64> = match raw {
        Some(raw) => {
            if count.checked_mul(size) != Some(raw.len()) {
                return Err(Error::tensor(
                    name,
                    format!(
                        "dims need {count} values but the data holds {} bytes",
                        raw.len()
                    ),
                ));
            }
            raw.chunks_exact(size)
                .map(|c| match (code, size) {
                    (_, 8) => i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
                    (_, 4) => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64,
                    (_, 2) => i16::from_le_bytes([c[0], c[1]]) as i64,
                    (3, 1) => c[0] as i8 as i64,
                    _ => c[0] as i64,
                })
                .collect()
        }
        None if code == 7 => t.int64_data.clone(),
        None => t.int32_data.iter().map(|&v| v as i64).collect(),
    };
    if values.len() != count {
        return Err(Error::tensor(
            name,
            format!(
                "dims need {count} values but the tensor holds {}",
                values.len()
            ),
        ));
    }
    ArrayD::from_shape_vec(IxDyn(&dims), values).map_err(|e| Error::tensor(name, e.to_string()))
}

/// Encodes values as little-endian bytes of `ty` (rounding to nearest).
pub fn to_le_bytes(values: &ArrayD<f64>, ty: FloatType) -> Vec<u8> {
    let standard = values.as_standard_layout();
    let mut out = Vec::new();
    encode_into(standard.as_slice().unwrap_or(&[]), ty, &mut out);
    out
}

/// [`to_le_bytes`], appending to `out`.
pub fn encode_into(values: &[f64], ty: FloatType, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + values.len() * ty.size(), 0);
    encode_to(values, ty, &mut out[start..]);
}

/// [`to_le_bytes`] into `out` (exactly as long).
#[inline(always)]
pub fn encode_to(values: &[f64], ty: FloatType, out: &mut [u8]) {
    /// Each value into its own `N` bytes (a constant width, so each copy is a plain store).
    fn fill<const N: usize>(out: &mut [u8], values: &[f64], encode: impl Fn(f64) -> [u8; N]) {
        let slots = out.chunks_exact_mut(N).zip(values);
        slots.for_each(|(d, &v)| d.copy_from_slice(&encode(v)));
    }
    match ty {
        FloatType::F32 => fill(out, values, |v| (v as f32).to_le_bytes()),
        FloatType::F64 => fill(out, values, f64::to_le_bytes),
        FloatType::F16 => fill(out, values, |v| f16::from_f64(v).to_le_bytes()),
        FloatType::Bf16 => fill(out, values, |v| bf16::from_f64(v).to_le_bytes()),
    }
}

/// Decodes little-endian bytes of `ty` (the inverse of [`to_le_bytes`]).
pub fn decode(bytes: &[u8], ty: FloatType) -> Vec<f64> {
    let mut values = Vec::with_capacity(bytes.len() / ty.size());
    decode_into(bytes, ty, &mut values);
    values
}

/// [`decode`] times `factor`, into `out` (one pass over slices of one length, which the compiler
/// vectorizes: the fold's hot loop).
#[inline(always)]
pub fn decode_scaled(bytes: &[u8], ty: FloatType, factor: f64, out: &mut [f64]) {
    fn each<const N: usize>(bytes: &[u8], out: &mut [f64], value: impl Fn([u8; N]) -> f64) {
        let slots = out.iter_mut().zip(bytes.chunks_exact(N));
        slots.for_each(|(d, c)| *d = value(c.try_into().unwrap_or([0; N])));
    }
    match ty {
        FloatType::F32 => each(bytes, out, |b| f32::from_le_bytes(b) as f64 * factor),
        FloatType::F64 => each(bytes, out, |b| f64::from_le_bytes(b) * factor),
        FloatType::F16 => each(bytes, out, |b| f16::from_le_bytes(b).to_f64() * factor),
        FloatType::Bf16 => each(bytes, out, |b| bf16::from_le_bytes(b).to_f64() * factor),
    }
}

/// [`decode`], appending to `values`.
pub fn decode_into(bytes: &[u8], ty: FloatType, values: &mut Vec<f64>) {
    match ty {
        FloatType::F32 => values.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
        ),
        FloatType::F64 => values.extend(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
        ),
        FloatType::F16 => values.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64()),
        ),
        FloatType::Bf16 => values.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64()),
        ),
    }
}

/// A new initializer holding `values` as `ty` in `raw_data`.
pub fn new_tensor(name: &str, values: &ArrayD<f64>, ty: FloatType) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: values.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(ty.code()),
        raw_data: Some(Bytes::from(to_le_bytes(values, ty))),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> ExternalStore {
        ExternalStore::default()
    }

    #[test]
    fn round_trips_every_float_type() {
        let values = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0, -2.5, 0.125, 3.0]).unwrap();
        for ty in [
            FloatType::F32,
            FloatType::F16,
            FloatType::Bf16,
            FloatType::F64,
        ] {
            let t = new_tensor("w", &values, ty);
            assert_eq!(read_f64(&t, &store()).unwrap(), values, "{ty:?}");
        }
    }

    #[test]
    fn reads_typed_fields() {
        let t = TensorProto {
            name: Some("w".into()),
            dims: vec![2],
            data_type: Some(1),
            float_data: vec![1.5, -1.0],
            ..Default::default()
        };
        assert_eq!(
            read_f64(&t, &store()).unwrap().into_raw_vec_and_offset().0,
            vec![1.5, -1.0]
        );
        let h = TensorProto {
            name: Some("h".into()),
            dims: vec![2],
            data_type: Some(10),
            int32_data: vec![
                f16::from_f32(0.5).to_bits() as i32,
                f16::from_f32(-2.0).to_bits() as i32,
            ],
            ..Default::default()
        };
        assert_eq!(
            read_f64(&h, &store()).unwrap().into_raw_vec_and_offset().0,
            vec![0.5, -2.0]
        );
    }

    #[test]
    fn dims_must_match_the_data() {
        let mut t = new_tensor(
            "w",
            &ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.0, 2.0]).unwrap(),
            FloatType::F32,
        );
        t.dims = vec![3];
        assert!(
            read_f64(&t, &store())
                .unwrap_err()
                .to_string()
                .contains("'w'")
        );
        t.dims = vec![-1];
        assert!(
            read_f64(&t, &store())
                .unwrap_err()
                .to_string()
                .contains("negative")
        );
        t.dims = vec![i64::MAX, i64::MAX];
        assert!(
            read_f64(&t, &store())
                .unwrap_err()
                .to_string()
                .contains("overflow")
        );
        t.dims = vec![2];
        t.data_type = Some(7);
        assert!(
            read_f64(&t, &store())
                .unwrap_err()
                .to_string()
                .contains("data type 7")
        );
    }
}
