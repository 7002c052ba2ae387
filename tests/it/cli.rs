//! The binary as a user and a pipeline see it: output lines, exit codes, refusals, and what is
//! (not) left on disk when something goes wrong.

use std::path::{Path, PathBuf};

use crate::common::*;
use tract_onnx::prelude::Framework;

fn sample() -> PathBuf {
    testdata().join("models/tiny/ts_fold_op17.onnx")
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Asserts a failed run: exit 1, one `onnx-repvgg: …` line on stderr mentioning `needle`.
fn assert_error(o: &std::process::Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "stderr: {}", stderr(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.starts_with("onnx-repvgg: "), "{err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
    assert!(stdout(o).is_empty());
}

#[test]
fn fuse_prints_one_summary_line() {
    let dir = tempfile::tempdir().unwrap();
    let o = fuse(&sample(), &dir.path().join("deploy.onnx"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with(
            "fused 7 blocks (5 without identity): 36 → 18 nodes, 22748 → 20260 parameters, verified (worst "
        ),
        "{out}"
    );
    assert!(out.trim_end().ends_with(" ms"), "{out}");
    assert!(stderr(&o).is_empty());
    assert_eq!(files_in(dir.path()), ["deploy.onnx"]);
}

#[test]
fn verbose_fuse_lists_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let o = fuse(&sample(), &dir.path().join("deploy.onnx"), &["-v"]);
    assert!(o.status.success());
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1 + 1 + 7, "{out}");
    assert!(
        lines[1].trim_start().starts_with("block") && lines[1].ends_with("status"),
        "{out}"
    );
    let stage0: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        stage0[..10],
        [
            "stage0", "3→8", "2", "1", "3x3", "+", "1x1", "none", "fused,", "verified"
        ]
    );
    let stage2_1: Vec<&str> = lines[5].split_whitespace().collect();
    assert_eq!(
        stage2_1[..11],
        [
            "stage2.1", "16→16", "1", "1", "3x3", "+", "1x1", "+", "identity", "yes", "fused,"
        ]
    );
    let rel: f64 = stage2_1[12].parse().unwrap();
    assert!(rel < 1e-6, "{out}");
}

#[test]
fn fused_conv_is_named_after_the_block_module() {
    let dir = tempfile::tempdir().unwrap();
    for form in ["ts_fold_op17", "ts_nofold_op17", "dynamo_op18"] {
        let out = dir.path().join(format!("{form}.onnx"));
        let input = testdata().join(format!("models/tiny/{form}.onnx"));
        assert!(fuse(&input, &out, &[]).status.success());
        let model = tract_onnx::onnx().proto_model_for_path(&out).unwrap();
        let graph = model.graph.unwrap();
        let convs: Vec<&str> = graph
            .node
            .iter()
            .filter(|n| n.op_type == "Conv")
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(
            convs.first(),
            Some(&"stage0.rbr_reparam"),
            "{form}: {convs:?}"
        );
        assert!(convs.contains(&"stage2.1.rbr_reparam"), "{form}: {convs:?}");
        let inits: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        assert!(
            inits.contains(&"stage2.1.rbr_reparam.weight")
                && inits.contains(&"stage2.1.rbr_reparam.bias"),
            "{form}: {inits:?}"
        );
    }
}

