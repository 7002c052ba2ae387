//! `onnx-repvgg dot`: its options, their check into a [`DotConfig`] (the output format named by
//! the file's extension: DOT text for `.dot`/`.gv`, any other format Graphviz knows rendered by
//! Graphviz `dot`, anything else refused before any work), and the run.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::input::{self, Source};
use super::{Failure, Result, emit};
use crate::Options;

pub(crate) const EXAMPLES: &str = "Examples:\n  onnx-repvgg dot train.onnx > model.dot\n  onnx-repvgg dot train.onnx --block stage2.1 -o block.svg\n  onnx-repvgg dot train.onnx -o model.png\n  cat train.onnx | onnx-repvgg dot - -o model.pdf\n\nAny format Graphviz knows (svg, png, pdf, jpg, …) is rendered by its `dot` program, chosen by\nthe output file's extension; .dot and .gv files get the DOT text, as stdout does.";

#[derive(Debug, clap::Args)]
pub(crate) struct DotArgs {
    /// The model to draw (`-`: standard input).
    input: PathBuf,
    /// Draw only this block (a name `inspect` lists).
    #[arg(long, value_name = "NAME")]
    block: Option<String>,
    /// Write here instead of stdout, in the format its extension names: .dot or .gv for DOT
    /// text, .svg, .png, .pdf or any other format Graphviz knows rendered with Graphviz `dot`.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Draw blocks with BatchNormalization in training mode as foldable.
    #[arg(long)]
    allow_training: bool,
}

/// What `dot` was asked to do, checked.
#[derive(Debug)]
pub(crate) struct DotConfig {
    input: Source,
    block: Option<String>,
    output: Output,
    options: Options,
}

/// Where the picture goes, in which form.
#[derive(Debug)]
enum Output {
    Stdout,
    /// DOT text into a file.
    Text(PathBuf),
    /// Rendered by Graphviz in `format` (its `-T` name).
    Rendered {
        path: PathBuf,
        format: String,
    },
}

impl DotArgs {
    /// Checks the output format before any work: known to Graphviz, or refused.
    pub(crate) fn config(self) -> Result<DotConfig> {
        let output = match self.output {
            None => Output::Stdout,
            Some(path) if input::is_pipe(&path) => Output::Stdout,
            Some(path) => output_format(path)?,
        };
        Ok(DotConfig {
            input: Source::new(self.input),
            block: self.block,
            output,
            options: Options {
                allow_training_bn: self.allow_training,
                ..Options::default()
            },
        })
    }
}

/// The form `path`'s extension asks for.
fn output_format(path: PathBuf) -> Result<Output> {
    let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
        return Err(Failure::Invalid(format!(
            "{}: name the output format by the file's extension: .dot or .gv for DOT text, .svg, .png, .pdf or another format Graphviz knows",
            path.display()
        )));
    };
    let format = ext.to_ascii_lowercase();
    if matches!(format.as_str(), "dot" | "gv") {
        return Ok(Output::Text(path));
    }
    let known = graphviz_formats().map_err(|e| {
        Failure::Failed(format!(
            "{}: writing .{ext} needs Graphviz `dot`, which could not be run ({e}): install Graphviz, or write .dot",
            path.display()
        ))
    })?;
    if !known.contains(&format) {
        return Err(Failure::Invalid(format!(
            "{}: Graphviz cannot write .{ext} files; it knows: {}",
            path.display(),
            known.join(", ")
        )));
    }
    Ok(Output::Rendered { path, format })
}

/// The output formats of the installed Graphviz `dot` (`dot -T?` lists them when it refuses
/// the format `?`).
fn graphviz_formats() -> std::result::Result<Vec<String>, String> {
    let out = std::process::Command::new("dot")
        .arg("-T?")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stderr);
    let list = text
        .split_once("Use one of:")
        .map(|(_, list)| list)
        .ok_or_else(|| format!("unexpected answer to `dot -T?`: {}", text.trim()))?;
    // x11 and xlib open a window: no file formats.
    Ok(list
        .split_whitespace()
        .filter(|f| !matches!(*f, "x11" | "xlib"))
        .map(str::to_string)
        .collect())
}

pub(crate) fn run(config: DotConfig) -> Result<()> {
    let block = config.block.as_deref();
    let dot = match &config.input {
        Source::File(path) => {
            crate::dot_file(path, block, config.options).map_err(|e| input::explain(e, None))?
        }
        Source::Stdin => {
            let bytes = input::read_stdin()?;
            crate::dot_model_named(bytes.clone(), &config.input.name(), block, config.options)
                .map_err(|e| input::explain(e, Some(&bytes)))?
        }
    };
    let (path, bytes) = match config.output {
        Output::Stdout => return emit(&dot),
        Output::Text(path) => (path, dot.into_bytes()),
        Output::Rendered { path, format } => {
            let bytes = render(&dot, &format, &path)?;
            (path, bytes)
        }
    };
    crate::onnx::output::write_bytes(&path, &bytes, false)?;
    Ok(())
}

/// Renders DOT with Graphviz `dot -T<format>`.
fn render(dot: &str, format: &str, path: &Path) -> Result<Vec<u8>> {
    use std::process::{Command, Stdio};
    let failed = |e: String| Failure::Failed(format!("{}: Graphviz `dot`: {e}", path.display()));
    let mut child = Command::new("dot")
        .arg(format!("-T{format}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| failed("no standard input".into()))?;
    let text = dot.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let result = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    let written = writer
        .join()
        .map_err(|_| failed("writer panicked".into()))?;
    if !result.status.success() {
        return Err(failed(format!(
            "failed: {}",
            String::from_utf8_lossy(&result.stderr).trim()
        )));
    }
    written.map_err(|e| failed(e.to_string()))?;
    Ok(result.stdout)
}
