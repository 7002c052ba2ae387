//! The Python extension module `onnx_repvgg._native` (cargo feature `python`, built by maturin
//! from `pyproject.toml`): thin bindings over the library for the Python package in
//! `python/onnx_repvgg/`, which turns `ModelProto`s into bytes, paths into strings and the JSON
//! reports into dicts.
//!
//! Every call crosses one boundary, [`guarded`]: the interpreter lock is released while the
//! library works (two Python threads fold two models at once), a library error becomes
//! `onnx_repvgg.Error` with the command line's one-line message, and a panic becomes the same
//! exception instead of crossing into Python. The reports are the `--json` objects of the
//! command line, as JSON text.

use std::ffi::OsString;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::{InspectOptions, Options};

pyo3::create_exception!(
    onnx_repvgg,
    Error,
    pyo3::exceptions::PyException,
    "A model could not be read, folded, verified or written; the message is the command line's."
);

/// Runs `work` with the interpreter lock released; errors and panics become [`Error`].
fn guarded<T: Send>(py: Python<'_>, work: impl FnOnce() -> crate::Result<T> + Send) -> PyResult<T> {
    match py.detach(|| catch_unwind(AssertUnwindSafe(work))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(Error::new_err(format!("{err:#}"))),
        Err(panic) => Err(Error::new_err(format!(
            "internal error (please report it): {}",
            panic_message(panic.as_ref())
        ))),
    }
}

/// The text a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "panic"
    }
}

fn options(verify: bool, allow_training: bool, tolerance: Option<f64>, strict: bool) -> Options {
    Options {
        allow_training_bn: allow_training,
        verify,
        tolerance,
        strict,
        ..Options::default()
    }
}

/// `fuse --json`'s object: the report, where the model came from and went to.
fn fuse_json(report: &crate::FuseReport, input: &Path, output: &Path) -> String {
    let mut value = report.to_json();
    value["input"] = input.display().to_string().into();
    value["output"] = output.display().to_string().into();
    value["dry_run"] = false.into();
    value.to_string()
}

/// Fuses a serialized model; returns the deploy model's bytes and the report as JSON.
#[pyfunction]
#[pyo3(signature = (model, *, verify, allow_training, tolerance, strict))]
fn fuse_bytes<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyBytes>,
    verify: bool,
    allow_training: bool,
    tolerance: Option<f64>,
    strict: bool,
) -> PyResult<(Bound<'py, PyBytes>, String)> {
    let bytes = model.as_bytes();
    let options = options(verify, allow_training, tolerance, strict);
    let (deploy, json) = guarded(py, || {
        let (deploy, report) = crate::fuse_model(bytes, options)?;
        let memory = Path::new(crate::IN_MEMORY);
        Ok((deploy, fuse_json(&report, memory, memory)))
    })?;
    Ok((PyBytes::new(py, &deploy), json))
}

/// Fuses the model at `input` into `output` as `onnx-repvgg fuse` does; returns the report as
/// JSON.
#[pyfunction]
#[pyo3(signature = (input, output, *, verify, allow_training, tolerance, strict))]
fn fuse_path(
    py: Python<'_>,
    input: PathBuf,
    output: PathBuf,
    verify: bool,
    allow_training: bool,
    tolerance: Option<f64>,
    strict: bool,
) -> PyResult<String> {
    let options = options(verify, allow_training, tolerance, strict);
    guarded(py, || {
        let report = crate::fuse_file(&input, &output, options)?;
        Ok(fuse_json(&report, &input, &output))
    })
}

/// `inspect --json` of the model at `path`.
#[pyfunction]
#[pyo3(signature = (path, *, int8, input_size))]
fn inspect_path(
    py: Python<'_>,
    path: PathBuf,
    int8: bool,
    input_size: Option<Vec<usize>>,
) -> PyResult<String> {
    let options = InspectOptions {
        int8,
        input_size,
        ..InspectOptions::default()
    };
    guarded(py, || {
        Ok(crate::inspect_file_with(&path, &options)?
            .to_json()
            .to_string())
    })
}

/// `inspect --json` of a serialized model.
#[pyfunction]
#[pyo3(signature = (model, *, int8, input_size))]
fn inspect_bytes(
    py: Python<'_>,
    model: &Bound<'_, PyBytes>,
    int8: bool,
    input_size: Option<Vec<usize>>,
) -> PyResult<String> {
    let bytes = model.as_bytes();
    let options = InspectOptions {
        int8,
        input_size,
        ..InspectOptions::default()
    };
    guarded(py, || {
        Ok(crate::inspect_model_with(bytes, &options)?
            .to_json()
            .to_string())
    })
}

/// The command line (`argv` with the program name first), exactly as the binary runs it; returns
/// the exit code (a panic prints its message and returns 101, as the binary's would).
#[pyfunction]
fn run_cli(py: Python<'_>, argv: Vec<OsString>) -> u8 {
    static TUNED: std::sync::Once = std::sync::Once::new();
    TUNED.call_once(crate::cli::tune_allocator);
    let result = py.detach(|| catch_unwind(AssertUnwindSafe(|| crate::cli::main(argv))));
    // The default panic hook has already printed the message.
    result.unwrap_or(101)
}

/// Panics inside the boundary: lets the tests check that a panic arrives as `Error`.
#[pyfunction]
fn _panic_for_tests(py: Python<'_>, message: String) -> PyResult<()> {
    guarded(py, || -> crate::Result<()> { panic!("{message}") })
}

#[pymodule]
#[pyo3(name = "_native")]
fn native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add("Error", module.py().get_type::<Error>())?;
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    module.add_function(wrap_pyfunction!(fuse_bytes, module)?)?;
    module.add_function(wrap_pyfunction!(fuse_path, module)?)?;
    module.add_function(wrap_pyfunction!(inspect_path, module)?)?;
    module.add_function(wrap_pyfunction!(inspect_bytes, module)?)?;
    module.add_function(wrap_pyfunction!(run_cli, module)?)?;
    module.add_function(wrap_pyfunction!(_panic_for_tests, module)?)?;
    Ok(())
}
