//! Trust at the edges: inputs on which the tool once exited 0 with an invalid model, or 1 on a
//! correct fold, each built here as a small model (issue "Trust at the edges", B1–B7), and the
//! neighbours of each (nested graphs, multi-output nodes, external data wherever a tensor lives).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use onnx_repvgg::onnx::attr::{new_graph, new_int, new_ints, new_string, new_tensor};
use onnx_repvgg::onnx::proto::{
    GraphProto, ModelProto, NodeProto, SparseTensorProto, StringStringEntryProto, TensorProto,
};
use prost::Message;
use tract_onnx::prelude::*;

use crate::common::builder::{Builder, ConvSpec, value_info};
use crate::common::*;

/// Writes `b`'s model to `dir/name`.
fn save(b: &Builder, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, b.build()).unwrap();
    path
}

/// Runs both models in tract on the same seeded input of `shape`; asserts they agree.
fn assert_same_outputs(original: &Path, fused: &Path, shape: &[usize]) {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 211) as f32 / 105.0) - 1.0)
        .collect();
    let x = Tensor::from(tract_ndarray::ArrayD::from_shape_vec(shape.to_vec(), data).unwrap());
    let (a, b) = (run_tract(original, &x), run_tract(fused, &x));
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(&b) {
        let rel = relative_error(a, b);
        assert!(rel < 1e-5, "{}: relative error {rel:.3e}", fused.display());
    }
}

