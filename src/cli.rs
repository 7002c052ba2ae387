//! Command-line interface: clap definitions (their doc comments are the help), and the printing
//! of reports. Results go to stdout; errors to stderr. The binary (`src/main.rs`) is [`main`];
//! so is the `onnx-repvgg` command of the Python package.

use std::path::PathBuf;

use std::fmt::Write as _;
use std::io::Write as _;

use crate::{BlockInfo, FuseReport, InspectReport, Options};
use clap::{Parser, Subcommand};

type Result<T, E = anyhow::Error> = std::result::Result<T, E>;

/// Fold RepVGG-style multi-branch blocks of an ONNX model into single convolutions.
///
/// Training-structure exports (parallel Conv+BatchNormalization branches and an identity, summed
/// by Add) become the deploy structure: one Conv with bias per block, the same outputs.
#[derive(Debug, Parser)]
#[command(version = VERSION, about, long_about)]
#[command(
    after_help = "Examples:\n  onnx-repvgg fuse train.onnx deploy.onnx\n  onnx-repvgg fuse -v train.onnx deploy.onnx\n  onnx-repvgg fuse --dry-run train.onnx\n  onnx-repvgg inspect train.onnx\n  onnx-repvgg dot train.onnx --block stage1.0 -o block.svg\n  onnx-repvgg completions bash > /etc/bash_completion.d/onnx-repvgg\n\nExit codes: 0 success, 1 error, 2 usage."
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
    /// With --out-dir, every argument is an input, fused to DIR/<its file name>, all in parallel.
    /// IN or OUT may be `-` for standard input / output (models without external data); the
    /// summary then goes to stderr.
    #[command(
        after_help = "Examples:\n  onnx-repvgg fuse train.onnx deploy.onnx\n  onnx-repvgg fuse a.onnx b.onnx --out-dir deploy/\n  onnx-repvgg fuse --dry-run --json train.onnx\n  cat train.onnx | onnx-repvgg fuse - - > deploy.onnx"
    )]
    Fuse {
        /// IN OUT, or with --out-dir the inputs.
        #[arg(required = true, value_name = "IN OUT | IN...")]
        paths: Vec<PathBuf>,
        /// Write each input's deploy model into this directory, under its own file name.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
        /// Also print one line per fused block.
        #[arg(short, long, conflicts_with = "quiet")]
        verbose: bool,
        /// Print nothing but errors (no summary, no progress).
        #[arg(short, long)]
        quiet: bool,
        /// Print the report as JSON (an array with --out-dir): see the README for its fields.
        #[arg(long, conflicts_with_all = ["quiet", "verbose"])]
        json: bool,
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
        /// Fold and verify every block and report, but write nothing: every path is an input.
        #[arg(long, short = 'n', conflicts_with = "out_dir")]
        dry_run: bool,
        /// Flush each output to disk before renaming it into place, so that it survives a power
        /// cut (off by default, as with cp; the output appears whole or not at all either way).
        #[arg(long, conflicts_with = "dry_run")]
        sync: bool,
    },
    /// List the blocks of IN: channels, stride, groups, branches, parameters and FLOPs before →
    /// after, and whether each can be folded (or why not).
    #[command(
        after_help = "Examples:\n  onnx-repvgg inspect train.onnx\n  onnx-repvgg inspect --input-size 320x320 train.onnx\n  onnx-repvgg inspect --int8 train.onnx\n  onnx-repvgg inspect --json train.onnx | jq '.summary'"
    )]
    Inspect {
        /// The model to study.
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
        /// the kernels likely to hurt per-tensor quantization.
        #[arg(long)]
        int8: bool,
    },
    /// Draw the block structure of IN before and after fusion as Graphviz DOT (or SVG).
    ///
    /// Before: every operator, each block's nodes filled in its own colour, identity branches
    /// bold red; after: each folded block as its one Conv. With --block, only that block.
    #[command(
        after_help = "Examples:\n  onnx-repvgg dot train.onnx > model.dot\n  onnx-repvgg dot train.onnx --block stage2.1 -o block.svg   (needs Graphviz `dot`)"
    )]
    Dot {
        /// The model to draw.
        input: PathBuf,
        /// Draw only this block (a name `inspect` lists).
        #[arg(long, value_name = "NAME")]
        block: Option<String>,
        /// Write here instead of stdout; a name ending in .svg is rendered with Graphviz `dot`.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Draw blocks with BatchNormalization in training mode as foldable.
        #[arg(long)]
        allow_training: bool,
    },
    /// Print a shell completion script: `onnx-repvgg completions bash > ~/.local/share/bash-completion/completions/onnx-repvgg`.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `onnx-repvgg man > onnx-repvgg.1; man ./onnx-repvgg.1`.
    Man,
}

