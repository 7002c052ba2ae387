//! What people and pipelines use besides `fuse IN OUT`: costs and INT8 statistics in `inspect`,
//! DOT pictures, dry runs, pipes, completions, the man page, the library API, the memory check.
//! Costs are checked against an independent count: tract's own shape inference and PyTorch's own
//! deploy export.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::*;
use tract_onnx::prelude::*;

fn tiny(name: &str) -> PathBuf {
    testdata().join("models/tiny").join(name)
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Initializer name → dims, read with tract's protobuf types.
fn initializer_dims(path: &Path) -> std::collections::HashMap<String, Vec<i64>> {
    let model = tract_onnx::onnx().proto_model_for_path(path).unwrap();
    let graph = model.graph.unwrap();
    graph
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone()))
        .collect()
}

#[test]
fn inspect_counts_parameters_like_the_pytorch_deploy_export() {
    // Fused weights + biases of every block = the Conv initializers PyTorch's own
    // re-parameterization exported.
    let report = json(&bin(&[
        "inspect".as_ref(),
        "--json".as_ref(),
        tiny("ts_nofold_op17.onnx").as_os_str(),
    ]));
    let deploy = tract_onnx::onnx()
        .proto_model_for_path(tiny("deploy_ts_fold_op17.onnx"))
        .unwrap()
        .graph
        .unwrap();
    let dims = initializer_dims(&tiny("deploy_ts_fold_op17.onnx"));
    let conv_params: i64 = deploy
        .node
        .iter()
        .filter(|n| n.op_type == "Conv")
        .flat_map(|n| n.input[1..].iter())
        .map(|v| dims[v].iter().product::<i64>())
        .sum();
    assert_eq!(report["summary"]["params_after"], conv_params);
    // Before: every Conv and BatchNormalization initializer of the training export.
    let train = tract_onnx::onnx()
        .proto_model_for_path(tiny("ts_nofold_op17.onnx"))
        .unwrap()
        .graph
        .unwrap();
    let dims = initializer_dims(&tiny("ts_nofold_op17.onnx"));
    let block_params: i64 = train
        .node
        .iter()
        .filter(|n| matches!(n.op_type.as_str(), "Conv" | "BatchNormalization"))
        .flat_map(|n| n.input.iter())
        .filter_map(|v| dims.get(v))
        .map(|d| d.iter().product::<i64>())
        .sum();
    assert_eq!(report["summary"]["params_before"], block_params);
    for block in report["blocks"].as_array().unwrap() {
        assert!(block["params_after"].as_u64() < block["params_before"].as_u64());
    }
}

#[test]
fn inspect_counts_flops_on_shapes_tract_infers() {
    let report = json(&bin(&[
        "inspect".as_ref(),
        "--json".as_ref(),
        tiny("ts_fold_op17.onnx").as_os_str(),
    ]));
    assert_eq!(
        report["summary"]["input_shape"],
        serde_json::json!([1, 3, 32, 32])
    );
    // Independent count: tract's typed model of PyTorch's deploy export, each Conv's output
    // shape and weight size from tract's facts; a multiply-add is 2 FLOPs, the bias 1.
    let model = tract_onnx::onnx()
        .model_for_path(tiny("deploy_ts_fold_op17.onnx"))
        .unwrap()
        .with_input_fact(0, f32::fact([1, 3, 32, 32]).into())
        .unwrap()
        .into_typed()
        .unwrap();
    let mut flops = 0u64;
    let mut convs = 0;
    for node in model.nodes() {
        if node.op.name() != "Conv" {
            continue;
        }
        convs += 1;
        let out = model.outlet_fact(OutletId::new(node.id, 0)).unwrap();
        let out = out.shape.as_concrete().unwrap().to_vec();
        let weight = model.outlet_fact(node.inputs[1]).unwrap();
        let weight: usize = weight.shape.as_concrete().unwrap().iter().product();
        let per_output = (weight / out[1]) as u64;
        let elements = out.iter().product::<usize>() as u64;
        flops += elements * (2 * per_output + 1);
    }
    assert_eq!(convs, 7);
    assert_eq!(report["summary"]["flops_after"], flops);
    assert!(report["summary"]["flops_before"].as_u64().unwrap() > flops);
    // A stated input size scales the count: twice the side, four times the FLOPs.
    let larger = json(&bin(&[
        "inspect".as_ref(),
        "--json".as_ref(),
        "--input-size".as_ref(),
        "64".as_ref(),
        tiny("ts_fold_op17.onnx").as_os_str(),
    ]));
    assert_eq!(
        larger["summary"]["input_shape"],
        serde_json::json!([1, 3, 64, 64])
    );
    assert_eq!(larger["summary"]["flops_after"], 4 * flops);
}

