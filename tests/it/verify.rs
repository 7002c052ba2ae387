//! `--verify`: each fused block is checked against its original subgraph by an evaluator that
//! shares nothing with the fold. A deliberately corrupted fold must be caught, and a failed
//! check must leave nothing on disk.

use crate::common::*;
use onnx_repvgg::graph::GraphIndex;
use onnx_repvgg::onnx::Model;
use onnx_repvgg::{plan, producer, rewrite, verify};

fn planned(path: &std::path::Path) -> (Model, plan::Analysis) {
    let model = Model::open(path).unwrap();
    let analysis = {
        let graph = GraphIndex::new(&model).unwrap();
        let index = onnx_repvgg::constant::Constants::new(&graph);
        plan::analyse(&index, Default::default()).unwrap()
    };
    (model, analysis)
}

#[test]
fn correct_folds_pass_and_corrupted_ones_are_caught() {
    for form in ["ts_fold_op17", "ts_nofold_op17", "dynamo_op18"] {
        let (model, analysis) = planned(&testdata().join(format!("models/grouped/{form}.onnx")));
        let graph = GraphIndex::new(&model).unwrap();
        let index = onnx_repvgg::constant::Constants::new(&graph);
        let patch = rewrite::build(&index, &analysis);
        for plan in &analysis.plans {
            let node = &patch.replaced[&plan.block.root][0];
            let sample = verify::sample(&plan.layout, &plan.name);
            let mut weight = Vec::new();
            let mut write = |chunk: &[u8]| {
                weight.extend_from_slice(chunk);
                Ok(())
            };
            let produced =
                producer::fold_block(&index, plan::Plan::Conv(plan), &mut write, &sample).unwrap();
            assert_eq!(
                weight.len(),
                plan.layout.weight_dims().iter().product::<usize>() * 4
            );
            let bias: Vec<f64> = produced
                .bias
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect();
            let bias =
                ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[bias.len()]), bias).unwrap();
            let written = produced.sampled().unwrap();
            let deviation =
                verify::check(&index, &plan.subject(), node, &written, &bias, None).unwrap();
            assert!(deviation.rel < 1e-6, "{form} {}: {deviation:?}", plan.name);

            // Corrupt the last written weight of the block (every output channel is checked up
            // to 64), then one bias.
            let mut rows = written.clone();
            *rows.iter_mut().last().unwrap() += 0.01;
            let err = verify::check(&index, &plan.subject(), node, &rows, &bias, None)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("block '{}' failed verification", plan.name)),
                "{err}"
            );
            let mut wrong_bias = bias.clone();
            wrong_bias[0] += 0.01;
            assert!(
                verify::check(&index, &plan.subject(), node, &written, &wrong_bias, None).is_err()
            );
        }
    }
}

/// Linear folds are checked by evaluating the original and the patched graph: a corrupted
/// weight (its last value) or bias of any fold is caught, naming it.
#[test]
fn corrupted_linear_folds_are_caught() {
    let mut checked = 0;
    for model in [
        "linear_bn_tokens/ts_nofold_op17",
        "nextvit/dynamo_op18",
        "gemm_attrs/onnx_op17",
    ] {
        let (model, analysis) = planned(&testdata().join(format!("linear/{model}.onnx")));
        let graph = GraphIndex::new(&model).unwrap();
        let index = onnx_repvgg::constant::Constants::new(&graph);
        let patch = rewrite::build(&index, &analysis);
        for plan in &analysis.linear.plans {
            let all: Vec<usize> = (0..plan.weight_dims[0]).collect();
            let fold = |write: &mut dyn FnMut(&[u8]) -> onnx_repvgg::Result<()>| {
                producer::fold_block(&index, plan::Plan::Linear(plan), write, &all).unwrap()
            };
            let produced = fold(&mut |_| Ok(()));
            let deviation = verify::linear(&index, &patch, plan, &produced, None).unwrap();
            assert!(deviation.rel < 1e-6, "{}: {deviation:?}", plan.name);
            let mut corrupted = fold(&mut |_| Ok(()));
            let last = corrupted.sampled_bytes.len() - 4;
            let value = f32::from_le_bytes(corrupted.sampled_bytes[last..].try_into().unwrap());
            corrupted.sampled_bytes[last..].copy_from_slice(&(value + 0.05).to_le_bytes());
            let err = verify::linear(&index, &patch, plan, &corrupted, None).unwrap_err();
            let name = format!("block '{}' failed verification", plan.name);
            assert!(err.to_string().contains(&name), "{err}");
            let mut corrupted = fold(&mut |_| Ok(()));
            let mut bias = corrupted.bias.to_vec();
            let value = f32::from_le_bytes(bias[..4].try_into().unwrap());
            bias[..4].copy_from_slice(&(value + 0.05).to_le_bytes());
            corrupted.bias = bias.into();
            assert!(verify::linear(&index, &patch, plan, &corrupted, None).is_err());
            checked += 1;
        }
    }
    assert!(checked >= 7, "{checked} folds checked");
}

#[test]
fn a_failed_check_exits_1_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let input = testdata().join("models/tiny/ts_nofold_op17.onnx");
    let run = fuse(&input, &out, &["--tolerance", "1e-15"]);
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("failed verification") && stderr.contains("over the tolerance 1.0e-15"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let run = fuse(&input, &out, &["--tolerance", "1e-15", "--no-verify"]);
    assert!(run.status.success());
}

#[test]
fn every_fixture_verifies_within_the_default_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let mut all = fixtures();
    all.extend(fixtures_in(&testdata().join("families")));
    let mut verified = 0;
    for fx in all
        .iter()
        .filter(|f| !f.deploy_structure && f.expect != "refused: training")
    {
        let out = dir.path().join("out.onnx");
        let run = fuse(&fx.path, &out, &["-v"]);
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "{}: {}",
            fx.label(),
            String::from_utf8_lossy(&run.stderr)
        );
        if !stdout.starts_with("fused 0 ") {
            assert!(
                stdout.lines().next().unwrap().contains("verified (worst "),
                "{stdout}"
            );
            verified += 1;
        }
    }
    assert!(verified >= 75, "{verified}");
}
