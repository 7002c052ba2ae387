//! The command line: the clap definitions of the top level (their doc comments are the help),
//! the one place that turns a run's outcome into an exit code, and the dispatch to one module
//! per subcommand. Each subcommand converts its raw arguments once into a validated config,
//! then runs; `print` formats what they report.
//!
//! Exit codes: 0 success (also "nothing to fuse"), 1 error (nothing written), 2 usage (bad
//! arguments or environment variables). Results go to stdout; errors (one line,
//! `onnx-repvgg: …`) and warnings to stderr. [`main`] never exits the process: the binary
//! (`src/main.rs`) and the Python package both call it and use its return value.
//!
//! Errors: the library's [`crate::Error`] and clap's usage errors, sorted into a `Failure`
//! that knows its exit code; no other error type.

mod dot;
mod fuse;
mod input;
mod inspect;
mod man;
mod print;

use std::io::Write as _;

use clap::{CommandFactory, Parser, Subcommand};

/// The program's name, as people type it.
pub const NAME: &str = "onnx-repvgg";

/// What the top-level help, the man page and the README say of the environment.
const ENVIRONMENT: &[(&str, &str)] = &[
    (
        crate::producer::THREADS_VAR,
        "Worker threads that fold the weights (default: one per core; batch mode fuses one input \
         at a time with all of them). A whole number from 1 to 1024; any other value is a usage \
         error (exit 2); empty means unset.",
    ),
    (
        crate::memory::LIMIT_VARIABLE,
        "Memory the tool may use, instead of what the system and its cgroup report as available: \
         bytes, or a number with a unit K, M, G or T (KB, KiB alike: powers of 1024), e.g. 512M \
         or 1.5GiB. A run that would need more is refused before it writes anything. Any other \
         value is a usage error (exit 2); empty means unset.",
    ),
];

/// What the help and the man page say of exit codes.
const EXIT_CODES: &[(&str, &str)] = &[
    (
        "0",
        "success, also when there was nothing to fuse; candidate blocks that could not be fused \
         are warnings on stderr (see fuse --strict)",
    ),
    (
        "1",
        "error: nothing was written (in batch mode: some inputs failed)",
    ),
    (
        "2",
        "usage: bad arguments or options, or a bad value of an environment variable",
    ),
];

/// Fold RepVGG-style multi-branch blocks of an ONNX model into single convolutions.
///
/// Training-structure exports (parallel Conv+BatchNormalization branches and an identity, summed
/// by Add) become the deploy structure: one Conv with bias per block, the same outputs.
#[derive(Debug, Parser)]
#[command(name = NAME, version = VERSION, about, long_about, after_help = after_help())]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fold every block of IN into one Conv and write the model to OUT.
    ///
    /// Prints one summary line on stdout. Candidate blocks that cannot be folded are warnings
    /// on stderr, with the reason (--strict makes them an error). OUT gets a sidecar OUT.data
    /// when IN has external data. With --out-dir, every argument is an input, fused to
    /// DIR/<its file name>, one after another. IN or OUT may be `-` for standard input / output
    /// (models without external data); the summary then goes to stderr.
    #[command(after_help = fuse::EXAMPLES)]
    Fuse(fuse::FuseArgs),
    /// List the blocks of IN: channels, stride, groups, branches, parameters and FLOPs before →
    /// after, and whether each can be folded (or why not).
    ///
    /// Sums that look like blocks but are none (residual connections: their summands read
    /// tensors that a nonlinearity separates) are listed too, with the reason. IN may be `-`
    /// for standard input.
    #[command(after_help = inspect::EXAMPLES)]
    Inspect(inspect::InspectArgs),
    /// Draw the block structure of IN before and after fusion as Graphviz DOT, or as a picture.
    ///
    /// Before: every operator, each block's nodes filled in its own colour, identity branches
    /// bold red; after: each folded block as its one Conv. With --block, only that block. IN
    /// may be `-` for standard input.
    #[command(after_help = dot::EXAMPLES)]
    Dot(dot::DotArgs),
    /// Print a shell completion script.
    ///
    /// bash: `onnx-repvgg completions bash > ~/.local/share/bash-completion/completions/onnx-repvgg`;
    /// zsh: into a folder of $fpath as `_onnx-repvgg`; fish: into
    /// ~/.config/fish/completions/onnx-repvgg.fish.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), every subcommand on one page: `onnx-repvgg man > onnx-repvgg.1; man ./onnx-repvgg.1`.
    Man,
}