#[test]
fn int8_statistics_match_those_of_pytorchs_own_fused_weights() {
    let report = json(&bin(&[
        "inspect".as_ref(),
        "--json".as_ref(),
        "--int8".as_ref(),
        tiny("ts_nofold_op17.onnx").as_os_str(),
    ]));
    // PyTorch's deploy export holds the same kernels, folded by PyTorch: the statistics of its
    // weights must match ours.
    let model = tract_onnx::onnx()
        .proto_model_for_path(tiny("deploy_ts_fold_op17.onnx"))
        .unwrap();
    let graph = model.graph.unwrap();
    let weights: std::collections::HashMap<&str, Vec<f64>> = graph
        .initializer
        .iter()
        .map(|t| {
            let values = t
                .raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect();
            (t.name.as_str(), values)
        })
        .collect();
    let convs: Vec<&tract_onnx::pb::NodeProto> =
        graph.node.iter().filter(|n| n.op_type == "Conv").collect();
    let blocks = report["blocks"].as_array().unwrap();
    assert_eq!(convs.len(), blocks.len());
    let mut risky = 0;
    for (conv, block) in convs.iter().zip(blocks) {
        let w = &weights[conv.input[1].as_str()];
        let out_channels = block["out_channels"].as_u64().unwrap() as usize;
        let theirs = onnx_repvgg::quant::Int8Stats::of(w, out_channels);
        let ours = &block["int8"];
        let close = |key: &str, value: f64, tol: f64| {
            let got = ours[key].as_f64().unwrap();
            assert!(
                (got - value).abs() <= tol * value.abs().max(1.0),
                "{} {key}: ours {got}, PyTorch's {value}",
                block["name"]
            );
        };
        close("min", theirs.min, 1e-5);
        close("max", theirs.max, 1e-5);
        close("channel_spread", theirs.channel_spread, 1e-4);
        close("sqnr_per_tensor_db", theirs.sqnr_per_tensor_db, 1e-3);
        close("sqnr_per_channel_db", theirs.sqnr_per_channel_db, 1e-3);
        assert_eq!(ours["risky"], theirs.is_risky());
        risky += usize::from(theirs.is_risky());
        // The advice follows both SQNRs: per-channel only where per-channel clears the bar.
        let per_channel = theirs.sqnr_per_channel_db;
        let advice = match (theirs.is_risky(), per_channel < 30.0) {
            (false, _) => "ok",
            (true, false) => "per-channel",
            (true, true) => "keep-float",
        };
        assert_eq!(ours["advice"], advice, "{}", block["name"]);
        assert_eq!(ours["risky_per_channel"], per_channel < 30.0);
    }
    assert_eq!(report["summary"]["int8_risky"], risky);
    assert_eq!(report["summary"]["int8_risky_per_channel"], 0);
    // Without --int8 nothing was measured: null, not 0.
    let plain = json(&bin(&[
        "inspect".as_ref(),
        "--json".as_ref(),
        tiny("ts_nofold_op17.onnx").as_os_str(),
    ]));
    assert!(
        plain["summary"]["int8_risky"].is_null(),
        "{}",
        plain["summary"]
    );
    assert!(plain["summary"]["int8_risky_per_channel"].is_null());
    assert!(plain["blocks"][0]["int8"].is_null());
    // The table says the same.
    let o = bin(&[
        "inspect".as_ref(),
        "--int8".as_ref(),
        tiny("ts_nofold_op17.onnx").as_os_str(),
    ]);
    assert!(
        text(&o.stdout).contains(&format!(
            "{risky} of 7 fused kernels below 30 dB SQNR with per-tensor INT8"
        )),
        "{}",
        text(&o.stdout)
    );
}