/// What `--version` prints after the name: the crate version and, when built from a git
/// checkout, the commit (`0.1.0 (abc1234)`).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), env!("ONNX_REPVGG_COMMIT"));

/// The whole command line, as the `onnx-repvgg` binary (and the Python package's command) runs
/// it: parses `args` (the program name first), runs the command, prints an error once on
/// stderr, and returns the exit code: 0 success, 1 error, 2 usage.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> u8 {
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 2.
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(args) {
        Ok(()) => 0,
        Err(err) if err.is::<clap::Error>() => {
            if let Ok(usage) = err.downcast::<clap::Error>() {
                let _ = usage.print();
            }
            2
        }
        Err(err) => {
            eprintln!("onnx-repvgg: {err:#}");
            1
        }
    }
}

/// glibc returns every freed block over 128 KiB to the kernel at once (unmapped, or trimmed off
/// the heap), so each new buffer of a fold is faulted in and zeroed page by page again: about a
/// third of the system time on big models. Keeping freed memory for reuse costs nothing here,
/// since the buffers are the same size run after run. For processes that run the command line:
/// the binary, and the Python package's `onnx-repvgg` (not its library functions, which run
/// inside someone else's program).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; glibc takes the main arena's lock for it,
    // so other threads (the Python interpreter's) may be allocating meanwhile.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Runs one command.
