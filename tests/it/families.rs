//! The re-parameterization family (QARepVGG, MobileOne, YOLOv7 RepConv, RepVGG-SE, ACNet,
//! RepLKNet, UniRepLKNet, dilated RepVGG, RepViT, standalone Conv→BN/Mul/Add, 1-D and 3-D,
//! Diverse Branch Block), as PyTorch exports them (`testdata/families/`): what must fold folds to
//! the PyTorch deploy structure with PyTorch's outputs; what must be refused is refused with the
//! reason; partial folds keep the outputs.

use std::path::Path;

use crate::common::*;

fn families() -> Vec<Fixture> {
    fixtures_in(&testdata().join("families"))
}

fn summary_fused(stdout: &str) -> usize {
    let line = stdout.lines().next().unwrap_or("");
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("summary: {line}"))
}

/// Runs the original and the fused model in tract and compares them with PyTorch's output (or,
/// where tract cannot run the original, the fused model with PyTorch's output alone).
fn compare(fx: &Fixture, fused: &Path) -> Result<String, String> {
    let input = load_tensor(&fx.input);
    let expected = load_values(&fx.output);
    let folded = try_run_tract(fused, &input, None).map_err(|e| format!("{}: {e}", fx.label()))?;
    let vs_torch = relative_error(&expected, &folded[0]);
    let note = match try_run_tract(&fx.path, &input, None) {
        Ok(original) => format!(
            "vs original {:.2e}",
            relative_error(&original[0], &folded[0])
        ),
        Err(_) => "original not runnable in tract".into(),
    };
    if vs_torch > fx.tolerance() {
        return Err(format!(
            "{}: relative error {vs_torch:.3e} vs PyTorch ({note})",
            fx.label()
        ));
    }
    Ok(format!("vs PyTorch {vs_torch:.2e}, {note}"))
}

#[test]
fn every_family_folds_to_its_deploy_structure() {
    let all = families();
    let folding = all
        .iter()
        .filter(|f| f.expect == "fused" && !f.deploy_structure);
    fuse_each(folding, 50, |fx, out, stdout| {
        let mut problems = Vec::new();
        // Where the exporter already folded a lone Conv→BN (standalone, constant folding on)
        // there are fewer folds left than blocks; the op histogram is exact either way.
        let fused = summary_fused(stdout);
        let exact = fx.family != "standalone";
        if fused == 0 || fused > fx.blocks || (exact && fused != fx.blocks) {
            problems.push(format!(
                "{}: expected {} blocks fused: {stdout}",
                fx.label(),
                fx.blocks
            ));
        }
        problems.extend(deploy_ops_problem(fx, out));
        if fx.runs {
            match compare(fx, out) {
                Ok(note) => eprintln!("{:<40} {note}", fx.label()),
                Err(e) => problems.push(e),
            }
        }
        problems
    });
}

#[test]
fn refused_family_blocks_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for fx in families()
        .iter()
        .filter(|f| f.expect.starts_with("refused:"))
    {
        let words = fx.expect.trim_start_matches("refused:").trim();
        let out = dir.path().join("out.onnx");
        let run = fuse(&fx.path, &out, &[]);
        if words == "training" {
            // Training mode is an error, not a skip: nothing is written.
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(run.status.code(), Some(1), "{}: {stderr}", fx.label());
            assert!(stderr.contains("training mode"), "{}: {stderr}", fx.label());
            assert!(!out.exists(), "{}", fx.label());
            checked += 1;
            continue;
        }
        assert!(run.status.success(), "{}", fx.label());
        let stdout = String::from_utf8_lossy(&run.stdout);
        // Candidates not fused are warnings on stderr, one line each, with the reason.
        let stderr = String::from_utf8_lossy(&run.stderr);
        let skipped: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("onnx-repvgg: warning: ") && l.contains(" not fused: "))
            .collect();
        assert!(
            !skipped.is_empty() && skipped.iter().all(|l| l.contains(words)),
            "{}: {stderr}",
            fx.label()
        );
        if summary_fused(&stdout) == 0 {
            let (a, b) = (
                std::fs::read(&out).unwrap(),
                std::fs::read(&fx.path).unwrap(),
            );
            assert!(a == b, "{}: not byte-identical", fx.label());
        } else if fx.runs {
            compare(fx, &out).unwrap();
        }
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} refused fixtures");
}

#[test]
fn partial_folds_keep_the_outputs_and_name_the_sequential_branches() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for fx in families()
        .iter()
        .filter(|f| f.expect.starts_with("partial:") && !f.deploy_structure)
    {
        let out = dir.path().join("out.onnx");
        let run = fuse(&fx.path, &out, &["-v"]);
        assert!(run.status.success(), "{}", fx.label());
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(summary_fused(&stdout) >= 1, "{}: {stdout}", fx.label());
        compare(fx, &out).unwrap();
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} partial fixtures");
}
