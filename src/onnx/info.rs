//! `ValueInfoProto` constructors: a tensor value's name, element type and static shape.

use super::proto::{TensorShapeProto, TypeProto, ValueInfoProto, tensor_shape_proto, type_proto};

/// A value of tensor type `elem_type` (a `TensorProto.DataType` code) and shape `dims`.
pub fn tensor(name: &str, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem_type),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}