pub fn run(args: Args) -> Result<()> {
    let mut out = String::new();
    match args.command {
        Command::Fuse {
            paths,
            out_dir,
            verbose,
            quiet,
            json,
            allow_training,
            verify: _,
            no_verify,
            tolerance,
            dry_run,
            sync,
        } => {
            let options = Options {
                allow_training_bn: allow_training,
                verify: !no_verify,
                tolerance,
                sync,
                strict: false,
            };
            let jobs = jobs(paths, out_dir, dry_run)?;
            if let [job] = jobs.as_slice()
                && (is_pipe(&job.input) || is_pipe(&job.output))
            {
                let report = fuse_piped(job, options)?;
                // Standard output may carry the model: the report goes to stderr then.
                let mut text = String::new();
                if json {
                    text = serde_json::to_string_pretty(&report.to_json())? + "\n";
                } else if !quiet {
                    print_fuse(&mut text, &report, verbose);
                }
                if is_pipe(&job.output) {
                    eprint!("{text}");
                    return Ok(());
                }
                return emit(&text);
            }
            let batch = jobs.len() > 1 || jobs.iter().any(|j| j.batch);
            let fuse_one = |job: &Job| {
                let bar = progress_bar(quiet || json || batch, &job.input);
                let tick = |done: usize, total: usize| {
                    if let Some(bar) = &bar {
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                    }
                };
                let report = match dry_run {
                    true => crate::dry_run_file(&job.input, options),
                    false => {
                        crate::fuse_file_with_progress(&job.input, &job.output, options, &tick)
                    }
                }
                .map_err(anyhow::Error::from);
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                report
            };
            let results = run_all(jobs, fuse_one);
            let mut failed = 0;
            let mut reports = Vec::new();
            for (job, result) in results {
                match result {
                    Ok(report) if json => {
                        let mut value = report.to_json();
                        value["input"] = job.input.display().to_string().into();
                        value["output"] = match dry_run {
                            true => serde_json::Value::Null,
                            false => job.output.display().to_string().into(),
                        };
                        value["dry_run"] = dry_run.into();
                        reports.push(value);
                    }
                    Ok(report) => {
                        if report.training_bn_folded > 0 {
                            eprintln!(
                                "onnx-repvgg: warning: {}: folded {} BatchNormalization nodes exported in \
                                 training mode with their running statistics (the export's own forward \
                                 pass updated them); re-exporting after model.eval() is safer",
                                job.input.display(),
                                report.training_bn_folded
                            );
                        }
                        if !quiet {
                            if dry_run {
                                let _ = write!(
                                    out,
                                    "{} (dry run, nothing written): ",
                                    job.input.display()
                                );
                            } else if batch {
                                let _ = write!(
                                    out,
                                    "{} → {}: ",
                                    job.input.display(),
                                    job.output.display()
                                );
                            }
                            print_fuse(&mut out, &report, verbose);
                        }
                    }
                    Err(e) if !batch => return Err(e),
                    Err(e) => {
                        failed += 1;
                        eprintln!("onnx-repvgg: {e:#}");
                    }
                }
            }
            if json {
                let value = match reports.len() {
                    1 if !batch => reports.remove(0),
                    _ => serde_json::Value::Array(reports),
                };
                out = serde_json::to_string_pretty(&value)? + "\n";
            }
            emit(&out)?;
            if failed > 0 {
                anyhow::bail!("{failed} of the inputs failed");
            }
            return Ok(());
        }
        Command::Inspect {
            input,
            allow_training,
            json,
            input_size,
            int8,
        } => {
            let options = crate::InspectOptions {
                allow_training_bn: allow_training,
                input_size: input_size.map(|s| s.0),
                int8,
            };
            let report = crate::inspect_file_with(&input, &options)?;
            if json {
                out = serde_json::to_string_pretty(&report.to_json())? + "\n";
            } else {
                print_inspect(&mut out, &report);
            }
        }
        Command::Dot {
            input,
            block,
            output,
            allow_training,
        } => {
            let options = Options {
                allow_training_bn: allow_training,
                ..Options::default()
            };
            let dot = crate::dot_file(&input, block.as_deref(), options)?;
            let Some(output) = output else {
                return emit(&dot);
            };
            let svg = output
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
            let bytes = match svg {
                true => render_svg(&dot)?,
                false => dot.into_bytes(),
            };
            crate::onnx::output::write_bytes(&output, &bytes, false)?;
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut bytes = Vec::new();
            clap_complete::generate(shell, &mut Args::command(), "onnx-repvgg", &mut bytes);
            out = String::from_utf8(bytes)?;
        }
        Command::Man => {
            use clap::CommandFactory;
            let mut bytes = Vec::new();
            clap_mangen::Man::new(Args::command()).render(&mut bytes)?;
            out = String::from_utf8(bytes)?;
        }
    }
    emit(&out)
}

/// One input and where its deploy model goes.
struct Job {
    input: PathBuf,
    output: PathBuf,
    /// Part of an --out-dir batch.
    batch: bool,
}

/// IN OUT, or every path an input written into `out_dir` (or, in a dry run, nowhere).
fn jobs(paths: Vec<PathBuf>, out_dir: Option<PathBuf>, dry_run: bool) -> Result<Vec<Job>> {
    if dry_run {
        let batch = paths.len() > 1;
        return Ok(paths
            .into_iter()
            .map(|input| Job {
                output: PathBuf::new(),
                input,
                batch,
            })
            .collect());
    }
    if out_dir.is_some()
        && let Some(pipe) = paths.iter().find(|p| is_pipe(p))
    {
        anyhow::bail!(
            "{}: standard input cannot be part of an --out-dir batch",
            pipe.display()
        );
    }
    match out_dir {
        Some(dir) => {
            let jobs: Vec<Job> = paths
                .into_iter()
                .map(|input| {
                    let name = input
                        .file_name()
                        .ok_or_else(|| anyhow::anyhow!("{}: not a file name", input.display()))?;
                    Ok(Job {
                        output: dir.join(name),
                        input,
                        batch: true,
                    })
                })
                .collect::<Result<_>>()?;
            let mut names = std::collections::HashSet::new();
            if let Some(twice) = jobs.iter().find(|j| !names.insert(j.output.clone())) {
                anyhow::bail!(
                    "{}: two inputs would be written there",
                    twice.output.display()
                );
            }
            Ok(jobs)
        }
        None => match <[PathBuf; 2]>::try_from(paths) {
            Ok([input, output]) => Ok(vec![Job {
                input,
                output,
                batch: false,
            }]),
            Err(paths) => {
                use clap::CommandFactory;
                let usage = Args::command().error(
                    clap::error::ErrorKind::WrongNumberOfValues,
                    format!(
                        "fuse takes IN OUT, or inputs with --out-dir DIR ({} paths given)",
                        paths.len()
                    ),
                );
                Err(usage.into())
            }
        },
    }
}

