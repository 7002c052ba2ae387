//! A hostile corpus, one case per class of bad input, each made from a real export: every case
//! must exit 1 with one line naming the file and the culprit, leave nothing in the output folder
//! and leave the input's bytes unchanged.

use std::path::{Path, PathBuf};

use onnx_repvgg::onnx::proto::{ModelProto, TensorProto};
use prost::Message;

fn training() -> ModelProto {
    let path = crate::common::testdata().join("models/tiny/ts_nofold_op17.onnx");
    ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

fn initializer<'m>(m: &'m mut ModelProto, name: &str) -> &'m mut TensorProto {
    let graph = m.graph.as_mut().unwrap();
    graph
        .initializer
        .iter_mut()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("no initializer {name}"))
}

/// Sets element `at` of a float32 initializer stored as raw bytes.
fn set_f32(m: &mut ModelProto, name: &str, at: usize, value: f32) {
    let t = initializer(m, name);
    let mut raw = t.raw_data.clone().unwrap().to_vec();
    raw[4 * at..4 * at + 4].copy_from_slice(&value.to_le_bytes());
    t.raw_data = Some(raw.into());
}

const WEIGHT: &str = "stage0.rbr_dense.conv.weight";

/// Every case: a file name, its bytes (and extra files next to it), the text the error must hold.
fn cases(dir: &Path) -> Vec<(String, Vec<u8>, &'static str)> {
    let mut cases: Vec<(String, Vec<u8>, &'static str)> = Vec::new();
    let mut model = |name: &str, edit: &dyn Fn(&mut ModelProto), needle: &'static str| {
        let mut m = training();
        edit(&mut m);
        cases.push((name.to_string(), m.encode_to_vec(), needle));
    };
    model(
        "bn_negative_variance.onnx",
        &|m| set_f32(m, "stage0.rbr_dense.bn.running_var", 0, -1.0),
        "variance of BatchNormalization '/stage0/rbr_dense/bn/BatchNormalization' is negative",
    );
    model(
        "bn_nan_mean.onnx",
        &|m| set_f32(m, "stage0.rbr_dense.bn.running_mean", 1, f32::NAN),
        "mean of BatchNormalization '/stage0/rbr_dense/bn/BatchNormalization' is not finite",
    );
    model(
        "bn_infinite_scale.onnx",
        &|m| set_f32(m, "stage1.0.rbr_1x1.bn.weight", 2, f32::INFINITY),
        "is not finite",
    );
    model(
        "dangling.onnx",
        &|m| m.graph.as_mut().unwrap().node[3].input[0] = "nowhere".into(),
        "reads 'nowhere', which nothing produces",
    );
    model(
        "duplicate_output.onnx",
        &|m| {
            let nodes = &mut m.graph.as_mut().unwrap().node;
            let relus: Vec<usize> = (0..nodes.len())
                .filter(|&i| nodes[i].op_type() == "Relu")
                .collect();
            nodes[relus[1]].output[0] = nodes[relus[0]].output[0].clone();
        },
        "is produced twice",
    );
    model(
        "cycle.onnx",
        &|m| {
            let nodes = &mut m.graph.as_mut().unwrap().node;
            let relu = nodes
                .iter()
                .filter(|n| n.op_type() == "Relu")
                .nth(2)
                .unwrap();
            let late = relu.output[0].clone();
            let conv = nodes.iter_mut().find(|n| n.op_type() == "Conv").unwrap();
            conv.input[0] = late;
        },
        "the graph has a cycle",
    );
    model(
        "dims_disagree.onnx",
        &|m| initializer(m, WEIGHT).dims[0] += 1,
        "dims [9, 3, 3, 3] need 243 values but the data holds 864 bytes",
    );
    model(
        "negative_dims.onnx",
        &|m| initializer(m, WEIGHT).dims[0] = -8,
        "negative dim -8",
    );
    model(
        "overflowing_dims.onnx",
        &|m| initializer(m, WEIGHT).dims = vec![1 << 40, 1 << 40, 1 << 40, 8],
        "overflow",
    );
    model(
        "dims_beyond_data.onnx",
        &|m| {
            // Typed values: far fewer than the dims declare.
            let t = initializer(m, WEIGHT);
            t.raw_data = None;
            t.float_data = vec![0.5; 10];
        },
        "need 216 values but the data holds 10 values",
    );
    model(
        "unknown_data_type.onnx",
        &|m| initializer(m, WEIGHT).data_type = Some(999),
        "unknown data type 999",
    );
    model(
        "no_graph.onnx",
        &|m| m.graph = None,
        "the model has no graph",
    );
    let bytes = training().encode_to_vec();
    cases.push(("empty.onnx".into(), Vec::new(), "the file is empty"));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    cases.push(("random.onnx".into(), noise, "not a valid ONNX model"));
    for cut in [1, 10, 1000, bytes.len() / 2, bytes.len() - 1] {
        cases.push((
            format!("truncated_{cut}.onnx"),
            bytes[..cut].to_vec(),
            "not a valid ONNX model",
        ));
    }
    let tensor = initializer(&mut training(), WEIGHT).encode_to_vec();
    cases.push(("a_tensor.onnx".into(), tensor, "not a valid ONNX model"));

    // External data: the weight's bytes in `w.data` next to the model, then pointed elsewhere.
    let mut external = |name: &str, location: &str, length_extra: usize, needle: &'static str| {
        let mut m = training();
        let t = initializer(&mut m, WEIGHT);
        let raw = t.raw_data.take().unwrap();
        std::fs::write(dir.join("w.data"), &raw).unwrap();
        t.data_location = Some(1);
        for (k, v) in [
            ("location", location.to_string()),
            ("offset", "0".to_string()),
            ("length", (raw.len() + length_extra).to_string()),
        ] {
            t.external_data
                .push(onnx_repvgg::onnx::proto::StringStringEntryProto {
                    key: Some(k.into()),
                    value: Some(v),
                });
        }
        cases.push((name.to_string(), m.encode_to_vec(), needle));
    };
    external("external_missing.onnx", "nope.data", 0, "No such file");
    external(
        "external_short.onnx",
        "w.data",
        100,
        "runs past the end of the file",
    );
    external(
        "external_absolute.onnx",
        "/etc/hostname",
        0,
        "absolute locations are not allowed",
    );
    external(
        "external_dotdot.onnx",
        "../w.data",
        0,
        "may not contain '..'",
    );
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("/etc/hostname", dir.join("escape.data")).unwrap();
        external(
            "external_symlink.onnx",
            "escape.data",
            0,
            "leaves the model's directory",
        );
    }
    cases
}

