//! `onnx-repvgg fuse`: its options, their check into a [`FuseConfig`], and the runs: one model
//! (files or pipes), a dry run, or a batch into `--out-dir`. A batch fuses its inputs one after
//! another, each with the whole worker pool (`ONNX_REPVGG_THREADS`) and checked against the
//! whole memory budget: never more threads or memory than one fusion asks for.

use std::path::{Path, PathBuf};

use super::input::{self, Source};
use super::{Failure, Result, emit, print, to_stderr, usage_error, warn};
use crate::{FuseReport, Options};

pub(crate) const EXAMPLES: &str = "Examples:\n  onnx-repvgg fuse train.onnx deploy.onnx\n  onnx-repvgg fuse --strict -q train.onnx deploy.onnx && ship deploy.onnx\n  onnx-repvgg fuse a.onnx b.onnx --out-dir deploy/\n  onnx-repvgg fuse --dry-run --json train.onnx\n  cat train.onnx | onnx-repvgg fuse - - > deploy.onnx\n\nExit codes: 0 success (also when there was nothing to fuse; candidates not fused are warnings\non stderr unless --strict), 1 error (nothing written), 2 usage (also a bad value of\nONNX_REPVGG_THREADS or ONNX_REPVGG_MEMORY_LIMIT: see onnx-repvgg --help).";

#[derive(Debug, clap::Args)]
pub(crate) struct FuseArgs {
    /// IN OUT; with --out-dir or --dry-run, the inputs.
    #[arg(required = true, value_name = "IN OUT | IN...")]
    paths: Vec<PathBuf>,
    /// Write each input's deploy model into this existing directory, under its own file name.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Also print a table of every block: fused, not fused (why), and the sums that are no
    /// blocks (why).
    #[arg(short, long, conflicts_with = "quiet")]
    verbose: bool,
    /// Print nothing but errors and warnings (no summary, no progress).
    #[arg(short, long)]
    quiet: bool,
    /// Print the report as JSON (an array with --out-dir or several dry-run inputs): see the
    /// README for its fields.
    #[arg(long, conflicts_with_all = ["quiet", "verbose"])]
    json: bool,
    /// Fold BatchNormalization nodes exported in training mode, with their running
    /// statistics (inference semantics), with a warning. Without it such a block is an error.
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
    /// Fold and verify every block and report, but write nothing: every path is an input.
    #[arg(long, short = 'n', conflicts_with = "out_dir")]
    dry_run: bool,
    /// Flush each output to disk before renaming it into place, so that it survives a power
    /// cut (off by default, as with cp; the output appears whole or not at all either way).
    #[arg(long, conflicts_with = "dry_run")]
    sync: bool,
    /// Fail (exit 1, write nothing) when any candidate block cannot be fused; the error
    /// lists them with the reasons. Without it they are warnings on stderr.
    #[arg(long)]
    strict: bool,
}

fn positive_float(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not a positive number")),
    }
}

/// What `fuse` was asked to do, checked.
#[derive(Debug)]
pub(crate) struct FuseConfig {
    jobs: Jobs,
    options: Options,
    verbose: bool,
    quiet: bool,
    json: bool,
}

/// The fusions of one run.
#[derive(Debug)]
enum Jobs {
    /// IN OUT; either may be standard input / output.
    One { input: Source, output: Target },
    /// Every input folded and verified, nothing written (one `-` at most, alone).
    DryRun(Vec<Source>),
    /// Every input written into a folder, under its own name.
    Batch(Vec<(PathBuf, PathBuf)>),
}

/// Where a deploy model goes.
#[derive(Debug)]
enum Target {
    File(PathBuf),
    Stdout,
}