/// Renders DOT to SVG with Graphviz.
fn render_svg(dot: &str) -> Result<Vec<u8>> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("cannot run Graphviz `dot` ({e}): install Graphviz, or write .dot")
        })?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("dot: no stdin"))?;
    let text = dot.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let result = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("dot: writer panicked"))??;
    if !result.status.success() {
        anyhow::bail!(
            "Graphviz `dot` failed: {}",
            String::from_utf8_lossy(&result.stderr).trim()
        );
    }
    Ok(result.stdout)
}

/// `-`: standard input or output.
fn is_pipe(path: &std::path::Path) -> bool {
    path.as_os_str() == "-"
}

/// Fuses a model read from stdin or written to stdout, in memory.
fn fuse_piped(job: &Job, options: Options) -> Result<FuseReport> {
    use std::io::{IsTerminal, Read};
    if is_pipe(&job.output) && std::io::stdout().is_terminal() {
        anyhow::bail!("refusing to write a binary model to a terminal: redirect standard output");
    }
    let (bytes, name) = if is_pipe(&job.input) {
        // The model and its fused copy sit in memory: read at most a third of what is free.
        let cap = crate::memory::available().map_or(u64::MAX, |m| m / 3);
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .take(cap.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| anyhow::anyhow!("<stdin>: {e}"))?;
        if bytes.len() as u64 > cap {
            anyhow::bail!(
                "<stdin>: not enough memory: a model over {} MiB cannot be fused through a pipe here; pass it as a file",
                cap >> 20
            );
        }
        (bytes, PathBuf::from("<stdin>"))
    } else {
        let bytes = std::fs::read(&job.input)
            .map_err(|e| anyhow::anyhow!("{}: {e}", job.input.display()))?;
        (bytes, job.input.clone())
    };
    let (model, report) = crate::fuse_model_named(bytes.into(), &name, options)?;
    if is_pipe(&job.output) {
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(&model)
            .and_then(|()| stdout.flush())
            .map_err(|e| anyhow::anyhow!("<stdout>: {e}"))?;
    } else {
        crate::onnx::output::write_bytes(&job.output, &model, options.sync)?;
    }
    Ok(report)
}

