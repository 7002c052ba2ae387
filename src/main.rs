//! The `onnx-repvgg` binary: parse arguments, run, print errors once. Exit codes: 0 success,
//! 1 error, 2 usage.

use std::process::ExitCode;

fn main() -> ExitCode {
    onnx_repvgg::cli::tune_allocator();
    ExitCode::from(onnx_repvgg::cli::main(std::env::args_os()))
}
