//! Linear folds on real exports (`testdata/linear/`): timm EfficientViT-M, LeViT, RepViT and
//! NextViT, and hand-written Linear/ConvTranspose/Conv1d/Conv3d/BN-before models, each in the
//! TorchScript (constant folding on and off) and dynamo forms. What folds leaves as few
//! BatchNormalization nodes as can be (`bn_min`: none but where folding is not exact), no more of
//! any operator than the library's own deploy model, and PyTorch's outputs (in tract); what
//! cannot fold stays, with the reason.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;

/// A linear fixture, with the fields of `testdata/linear/manifest.json` beyond [`Fixture`]'s.
struct Linear {
    fx: Fixture,
    /// BatchNormalization nodes that must remain (those no fold is exact for).
    bn_min: usize,
    /// Whether tract runs the model (it cannot run LeViT's attention-bias subsample).
    tract_runs: bool,
}

fn linear_fixtures() -> Vec<Linear> {
    let dir = testdata().join("linear");
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let items: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    fixtures_in(&dir)
        .into_iter()
        .zip(items)
        .map(|(fx, v)| Linear {
            fx,
            bn_min: v["bn_min"].as_u64().unwrap() as usize,
            tract_runs: v["tract_runs"].as_bool().unwrap_or(true),
        })
        .collect()
}

fn bn_count(ops: &BTreeMap<String, usize>) -> usize {
    ops.get("BatchNormalization").copied().unwrap_or(0)
}

#[test]
fn every_bn_that_can_fold_folds_with_the_same_outputs() {
    let all = linear_fixtures();
    let by_path: BTreeMap<&Path, &Linear> = all.iter().map(|l| (l.fx.path.as_path(), l)).collect();
    let folding = all.iter().map(|l| &l.fx).filter(|f| f.expect == "fused");
    fuse_each(folding, 40, |fx, out, _| {
        let l = by_path[fx.path.as_path()];
        let mut problems = Vec::new();
        let ops = op_histogram(out);
        if bn_count(&ops) != l.bn_min {
            problems.push(format!(
                "{}: {} BatchNormalization left, {} expected",
                fx.label(),
                bn_count(&ops),
                l.bn_min
            ));
        }
        // No more of any operator than the library's deploy export of the same model.
        for (op, &n) in &ops {
            let deploy = fx.deploy_ops.get(op).copied().unwrap_or(0);
            if n > deploy {
                problems.push(format!(
                    "{}: {n} {op}, the deploy export has {deploy}",
                    fx.label()
                ));
            }
        }
        if l.tract_runs {
            let input = load_tensor(&fx.input);
            match try_run_tract(out, &input, None) {
                Ok(got) => {
                    let rel = relative_error(&load_values(&fx.output), &got[0]);
                    if rel > fx.tolerance() {
                        problems.push(format!("{}: relative error {rel:.3e}", fx.label()));
                    }
                }
                Err(e) => problems.push(format!("{}: tract: {e}", fx.label())),
            }
        }
        problems
    });
}

#[test]
fn what_cannot_fold_stays_with_the_reason() {
    let reasons = [
        ("refused: pad", "pads its input"),
        ("refused: consumer", "is read by"),
        ("refused: channel", "feature"),
        ("refused: constant", "is not a constant"),
    ];
    let mut checked = 0;
    let dir = tempfile::tempdir().unwrap();
    for l in linear_fixtures() {
        let Some((_, words)) = reasons.iter().find(|(e, _)| *e == l.fx.expect) else {
            continue;
        };
        let out = dir.path().join("out.onnx");
        let run = fuse(&l.fx.path, &out, &["-v"]);
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success(), "{}: {stdout}", l.fx.label());
        let stays: Vec<&str> = stdout.lines().filter(|s| s.contains("' stays: ")).collect();
        assert_eq!(stays.len(), l.bn_min, "{}: {stdout}", l.fx.label());
        assert!(
            stays.iter().any(|s| s.contains(words)),
            "{}: no reason with '{words}': {stdout}",
            l.fx.label()
        );
        assert_eq!(bn_count(&op_histogram(&out)), l.bn_min, "{}", l.fx.label());
        checked += 1;
    }
    assert!(checked >= 12, "{checked} refusals checked");
}

#[test]
fn training_mode_beside_a_linear_operator_is_an_error_unless_allowed() {
    let path = testdata().join("linear/linear_bn/ts_train_op17.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let run = fuse(&path, &out, &[]);
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("training mode"), "{stderr}");
    assert!(!out.exists());
    let run = fuse(&path, &out, &["--allow-training", "-v"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}");
    // The BatchNormalization before a training-mode Dropout stays: Dropout is no view.
    assert_eq!(bn_count(&op_histogram(&out)), 1, "{stdout}");
    assert!(stdout.contains("Dropout"), "{stdout}");
}

#[test]
fn summed_heads_become_one_gemm() {
    let dir = tempfile::tempdir().unwrap();
    for form in ["ts_fold_op17", "ts_nofold_op17", "dynamo_op18"] {
        let path = testdata().join(format!("linear/repvit/{form}.onnx"));
        let out = dir.path().join("out.onnx");
        let run = fuse(&path, &out, &["-v"]);
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success(), "{stdout}");
        let (before, after) = (op_histogram(&path), op_histogram(&out));
        assert_eq!(after.get("Gemm"), Some(&1), "{form}: {after:?}");
        assert_eq!(after["Div"], before["Div"] - 1, "{form}: {after:?}");
        let heads = stdout.lines().find(|l| l.contains(" heads ")).unwrap_or("");
        assert!(heads.contains("2×Gemm"), "{form}: {stdout}");
    }
}

#[test]
fn inspect_lists_the_folds_and_what_stays() {
    let path = testdata().join("linear/nextvit/ts_fold_op17.onnx");
    let run = bin(&["inspect".as_ref(), "--json".as_ref(), path.as_os_str()]);
    assert!(run.status.success());
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let folds = report["folds"].as_array().unwrap();
    assert_eq!(report["summary"]["folds"], folds.len());
    let kinds: Vec<&str> = folds.iter().map(|f| f["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"bn→conv") && kinds.contains(&"bn→linear"),
        "{kinds:?}"
    );
    // Each of the 5 once, though one reaches three MatMul nodes.
    assert_eq!(report["summary"]["bn_folded"], 5);
    assert_eq!(report["summary"]["bn_left"], 0);
    let path = testdata().join("linear/bn_conv_pad/ts_fold_op17.onnx");
    let run = bin(&["inspect".as_ref(), path.as_os_str()]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("stays: Conv"), "{stdout}");
}