/// Runs `work` on every job, as many at a time as there are worker threads (one per core, see
/// [`crate::producer::workers`]), and returns the results in the jobs' order.
fn run_all<T: Send>(
    jobs: Vec<Job>,
    work: impl Fn(&Job) -> Result<T> + Sync,
) -> Vec<(Job, Result<T>)> {
    let cores = crate::producer::workers();
    let queue = std::sync::Mutex::new(jobs.into_iter().enumerate());
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..cores {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    let Some((i, job)) = next else { break };
                    let result = work(&job);
                    if let Ok(mut done) = done.lock() {
                        done.push((i, job, result));
                    }
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_default();
    done.sort_by_key(|(i, _, _)| *i);
    done.into_iter().map(|(_, job, r)| (job, r)).collect()
}

/// A progress bar on stderr for long runs, when it is a terminal.
fn progress_bar(quiet: bool, input: &std::path::Path) -> Option<indicatif::ProgressBar> {
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
        blocks.sort_by_key(|b| !b.is_fusable());
        print_table(out, &blocks, "  ", ["status", "fused"]);
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
/// `[header, yes]`: the last column's title and what it says of a fusable block.
fn print_table(out: &mut String, blocks: &[&BlockInfo], indent: &str, [last, yes]: [&str; 2]) {
    let rows: Vec<[String; 9]> = blocks
        .iter()
        .map(|b| {
            let before_after = |before: Option<u64>, after: Option<u64>| match (before, after) {
                (Some(x), Some(y)) => format!("{} → {}", count(x), count(y)),
                (Some(x), None) => count(x),
                _ => String::new(),
            };
            [
                b.name.clone(),
                channels(b),
                stride(b),
                b.groups.to_string(),
                shape(b),
                if b.has_identity() { "yes" } else { "none" }.into(),
                b.cost.map_or(String::new(), |c| {
                    before_after(Some(c.params_before), c.params_after)
                }),
                b.cost.map_or(String::new(), |c| {
                    before_after(c.flops_before, c.flops_after)
                }),
                match (&b.reason, b.deviation) {
                    (None, Some(d)) => format!("{yes}, verified {:.1e}", d.rel),
                    (None, None) => yes.into(),
                    (Some(r), _) => format!("no: {r}"),
                },
            ]
        })
        .collect();
    let header = [
        "block", "channels", "stride", "groups", "branches", "identity", "params", "FLOPs", last,
    ]
    .map(String::from);
    print_rows(out, indent, &header, &rows);
}

/// Rows under a header, columns padded to the widest cell; columns empty in every row are left
/// out.
fn print_rows<const N: usize>(
    out: &mut String,
    indent: &str,
    header: &[String; N],
    rows: &[[String; N]],
) {
    let used: Vec<usize> = (0..N)
        .filter(|&c| rows.is_empty() || rows.iter().any(|r| !r[c].is_empty()))
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(header).chain(rows) {
        let cells: Vec<String> = used
            .iter()
            .map(|&c| format!("{:<w$}", row[c], w = widths[c]))
            .collect();
        let _ = writeln!(out, "{indent}{}", cells.join("  ").trim_end());
    }
}

fn print_inspect(out: &mut String, r: &InspectReport) {
    let blocks: Vec<&BlockInfo> = r.blocks.iter().collect();
    print_table(out, &blocks, "", ["fusable", "yes"]);
    let _ = writeln!(
        out,
        "{} blocks, {} without identity, {} fusable",
        r.blocks.len(),
        r.without_identity(),
        r.fusable()
    );
    let [pb, pa, fb, fa] = r.totals();
    if let (Some(pb), Some(pa)) = (pb, pa) {
        let _ = write!(out, "blocks' parameters {} → {}", count(pb), count(pa));
        if let (Some(fb), Some(fa)) = (fb, fa) {
            let _ = write!(out, ", FLOPs {} → {}", count(fb), count(fa));
            if let Some(shape) = &r.input_shape {
                let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
                let _ = write!(out, " at input {}", dims.join("x"));
            }
        }
        let _ = writeln!(out);
    }
    if r.blocks.iter().any(|b| b.int8.is_some()) {
        let _ = writeln!(out);
        print_int8(out, r);
    }
}

/// The INT8 readiness table: one row per fused kernel.
fn print_int8(out: &mut String, r: &InspectReport) {
    let header = [
        "block",
        "min",
        "max",
        "channel spread",
        ">3σ",
        "SQNR tensor",
        "SQNR channel",
        "INT8",
    ]
    .map(String::from);
    let db = |v: f64| match v.is_finite() {
        true => format!("{v:.1} dB"),
        false => "exact".into(),
    };
    let rows: Vec<[String; 8]> = r
        .blocks
        .iter()
        .filter_map(|b| b.int8.map(|q| (b, q)))
        .map(|(b, q)| {
            [
                b.name.clone(),
                format!("{:.3}", q.min),
                format!("{:.3}", q.max),
                format!("{:.1}", q.channel_spread),
                format!("{:.2}%", 100.0 * q.outliers),
                db(q.sqnr_per_tensor_db),
                db(q.sqnr_per_channel_db),
                if q.is_risky() {
                    "per-tensor risky: use per-channel".into()
                } else {
                    "ok".into()
                },
            ]
        })
        .collect();
    print_rows(out, "", &header, &rows);
    let risky = r
        .blocks
        .iter()
        .filter(|b| b.int8.is_some_and(|q| q.is_risky()))
        .count();
    let _ = writeln!(
        out,
        "{risky} of {} fused kernels below {} dB SQNR with per-tensor INT8",
        rows.len(),
        crate::quant::RISK_SQNR_DB
    );
}

/// 1234567 → `1.23M`.
fn count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2}M", n as f64 / 1e6),
        _ => format!("{:.2}G", n as f64 / 1e9),
    }
}
