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
