//! Compiles `proto/onnx-ml.proto` with prost-build, parsed by protox (pure Rust: no `protoc`).
//! Every `bytes` field becomes `bytes::Bytes`, so tensor data can point into the input map.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx-ml.proto");
    let descriptors = protox::compile(["proto/onnx-ml.proto"], ["proto/"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
