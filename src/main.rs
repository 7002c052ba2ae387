//! The `onnx-repvgg` binary: parse arguments, run, print errors once. Exit codes: 0 success,
//! 1 error, 2 usage.

use std::process::ExitCode;

fn main() -> ExitCode {
    onnx_repvgg::cli::tune_allocator();
    // Interrupted (Ctrl-C, `timeout`, a closed terminal), leave no temporary file behind.
    if let Err(e) = onnx_repvgg::onnx::output::clean_up_on_signals() {
        eprintln!("onnx-repvgg: cannot watch for signals: {e}");
        return ExitCode::from(1);
    }
    ExitCode::from(onnx_repvgg::cli::main(std::env::args_os()))
}