fn digest(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn every_class_of_bad_input_fails_cleanly() {
    let models = tempfile::tempdir().unwrap();
    let cases = cases(models.path());
    assert!(cases.len() >= 25);
    for (name, bytes, needle) in cases {
        let run = crate::common::fuse_fresh(models.path(), &name, &bytes);
        run.assert_clean_failure(&name);
        let err = &run.stderr;
        assert!(err.contains(needle), "{name}: '{needle}' not in {err}");
        assert_eq!(digest(&run.input), bytes, "{name}: input changed");
    }
}

#[test]
fn paths_that_would_lose_data_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("model.onnx");
    std::fs::copy(
        crate::common::testdata().join("models/tiny/ts_nofold_op17.onnx"),
        &input,
    )
    .unwrap();
    let before = digest(&input);
    let link = dir.path().join("link.onnx");
    #[cfg(unix)]
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let dotted = dir.path().join(".").join("model.onnx");
    let cases: Vec<(PathBuf, PathBuf, &str)> = vec![
        (
            input.clone(),
            input.clone(),
            "refusing to write over the input",
        ),
        (input.clone(), dotted, "refusing to write over the input"),
        #[cfg(unix)]
        (
            input.clone(),
            link.clone(),
            "refusing to write over the input",
        ),
        #[cfg(unix)]
        (
            link.clone(),
            input.clone(),
            "refusing to write over the input",
        ),
        (
            input.clone(),
            dir.path().join("missing/out.onnx"),
            "the output directory does not exist",
        ),
        (input.clone(), dir.path().to_path_buf(), "is a directory"),
        (
            dir.path().to_path_buf(),
            dir.path().join("o.onnx"),
            "is a directory",
        ),
        (
            dir.path().join("absent.onnx"),
            dir.path().join("o.onnx"),
            "No such file",
        ),
    ];
    for (from, to, needle) in cases {
        let o = crate::common::fuse(&from, &to, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{from:?} → {to:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "'{needle}' not in {err}");
        assert_eq!(digest(&input), before);
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let expected: Vec<&str> = if cfg!(unix) {
        vec!["link.onnx", "model.onnx"]
    } else {
        vec!["model.onnx"]
    };
    assert_eq!(names, expected);
}