/// Fuses `input` into `output` with the binary; asserts success and `fused` blocks.
fn fuse_expecting(input: &Path, output: &Path, fused: usize) {
    let run = fuse(input, output, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let summary = stdout(&run);
    let want = format!("fused {fused} blocks");
    assert!(summary.starts_with(&want), "{summary}");
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A Conv with `auto_pad` and strides, followed by a BatchNormalization.
fn same_conv_bn(pad: &str, k: usize, stride: i64, size: i64) -> Builder {
    let mut b = Builder::new(&[1, 4, size, size]);
    let w = b.init(&[8, 4, k, k], -0.5, 0.5);
    let attrs = vec![
        new_string("auto_pad", pad),
        new_ints("strides", [stride, stride]),
    ];
    let c = b.node("Conv", &["x", &w], attrs);
    let y = b.bn(&c, 8, 1e-5);
    let out = (size + stride - 1) / stride;
    b.output(&y, &[1, 8, out, out]);
    b
}

#[test]
fn same_padding_with_strides_folds_and_verifies_at_every_geometry() {
    // B1: the check's narrowed input once had another size modulo the stride than the
    // declared one, and `SAME_*` pads depend on exactly that: 12 of these 48 failed their check.
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for pad in ["SAME_UPPER", "SAME_LOWER"] {
        for k in [2, 3, 5] {
            for stride in [2, 3] {
                for size in 31..=34 {
                    let b = same_conv_bn(pad, k, stride, size);
                    let label = format!("{pad} k{k} s{stride} n{size}");
                    let (deploy, report) = onnx_repvgg::fuse_model(&b.build(), Default::default())
                        .unwrap_or_else(|e| panic!("{label}: {e}"));
                    assert_eq!(report.fused.len(), 1, "{label}");
                    let block = &report.fused[0];
                    let n = size as usize;
                    assert_eq!(block.sized_for, Some(vec![n, n]), "{label}");
                    assert!(block.deviation.is_some_and(|d| d.rel < 1e-6), "{label}");
                    let original = save(&b, dir.path(), "in.onnx");
                    let fused = dir.path().join("out.onnx");
                    std::fs::write(&fused, deploy).unwrap();
                    assert_same_outputs(&original, &fused, &[1, 4, n, n]);
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 48);
}

#[test]
fn same_padding_deeper_in_the_graph_resolves_from_propagated_shapes() {
    // The block's input size is declared nowhere but follows from the graph input's.
    let mut b = Builder::new(&[1, 4, 32, 32]);
    let stem = b.conv(
        "x",
        ConvSpec {
            stride: 2,
            ..ConvSpec::k3(4, 4)
        },
    );
    let r = b.node("Relu", &[&stem], vec![]);
    let w3 = b.init(&[4, 4, 3, 3], -0.5, 0.5);
    let w1 = b.init(&[4, 4, 1, 1], -0.5, 0.5);
    let attrs = || {
        vec![
            new_string("auto_pad", "SAME_UPPER"),
            new_ints("strides", [2, 2]),
        ]
    };
    let c3 = b.node("Conv", &[&r, &w3], attrs());
    let c1 = b.node("Conv", &[&r, &w1], attrs());
    let y = b.node("Add", &[&c3, &c1], vec![]);
    b.output(&y, &[1, 4, 8, 8]);
    let dir = tempfile::tempdir().unwrap();
    let input = save(&b, dir.path(), "in.onnx");
    let output = dir.path().join("out.onnx");
    let run = fuse(&input, &output, &["--json"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let report: serde_json::Value = serde_json::from_str(&stdout(&run)).unwrap();
    assert_eq!(report["summary"]["fused"], 1, "{report}");
    assert_eq!(report["fused"][0]["sized_for"], serde_json::json!([16, 16]));
    assert_same_outputs(&input, &output, &[1, 4, 32, 32]);
}

/// A 3x3 with pads (0, 1) and a 1x1 with pads (0, 0), both with stride 2: their outputs have
/// one size only when the input's is even.
fn uneven_pads(size: Option<i64>) -> Builder {
    let mut b = Builder::new(&[1, 4, size.unwrap_or(8), size.unwrap_or(8)]);
    if size.is_none() {
        let t = b.graph.input[0].r#type.as_mut().unwrap();
        if let Some(onnx_repvgg::onnx::proto::type_proto::Value::TensorType(t)) = t.value.as_mut() {
            let dims = &mut t.shape.as_mut().unwrap().dim;
            for d in &mut dims[2..] {
                d.value = Some(
                    onnx_repvgg::onnx::proto::tensor_shape_proto::dimension::Value::DimParam(
                        "n".into(),
                    ),
                );
            }
        }
    }
    let spec = |k: usize, pads: [i64; 4]| ConvSpec {
        k: [k, k],
        pads,
        stride: 2,
        ..ConvSpec::k3(4, 4)
    };
    let c3 = b.conv("x", spec(3, [0, 0, 1, 1]));
    let c1 = b.conv("x", spec(1, [0, 0, 0, 0]));
    let y = b.node("Add", &[&c3, &c1], vec![]);
    let n = size.map_or(4, |n| (n + 1) / 2);
    b.output(&y, &[1, 4, n, n]);
    b
}

#[test]
fn branches_whose_pads_agree_at_the_declared_size_only_fold_there() {
    let (deploy, report) =
        onnx_repvgg::fuse_model(&uneven_pads(Some(32)).build(), Default::default()).unwrap();
    assert_eq!(report.fused.len(), 1);
    assert_eq!(report.fused[0].sized_for, Some(vec![32, 32]));
    let dir = tempfile::tempdir().unwrap();
    let original = save(&uneven_pads(Some(32)), dir.path(), "in.onnx");
    let fused = dir.path().join("out.onnx");
    std::fs::write(&fused, deploy).unwrap();
    assert_same_outputs(&original, &fused, &[1, 4, 32, 32]);
    // At an odd size the branches' outputs differ: nothing to fold (the model is invalid).
    // With a symbolic size, whether they agree is unknown: refused with the reason.
    let (_, report) =
        onnx_repvgg::fuse_model(&uneven_pads(None).build(), Default::default()).unwrap();
    assert!(report.fused.is_empty());
    let reason = report.skipped[0].reason.as_deref().unwrap_or("");
    assert!(reason.contains("not static"), "{reason}");
}

/// `key=value` entries of an external tensor.
fn entries(location: &str, offset: usize, length: Option<usize>) -> Vec<StringStringEntryProto> {
    let entry = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    let mut e = vec![
        entry("location", location.into()),
        entry("offset", offset.to_string()),
    ];
    e.extend(length.map(|l| entry("length", l.to_string())));
    e
}

/// Moves `t`'s values into `data` (at a 64-byte aligned offset) and points `t` at `location`.
fn externalize(t: &mut TensorProto, data: &mut Vec<u8>, location: &str, length: bool) {
    data.resize(data.len().next_multiple_of(64), 0);
    let offset = data.len();
    let bytes: Vec<u8> = t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect();
    data.extend_from_slice(&bytes);
    t.float_data.clear();
    t.data_location = Some(1);
    t.external_data = entries(location, offset, length.then_some(bytes.len()));
}

/// A Constant node producing `t`.
fn constant_node(t: TensorProto) -> NodeProto {
    NodeProto {
        output: vec![t.name().to_string()],
        name: Some(format!("{}_constant", t.name())),
        op_type: Some("Constant".into()),
        attribute: vec![new_tensor("value", t)],
        ..Default::default()
    }
}

#[test]
fn constant_weights_with_external_data_fold_and_move_to_the_sidecar() {
    // B2a: a Conv weight in a Constant node (onnx.save(..., convert_attribute=True)), and a
    // Constant outside any block, both with external data; fused into another folder.
    let mut b = Builder::new(&[1, 4, 6, 6]);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let y = b.node("Add", &[&c3, &c1], vec![]);
    let r = b.node("Relu", &[&y], vec![]);
    let scale = b.init(&[1, 4, 1, 1], 0.5, 1.5);
    let z = b.node("Mul", &[&r, &scale], vec![]);
    b.output(&z, &[1, 4, 6, 6]);
    let mut data = Vec::new();
    let mut constants = Vec::new();
    for mut t in std::mem::take(&mut b.graph.initializer) {
        externalize(&mut t, &mut data, "weights.bin", true);
        constants.push(constant_node(t));
    }
    constants.append(&mut b.graph.node);
    b.graph.node = constants;
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(src.path().join("weights.bin"), &data).unwrap();
    let input = save(&b, src.path(), "train.onnx");
    let output = dst.path().join("deploy.onnx");
    fuse_expecting(&input, &output, 1);
    let mut left: Vec<String> = std::fs::read_dir(dst.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["deploy.onnx", "deploy.onnx.data"]);
    // Runs from its own folder, the training model's data out of reach.
    assert_same_outputs(&input, &output, &[1, 4, 6, 6]);
    let model = ModelProto::decode(&*std::fs::read(&output).unwrap()).unwrap();
    let mut locations = Vec::new();
    onnx_repvgg::onnx::tensors::in_graph(model.graph.as_ref().unwrap(), &mut |t| {
        locations.extend(t.external_data.iter().filter(|e| e.key() == "location"))
    });
    assert!(!locations.is_empty());
    assert!(locations.iter().all(|e| e.value() == "deploy.onnx.data"));
}

/// An `If` on a constant condition whose branches hold a weight each (an initializer of the
/// branch graph), stored externally in `location` (or inline).
fn if_with_branch_weights(data: &mut Vec<u8>, location: Option<&str>) -> GraphProto {
    let branch = |name: &str, value: f32, data: &mut Vec<u8>| {
        let mut w = TensorProto {
            name: Some(format!("{name}_w")),
            dims: vec![1, 4, 1, 1],
            data_type: Some(1),
            float_data: vec![value; 4],
            ..Default::default()
        };
        if let Some(location) = location {
            externalize(&mut w, data, location, true);
        }
        GraphProto {
            name: Some(name.into()),
            node: vec![NodeProto {
                input: vec!["y".into(), format!("{name}_w")],
                output: vec![format!("{name}_out")],
                op_type: Some("Mul".into()),
                name: Some(format!("{name}_mul")),
                ..Default::default()
            }],
            initializer: vec![w],
            output: vec![value_info(&format!("{name}_out"), &[1, 4, 6, 6])],
            ..Default::default()
        }
    };
    let mut b = Builder::new(&[1, 4, 6, 6]);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    b.node("Add", &[&c3, &c1], vec![]);
    let sum = b.graph.node.last().unwrap().output[0].clone();
    b.graph.node.last_mut().unwrap().output[0] = "y".into();
    assert_eq!(sum, "v3");
    b.graph.initializer.push(TensorProto {
        name: Some("cond".into()),
        dims: vec![],
        data_type: Some(9),
        int32_data: vec![1],
        ..Default::default()
    });
    b.graph.node.push(NodeProto {
        input: vec!["cond".into()],
        output: vec!["z".into()],
        op_type: Some("If".into()),
        name: Some("choose".into()),
        attribute: vec![
            new_graph("then_branch", branch("then", 2.0, data)),
            new_graph("else_branch", branch("else", 3.0, data)),
        ],
        ..Default::default()
    });
    b.output("z", &[1, 4, 6, 6]);
    b.graph
}

/// A model (IR 8, opset 17) of `graph`.
fn model_of(graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![onnx_repvgg::onnx::proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

#[test]
fn nested_graph_tensors_with_external_data_move_to_the_sidecar() {
    // B2b: initializers of If branches kept pointing at the *input's* data file.
    let mut data = vec![7u8; 100];
    let graph = if_with_branch_weights(&mut data, Some("train.onnx.data"));
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(src.path().join("train.onnx.data"), &data).unwrap();
    let model = model_of(graph);
    let input = src.path().join("train.onnx");
    std::fs::write(&input, model.encode_to_vec()).unwrap();
    let output = dst.path().join("deploy.onnx");
    fuse_expecting(&input, &output, 1);
    let fused = ModelProto::decode(&*std::fs::read(&output).unwrap()).unwrap();
    let sidecar = std::fs::read(dst.path().join("deploy.onnx.data")).unwrap();
    let node = fused
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .find(|n| n.op_type() == "If");
    let mut seen = BTreeMap::new();
    for g in onnx_repvgg::onnx::tensors::subgraphs(node.unwrap()) {
        let w = &g.initializer[0];
        let get = |k: &str| {
            w.external_data
                .iter()
                .find(|e| e.key() == k)
                .map(|e| e.value().to_string())
                .unwrap()
        };
        assert_eq!(get("location"), "deploy.onnx.data");
        let (offset, length): (usize, usize) = (
            get("offset").parse().unwrap(),
            get("length").parse().unwrap(),
        );
        let values: Vec<f32> = sidecar[offset..offset + length]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        seen.insert(g.name().to_string(), values);
    }
    assert_eq!(seen["then"], [2.0; 4]);
    assert_eq!(seen["else"], [3.0; 4]);
}

#[test]
fn new_names_never_collide_with_names_inside_nested_graphs() {
    // B5: the fused weight's name, `<block>.rbr_reparam.weight`, is taken inside a branch.
    let mut data = Vec::new();
    let mut graph = if_with_branch_weights(&mut data, None);
    graph.node[2].name = Some("sum".into());
    if let Some(then) = graph.node[3].attribute[0].g.as_mut() {
        then.node[0].output[0] = "sum.rbr_reparam.weight".into();
        then.output[0].name = Some("sum.rbr_reparam.weight".into());
    }
    let model = model_of(graph);
    let (deploy, report) =
        onnx_repvgg::fuse_model(&model.encode_to_vec(), Default::default()).unwrap();
    assert_eq!(report.fused.len(), 1);
    let fused = ModelProto::decode(deploy.as_slice()).unwrap();
    let names: Vec<&str> = fused
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .map(|t| t.name())
        .collect();
    assert!(names.contains(&"sum.rbr_reparam_1.weight"), "{names:?}");
    assert!(!names.contains(&"sum.rbr_reparam.weight"), "{names:?}");
}

#[test]
fn a_batch_norm_whose_running_statistics_are_used_stays_out_of_blocks() {
    // B3: with --allow-training, a training-mode BN whose running mean is a graph output was
    // folded away, leaving a graph output nothing produced.
    let mut b = Builder::new(&[2, 4, 6, 6]);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let bn = b.bn(&c3, 4, 1e-5);
    let node = b.graph.node.last_mut().unwrap();
    node.attribute.push(new_int("training_mode", 1));
    node.output
        .extend(["running_mean".into(), "running_var".into()]);
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let bn1 = b.bn(&c1, 4, 1e-5);
    let y = b.node("Add", &[&bn, &bn1], vec![]);
    b.output(&y, &[2, 4, 6, 6]);
    b.output("running_mean", &[4]);
    let bytes = b.build();
    let options = onnx_repvgg::Options {
        allow_training_bn: true,
        ..Default::default()
    };
    let (deploy, report) = onnx_repvgg::fuse_model(&bytes, options).unwrap();
    // The 1x1 branch's Conv→BN still folds; the training BN and its block stay.
    assert_eq!(report.fused.len(), 1);
    let reason = report.skipped[0].reason.as_deref().unwrap_or("");
    assert!(reason.contains("other outputs in use"), "{reason}");
    let fused = ModelProto::decode(deploy.as_slice()).unwrap();
    let g = fused.graph.unwrap();
    assert!(
        g.node
            .iter()
            .any(|n| n.output.iter().any(|o| o == "running_mean"))
    );
    assert_eq!(report.skipped[0].branches, ["v2", "1x1"]);
    // Without --allow-training the same: that BN is in no block, so nothing is in training mode.
    let (_, report) = onnx_repvgg::fuse_model(&bytes, Default::default()).unwrap();
    assert_eq!((report.fused.len(), report.skipped.len()), (1, 1));
}

#[test]
fn external_data_without_length_is_sized_from_dims() {
    // B4: `length` is optional; ONNX Runtime sizes such tensors from their dims and type.
    let fixture = testdata().join("models/tiny/dynamo_op18.onnx");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        testdata().join("models/tiny/dynamo_op18.onnx.data"),
        dir.path().join("dynamo_op18.onnx.data"),
    )
    .unwrap();
    let mut model = ModelProto::decode(&*std::fs::read(&fixture).unwrap()).unwrap();
    let mut stripped = 0;
    for t in &mut model.graph.as_mut().unwrap().initializer {
        let before = t.external_data.len();
        t.external_data.retain(|e| e.key() != "length");
        stripped += before - t.external_data.len();
    }
    assert!(stripped > 10, "{stripped}");
    let input = dir.path().join("dynamo_op18.onnx");
    std::fs::write(&input, model.encode_to_vec()).unwrap();
    let output = dir.path().join("deploy.onnx");
    fuse_expecting(&input, &output, 7);
    assert_same_outputs(&fixture, &output, &[1, 3, 32, 32]);
}

#[test]
fn sparse_initializers_pass_through_and_the_rest_fuses() {
    // B6: a valid model with a sparse initializer was refused as malformed.
    let mut b = Builder::new(&[1, 4, 6, 6]);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let y = b.node("Add", &[&c3, &c1], vec![]);
    let z = b.node("Add", &[&y, "sp"], vec![]);
    b.output(&z, &[1, 4, 6, 6]);
    b.graph.sparse_initializer.push(SparseTensorProto {
        values: Some(TensorProto {
            name: Some("sp".into()),
            dims: vec![2],
            data_type: Some(1),
            float_data: vec![1.0, 2.0],
            ..Default::default()
        }),
        indices: Some(TensorProto {
            name: Some("sp_indices".into()),
            dims: vec![2],
            data_type: Some(7),
            int64_data: vec![0, 5],
            ..Default::default()
        }),
        dims: vec![4, 1, 1],
    });
    let (deploy, report) = onnx_repvgg::fuse_model(&b.build(), Default::default()).unwrap();
    assert_eq!(report.fused.len(), 1);
    let fused = ModelProto::decode(deploy.as_slice()).unwrap();
    let g = fused.graph.unwrap();
    assert_eq!(g.sparse_initializer, b.graph.sparse_initializer);
    assert_eq!(g.node.iter().filter(|n| n.op_type() == "Conv").count(), 1);
}

#[test]
fn parameters_count_constant_node_weights() {
    // B7: a fusion of Constant-node weights appeared to add parameters.
    let mut b = Builder::new(&[1, 4, 6, 6]);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let y = b.node("Add", &[&c3, &c1], vec![]);
    b.output(&y, &[1, 4, 6, 6]);
    let weight = b.graph.initializer.pop().unwrap();
    b.graph.node.insert(0, constant_node(weight));
    let (_, report) = onnx_repvgg::fuse_model(&b.build(), Default::default()).unwrap();
    // 144 + 16 before; the fused 3x3 weight and its bias after.
    assert_eq!((report.params_before, report.params_after), (160, 148));
}

#[test]
fn an_interrupted_run_leaves_nothing_behind() {
    // Ctrl-C, `timeout -s TERM`, a closed terminal: the output folder stays as it was. The model
    // is large enough (4 blocks of 512 channels, 50 MB) that the run is caught while writing.
    use std::os::unix::process::ExitStatusExt;
    let mut b = Builder::new(&[1, 512, 8, 8]);
    let mut x = "x".to_string();
    for _ in 0..4 {
        let c3 = b.conv(&x, ConvSpec::k3(512, 512));
        let c1 = b.conv(&x, ConvSpec::k1(512, 512));
        x = b.node("Add", &[&c3, &c1], vec![]);
    }
    b.output(&x, &[1, 512, 8, 8]);
    let src = tempfile::tempdir().unwrap();
    let input = save(&b, src.path(), "big.onnx");
    for signal in [libc_signal::TERM, libc_signal::INT, libc_signal::HUP] {
        let dst = tempfile::tempdir().unwrap();
        let output = dst.path().join("deploy.onnx");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-repvgg"))
            .args([
                "fuse".as_ref(),
                input.as_os_str(),
                output.as_os_str(),
                "--sync".as_ref(),
            ])
            .env("ONNX_REPVGG_THREADS", "1")
            .spawn()
            .unwrap();
        // Wait until it holds a file open in the output folder (unnamed or hidden), then signal.
        let fds = PathBuf::from(format!("/proc/{}/fd", child.id()));
        let writing = || {
            std::fs::read_dir(&fds)
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(dst.path()))
                })
        };
        let start = std::time::Instant::now();
        while !writing() && start.elapsed().as_secs() < 60 {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        assert!(writing(), "the run never started writing");
        std::process::Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(signal), "{status:?}");
        let left: Vec<_> = std::fs::read_dir(dst.path()).unwrap().collect();
        assert!(left.is_empty(), "signal {signal} left {left:?}");
    }
}

/// Signal numbers (Linux), for `kill -N`.
mod libc_signal {
    pub const HUP: i32 = 1;
    pub const INT: i32 = 2;
    pub const TERM: i32 = 15;
}

#[test]
fn an_invalid_model_is_an_error_naming_the_tensor_not_a_skip() {
    // BatchNormalization parameters of the wrong length, a Conv bias of the wrong shape: the
    // model is broken, and passing it through as "skipped" would hide that.
    let bn_too_short = || {
        let mut b = Builder::new(&[1, 4, 6, 6]);
        let c = b.conv("x", ConvSpec::k3(4, 4));
        let y = b.bn(&c, 4, 1e-5);
        b.output(&y, &[1, 4, 6, 6]);
        let mean = b.graph.node[1].input[3].clone();
        let t = b.graph.initializer.iter_mut().find(|t| t.name() == mean);
        let t = t.unwrap();
        t.dims = vec![3];
        t.float_data.truncate(3);
        (b, mean)
    };
    let (b, mean) = bn_too_short();
    let err = onnx_repvgg::fuse_model(&b.build(), Default::default()).unwrap_err();
    let err = err.to_string();
    assert!(
        err.contains(&format!("tensor '{mean}'")) && err.contains("3 values for 4"),
        "{err}"
    );
    let mut b = Builder::new(&[1, 4, 6, 6]);
    let c = b.conv(
        "x",
        ConvSpec {
            bias: true,
            ..ConvSpec::k3(4, 4)
        },
    );
    let y = b.bn(&c, 4, 1e-5);
    b.output(&y, &[1, 4, 6, 6]);
    let bias = b.graph.node[0].input[2].clone();
    b.graph
        .initializer
        .iter_mut()
        .find(|t| t.name() == bias)
        .unwrap()
        .dims = vec![2, 2];
    let err = onnx_repvgg::fuse_model(&b.build(), Default::default()).unwrap_err();
    assert!(
        err.to_string().contains(&format!("tensor '{bias}'")),
        "{err}"
    );
}

#[test]
fn verbose_output_says_when_a_fold_holds_for_the_declared_size_only() {
    let dir = tempfile::tempdir().unwrap();
    let input = save(&uneven_pads(Some(32)), dir.path(), "in.onnx");
    let run = fuse(&input, &dir.path().join("out.onnx"), &["-v"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stdout(&run).contains("for 32x32 inputs only"),
        "{}",
        stdout(&run)
    );
}
