//! The output data layouts through the library: moving inline tensors to a sidecar (what happens
//! when an output would pass protobuf's 2 GiB limit) gives a model tract runs unchanged.

use crate::common::*;
use onnx_repvgg::graph::GraphIndex;
use onnx_repvgg::onnx::Model;
use onnx_repvgg::onnx::splice::{self, DataLayout, EXTERNAL_THRESHOLD, Sink};
use onnx_repvgg::{plan, producer, rewrite};

#[test]
fn inline_tensors_moved_to_a_sidecar_still_compute_the_same() {
    let input = testdata().join("models/grouped/ts_nofold_op17.onnx");
    let model = Model::open(&input).unwrap();
    let graph = GraphIndex::new(&model).unwrap();
    let index = onnx_repvgg::constant::Constants::new(&graph);
    let analysis = plan::analyse(&index, Default::default()).unwrap();
    let patch = rewrite::build(&index, &analysis);
    let layout = DataLayout::Sidecar {
        location: "big.onnx.data".into(),
        move_inline: true,
    };
    let output = splice::plan(&model, &patch, &layout).unwrap();
    let (mut model_sink, mut sidecar_sink) = (Sink::Memory(Vec::new()), Sink::Memory(Vec::new()));
    let mut produce = |p: usize, write: &mut dyn FnMut(&[u8]) -> onnx_repvgg::Result<()>| {
        Ok(vec![
            producer::fold_block(&index, analysis.all()[p], write, &[])?.bias,
        ])
    };
    splice::write(
        &output,
        &model,
        &patch,
        &mut model_sink,
        Some(&mut sidecar_sink),
        &mut produce,
    )
    .unwrap();
    let (Sink::Memory(bytes), Sink::Memory(sidecar)) = (model_sink, sidecar_sink) else {
        unreachable!()
    };
    assert_eq!(bytes.len() as u64, output.model_len);
    assert_eq!(Some(sidecar.len() as u64), output.sidecar_len);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big.onnx");
    std::fs::write(&out, &bytes).unwrap();
    std::fs::write(dir.path().join("big.onnx.data"), &sidecar).unwrap();
    assert!(
        bytes.len() < 16 * 1024,
        "tensors left inline: {} bytes",
        bytes.len()
    );
    assert!(sidecar.len() > 100 * 1024);

    let reread = Model::open(&out).unwrap();
    let external = reread
        .initializers
        .iter()
        .filter(|t| t.data_location == Some(1))
        .count();
    let big = reread
        .initializers
        .iter()
        .filter(|t| {
            t.raw_data
                .as_ref()
                .is_some_and(|r| r.len() >= EXTERNAL_THRESHOLD)
        })
        .count();
    assert!(external > 0);
    assert_eq!(big, 0, "a tensor over the threshold stayed inline");

    let x = load_tensor(&testdata().join("models/grouped/input.pb"));
    let want = run_tract(&input, &x);
    let got = run_tract(&out, &x);
    assert!(relative_error(&want[0], &got[0]) < TOLERANCE_F32);
}