#[test]
fn inspect_prints_the_block_table_and_summary() {
    let o = bin(&["inspect".as_ref(), sample().as_os_str()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("block"), "{out}");
    assert!(
        lines[0].contains("params") && lines[0].contains("FLOPs"),
        "{out}"
    );
    assert_eq!(lines.len(), 1 + 7 + 2, "{out}");
    assert!(
        lines[1].starts_with("stage0 ") && lines[1].contains("none"),
        "{out}"
    );
    assert!(
        lines[4].starts_with("stage2.1 ") && lines[4].contains("3x3 + 1x1 + identity"),
        "{out}"
    );
    assert_eq!(lines[8], "7 blocks, 5 without identity, 7 fusable");
    assert_eq!(
        lines[9],
        "blocks' parameters 22.4K → 19.9K, FLOPs 430.8K → 381.2K at input 1x3x32x32"
    );
}

#[test]
fn inspect_says_why_training_exports_cannot_be_fused() {
    let input = testdata().join("models/grouped/ts_train_op13.onnx");
    let o = bin(&["inspect".as_ref(), input.as_os_str()]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("no: BatchNormalization"), "{out}");
    assert!(
        out.contains("\n8 blocks, 5 without identity, 0 fusable\n"),
        "{out}"
    );
}

#[test]
fn external_data_input_gives_a_sidecar_next_to_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = testdata().join("models/tiny/dynamo_op18.onnx");
    let sidecar_before =
        std::fs::read(testdata().join("models/tiny/dynamo_op18.onnx.data")).unwrap();
    let out = dir.path().join("deploy.onnx");
    assert!(fuse(&input, &out, &[]).status.success());
    assert_eq!(files_in(dir.path()), ["deploy.onnx", "deploy.onnx.data"]);
    let model = tract_onnx::onnx().proto_model_for_path(&out).unwrap();
    let external: Vec<_> = model
        .graph
        .unwrap()
        .initializer
        .into_iter()
        .filter(|t| t.data_location == Some(1))
        .collect();
    assert!(!external.is_empty());
    for t in &external {
        let location = t
            .external_data
            .iter()
            .find(|e| e.key == "location")
            .unwrap();
        assert_eq!(location.value, "deploy.onnx.data");
        let offset: u64 = t
            .external_data
            .iter()
            .find(|e| e.key == "offset")
            .unwrap()
            .value
            .parse()
            .unwrap();
        assert_eq!(offset % 4096, 0);
    }
    // The input's own sidecar is untouched and the output runs from its new folder.
    assert_eq!(
        std::fs::read(testdata().join("models/tiny/dynamo_op18.onnx.data")).unwrap(),
        sidecar_before
    );
    let x = load_tensor(&testdata().join("models/tiny/input.pb"));
    let y = run_tract(&out, &x);
    let want = run_tract(&input, &x);
    assert!(relative_error(&want[0], &y[0]) < TOLERANCE_F32);
}

#[test]
fn missing_input_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let o = fuse(&dir.path().join("nope.onnx"), &out, &[]);
    assert_error(&o, "nope.onnx");
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn garbage_input_is_an_error_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.onnx");
    for (bytes, needle) in [
        (vec![], "empty"),
        (
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
            "not a valid ONNX model",
        ),
        (
            std::fs::read(sample()).unwrap()[..5000].to_vec(),
            "truncated",
        ),
    ] {
        std::fs::write(&input, &bytes).unwrap();
        let o = fuse(&input, &dir.path().join("out.onnx"), &[]);
        assert_error(&o, needle);
        assert!(stderr(&o).contains("bad.onnx"));
        assert_eq!(files_in(dir.path()), ["bad.onnx"]);
        assert_eq!(std::fs::read(&input).unwrap(), bytes);
    }
}

#[test]
fn refuses_to_write_over_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("m.onnx");
    std::fs::copy(sample(), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    for target in [input.clone(), dir.path().join(".").join("m.onnx")] {
        let o = fuse(&input, &target, &[]);
        assert_error(&o, "refusing to write over the input");
    }
    assert_eq!(std::fs::read(&input).unwrap(), before);
    assert_eq!(files_in(dir.path()), ["m.onnx"]);
}

#[test]
fn missing_output_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = fuse(&sample(), &dir.path().join("no/such/dir/out.onnx"), &[]);
    assert_error(&o, "output directory does not exist");
}

#[test]
fn usage_errors_exit_with_2() {
    let o = bin(&["fuse".as_ref()]);
    assert_eq!(o.status.code(), Some(2));
    let o = bin(&["frobnicate".as_ref()]);
    assert_eq!(o.status.code(), Some(2));
    let o = bin(&["--help".as_ref()]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("Exit codes"));
}