#[test]
fn dot_draws_blocks_before_and_after_with_identity_branches() {
    let model = tiny("ts_nofold_op17.onnx");
    let o = bin(&["dot".as_ref(), model.as_os_str()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let dot = text(&o.stdout);
    assert!(dot.starts_with("digraph {"), "{dot}");
    assert_eq!(dot.matches("(fused)\"").count(), 7, "{dot}");
    assert_eq!(dot.matches("label=\"identity\"").count(), 2, "{dot}");
    // Before: 14 block Convs; after: the fused ones only.
    assert_eq!(dot.matches("label=\"Conv ").count(), 14 + 7, "{dot}");
    assert!(dot.contains("training structure") && dot.contains("after onnx-repvgg fuse"));

    let o = bin(&[
        "dot".as_ref(),
        model.as_os_str(),
        "--block".as_ref(),
        "stage2.1".as_ref(),
    ]);
    let block = text(&o.stdout);
    assert_eq!(block.matches("(fused)\"").count(), 1, "{block}");
    assert_eq!(block.matches("label=\"identity\"").count(), 1, "{block}");
    assert_eq!(block.matches("label=\"Add\"").count(), 2, "{block}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.dot");
    let o = bin(&[
        "dot".as_ref(),
        model.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert!(o.status.success() && o.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), dot);

    let o = bin(&[
        "dot".as_ref(),
        model.as_os_str(),
        "--block".as_ref(),
        "stage9".as_ref(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no block named 'stage9' (blocks: stage0, stage1.0"),
        "{err}"
    );
}

#[test]
fn dry_run_reports_everything_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("train.onnx");
    std::fs::copy(tiny("ts_fold_op17.onnx"), &input).unwrap();
    let o = bin(&["fuse".as_ref(), "--dry-run".as_ref(), input.as_os_str()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("(dry run, nothing written): fused 7 blocks (5 without identity)"),
        "{out}"
    );
    assert!(out.contains("verified (worst"), "{out}");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
    let report = json(&bin(&[
        "fuse".as_ref(),
        "-n".as_ref(),
        "--json".as_ref(),
        input.as_os_str(),
    ]));
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["output"], serde_json::Value::Null);
    assert_eq!(report["summary"]["fused"], 7);
}

/// Runs the binary with `stdin` piped in.
fn piped(args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_onnx-repvgg"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let bytes = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&bytes);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

#[test]
fn models_flow_through_pipes() {
    let training = std::fs::read(tiny("ts_fold_op17.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("deploy.onnx");
    assert!(
        fuse(&tiny("ts_fold_op17.onnx"), &reference, &["-q"])
            .status
            .success()
    );
    let reference = std::fs::read(&reference).unwrap();

    // stdin → stdout: the model on stdout, byte for byte the file fusion; the report on stderr.
    let o = piped(&["fuse", "-", "-"], &training);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(o.stdout, reference);
    assert!(
        text(&o.stderr).starts_with("fused 7 blocks"),
        "{}",
        text(&o.stderr)
    );

    // stdin → file.
    let out = dir.path().join("from-stdin.onnx");
    let o = piped(&["fuse", "-", out.to_str().unwrap()], &training);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), reference);

    // Garbage on stdin: one line naming <stdin>, nothing on stdout.
    let o = piped(&["fuse", "-", "-"], b"not a model at all");
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("onnx-repvgg: <stdin>: not an ONNX model (it is text): "),
        "{err}"
    );

    // Pipes carry whole models only: external data is refused by name.
    let o = piped(
        &["fuse", tiny("dynamo_op18.onnx").to_str().unwrap(), "-"],
        b"",
    );
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("dynamo_op18.onnx: the model keeps its tensors in external data")
            && err.contains("standard output cannot carry a sidecar"),
        "{err}"
    );
    assert!(o.stdout.is_empty());

    // inspect and dot read standard input as fuse does: the same output as from the file.
    for command in ["inspect", "dot"] {
        let from_file = bin(&[command.as_ref(), tiny("ts_fold_op17.onnx").as_os_str()]);
        let from_stdin = piped(&[command, "-"], &training);
        assert!(
            from_stdin.status.success(),
            "{command}: {}",
            text(&from_stdin.stderr)
        );
        assert_eq!(
            text(&from_stdin.stdout),
            text(&from_file.stdout),
            "{command}"
        );
        let o = piped(&[command, "-"], b"not a model at all");
        assert_eq!(o.status.code(), Some(1), "{command}");
        assert!(
            text(&o.stderr).starts_with("onnx-repvgg: <stdin>: not an ONNX model (it is text): "),
            "{command}: {}",
            text(&o.stderr)
        );
    }
    let report = piped(&["inspect", "--json", "--int8", "-"], &training);
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["summary"]["blocks"], 7);
    assert!(report["summary"]["int8_risky"].is_number());

    // A dry run of standard input.
    let o = piped(&["fuse", "-n", "-"], &training);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).starts_with("<stdin> (dry run, nothing written): fused 7 blocks"),
        "{}",
        text(&o.stdout)
    );
}

#[test]
fn training_mode_warnings_reach_stderr_through_pipes_too() {
    let training = std::fs::read(tiny("ts_train_op17.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deploy.onnx");
    let model = tiny("ts_train_op17.onnx");
    let file_to_stdout = ["fuse", "--allow-training", model.to_str().unwrap(), "-"];
    let stdin_to_file = ["fuse", "--allow-training", "-", out.to_str().unwrap()];
    for (args, stdin) in [(&file_to_stdout, &b""[..]), (&stdin_to_file, &training[..])] {
        let o = piped(args, stdin);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        let err = text(&o.stderr);
        assert!(
            err.lines().any(|l| l.starts_with("onnx-repvgg: warning: ")
                && l.contains("folded 16 BatchNormalization nodes exported in training mode")),
            "{args:?}: {err}"
        );
    }
    // Without --allow-training it is an error, through pipes as well: nothing on stdout.
    let o = piped(&["fuse", "-", "-"], &training);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert!(
        text(&o.stderr).contains("training mode"),
        "{}",
        text(&o.stderr)
    );
}

/// Whether `program` can be run (`program version_flag` succeeds).
fn has(program: &str, version_flag: &str) -> bool {
    Command::new(program)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What bash offers when `words` are typed and TAB is pressed after the last one: the script
/// is sourced into a real bash, and the function it registered for `onnx-repvgg` is called the
/// way bash's programmable completion calls it (COMP_WORDS, COMP_CWORD, command, word,
/// previous word).
fn bash_completes(script: &Path, words: &[&str]) -> Vec<String> {
    let driver = r#"
source "$1"; shift
COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
spec=$(complete -p onnx-repvgg) || exit 3
fn=$(sed -E 's/.* -F ([^ ]+) .*/\1/' <<< "$spec")
prev=""; (( COMP_CWORD > 0 )) && prev=${COMP_WORDS[COMP_CWORD-1]}
"$fn" onnx-repvgg "${COMP_WORDS[COMP_CWORD]}" "$prev"
printf '%s\n' "${COMPREPLY[@]}"
"#;
    let o = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", driver, "driver"])
        .arg(script)
        .args(words)
        .output()
        .unwrap();
    assert!(o.status.success(), "bash: {}", text(&o.stderr));
    text(&o.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn bash_completes_options_past_the_subcommand() {
    if !has("bash", "--version") {
        eprintln!("SKIPPED bash_completes_options_past_the_subcommand: bash is not installed");
        return;
    }
    let o = bin(&["completions".as_ref(), "bash".as_ref()]);
    assert!(o.status.success());
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("onnx-repvgg.bash");
    std::fs::write(&script, &o.stdout).unwrap();

    let top = bash_completes(&script, &["onnx-repvgg", ""]);
    for word in ["fuse", "inspect", "dot", "completions", "man"] {
        assert!(top.iter().any(|w| w == word), "{word} not in {top:?}");
    }
    let fuse = bash_completes(&script, &["onnx-repvgg", "fuse", "--"]);
    for word in [
        "--out-dir",
        "--dry-run",
        "--strict",
        "--allow-training",
        "--json",
    ] {
        assert!(fuse.iter().any(|w| w == word), "{word} not in {fuse:?}");
    }
    let mut inspect = bash_completes(&script, &["onnx-repvgg", "inspect", "m.onnx", "--i"]);
    inspect.sort();
    assert_eq!(inspect, ["--input-size", "--int8"]);
    let dot = bash_completes(&script, &["onnx-repvgg", "dot", "--"]);
    assert!(dot.iter().any(|w| w == "--block"), "{dot:?}");
    let shells = bash_completes(&script, &["onnx-repvgg", "completions", ""]);
    for shell in ["bash", "zsh", "fish"] {
        assert!(
            shells.iter().any(|w| w == shell),
            "{shell} not in {shells:?}"
        );
    }

    // The other shells' scripts come from the same definition.
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let o = bin(&["completions".as_ref(), shell.as_ref()]);
        assert!(o.status.success(), "{shell}");
        let script = text(&o.stdout);
        for word in [
            "onnx-repvgg",
            "fuse",
            "inspect",
            "dry-run",
            "int8",
            "strict",
        ] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
}

/// The long options `onnx-repvgg SUBCOMMAND --help` lists.
fn long_options(subcommand: &str) -> Vec<String> {
    let o = bin(&[subcommand.as_ref(), "--help".as_ref()]);
    assert!(o.status.success(), "{subcommand}");
    text(&o.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '.']).to_string())
        .filter(|w| {
            w.chars()
                .skip(2)
                .all(|c| c.is_ascii_lowercase() || c == '-')
        })
        .collect()
}

#[test]
fn the_man_page_documents_every_subcommand_the_environment_and_exit_codes() {
    let o = bin(&["man".as_ref()]);
    assert!(o.status.success());
    let man = text(&o.stdout);
    assert!(man.contains(".TH onnx-repvgg 1"), "{man}");
    // roff writes a hyphen in an option as \-.
    let plain = man.replace("\\-", "-");
    for subcommand in ["fuse", "inspect", "dot", "completions", "man"] {
        assert!(
            plain.contains(&format!(".SS \"onnx-repvgg {subcommand}")),
            "no section for {subcommand}"
        );
        let options = long_options(subcommand);
        assert!(
            options.iter().any(|o| o == "--help"),
            "{subcommand}: {options:?}"
        );
        for option in options {
            assert!(
                plain.contains(&option),
                "man page lacks {subcommand} {option}"
            );
        }
    }
    for needle in [
        ".SH ENVIRONMENT",
        "ONNX_REPVGG_THREADS",
        "ONNX_REPVGG_MEMORY_LIMIT",
        ".SH \"EXIT STATUS\"",
        "usage: bad arguments",
    ] {
        assert!(plain.contains(needle), "man page lacks {needle}");
    }
    // It names no page that does not exist (clap_mangen's own page refers to one per
    // subcommand).
    assert!(!plain.contains("onnx-repvgg-fuse(1)"), "{man}");

    // The formatter reads it without a warning, where one is installed.
    if !has("groff", "--version") {
        eprintln!("SKIPPED the man page's groff check: groff is not installed");
        return;
    }
    let mut child = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&o.stdout).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stderr), "", "groff warnings");
    // Bold and underline are overstruck on a terminal: keep the last character of each.
    let mut page = String::new();
    for c in text(&out.stdout).chars() {
        match c {
            '\x08' => {
                page.pop();
            }
            c => page.push(c),
        }
    }
    for needle in [
        "EXIT STATUS",
        "--out-dir",
        "ONNX_REPVGG_MEMORY_LIMIT",
        "before → after",
    ] {
        assert!(
            page.contains(needle),
            "rendered page lacks {needle}: {page}"
        );
    }
}

