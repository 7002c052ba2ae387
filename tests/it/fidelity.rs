//! What the tool does not rewrite comes out as it came in: fields our schema does not know
//! survive on the model, the graph, untouched nodes and tensors; every untouched field is copied
//! byte for byte; the same input always gives the same bytes.

use crate::common::*;
use onnx_repvgg::onnx::proto::{NodeProto, TensorProto};
use onnx_repvgg::onnx::wire::{self, Field, put_bytes_field};
use prost::Message;

/// An unknown field (number 1000, length-delimited) carrying `marker`.
fn unknown(marker: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes_field(&mut out, 1000, marker.as_bytes());
    out
}

/// `msg` with `edit` applied to the payload of every field `pick` selects.
fn edit_fields(
    msg: &[u8],
    pick: &dyn Fn(&Field, &[u8]) -> bool,
    edit: &dyn Fn(&[u8]) -> Vec<u8>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for f in wire::scan(msg, 0).unwrap() {
        let payload = &msg[f.payload.clone()];
        if pick(&f, payload) {
            put_bytes_field(&mut out, f.number, &edit(payload));
        } else {
            out.extend_from_slice(&msg[f.whole.clone()]);
        }
    }
    out
}

fn append(payload: &[u8], marker: &str) -> Vec<u8> {
    [payload, &unknown(marker)].concat()
}

/// The payloads of `number` fields of `msg`.
fn payloads(msg: &[u8], number: u32) -> Vec<Vec<u8>> {
    wire::scan(msg, 0)
        .unwrap()
        .into_iter()
        .filter(|f| f.number == number)
        .map(|f| msg[f.payload].to_vec())
        .collect()
}

fn has_marker(msg: &[u8], marker: &str) -> bool {
    payloads(msg, 1000).iter().any(|p| p == marker.as_bytes())
}

#[test]
fn unknown_fields_survive_a_real_fusion() {
    let original = std::fs::read(testdata().join("models/tiny/ts_nofold_op17.onnx")).unwrap();
    let node_named = |name: &'static str| {
        move |f: &Field, p: &[u8]| {
            f.number == 1 && NodeProto::decode(p).is_ok_and(|n| n.name() == name)
        }
    };
    let tensor_named = |name: &'static str| {
        move |f: &Field, p: &[u8]| {
            f.number == 5 && TensorProto::decode(p).is_ok_and(|t| t.name() == name)
        }
    };
    let edit_graph = |graph: &[u8]| {
        let g = edit_fields(graph, &node_named("/linear/Gemm"), &|p| {
            append(p, "node-ext")
        });
        let g = edit_fields(&g, &tensor_named("linear.weight"), &|p| {
            append(p, "tensor-ext")
        });
        append(&g, "graph-ext")
    };
    let model = edit_fields(&original, &|f, _| f.number == 7, &edit_graph);
    let model = append(&model, "model-ext");

    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.onnx"), dir.path().join("out.onnx"));
    std::fs::write(&input, &model).unwrap();
    let run = fuse(&input, &output, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).starts_with("fused 7 blocks"));

    let fused = std::fs::read(&output).unwrap();
    assert!(has_marker(&fused, "model-ext"));
    let graph = &payloads(&fused, 7)[0];
    assert!(has_marker(graph, "graph-ext"));
    let nodes = payloads(graph, 1);
    let gemm = nodes
        .iter()
        .find(|p| NodeProto::decode(p.as_slice()).unwrap().name() == "/linear/Gemm")
        .unwrap();
    assert!(has_marker(gemm, "node-ext"));
    let tensors = payloads(graph, 5);
    let weight = tensors
        .iter()
        .find(|p| TensorProto::decode(p.as_slice()).unwrap().name() == "linear.weight")
        .unwrap();
    assert!(has_marker(weight, "tensor-ext"));
    // Still a model runtimes accept, computing the same.
    let x = load_tensor(&testdata().join("models/tiny/input.pb"));
    let want = run_tract(&testdata().join("models/tiny/ts_nofold_op17.onnx"), &x);
    assert!(relative_error(&want[0], &run_tract(&output, &x)[0]) < TOLERANCE_F32);
}

