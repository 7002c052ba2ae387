//! The README's console examples are true: every ```console block of README.md runs, through
//! trycmd, against the real binary, in a scratch folder where `testdata/` is the repository's
//! and the files the examples name exist (`broken.onnx`: a model cut short; `model.onnx`;
//! `weights.npz`: the start of a ZIP archive).
//! `[..]` in an example stands for what varies from run to run (timings); `? 1` is the exit
//! code of a command that fails.

use std::path::Path;

use crate::common::testdata;

#[test]
fn readme_console_examples_are_true() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = tempfile::tempdir().unwrap();
    // trycmd runs the commands of `X.md` in `X.in/`.
    let readme = scratch.path().join("README.md");
    let text = std::fs::read_to_string(root.join("README.md")).unwrap();
    std::fs::write(&readme, with_final_newlines(&text)).unwrap();
    let cwd = scratch.path().join("README.in");
    std::fs::create_dir(&cwd).unwrap();
    std::os::unix::fs::symlink(testdata(), cwd.join("testdata")).unwrap();
    let sample = std::fs::read(testdata().join("models/tiny/ts_fold_op17.onnx")).unwrap();
    std::fs::write(cwd.join("model.onnx"), &sample).unwrap();
    std::fs::write(cwd.join("broken.onnx"), &sample[..4096]).unwrap();
    std::fs::write(
        cwd.join("weights.npz"),
        b"PK\x03\x04\x14\x00\x00\x00\x00\x00arr_0.npy",
    )
    .unwrap();

    trycmd::TestCases::new()
        .register_bin("onnx-repvgg", Path::new(env!("CARGO_BIN_EXE_onnx-repvgg")))
        .env("ONNX_REPVGG_THREADS", "2")
        .case(&readme)
        .run();
}

/// The README as trycmd expects it: trycmd drops the line break before a blank line that ends
/// a command's output, so without one the last line of output could never match. A blank line
/// after each command's output of a console block (before the next `$` and before the closing
/// fence) keeps the README as people read it and gives trycmd what it needs.
fn with_final_newlines(readme: &str) -> String {
    let mut out = String::new();
    let mut in_console = false;
    let mut previous = "";
    for line in readme.lines() {
        if in_console {
            let ends_output = line.starts_with("```") || line.starts_with("$ ");
            if ends_output && !previous.starts_with("```console") && !previous.is_empty() {
                out.push('\n');
            }
            if line.starts_with("```") {
                in_console = false;
            }
        } else if line.starts_with("```console") {
            in_console = true;
        }
        out.push_str(line);
        out.push('\n');
        previous = line;
    }
    out
}
