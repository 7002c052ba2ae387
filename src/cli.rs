//! Command-line interface: clap definitions (their doc comments are the help), and the printing
//! of reports. Results go to stdout; errors to stderr.

use std::path::PathBuf;

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::Result;
use clap::{Parser, Subcommand};
use onnx_repvgg::{BlockInfo, FuseReport, InspectReport, Options};

/// Fold RepVGG-style multi-branch blocks of an ONNX model into single convolutions.
///
/// Training-structure exports (parallel Conv+BatchNormalization branches and an identity, summed
/// by Add) become the deploy structure: one Conv with bias per block, the same outputs.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
#[command(
    after_help = "Examples:\n  onnx-repvgg fuse train.onnx deploy.onnx\n  onnx-repvgg fuse -v train.onnx deploy.onnx\n  onnx-repvgg inspect train.onnx\n\nExit codes: 0 success, 1 error, 2 usage."
)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fold every block of IN into one Conv and write the model to OUT.
    ///
    /// Prints one summary line; blocks that look like RepVGG blocks but could not be folded are
    /// listed with the reason. OUT gets a sidecar OUT.data when IN has external data.
    Fuse {
        /// The training-structure model.
        input: PathBuf,
        /// Where to write the deploy model (never over IN).
        output: PathBuf,
        /// Also print one line per fused block.
        #[arg(short, long)]
        verbose: bool,
        /// Fold BatchNormalization nodes exported in training mode, with their running
        /// statistics (inference semantics). Prints a warning.
        #[arg(long)]
        allow_training: bool,
        /// Check every fused block against its original subgraph on random inputs before
        /// writing, with an evaluator independent of the fold (the default).
        #[arg(long, overrides_with = "no_verify")]
        verify: bool,
        /// Skip the numerical check.
        #[arg(long, overrides_with = "verify")]
        no_verify: bool,
        /// Largest accepted relative deviation of a fused block (default: 1e-5 for float32
        /// weights, 1e-2 float16, 5e-2 bfloat16, 1e-9 float64).
        #[arg(long, value_name = "REL", value_parser = positive_float)]
        tolerance: Option<f64>,
    },
    /// List the blocks of IN: channels, stride, groups, branches, and whether each can be folded.
    Inspect {
        /// The model to study.
        input: PathBuf,
        /// Count BatchNormalization nodes in training mode as foldable (see `fuse --allow-training`).
        #[arg(long)]
        allow_training: bool,
    },
}

/// Runs one command.
pub fn run(args: Args) -> Result<()> {
    let mut out = String::new();
    match args.command {
        Command::Fuse {
            input,
            output,
            verbose,
            allow_training,
            verify: _,
            no_verify,
            tolerance,
        } => {
            let options = Options {
                allow_training_bn: allow_training,
                verify: !no_verify,
                tolerance,
            };
            let report = onnx_repvgg::fuse_file(&input, &output, options)?;
            if report.training_bn_folded > 0 {
                eprintln!(
                    "onnx-repvgg: warning: folded {} BatchNormalization nodes exported in training \
                     mode with their running statistics (the export's own forward pass updated \
                     them); re-exporting after model.eval() is safer",
                    report.training_bn_folded
                );
            }
            print_fuse(&mut out, &report, verbose);
        }
        Command::Inspect {
            input,
            allow_training,
        } => {
            let options = Options {
                allow_training_bn: allow_training,
                ..Options::default()
            };
            let report = onnx_repvgg::inspect_file(&input, options)?;
            print_inspect(&mut out, &report);
        }
    }
    emit(&out)
}

fn positive_float(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not a positive number")),
    }
}

/// Writes the results to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn print_fuse(out: &mut String, r: &FuseReport, verbose: bool) {
    let _ = writeln!(
        out,
        "fused {} blocks ({} without identity): {} → {} nodes, {} → {} parameters, {}{:.1} ms",
        r.fused.len(),
        r.fused_without_identity(),
        r.nodes_before,
        r.nodes_after,
        r.params_before,
        r.params_after,
        match r.worst() {
            Some(b) => format!(
                "verified (worst {:.1e} relative, {}), ",
                b.deviation.map_or(0.0, |d| d.rel),
                b.name
            ),
            None => String::new(),
        },
        r.elapsed.as_secs_f64() * 1e3
    );
    let rounding = r
        .fused
        .iter()
        .filter_map(|b| b.rounding_error)
        .fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
    if let Some(e) = rounding {
        let _ = writeln!(
            out,
            "  half-precision weights: folded in f64, rounded once (largest change {e:.1e} of the largest weight)"
        );
    }
    if verbose {
        let mut blocks: Vec<&BlockInfo> = r.fused.iter().chain(&r.skipped).collect();
        blocks.sort_by_key(|b| !b.fusable);
        print_table(out, &blocks, "  ", "status");
        return;
    }
    for b in &r.skipped {
        let _ = writeln!(
            out,
            "  skipped {} ({}, {}): {}",
            b.name,
            channels(b),
            shape(b),
            b.reason.as_deref().unwrap_or("")
        );
    }
}

/// `C_in→C_out`, or `?` where the weights are not constants.
fn channels(b: &BlockInfo) -> String {
    match (b.in_channels, b.out_channels) {
        (0, 0) => "?".into(),
        (i, o) => format!("{i}→{o}"),
    }
}

/// Branches, then what follows their sum: `3x3 + 1x1 + identity → BatchNormalization`.
fn shape(b: &BlockInfo) -> String {
    let mut s = b.branches.join(" + ");
    for op in &b.post {
        s += &format!(" → {op}");
    }
    s
}

fn stride(b: &BlockInfo) -> String {
    match b.stride.as_slice() {
        [] => "?".into(),
        [first, rest @ ..] if rest.iter().all(|s| s == first) => first.to_string(),
        all => all
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("x"),
    }
}

/// One row per block, columns padded to the widest cell; the last column says fused/fusable.
fn print_table(out: &mut String, blocks: &[&BlockInfo], indent: &str, last: &str) {
    let yes = if last == "status" { "fused" } else { "yes" };
    let rows: Vec<[String; 7]> = blocks
        .iter()
        .map(|b| {
            [
                b.name.clone(),
                channels(b),
                stride(b),
                b.groups.to_string(),
                shape(b),
                if b.has_identity() { "yes" } else { "none" }.into(),
                match (&b.reason, b.deviation) {
                    (None, Some(d)) => format!("{yes}, verified {:.1e}", d.rel),
                    (None, None) => yes.into(),
                    (Some(r), _) => format!("no: {r}"),
                },
            ]
        })
        .collect();
    let header = [
        "block", "channels", "stride", "groups", "branches", "identity", last,
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{indent}{}", cells.join("  ").trim_end());
    }
}

fn print_inspect(out: &mut String, r: &InspectReport) {
    let blocks: Vec<&BlockInfo> = r.blocks.iter().collect();
    print_table(out, &blocks, "", "fusable");
    let _ = writeln!(
        out,
        "{} blocks, {} without identity, {} fusable",
        r.blocks.len(),
        r.without_identity(),
        r.fusable()
    );
}