#[test]
fn model_fields_and_graph_signature_survive_a_fusion() {
    let dir = tempfile::tempdir().unwrap();
    for form in ["ts_nofold_op17", "dynamo_op20_dynbatch"] {
        let input = testdata().join(format!("models/grouped/{form}.onnx"));
        let out = dir.path().join(format!("{form}.onnx"));
        assert!(fuse(&input, &out, &[]).status.success());
        let a = tract_onnx::onnx().proto_model_for_path(&input).unwrap();
        let b = tract_onnx::onnx().proto_model_for_path(&out).unwrap();
        assert_eq!(a.ir_version, b.ir_version);
        assert_eq!(a.opset_import, b.opset_import);
        assert_eq!(a.producer_name, b.producer_name);
        assert_eq!(a.producer_version, b.producer_version);
        assert_eq!(a.doc_string, b.doc_string);
        assert_eq!(a.metadata_props, b.metadata_props);
        let (ga, gb) = (a.graph.unwrap(), b.graph.unwrap());
        assert_eq!(ga.name, gb.name);
        assert_eq!(ga.input, gb.input);
        assert_eq!(ga.output, gb.output);
        // Nodes outside blocks come out unchanged and in the same order.
        let untouched = |g: &tract_onnx::pb::GraphProto| -> Vec<tract_onnx::pb::NodeProto> {
            g.node
                .iter()
                .filter(|n| !matches!(n.op_type.as_str(), "Conv" | "BatchNormalization" | "Add"))
                .cloned()
                .collect()
        };
        assert_eq!(untouched(&ga), untouched(&gb), "{form}");
    }
}

#[test]
fn ir3_models_keep_every_initializer_listed_as_an_input() {
    // Opset 8 exports are IR 3: every initializer must also be a graph input. Those of removed
    // weights go, the fused weights are listed, the real input stays first.
    let dir = tempfile::tempdir().unwrap();
    let input = testdata().join("models/tiny/ts_nofold_op8.onnx");
    let out = dir.path().join("out.onnx");
    assert!(fuse(&input, &out, &[]).status.success());
    let graph = tract_onnx::onnx()
        .proto_model_for_path(&out)
        .unwrap()
        .graph
        .unwrap();
    let inputs: Vec<&str> = graph.input.iter().map(|v| v.name.as_str()).collect();
    let mut expected: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let original = tract_onnx::onnx()
        .proto_model_for_path(&input)
        .unwrap()
        .graph
        .unwrap();
    assert_eq!(inputs[0], original.input[0].name);
    expected.sort();
    let mut listed = inputs[1..].to_vec();
    listed.sort();
    assert_eq!(listed, expected);
}

