pub mod affine;
pub mod error;
pub mod graph;
pub mod onnx;
pub mod tensor;
