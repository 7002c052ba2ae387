//! `onnx-repvgg inspect`: its options, their check into an [`InspectConfig`], and the run: the
//! block table (or JSON) of a model file or of standard input.

use std::path::PathBuf;

use super::input::{self, Source};
use super::{Result, emit, print};
use crate::InspectOptions;

pub(crate) const EXAMPLES: &str = "Examples:\n  onnx-repvgg inspect train.onnx\n  onnx-repvgg inspect --input-size 320x320 train.onnx\n  onnx-repvgg inspect --int8 train.onnx\n  onnx-repvgg inspect --json train.onnx | jq '.summary'\n  cat train.onnx | onnx-repvgg inspect -";

#[derive(Debug, clap::Args)]
pub(crate) struct InspectArgs {
    /// The model to study (`-`: standard input).
    input: PathBuf,
    /// Count BatchNormalization nodes in training mode as foldable (see `fuse --allow-training`).
    #[arg(long)]
    allow_training: bool,
    /// Print the blocks as JSON: see the README for its fields.
    #[arg(long)]
    json: bool,
    /// Input size FLOPs are counted for: `224`, `320x256` (default: the model's declared
    /// size, or 224 on every spatial axis when it is symbolic).
    #[arg(long, value_name = "HxW", value_parser = input_size)]
    input_size: Option<Size>,
    /// Fold every block (writing nothing) and report how its fused kernel suits INT8:
    /// range, per-channel spread, outliers beyond 3σ, per-tensor and per-channel SQNR; flag
    /// the kernels likely to hurt per-tensor (and even per-channel) quantization.
    #[arg(long)]
    int8: bool,
}

/// A spatial size: one number per axis, or one for all.
#[derive(Debug, Clone)]
struct Size(Vec<usize>);

/// `224` or `320x256`: positive sizes.
fn input_size(s: &str) -> std::result::Result<Size, String> {
    s.split('x')
        .map(|d| match d.trim().parse::<usize>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(format!("'{s}' is not a size like 224 or 320x256")),
        })
        .collect::<std::result::Result<_, _>>()
        .map(Size)
}

/// What `inspect` was asked to do.
#[derive(Debug)]
pub(crate) struct InspectConfig {
    input: Source,
    options: InspectOptions,
    json: bool,
}

impl InspectArgs {
    pub(crate) fn config(self) -> InspectConfig {
        InspectConfig {
            input: Source::new(self.input),
            options: InspectOptions {
                allow_training_bn: self.allow_training,
                input_size: self.input_size.map(|s| s.0),
                int8: self.int8,
            },
            json: self.json,
        }
    }
}

pub(crate) fn run(config: InspectConfig) -> Result<()> {
    let report = match &config.input {
        Source::File(path) => {
            crate::inspect_file_with(path, &config.options).map_err(|e| input::explain(e, None))?
        }
        Source::Stdin => {
            let bytes = input::read_stdin()?;
            crate::inspect_model_named(bytes.clone(), &config.input.name(), &config.options)
                .map_err(|e| input::explain(e, Some(&bytes)))?
        }
    };
    let mut out = String::new();
    match config.json {
        true => out = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default() + "\n",
        false => print::inspect(&mut out, &report),
    }
    emit(&out)
}
