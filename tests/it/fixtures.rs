//! Every real PyTorch export in `testdata/` through the real binary: fusable forms become the
//! deploy structure op for op and compute PyTorch's outputs in tract; training-mode exports are
//! refused block by block with the reason; models with nothing to fold come out byte-identical.

use crate::common::*;

fn summary_counts(stdout: &str) -> (usize, usize) {
    let line = stdout.lines().next().unwrap_or("");
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"fused"), "summary line: {line}");
    let fused = words[1].parse().expect("fused count");
    let without = words[3]
        .trim_start_matches('(')
        .parse()
        .expect("without identity count");
    (fused, without)
}

#[test]
fn fusable_exports_become_the_deploy_structure_and_keep_their_outputs() {
    let all = fixtures();
    let fusable = all.iter().filter(|f| f.fusable && !f.deploy_structure);
    fuse_each(fusable, 16, |fx, out, stdout| {
        let mut problems = Vec::new();
        let (fused, without) = summary_counts(stdout);
        if (fused, without) != (fx.blocks, fx.without_identity) {
            problems.push(format!(
                "{}: fused {fused} blocks ({without} without identity), expected {} ({})",
                fx.label(),
                fx.blocks,
                fx.without_identity
            ));
        }
        problems.extend(deploy_ops_problem(fx, out));
        problems.extend(outputs_problem(fx, out));
        problems
    });
}

/// What is wrong with the fused model's outputs, against PyTorch's and the original's in tract.
fn outputs_problem(fx: &Fixture, out: &std::path::Path) -> Option<String> {
    let input = load_tensor(&fx.input);
    if fx.dtype == "float16" {
        // tract cannot type the fp16 Gemm head of the original export: compare the models
        // at the backbone's output instead, which every block feeds.
        let until = backbone_output(&fx.path);
        let original = run_tract_until(&fx.path, &input, Some(&until));
        let folded = run_tract_until(out, &input, Some(&until));
        let rel = relative_error(&original[0], &folded[0]);
        eprintln!(
            "{:<28} fused vs original (tract, backbone output) {rel:.2e}",
            fx.label()
        );
        let problem = format!("{}: relative error {rel:.3e} at '{until}'", fx.label());
        return (rel > fx.tolerance()).then_some(problem);
    }
    let expected = load_values(&fx.output);
    let original = run_tract(&fx.path, &input);
    let folded = run_tract(out, &input);
    let vs_torch = relative_error(&expected, &folded[0]);
    let vs_original = relative_error(&original[0], &folded[0]);
    let original_vs_torch = relative_error(&expected, &original[0]);
    eprintln!(
        "{:<28} fused vs PyTorch {vs_torch:.2e}, fused vs original (tract) {vs_original:.2e}, original vs PyTorch {original_vs_torch:.2e}",
        fx.label()
    );
    let wrong = vs_torch > fx.tolerance() || vs_original > fx.tolerance();
    wrong.then(|| format!(
            "{}: relative error {vs_torch:.3e} vs PyTorch, {vs_original:.3e} vs the original model (tolerance {:.0e})",
            fx.label(),
            fx.tolerance()
        ))
}

#[test]
fn training_mode_exports_are_an_error_that_writes_nothing_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for fx in fixtures().iter().filter(|f| !f.fusable) {
        let out = dir.path().join("out.onnx");
        let before = std::fs::read(&fx.path).unwrap();
        let run = fuse(&fx.path, &out, &[]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{}: {stderr}", fx.label());
        assert_eq!(stderr.lines().count(), 1, "{}: {stderr}", fx.label());
        assert!(
            stderr.contains("training mode") && stderr.contains("model.eval()"),
            "{}: {stderr}",
            fx.label()
        );
        assert!(!out.exists(), "{}: output written", fx.label());
        assert_eq!(std::fs::read(&fx.path).unwrap(), before, "{}", fx.label());
        // --allow-training folds them all, with a warning.
        let run = fuse(&fx.path, &out, &["--allow-training"]);
        assert!(run.status.success(), "{}", fx.label());
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert_eq!(
            summary_counts(&stdout).0,
            fx.blocks,
            "{}: {stdout}",
            fx.label()
        );
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(stderr.contains("warning"), "{}: {stderr}", fx.label());
        std::fs::remove_file(&out).unwrap();
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} training fixtures");
}

#[test]
fn deploy_models_have_nothing_to_fuse_and_come_out_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for fx in fixtures().iter().filter(|f| f.deploy_structure) {
        let out = dir.path().join("out.onnx");
        let run = fuse(&fx.path, &out, &[]);
        assert!(run.status.success(), "{}", fx.label());
        // No candidate at all: one line says so, and nothing is warned about.
        assert_eq!(
            String::from_utf8_lossy(&run.stdout),
            "nothing to fuse: no re-parameterizable blocks found\n",
            "{}",
            fx.label()
        );
        assert!(run.stderr.is_empty(), "{}", fx.label());
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&fx.path).unwrap(),
            "{}",
            fx.label()
        );
        checked += 1;
    }
    assert_eq!(checked, 2, "one deploy export per model");
}