#[test]
fn untouched_fields_are_copied_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    for form in ["ts_nofold_op17", "ts_fold_op13", "dynamo_op20_dynbatch"] {
        let input = testdata().join(format!("models/grouped/{form}.onnx"));
        let output = dir.path().join(format!("{form}.onnx"));
        assert!(fuse(&input, &output, &[]).status.success());
        let (a, b) = (
            std::fs::read(&input).unwrap(),
            std::fs::read(&output).unwrap(),
        );
        // Model-level fields other than the graph: the same bytes in the same order.
        let outside = |m: &[u8]| -> Vec<Vec<u8>> {
            wire::scan(m, 0)
                .unwrap()
                .into_iter()
                .filter(|f| f.number != 7)
                .map(|f| m[f.whole].to_vec())
                .collect()
        };
        assert_eq!(outside(&a), outside(&b), "{form}");
        let (ga, gb) = (&payloads(&a, 7)[0], &payloads(&b, 7)[0]);
        let whole = |g: &[u8], number: u32| -> Vec<Vec<u8>> {
            wire::scan(g, 0)
                .unwrap()
                .into_iter()
                .filter(|f| f.number == number)
                .map(|f| g[f.whole].to_vec())
                .collect()
        };
        // Graph name, doc string, inputs, outputs: identical.
        for number in [2, 10, 11, 12] {
            assert_eq!(
                whole(ga, number),
                whole(gb, number),
                "{form}: graph field {number}"
            );
        }
        // Every node, initializer and value_info of the output that the fusion did not create is
        // a byte-identical copy of one of the input's, in the input's order.
        // External tensors are the exception: their location and offset now point at OUT.data.
        let inline = |f: &Vec<u8>| {
            let payload = &wire::scan(f, 0).unwrap()[0].payload;
            TensorProto::decode(&f[payload.clone()]).map_or(true, |t| t.data_location != Some(1))
        };
        for number in [1, 5, 13] {
            let before: Vec<Vec<u8>> = whole(ga, number)
                .into_iter()
                .filter(|f| number != 5 || inline(f))
                .collect();
            let kept: Vec<Vec<u8>> = whole(gb, number)
                .into_iter()
                .filter(|f| number != 5 || inline(f))
                .filter(|f| !String::from_utf8_lossy(f).contains(".rbr_reparam"))
                .collect();
            let mut cursor = before.iter();
            for field in &kept {
                assert!(
                    cursor.any(|f| f == field),
                    "{form}: field {number} changed or reordered"
                );
            }
        }
    }
}

#[test]
fn the_same_input_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    for path in [
        "models/grouped/ts_nofold_op17.onnx",
        "models/tiny/dynamo_op18.onnx",
        "families/mobileone/dynamo_noopt_op18.onnx",
    ] {
        let input = testdata().join(path);
        let mut results = Vec::new();
        for run in 0..3 {
            let out = dir.path().join(format!("run{run}.onnx"));
            assert!(fuse(&input, &out, &[]).status.success());
            let sidecar = std::fs::read(dir.path().join(format!("run{run}.onnx.data"))).ok();
            let mut model = std::fs::read(&out).unwrap();
            // The sidecar's name is part of the model; normalize it to compare the rest.
            let name = format!("run{run}.onnx.data");
            while let Some(at) = model.windows(name.len()).position(|w| w == name.as_bytes()) {
                model[at..at + name.len()].copy_from_slice(b"runX.onnx.data");
            }
            results.push((model, sidecar));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{path}");
    }
}

#[test]
fn the_output_does_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for threads in ["1", "2", "3"] {
        let out = dir.path().join(format!("t{threads}.onnx"));
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-repvgg"))
            .env("ONNX_REPVGG_THREADS", threads)
            .args([
                "fuse".as_ref(),
                testdata()
                    .join("models/grouped/ts_nofold_op17.onnx")
                    .as_os_str(),
                out.as_os_str(),
            ])
            .output()
            .unwrap()
            .status;
        assert!(status.success());
        outputs.push(std::fs::read(&out).unwrap());
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
}
