//! Compiles `proto/onnx-ml.proto` with prost-build, parsed by protox (pure Rust: no `protoc`).
//! Every `bytes` field becomes `bytes::Bytes`, so tensor data can point into the input map.
//!
//! Also sets `ONNX_REPVGG_COMMIT` to ` (abc1234)` when built from a git checkout, for
//! `--version`; empty elsewhere (a `cargo package` tarball, an sdist, no `git` installed).

use std::path::Path;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx-ml.proto");
    let descriptors = protox::compile(["proto/onnx-ml.proto"], ["proto/"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    let commit = commit().map(|c| format!(" ({c})")).unwrap_or_default();
    println!("cargo:rustc-env=ONNX_REPVGG_COMMIT={commit}");
    Ok(())
}

/// The short hash of `HEAD`, when this is a git checkout and `git` runs. Asks cargo to run this
/// again when `HEAD` moves (a commit, a checkout).
fn commit() -> Option<String> {
    let root = std::env::var_os("CARGO_MANIFEST_DIR")?;
    // `.git` is a folder in a clone and a file in a worktree; neither is in a package.
    if !Path::new(&root).join(".git").exists() {
        // `cargo package` verifies the package in the checkout's target folder, where its
        // output (no commit) would then stand for the checkout's too. The relative path exists
        // in every package and never in a checkout, where cargo runs this script again.
        if Path::new(&root).join("Cargo.toml.orig").exists() {
            println!("cargo:rerun-if-changed=Cargo.toml.orig");
        }
        return None;
    }
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(&root)
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
    };
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])?];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.extend(git(&["rev-parse", "--git-path", &branch]));
    }
    watched.extend(git(&["rev-parse", "--git-path", "packed-refs"]));
    for path in watched {
        let path = Path::new(&root).join(path);
        // A path that does not exist would make cargo run this script on every build.
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    git(&["rev-parse", "--short", "HEAD"])
}