impl FuseArgs {
    /// Checks the command line: the paths fit the mode, an output folder exists and no two
    /// inputs would be written to one file. Usage errors print `fuse`'s usage.
    pub(crate) fn config(self) -> Result<FuseConfig> {
        let options = Options {
            allow_training_bn: self.allow_training,
            verify: !self.no_verify,
            tolerance: self.tolerance,
            sync: self.sync,
            strict: self.strict,
        };
        let jobs = match (self.dry_run, self.out_dir) {
            (true, _) => {
                if self.paths.len() > 1 && self.paths.iter().any(|p| input::is_pipe(p)) {
                    return Err(usage_error(
                        "fuse",
                        "standard input (-) can only be dry-run alone",
                    ));
                }
                Jobs::DryRun(self.paths.into_iter().map(Source::new).collect())
            }
            (false, Some(dir)) => Jobs::Batch(batch(self.paths, &dir)?),
            (false, None) => match <[PathBuf; 2]>::try_from(self.paths) {
                Ok([input, output]) => Jobs::One {
                    input: Source::new(input),
                    output: match input::is_pipe(&output) {
                        true => Target::Stdout,
                        false => Target::File(output),
                    },
                },
                Err(paths) => {
                    return Err(usage_error(
                        "fuse",
                        format!(
                            "fuse takes IN OUT, or inputs with --out-dir DIR or --dry-run ({} path{} given)",
                            paths.len(),
                            if paths.len() == 1 { "" } else { "s" }
                        ),
                    ));
                }
            },
        };
        Ok(FuseConfig {
            jobs,
            options,
            verbose: self.verbose,
            quiet: self.quiet,
            json: self.json,
        })
    }
}

/// Each input and its output in `dir`: the folder must exist (one error, before any input),
/// standard input cannot take part, and no two inputs may share a file name.
fn batch(inputs: Vec<PathBuf>, dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    if let Some(pipe) = inputs.iter().find(|p| input::is_pipe(p)) {
        return Err(usage_error(
            "fuse",
            format!(
                "{}: standard input cannot be part of an --out-dir batch",
                pipe.display()
            ),
        ));
    }
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Failure::Failed(format!(
                "{}: --out-dir is not a directory",
                dir.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Failure::Failed(format!(
                "{}: output directory does not exist",
                dir.display()
            )));
        }
        Err(e) => return Err(Failure::Failed(format!("{}: {e}", dir.display()))),
    }
    let mut names = std::collections::HashSet::new();
    inputs
        .into_iter()
        .map(|input| {
            let Some(name) = input.file_name() else {
                return Err(Failure::Failed(format!(
                    "{}: not a file name",
                    input.display()
                )));
            };
            let output = dir.join(name);
            if !names.insert(output.clone()) {
                return Err(Failure::Failed(format!(
                    "{}: two inputs would be written there",
                    output.display()
                )));
            }
            Ok((input, output))
        })
        .collect()
}

/// Runs the fusions `config` asks for.
pub(crate) fn run(config: FuseConfig) -> Result<()> {
    match &config.jobs {
        Jobs::One { input, output } => one(&config, input, output),
        Jobs::DryRun(inputs) => {
            let several = inputs.len() > 1;
            let runs = inputs.iter().map(|input| {
                let name = input.name();
                let report = match input {
                    Source::File(path) => crate::dry_run_file(path, config.options)
                        .map_err(|e| input::explain(e, None)),
                    Source::Stdin => in_memory(input, None, config.options).map(|(_, r)| r),
                };
                (name, None, report)
            });
            each(&config, several, runs)
        }
        Jobs::Batch(pairs) => {
            let runs = pairs.iter().map(|(input, output)| {
                let report = to_file(&config, input, output);
                (input.clone(), Some(output.clone()), report)
            });
            each(&config, true, runs)
        }
    }
}

/// One fusion, IN OUT: the report on stdout, or on stderr when stdout carries the model.
fn one(config: &FuseConfig, input: &Source, output: &Target) -> Result<()> {
    let report = match (input, output) {
        (Source::File(path), Target::File(out)) => to_file(config, path, out)?,
        (_, Target::File(out)) => in_memory(input, Some(out), config.options)?.1,
        (_, Target::Stdout) => {
            use std::io::IsTerminal;
            if std::io::stdout().is_terminal() {
                return Err(Failure::Failed(
                    "refusing to write a binary model to a terminal: redirect standard output"
                        .into(),
                ));
            }
            in_memory(input, None, config.options)
                .and_then(|(model, report)| write_stdout(&model).map(|()| report))?
        }
    };
    let name = input.name();
    let text = match (config.json, config.quiet) {
        (true, _) => {
            let mut value = report.to_json();
            value["input"] = name.display().to_string().into();
            value["output"] = match output {
                Target::File(path) => path.display().to_string().into(),
                Target::Stdout => "-".into(),
            };
            value["dry_run"] = false.into();
            pretty(&value)
        }
        (false, true) => String::new(),
        (false, false) => {
            let mut text = String::new();
            print::fuse_summary(&mut text, &report, config.verbose);
            text
        }
    };
    // The result first, then what is wrong with it.
    match output {
        Target::Stdout => to_stderr(&text),
        Target::File(_) => emit(&text)?,
    }
    for warning in print::fuse_warnings(&name, &report) {
        warn(warning);
    }
    Ok(())
}

