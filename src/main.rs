//! The `onnx-repvgg` binary: parse arguments, run, print errors once. Exit codes: 0 success,
//! 1 error, 2 usage.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = <cli::Args as clap::Parser>::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("onnx-repvgg: {err:#}");
            ExitCode::from(1)
        }
    }
}
