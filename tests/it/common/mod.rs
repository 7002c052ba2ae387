//! Shared helpers of the integration tests: the fixture manifest, the real binary, and tract (a
//! runtime we did not write) as the numerical oracle.

#![allow(dead_code)]

pub mod builder;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tract_onnx::pb;
use tract_onnx::prelude::*;

/// Relative tolerance (max |a − b| / max |reference|) for float32 models.
pub const TOLERANCE_F32: f64 = 1e-4;
/// Relative tolerance for float16 models (their outputs carry ~1e-3 rounding already).
pub const TOLERANCE_F16: f64 = 2e-2;

/// The `testdata/` folder.
pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// One entry of `testdata/manifest.json`.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub model: String,
    pub family: String,
    pub form: String,
    pub path: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    pub dtype: String,
    pub blocks: usize,
    pub without_identity: usize,
    pub fusable: bool,
    pub deploy_structure: bool,
    pub external_data: bool,
    pub deploy_ops: BTreeMap<String, usize>,
    /// `fused`, `refused: <words of the reason>` or `partial: <why>` (families manifest).
    pub expect: String,
    /// Whether ONNX Runtime (and so any runtime we have) can run the model.
    pub runs: bool,
}

impl Fixture {
    pub fn label(&self) -> String {
        format!("{}/{}", self.model, self.form)
    }

    pub fn tolerance(&self) -> f64 {
        if self.dtype == "float16" {
            TOLERANCE_F16
        } else {
            TOLERANCE_F32
        }
    }
}

/// Every fixture of `testdata/manifest.json`.
pub fn fixtures() -> Vec<Fixture> {
    fixtures_in(&testdata())
}

/// Every fixture of `DIR/manifest.json` (paths relative to DIR).
pub fn fixtures_in(dir: &Path) -> Vec<Fixture> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    let items: Vec<serde_json::Value> = serde_json::from_str(&text).expect("manifest json");
    items
        .iter()
        .map(|v| {
            let s = |k: &str| {
                v[k].as_str()
                    .unwrap_or_else(|| panic!("manifest: {k}"))
                    .to_string()
            };
            let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("manifest: {k}")) as usize;
            let ops = v["deploy_ops_same_export"]
                .as_object()
                .expect("deploy ops")
                .iter()
                .map(|(k, c)| (k.clone(), c.as_u64().unwrap() as usize))
                .collect();
            Fixture {
                model: s("model"),
                family: v["family"].as_str().unwrap_or("repvgg").to_string(),
                form: s("form"),
                path: dir.join(s("path")),
                input: dir.join(s("input")),
                output: dir.join(s("output")),
                dtype: s("dtype"),
                blocks: n("blocks"),
                without_identity: n("without_identity"),
                fusable: v["fusable"].as_bool().unwrap(),
                deploy_structure: v["deploy_structure"].as_bool().unwrap_or(false),
                external_data: v["external_data"].as_bool().unwrap_or(false),
                deploy_ops: ops,
                expect: v["expect"]
                    .as_str()
                    .unwrap_or(if v["fusable"].as_bool().unwrap() {
                        "fused"
                    } else {
                        "refused: training"
                    })
                    .to_string(),
                runs: v["ort_runs"].as_bool().unwrap_or(true),
            }
        })
        .collect()
}

/// Runs the real binary.
pub fn bin(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onnx-repvgg"))
        .args(args)
        .output()
        .expect("run onnx-repvgg")
}

/// `onnx-repvgg fuse IN OUT [extra]`.
pub fn fuse(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["fuse".as_ref(), input.as_os_str(), output.as_os_str()];
    args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
    bin(&args)
}

/// `fuse` of `bytes` saved as `dir/name` into a fresh, empty folder.
pub struct FreshRun {
    pub input: PathBuf,
    pub output: PathBuf,
    pub out: Output,
    pub stderr: String,
    /// What the run left in the output folder.
    pub left: Vec<PathBuf>,
    /// Keeps the output folder while the run is looked at.
    _out_dir: tempfile::TempDir,
}