fn after_help() -> String {
    let mut text = String::from(
        "Examples:\n  onnx-repvgg fuse train.onnx deploy.onnx\n  onnx-repvgg fuse -v train.onnx deploy.onnx\n  onnx-repvgg fuse --dry-run train.onnx\n  onnx-repvgg inspect train.onnx\n  onnx-repvgg dot train.onnx --block stage1.0 -o block.svg\n  onnx-repvgg completions bash > ~/.local/share/bash-completion/completions/onnx-repvgg\n\nEnvironment:\n",
    );
    for (name, what) in ENVIRONMENT {
        text += &format!("  {name}\n{}", wrap(what, "      "));
    }
    text += "\nExit codes:\n";
    for (code, what) in EXIT_CODES {
        let body = wrap(what, "     ");
        text += &format!("  {code}  {}", body.trim_start());
    }
    text
}

/// `text` filled into lines of at most 92 characters, each starting with `indent`.
fn wrap(text: &str, indent: &str) -> String {
    const WIDTH: usize = 92;
    let mut out = String::new();
    let mut line = String::from(indent);
    for word in text.split_whitespace() {
        if line.len() > indent.len() && line.len() + 1 + word.len() > WIDTH {
            out += &line;
            out.push('\n');
            line = String::from(indent);
        }
        if line.len() > indent.len() {
            line.push(' ');
        }
        line += word;
    }
    out + &line + "\n"
}

/// Why a run did not succeed, and so its exit code.
#[derive(Debug)]
pub(crate) enum Failure {
    /// A bad command line, reported by clap with the (sub)command's usage: exit 2.
    Usage(clap::Error),
    /// A bad value the command line or the environment gave, in one line: exit 2.
    Invalid(String),
    /// The run failed, in one line: exit 1.
    Failed(String),
}

impl Failure {
    /// Prints the failure on stderr and returns its exit code.
    fn report(self) -> u8 {
        match self {
            Failure::Usage(usage) => {
                let _ = usage.print();
                2
            }
            Failure::Invalid(message) => {
                to_stderr(&format!("{NAME}: {message}\n"));
                2
            }
            Failure::Failed(message) => {
                to_stderr(&format!("{NAME}: {message}\n"));
                1
            }
        }
    }
}

impl From<crate::Error> for Failure {
    fn from(error: crate::Error) -> Failure {
        let usage = match &error {
            crate::Error::Environment { .. } => true,
            crate::Error::InFile { error, .. } => {
                matches!(**error, crate::Error::Environment { .. })
            }
            _ => false,
        };
        match usage {
            true => Failure::Invalid(environment_error(&error)),
            false => Failure::Failed(error.to_string()),
        }
    }
}

/// The message of an environment error, without the file a run had in hand: the variable is
/// the culprit.
fn environment_error(error: &crate::Error) -> String {
    match error {
        crate::Error::InFile { error, .. } => error.to_string(),
        other => other.to_string(),
    }
}

type Result<T, E = Failure> = std::result::Result<T, E>;

/// What `--version` prints after the name: the crate version and, when built from a git
/// checkout, the commit (`0.1.0 (abc1234)`).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), env!("ONNX_REPVGG_COMMIT"));

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
        Err(failure) => failure.report(),
    }
}

/// Runs one command.
fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Fuse(args) => {
            check_environment()?;
            fuse::run(args.config()?)
        }
        Command::Inspect(args) => {
            check_environment()?;
            inspect::run(args.config())
        }
        Command::Dot(args) => dot::run(args.config()?),
        Command::Completions { shell } => emit(&man::completions(shell)),
        Command::Man => emit(&man::page()),
    }
}

/// The environment variables a run reads are valid (a usage error, exit 2, before any work).
fn check_environment() -> Result<()> {
    crate::producer::threads_from_env()?;
    crate::memory::limit_from_env()?;
    Ok(())
}

/// The clap definition of the subcommand `name`, built (its usage names `onnx-repvgg name`).
fn subcommand(name: &str) -> clap::Command {
    let mut top = Args::command();
    top.build();
    top.find_subcommand(name).cloned().unwrap_or(top)
}

/// A usage error of the subcommand `name`: clap prints the message and that subcommand's usage.
fn usage_error(name: &str, message: impl std::fmt::Display) -> Failure {
    Failure::Usage(subcommand(name).error(clap::error::ErrorKind::WrongNumberOfValues, message))
}

/// Writes the results to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Failed(format!("<stdout>: {e}"))),
        Ok(()) => Ok(()),
    }
}

/// Prints a warning on stderr (also with `-q`: it says something about the result).
fn warn(message: impl std::fmt::Display) {
    to_stderr(&format!("{NAME}: warning: {message}\n"));
}

/// Writes to stderr; a closed stderr is no reason to panic (`eprintln!` would, and the Python
/// package runs [`main`] in its own process).
fn to_stderr(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