/// The runs of a dry run or a batch, one after another: each report printed as it comes (the
/// JSON array at the end); a failing input does not stop the others, but the run exits 1.
fn each(
    config: &FuseConfig,
    several: bool,
    runs: impl Iterator<Item = (PathBuf, Option<PathBuf>, Result<FuseReport>)>,
) -> Result<()> {
    let dry_run = matches!(config.jobs, Jobs::DryRun(_));
    let mut values = Vec::new();
    let mut failed = 0;
    let mut total = 0;
    for (input, output, report) in runs {
        total += 1;
        let report = match report {
            Ok(report) => report,
            Err(failure) if !several => return Err(failure),
            Err(failure) => {
                failed += 1;
                let message = match failure {
                    Failure::Usage(e) => e.to_string(),
                    Failure::Invalid(m) | Failure::Failed(m) => m,
                };
                to_stderr(&format!("{}: {message}\n", super::NAME));
                if config.json {
                    values.push(serde_json::json!({
                        "input": input.display().to_string(),
                        "output": output.map(|o| o.display().to_string()),
                        "dry_run": dry_run,
                        "error": message,
                    }));
                }
                continue;
            }
        };
        if config.json {
            let mut value = report.to_json();
            value["input"] = input.display().to_string().into();
            value["output"] = output.map(|o| o.display().to_string()).into();
            value["dry_run"] = dry_run.into();
            values.push(value);
        } else if !config.quiet {
            let mut text = match &output {
                None => format!("{} (dry run, nothing written): ", input.display()),
                Some(output) => format!("{} → {}: ", input.display(), output.display()),
            };
            print::fuse_summary(&mut text, &report, config.verbose);
            emit(&text)?;
        }
        for warning in print::fuse_warnings(&input, &report) {
            warn(warning);
        }
    }
    if config.json {
        let value = match values.len() {
            1 if !several => values.remove(0),
            _ => serde_json::Value::Array(values),
        };
        emit(&pretty(&value))?;
    }
    match failed {
        0 => Ok(()),
        n => Err(Failure::Failed(format!("{n} of {total} inputs failed"))),
    }
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

/// Fuses the file `input` into the file `output`, with a progress bar on a terminal.
fn to_file(config: &FuseConfig, input: &Path, output: &Path) -> Result<FuseReport> {
    let bar = progress_bar(config.quiet || config.json, input);
    let tick = |done: usize, total: usize| {
        if let Some(bar) = &bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    };
    let report = crate::fuse_file_with_progress(input, output, config.options, &tick);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    report.map_err(|e| input::explain(e, None))
}

/// Fuses in memory (a pipe at either end): the model from `input`, the deploy model written to
/// `output`, or returned (for standard output; empty in a dry run, where it is dropped).
fn in_memory(
    input: &Source,
    output: Option<&Path>,
    options: Options,
) -> Result<(Vec<u8>, FuseReport)> {
    let name = input.name();
    let bytes = match input {
        Source::Stdin => input::read_stdin()?,
        Source::File(path) => {
            // Standard output carries one stream: a model whose tensors live in a sidecar
            // cannot go there.
            let model = crate::onnx::Model::open(path).map_err(|e| input::explain(e, None))?;
            if model.has_external_data() {
                return Err(Failure::Failed(format!(
                    "{}: the model keeps its tensors in external data, and standard output cannot carry a sidecar file: write the output to a file",
                    path.display()
                )));
            }
            bytes::Bytes::from(
                std::fs::read(path)
                    .map_err(|e| Failure::Failed(format!("{}: {e}", path.display())))?,
            )
        }
    };
    let (model, report) = crate::fuse_model_named(bytes.clone(), &name, options)
        .map_err(|e| input::explain(e, Some(&bytes)))?;
    if let Some(output) = output {
        crate::onnx::output::write_bytes(output, &model, options.sync)?;
    }
    Ok((model, report))
}

fn write_stdout(model: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(model)
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::Failed(format!("<stdout>: {e}")))
}

/// A progress bar on stderr for long runs, when it is a terminal.
fn progress_bar(quiet: bool, input: &Path) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} blocks")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(input.display().to_string());
    Some(bar)
}