#[test]
fn the_help_documents_the_environment_and_exit_codes() {
    let o = bin(&["--help".as_ref()]);
    assert!(o.status.success());
    let help = text(&o.stdout);
    for needle in [
        "ONNX_REPVGG_THREADS",
        "ONNX_REPVGG_MEMORY_LIMIT",
        "Exit codes",
        "0  success",
        "2  usage",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}: {help}");
    }
}

/// Runs `dot` on the sample model into `name` in a fresh folder.
fn dot_into(name: &str) -> (std::process::Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let o = bin(&[
        "dot".as_ref(),
        tiny("ts_nofold_op17.onnx").as_os_str(),
        "-o".as_ref(),
        dir.path().join(name).as_os_str(),
    ]);
    (o, dir)
}

#[test]
fn dot_writes_the_format_the_file_extension_names_or_refuses() {
    // DOT text without Graphviz: .dot and .gv.
    for name in ["m.dot", "m.gv"] {
        let (o, dir) = dot_into(name);
        assert!(o.status.success(), "{name}: {}", text(&o.stderr));
        let written = std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert!(written.starts_with("digraph {"), "{name}");
    }
    // No extension: refused before any work (usage, exit 2), nothing written.
    let (o, dir) = dot_into("picture");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("name the output format by the file's extension"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    if !has("dot", "-V") {
        eprintln!(
            "SKIPPED dot_writes_the_format_the_file_extension_names_or_refuses (rendering): \
             Graphviz is not installed"
        );
        let (o, dir) = dot_into("m.png");
        assert_eq!(o.status.code(), Some(1));
        assert!(
            text(&o.stderr).contains("install Graphviz"),
            "{}",
            text(&o.stderr)
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        return;
    }
    // Every format renders as that format, never as DOT text under another name.
    let magic: &[(&str, &[u8])] = &[
        ("m.svg", b"<?xml"),
        ("m.png", b"\x89PNG"),
        ("m.PDF", b"%PDF"),
        ("m.jpg", b"\xff\xd8\xff"),
        ("m.gif", b"GIF8"),
        ("m.ps", b"%!PS"),
    ];
    for (name, magic) in magic {
        let (o, dir) = dot_into(name);
        assert!(o.status.success(), "{name}: {}", text(&o.stderr));
        let written = std::fs::read(dir.path().join(name)).unwrap();
        assert!(
            written.starts_with(magic),
            "{name}: {:?}",
            &written[..16.min(written.len())]
        );
    }
    // An extension Graphviz does not know: usage error, the known ones listed, nothing written.
    let (o, dir) = dot_into("m.xyz");
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("Graphviz cannot write .xyz files; it knows: ") && err.contains("png"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_run_that_would_not_fit_in_memory_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deploy.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_onnx-repvgg"))
        .args([
            "fuse".as_ref(),
            tiny("ts_fold_op17.onnx").as_os_str(),
            out.as_os_str(),
        ])
        .env(onnx_repvgg::memory::LIMIT_VARIABLE, "4M")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("not enough memory: fusing this model would need about")
            && err.contains("but only 4 MiB are available"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn the_library_fuses_bytes_like_the_binary_fuses_files() {
    let training = std::fs::read(tiny("ts_nofold_op17.onnx")).unwrap();
    let (deploy, report) =
        onnx_repvgg::fuse_model(&training, onnx_repvgg::Options::default()).unwrap();
    assert_eq!(report.fused.len(), 7);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deploy.onnx");
    assert!(
        fuse(&tiny("ts_nofold_op17.onnx"), &path, &["-q"])
            .status
            .success()
    );
    assert_eq!(deploy, std::fs::read(&path).unwrap());
    let report = onnx_repvgg::inspect_model(&training, onnx_repvgg::Options::default()).unwrap();
    assert_eq!(report.blocks.len(), 7);
    let err = onnx_repvgg::fuse_model(b"\x08", onnx_repvgg::Options::default()).unwrap_err();
    assert!(err.to_string().starts_with("<memory>: "), "{err}");
}