#[test]
fn batch_mode_fuses_every_input_into_the_output_directory() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = [
        "models/tiny/ts_fold_op17.onnx",
        "models/grouped/dynamo_op18.onnx",
        "families/acnet/ts_nofold_op17.onnx",
    ];
    let mut args: Vec<std::ffi::OsString> = vec!["fuse".into()];
    args.extend(inputs.iter().map(|p| testdata().join(p).into_os_string()));
    args.extend(["--out-dir".into(), dir.path().as_os_str().to_owned()]);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let o = bin(&refs);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(
        out.lines()
            .filter(|l| l.contains(" → ") && l.contains(": fused "))
            .count(),
        3,
        "{out}"
    );
    assert_eq!(
        files_in(dir.path()),
        [
            "dynamo_op18.onnx",
            "dynamo_op18.onnx.data",
            "ts_fold_op17.onnx",
            "ts_nofold_op17.onnx"
        ]
    );
    // A failing input does not stop the others, but the run exits 1.
    let missing = dir.path().join("missing.onnx");
    let other = tempfile::tempdir().unwrap();
    let o = bin(&[
        "fuse".as_ref(),
        missing.as_os_str(),
        sample().as_os_str(),
        "--out-dir".as_ref(),
        other.path().as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing.onnx"));
    assert_eq!(files_in(other.path()), ["ts_fold_op17.onnx"]);
    // Two inputs of one name would collide.
    let o = bin(&[
        "fuse".as_ref(),
        sample().as_os_str(),
        sample().as_os_str(),
        "--out-dir".as_ref(),
        other.path().as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    // Three paths without --out-dir are a usage error.
    let o = bin(&[
        "fuse".as_ref(),
        sample().as_os_str(),
        sample().as_os_str(),
        sample().as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn quiet_prints_nothing_on_success() {
    let dir = tempfile::tempdir().unwrap();
    let o = fuse(&sample(), &dir.path().join("out.onnx"), &["-q"]);
    assert!(o.status.success());
    assert!(stdout(&o).is_empty() && stderr(&o).is_empty());
}

#[test]
fn mangled_models_never_panic_and_leave_nothing_behind() {
    // Truncations, byte flips and random bytes of a real model: each run either fuses (a cut at
    // a field boundary can still be a valid model) or fails with one line and no file.
    let original = std::fs::read(testdata().join("models/tiny/ts_nofold_op17.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.onnx"), dir.path().join("out.onnx"));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    for case in 0..90 {
        let data: Vec<u8> = match case % 3 {
            0 => original[..1 + next(original.len() - 1)].to_vec(),
            1 => {
                let mut d = original.clone();
                for _ in 0..5 {
                    let at = next(d.len());
                    d[at] = next(256) as u8;
                }
                d
            }
            _ => (0..1 + next(2000)).map(|_| next(256) as u8).collect(),
        };
        std::fs::write(&input, &data).unwrap();
        let _ = std::fs::remove_file(&output);
        let o = fuse(&input, &output, &[]);
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "case {case}: {err}");
        match o.status.code() {
            Some(0) => assert!(output.exists()),
            Some(1) => {
                assert_eq!(err.lines().count(), 1, "case {case}: {err}");
                assert!(!output.exists(), "case {case}: output left behind");
            }
            other => panic!("case {case}: exit {other:?}: {err}"),
        }
        assert_eq!(
            std::fs::read(&input).unwrap(),
            data,
            "case {case}: input changed"
        );
        let leftovers = files_in(dir.path())
            .into_iter()
            .filter(|f| f.ends_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0, "case {case}: temporary files left");
    }
}

#[test]
fn json_reports_for_pipelines() {
    let o = bin(&["inspect".as_ref(), "--json".as_ref(), sample().as_os_str()]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["summary"]["blocks"], 7);
    assert_eq!(v["summary"]["fusable"], 7);
    assert_eq!(v["summary"]["without_identity"], 5);
    let blocks = v["blocks"].as_array().unwrap();
    assert_eq!(blocks[3]["name"], "stage2.1");
    assert_eq!(blocks[3]["in_channels"], 16);
    assert_eq!(blocks[3]["out_channels"], 16);
    assert_eq!(blocks[3]["stride"], serde_json::json!([1, 1]));
    assert_eq!(blocks[3]["groups"], 1);
    assert_eq!(
        blocks[3]["branches"],
        serde_json::json!(["3x3", "1x1", "identity"])
    );
    assert_eq!(blocks[3]["fusable"], true);
    assert!(blocks[3]["reason"].is_null());

    let dir = tempfile::tempdir().unwrap();
    let o = fuse(&sample(), &dir.path().join("out.onnx"), &["--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["summary"]["fused"], 7);
    assert_eq!(v["summary"]["nodes_after"], 18);
    assert!(v["fused"][0]["deviation"]["rel"].as_f64().unwrap() < 1e-6);
    assert!(v["output"].as_str().unwrap().ends_with("out.onnx"));

    let train = testdata().join("models/tiny/ts_train_op17.onnx");
    let o = bin(&["inspect".as_ref(), "--json".as_ref(), train.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["summary"]["fusable"], 0);
    assert!(
        v["blocks"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("training mode")
    );
}

/// A model with one candidate block that cannot be fused (its branches' groups differ) and one
/// that can.
fn model_with_a_blocked_candidate() -> Vec<u8> {
    use crate::common::builder::{Builder, ConvSpec};
    let mut b = Builder::new(&[1, 4, 6, 6]);
    let c3 = b.conv(
        "x",
        ConvSpec {
            group: 2,
            ..ConvSpec::k3(4, 4)
        },
    );
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let s = b.node("Add", &[&c3, &c1], vec![]);
    let r = b.node("Relu", &[&s], vec![]);
    let d3 = b.conv(&r, ConvSpec::k3(4, 4));
    let d1 = b.conv(&r, ConvSpec::k1(4, 4));
    let y = b.node("Add", &[&d3, &d1], vec![]);
    b.output(&y, &[1, 4, 6, 6]);
    b.build()
}

/// A model whose only sum is a residual connection around Conv→ReLU→Conv: no candidate at all.
fn model_with_a_residual_only() -> Vec<u8> {
    use crate::common::builder::{Builder, ConvSpec};
    let mut b = Builder::new(&[1, 4, 6, 6]);
    let c = b.conv("x", ConvSpec::k3(4, 4));
    let r = b.node("Relu", &[&c], vec![]);
    let d = b.conv(&r, ConvSpec::k3(4, 4));
    let y = b.node("Add", &[&d, "x"], vec![]);
    b.output(&y, &[1, 4, 6, 6]);
    b.build()
}

#[test]
fn skipped_candidates_are_warnings_on_stderr_and_strict_makes_them_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("blocked.onnx");
    std::fs::write(&input, model_with_a_blocked_candidate()).unwrap();
    let out = dir.path().join("out.onnx");

    let o = fuse(&input, &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let summary = stdout(&o);
    assert_eq!(summary.lines().count(), 1, "{summary}");
    assert!(
        summary.starts_with("fused 1 blocks (1 without identity), 1 not fused: "),
        "{summary}"
    );
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "onnx-repvgg: warning: {}: block '",
            input.display()
        )) && err.contains("(4→4, 3x3 + 1x1) not fused: branches use group=2 and group=1"),
        "{err}"
    );
    assert!(out.exists());

    // -q: nothing but errors and warnings; the warning stays.
    std::fs::remove_file(&out).unwrap();
    let o = fuse(&input, &out, &["-q"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(o.stdout.is_empty());
    assert_eq!(stderr(&o), err);

    // --json: the warning on stderr, the report (with the skipped block) on stdout.
    let o = fuse(&input, &out, &["--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["summary"]["skipped"], 1);
    assert_eq!(stderr(&o), err);

    // --strict: exit 1, one line naming the block and its reason, nothing written.
    std::fs::remove_file(&out).unwrap();
    let o = fuse(&input, &out, &["--strict", "-q"]);
    assert_error(&o, "strict: 1 candidate block was not fused: ");
    assert!(stderr(&o).contains("branches use group=2 and group=1"));
    assert!(!out.exists());
    assert_eq!(files_in(dir.path()), ["blocked.onnx"]);
}

/// A sum of two convolutions, one of `x`, one of `Relu(x)`: it looks like a block, but its
/// summands read tensors a nonlinearity separates.
fn model_with_a_sum_across_a_relu() -> Vec<u8> {
    use crate::common::builder::{Builder, ConvSpec};
    let mut b = Builder::new(&[1, 4, 6, 6]);
    let r = b.node("Relu", &["x"], vec![]);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let c1 = b.conv(&r, ConvSpec::k1(4, 4));
    let y = b.node("Add", &[&c3, &c1], vec![]);
    b.output(&y, &[1, 4, 6, 6]);
    b.build()
}

#[test]
fn a_residual_connection_is_no_candidate_and_no_skip() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let residual = dir.path().join("residual.onnx");
    std::fs::write(&residual, model_with_a_residual_only()).unwrap();
    let input = dir.path().join("across-relu.onnx");
    std::fs::write(&input, model_with_a_sum_across_a_relu()).unwrap();

    // Default: one line saying there was nothing to fuse, no warning; --strict agrees.
    for model in [&residual, &input] {
        for extra in [&[][..], &["--strict"]] {
            let o = fuse(model, &out, extra);
            assert_eq!(o.status.code(), Some(0), "{extra:?}: {}", stderr(&o));
            assert_eq!(
                stdout(&o),
                "nothing to fuse: no re-parameterizable blocks found\n"
            );
            assert!(o.stderr.is_empty(), "{extra:?}: {}", stderr(&o));
            assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(model).unwrap());
        }
    }

    // -v and inspect list it, with the reason.
    let o = fuse(&input, &out, &["-v"]);
    let table = stdout(&o);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(
        table
            .lines()
            .nth(2)
            .unwrap()
            .contains("not a re-parameterizable block"),
        "{table}"
    );
    let o = bin(&["inspect".as_ref(), input.as_os_str()]);
    let listed = stdout(&o);
    assert!(
        listed.contains("not a re-parameterizable block"),
        "{listed}"
    );
    assert!(!listed.contains("no: not a"), "{listed}");
    assert!(
        listed.ends_with(
            "nothing to fuse: no re-parameterizable blocks found; 1 sum that is no block\n"
        ),
        "{listed}"
    );
    let o = bin(&["inspect".as_ref(), "--json".as_ref(), input.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["summary"]["blocks"], 0);
    assert_eq!(v["summary"]["not_blocks"], 1);
    assert_eq!(v["blocks"][0]["candidate"], false);
    let o = fuse(&input, &out, &["--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["summary"]["skipped"], 0);
    assert_eq!(v["not_blocks"].as_array().unwrap().len(), 1);
}

#[test]
fn training_mode_is_an_error_that_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deploy.onnx");
    let o = fuse(
        &testdata().join("models/tiny/ts_train_op17.onnx"),
        &out,
        &["-q"],
    );
    assert_error(&o, "training mode");
    assert!(stderr(&o).contains("--allow-training"));
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn fuse_with_one_path_prints_the_usage_of_fuse() {
    let o = bin(&["fuse".as_ref(), sample().as_os_str()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("fuse takes IN OUT"), "{err}");
    assert!(
        err.contains("Usage: onnx-repvgg fuse [OPTIONS] <IN OUT | IN...>..."),
        "{err}"
    );
    assert!(stdout(&o).is_empty());
}

#[test]
fn a_missing_out_dir_is_one_error_before_any_input() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir");
    let o = bin(&[
        "fuse".as_ref(),
        sample().as_os_str(),
        testdata()
            .join("models/tiny/ts_nofold_op17.onnx")
            .as_os_str(),
        dir.path().join("not-even-read.onnx").as_os_str(),
        "--out-dir".as_ref(),
        missing.as_os_str(),
    ]);
    assert_error(&o, "dir: output directory does not exist");
    assert!(!stderr(&o).contains("not-even-read"));
}

/// Runs the binary with one environment variable set.
fn with_env(args: &[&std::ffi::OsStr], name: &str, value: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_onnx-repvgg"))
        .args(args)
        .env(name, value)
        .output()
        .unwrap()
}

#[test]
fn bad_environment_values_are_usage_errors_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deploy.onnx");
    let model = sample();
    let fuse_args = ["fuse".as_ref(), model.as_os_str(), out.as_os_str()];
    let inspect_args = ["inspect".as_ref(), "--int8".as_ref(), model.as_os_str()];
    let bad = [
        ("ONNX_REPVGG_THREADS", "abc"),
        ("ONNX_REPVGG_THREADS", "0"),
        ("ONNX_REPVGG_THREADS", "-2"),
        ("ONNX_REPVGG_THREADS", "1.5"),
        ("ONNX_REPVGG_THREADS", "100000"),
        ("ONNX_REPVGG_MEMORY_LIMIT", "abc"),
        ("ONNX_REPVGG_MEMORY_LIMIT", "512XB"),
        ("ONNX_REPVGG_MEMORY_LIMIT", "-1M"),
        ("ONNX_REPVGG_MEMORY_LIMIT", "0"),
    ];
    for (name, value) in bad {
        for args in [&fuse_args[..], &inspect_args[..]] {
            let o = with_env(args, name, value);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{name}={value}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.starts_with(&format!("onnx-repvgg: {name}=\"{value}\": ")),
                "{err}"
            );
            assert!(o.stdout.is_empty());
            assert!(files_in(dir.path()).is_empty(), "{name}={value}");
        }
    }
    // Accepted units, and an empty value (unset).
    for (name, value) in [
        ("ONNX_REPVGG_MEMORY_LIMIT", "512MB"),
        ("ONNX_REPVGG_MEMORY_LIMIT", "1.5GiB"),
        ("ONNX_REPVGG_MEMORY_LIMIT", "2g"),
        ("ONNX_REPVGG_MEMORY_LIMIT", ""),
        ("ONNX_REPVGG_THREADS", "3"),
        ("ONNX_REPVGG_THREADS", ""),
    ] {
        let o = with_env(&fuse_args, name, value);
        assert_eq!(o.status.code(), Some(0), "{name}={value}: {}", stderr(&o));
    }
    // 1MiB is a size: accepted, and too small for this run (an error, not usage).
    let o = with_env(&fuse_args, "ONNX_REPVGG_MEMORY_LIMIT", "1MiB");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("but only 1 MiB are available"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn files_that_are_no_onnx_model_say_so_first() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 3] = [
        (
            "notes.txt",
            b"these are my notes\nnot a model\n",
            "(it is text)",
        ),
        (
            "weights.npz",
            b"PK\x03\x04\x14\x00\x00\x00\x00\x00arr_0.npy\x93NUMPY",
            "(a ZIP archive, such as NumPy .npz or a PyTorch checkpoint)",
        ),
        (
            "array.npy",
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}",
            "(a NumPy .npy array)",
        ),
    ];
    for (name, bytes, what) in cases {
        let input = dir.path().join(name);
        std::fs::write(&input, bytes).unwrap();
        for command in ["inspect", "dot"] {
            let o = bin(&[command.as_ref(), input.as_os_str()]);
            assert_error(&o, what);
            let prefix = format!(
                "onnx-repvgg: {}: not an ONNX model {what}: ",
                input.display()
            );
            assert!(stderr(&o).starts_with(&prefix), "{}", stderr(&o));
        }
        let o = fuse(&input, &dir.path().join("out.onnx"), &[]);
        assert_error(&o, &format!("not an ONNX model {what}: "));
    }
    assert_eq!(
        files_in(dir.path()),
        ["array.npy", "notes.txt", "weights.npz"]
    );
}

#[test]
fn batch_mode_fuses_one_input_at_a_time() {
    // The second input is a named pipe: the tool blocks opening it until the test writes. By
    // then the first input must be fused and reported, and no thread of the first fusion (nor
    // a second fusion) may be running: one worker pool, one memory budget, input after input.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("second.onnx");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let out = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-repvgg"))
        .args([
            "fuse".as_ref(),
            sample().as_os_str(),
            fifo.as_os_str(),
            "--out-dir".as_ref(),
            out.path().as_os_str(),
        ])
        .env("ONNX_REPVGG_THREADS", "4")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout_pipe = child.stdout.take().unwrap();
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout_pipe).lines();
        let first = lines.next();
        let _ = send.send(first);
        lines.count()
    });
    let first = receive
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the first input's report before the second input is read");
    let first = first.unwrap().unwrap();
    assert!(
        first.contains("ts_fold_op17.onnx → ") && first.contains(": fused 7 blocks"),
        "{first}"
    );
    // Blocked on the second input: the main thread alone (beside the one that waits for
    // signals, to clean up after an interrupted run).
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap())
        .filter(|name| name.trim() != "signals")
        .collect();
    assert_eq!(
        threads.len(),
        1,
        "threads while waiting for the second input: {threads:?}"
    );
    // The tool may fail on the pipe before all is written: that is no failure of the test.
    let _ = std::fs::write(&fifo, std::fs::read(sample()).unwrap());
    let status = child.wait().unwrap();
    // A pipe cannot be mapped: the second input fails, the first one stands.
    assert!(matches!(status.code(), Some(0 | 1)), "{status:?}");
    assert!(out.path().join("ts_fold_op17.onnx").exists());
}