impl FreshRun {
    /// Asserts the failure a user should see: exit 1, one line on stderr that names the input,
    /// nothing on stdout, nothing left behind.
    pub fn assert_clean_failure(&self, name: &str) {
        let err = &self.stderr;
        assert_eq!(self.out.status.code(), Some(1), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        let prefix = format!("onnx-repvgg: {}: ", self.input.display());
        assert!(err.starts_with(&prefix), "{name}: {err}");
        assert!(self.out.stdout.is_empty(), "{name}");
        assert!(self.left.is_empty(), "{name}: left {:?}", self.left);
    }
}

pub fn fuse_fresh(dir: &Path, name: &str, bytes: &[u8]) -> FreshRun {
    let input = dir.join(name);
    std::fs::write(&input, bytes).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("deploy.onnx");
    let out = fuse(&input, &output, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let left = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    FreshRun {
        input,
        output,
        out,
        stderr,
        left,
        _out_dir: out_dir,
    }
}

/// Fuses each fixture into a fresh file and runs `check(fixture, output, stdout)` on it, which
/// returns what is wrong (nothing when all is well); the test then fails listing every problem
/// of every fixture (a failed run is one), or when fewer than `least` fixtures were checked.
pub fn fuse_each<'a>(
    fixtures: impl IntoIterator<Item = &'a Fixture>,
    least: usize,
    mut check: impl FnMut(&Fixture, &Path, &str) -> Vec<String>,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut problems = Vec::new();
    let mut checked = 0;
    for fx in fixtures {
        let out = dir.path().join(format!("{}_{}.onnx", fx.model, fx.form));
        let run = fuse(&fx.path, &out, &[]);
        let stdout = String::from_utf8_lossy(&run.stdout);
        match run.status.success() {
            true => problems.extend(check(fx, &out, &stdout)),
            false => problems.push(format!(
                "{}: exit {:?}: {}",
                fx.label(),
                run.status,
                String::from_utf8_lossy(&run.stderr)
            )),
        }
        checked += 1;
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked >= least, "only {checked} fixtures checked");
}

/// What is wrong with the op histogram of `out` against the fixture's deploy export.
pub fn deploy_ops_problem(fx: &Fixture, out: &Path) -> Option<String> {
    let ops = op_histogram(out);
    (ops != fx.deploy_ops).then(|| {
        format!(
            "{}: ops {ops:?}, deploy export has {:?}",
            fx.label(),
            fx.deploy_ops
        )
    })
}

/// Op type histogram of a model file, read with tract's own protobuf types.
pub fn op_histogram(path: &Path) -> BTreeMap<String, usize> {
    let model = tract_onnx::onnx()
        .proto_model_for_path(path)
        .expect("parse model");
    let mut ops = BTreeMap::new();
    for node in &model.graph.expect("graph").node {
        *ops.entry(node.op_type.clone()).or_default() += 1;
    }
    ops
}

/// A tensor stored as a serialized TensorProto, loaded by tract.
pub fn load_tensor(path: &Path) -> Tensor {
    use prost::Message;
    let bytes = std::fs::read(path).expect("read tensor");
    let proto = pb::TensorProto::decode(bytes.as_slice()).expect("decode tensor");
    tract_onnx::tensor::load_tensor(&*tract_onnx::onnx().provider, &proto, None)
        .expect("load tensor")
}

/// A stored tensor's values as f64.
pub fn load_values(path: &Path) -> Vec<f64> {
    let t = load_tensor(path).cast_to::<f64>().unwrap().into_owned();
    t.to_plain_array_view::<f64>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

/// The value feeding the classifier head (the input of the first pooling node): the output of
/// the last block.
pub fn backbone_output(path: &Path) -> String {
    let model = tract_onnx::onnx()
        .proto_model_for_path(path)
        .expect("parse model");
    let graph = model.graph.expect("graph");
    let pool = graph
        .node
        .iter()
        .find(|n| matches!(n.op_type.as_str(), "GlobalAveragePool" | "ReduceMean"))
        .expect("a pooling node");
    pool.input[0].clone()
}

/// Runs a model in tract on one input and returns its outputs as f64.
pub fn run_tract(model: &Path, input: &Tensor) -> Vec<Vec<f64>> {
    run_tract_until(model, input, None)
}

/// Like [`run_tract`], but stops at the value `output` when given.
pub fn run_tract_until(model: &Path, input: &Tensor, output: Option<&str>) -> Vec<Vec<f64>> {
    try_run_tract(model, input, output).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a model in tract, or says why tract cannot.
pub fn try_run_tract(
    model: &Path,
    input: &Tensor,
    output: Option<&str>,
) -> Result<Vec<Vec<f64>>, String> {
    let fail = |stage: &str, e: TractError| format!("tract {stage} {}: {e:?}", model.display());
    let fact = InferenceFact::dt_shape(input.datum_type(), input.shape());
    // value_info with a symbolic batch ("batch") would contradict the concrete input fact.
    let mut onnx = tract_onnx::onnx();
    onnx.ignore_value_info = true;
    let mut plan = onnx
        .model_for_path(model)
        .map_err(|e| fail("load", e))?
        .with_input_fact(0, fact)
        .map_err(|e| fail("input", e))?;
    if let Some(name) = output {
        plan.select_outputs_by_name([name])
            .map_err(|e| fail("output", e))?;
    }
    let plan = plan
        .into_optimized()
        .map_err(|e| fail("optimize", e))?
        .into_runnable()
        .map_err(|e| fail("plan", e))?;
    let outputs = plan
        .run(tvec!(input.clone().into()))
        .map_err(|e| fail("run", e))?;
    outputs
        .iter()
        .map(|t| {
            let t = t.cast_to::<f64>().map_err(|e| fail("cast", e))?;
            Ok(t.to_plain_array_view::<f64>()
                .map_err(|e| fail("view", e))?
                .iter()
                .copied()
                .collect())
        })
        .collect()
}

/// max |a − b| / max |reference|.
pub fn relative_error(reference: &[f64], other: &[f64]) -> f64 {
    assert_eq!(reference.len(), other.len(), "output sizes differ");
    let scale = reference
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-12);
    let diff = reference
        .iter()
        .zip(other)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}
