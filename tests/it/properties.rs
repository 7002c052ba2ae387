//! Property tests: random block geometries — kernel sizes, pads, strides, dilations, groups
//! (depthwise included), which branches are present, BN statistics — built as ONNX, fused by the
//! real binary and compared with the unfused model in tract, in float32 and in float16 (weights,
//! statistics, input and output; compared with tract running both the float16 models and the
//! same values in float32); and random look-alikes that are no block (branches reading
//! different inputs, a shared internal value) must come out unchanged.

use crate::common::builder::{Builder, value_info};
use crate::common::*;
use onnx_repvgg::onnx::attr::{new_int, new_ints};
use onnx_repvgg::onnx::proto::{ModelProto, type_proto};
use proptest::prelude::*;
use prost::Message;
use tract_onnx::prelude::*;

#[derive(Debug, Clone)]
struct Geometry {
    channels: usize,
    group: usize,
    kernel: usize,
    dilation: usize,
    stride: usize,
    with_1x1: bool,
    identity: u8, // 0 none, 1 raw, 2 BN
    post_bn: bool,
    size: usize,
}

fn geometry() -> impl Strategy<Value = Geometry> {
    (
        prop::sample::select(vec![2usize, 4, 6]),
        prop::sample::select(vec![1usize, 2, 0]), // 0: depthwise
        prop::sample::select(vec![1usize, 3, 5]),
        1usize..=2,
        1usize..=2,
        any::<bool>(),
        0u8..=2,
        any::<bool>(),
        5usize..=9,
    )
        .prop_map(
            |(channels, g, kernel, dilation, stride, with_1x1, identity, post_bn, size)| Geometry {
                channels,
                group: if g == 0 { channels } else { g },
                kernel,
                dilation,
                stride,
                with_1x1: with_1x1 || kernel == 1,
                identity: if stride == 1 { identity } else { 0 },
                post_bn,
                size,
            },
        )
}

fn conv(b: &mut Builder, x: &str, g: &Geometry, k: usize, dilation: usize) -> String {
    let w = b.init(&[g.channels, g.channels / g.group, k, k], -0.5, 0.5);
    let pad = (dilation * (k - 1) / 2) as i64;
    b.node(
        "Conv",
        &[x, &w],
        vec![
            new_ints("pads", [pad; 4]),
            new_ints("strides", [g.stride as i64; 2]),
            new_ints("dilations", [dilation as i64; 2]),
            new_int("group", g.group as i64),
        ],
    )
}

fn build(g: &Geometry) -> Builder {
    let shape = [1, g.channels as i64, g.size as i64, g.size as i64];
    let mut b = Builder::new(&shape);
    let main = conv(&mut b, "x", g, g.kernel, g.dilation);
    let mut sum = b.bn(&main, g.channels, 1e-5);
    if g.with_1x1 && g.kernel > 1 {
        let c = conv(&mut b, "x", g, 1, 1);
        let c = b.bn(&c, g.channels, 1e-3);
        sum = b.node("Add", &[&sum, &c], vec![]);
    }
    match g.identity {
        1 => sum = b.node("Add", &["x", &sum], vec![]),
        2 => {
            let id = b.bn("x", g.channels, 1e-5);
            sum = b.node("Add", &[&sum, &id], vec![]);
        }
        _ => {}
    }
    if g.post_bn {
        sum = b.bn(&sum, g.channels, 1e-5);
    }
    let out = (g.size - 1) / g.stride + 1;
    b.output(&sum, &[1, g.channels as i64, out as i64, out as i64]);
    b
}

fn input_values(g: &Geometry, seed: u64) -> Vec<f32> {
    let n = g.channels * g.size * g.size;
    (0..n)
        .map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

fn input(g: &Geometry, seed: u64) -> Tensor {
    let data = input_values(g, seed);
    Tensor::from(
        tract_ndarray::ArrayD::from_shape_vec(vec![1, g.channels, g.size, g.size], data).unwrap(),
    )
}

/// The input rounded to float16, as a float16 tensor and as the same values in float32.
fn input_f16(g: &Geometry, seed: u64) -> (Tensor, Tensor) {
    let half: Vec<f16> = input_values(g, seed)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let single: Vec<f32> = half.iter().map(|v| v.to_f32()).collect();
    let shape = vec![1, g.channels, g.size, g.size];
    (
        Tensor::from(tract_ndarray::ArrayD::from_shape_vec(shape.clone(), half).unwrap()),
        Tensor::from(tract_ndarray::ArrayD::from_shape_vec(shape, single).unwrap()),
    )
}

/// Rounds every float32 initializer to float16 values (still float32: they are exact there).
pub(crate) fn round_to_f16(b: &mut Builder) {
    for t in &mut b.graph.initializer {
        for v in &mut t.float_data {
            *v = f16::from_f32(*v).to_f32();
        }
    }
}

/// Makes the model float16: every float32 initializer becomes FLOAT16 (as little-endian
/// `raw_data`, or as bit patterns in `int32_data`), and the graph's input and output float16.
pub(crate) fn to_f16(b: &mut Builder, raw: bool) {
    for t in &mut b.graph.initializer {
        if t.data_type != Some(1) {
            continue;
        }
        let values: Vec<f16> = t.float_data.drain(..).map(f16::from_f32).collect();
        t.data_type = Some(10);
        if raw {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            t.raw_data = Some(bytes.into());
        } else {
            t.int32_data = values.iter().map(|v| v.to_bits() as i32).collect();
        }
    }
    for v in b.graph.input.iter_mut().chain(&mut b.graph.output) {
        if let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            t.elem_type = Some(10);
        }
    }
}

/// Relative tolerance (of the output's magnitude) of the float16 property: float16 keeps 11
/// significant bits (~5e-4), and both the fused weights and every intermediate of the original
/// are rounded to it.
const TOLERANCE_FP16_PROPERTY: f64 = 1e-2;

/// `cases` cases; failures are kept next to this file (`properties.proptest-regressions`) and
/// replayed first.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(
            prop::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn random_blocks_fold_to_one_conv_with_the_same_outputs(g in geometry(), seed in 0u64..1000) {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("in.onnx"), dir.path().join("out.onnx"));
        std::fs::write(&src, build(&g).build()).unwrap();
        let run = fuse(&src, &dst, &[]);
        prop_assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let ops = op_histogram(&dst);
        prop_assert_eq!(ops.get("Conv"), Some(&1), "{:?} {:?}", g, ops);
        prop_assert_eq!(ops.len(), 1, "{:?} {:?}", g, ops);
        let x = input(&g, seed);
        let want = run_tract(&src, &x);
        let got = run_tract(&dst, &x);
        let rel = relative_error(&want[0], &got[0]);
        prop_assert!(rel < 1e-5, "{:?}: relative error {}", g, rel);
    }

    #[test]
    fn random_float16_blocks_fold_to_one_conv_with_close_outputs(
        g in geometry(),
        seed in 0u64..1000,
        raw in any::<bool>(),
    ) {
        let mut half = build(&g);
        to_f16(&mut half, raw);
        let mut single = build(&g);
        round_to_f16(&mut single);
        let dir = tempfile::tempdir().unwrap();
        let (src, dst, reference) = (
            dir.path().join("in.onnx"),
            dir.path().join("out.onnx"),
            dir.path().join("ref.onnx"),
        );
        std::fs::write(&src, half.build()).unwrap();
        std::fs::write(&reference, single.build()).unwrap();
        let run = fuse(&src, &dst, &[]);
        prop_assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let ops = op_histogram(&dst);
        prop_assert_eq!(ops.get("Conv"), Some(&1), "{:?} {:?}", g, ops);
        prop_assert_eq!(ops.len(), 1, "{:?} {:?}", g, ops);
        // The fused Conv keeps float16 weights and bias.
        let model = ModelProto::decode(std::fs::read(&dst).unwrap().as_slice()).unwrap();
        let graph = model.graph.unwrap();
        for name in &graph.node[0].input[1..] {
            let t = graph.initializer.iter().find(|t| t.name() == name.as_str());
            prop_assert_eq!(t.and_then(|t| t.data_type), Some(10), "{}", name);
        }
        let (x16, x32) = input_f16(&g, seed);
        // The float16 model's values evaluated in float32, and the original in float16.
        let want = run_tract(&reference, &x32);
        let original = run_tract(&src, &x16);
        let got = run_tract(&dst, &x16);
        let rel = relative_error(&want[0], &got[0]);
        let rel_original = relative_error(&original[0], &got[0]);
        prop_assert!(
            rel < TOLERANCE_FP16_PROPERTY && rel_original < TOLERANCE_FP16_PROPERTY,
            "{:?}: relative error {} vs float32, {} vs the original in float16",
            g, rel, rel_original
        );
    }

    #[test]
    fn look_alikes_that_are_no_block_stay_unchanged(g in geometry(), shared in any::<bool>()) {
        let mut b = Builder::new(&[1, g.channels as i64, g.size as i64, g.size as i64]);
        let other = b.node("Relu", &["x"], vec![]);
        let a = conv(&mut b, "x", &g, g.kernel, g.dilation);
        let c = conv(&mut b, if shared { "x" } else { &other }, &g, g.kernel, g.dilation);
        let y = b.node("Add", &[&a, &c], vec![]);
        let out = (g.size - 1) / g.stride + 1;
        let dims = [1, g.channels as i64, out as i64, out as i64];
        b.output(&y, &dims);
        if shared {
            // The first branch is also a graph output: its Conv cannot go.
            b.graph.output.push(value_info(&a, &dims));
        }
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("in.onnx"), dir.path().join("out.onnx"));
        std::fs::write(&src, b.build()).unwrap();
        let run = fuse(&src, &dst, &[]);
        prop_assert!(run.status.success());
        prop_assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
    }
}

/// How a Conv pads: `auto_pad`, or explicit begin and end pads (the same on both axes).
#[derive(Debug, Clone, Copy)]
enum Padding {
    SameUpper,
    SameLower,
    Valid,
    Explicit(i64, i64),
}

fn padding() -> impl Strategy<Value = Padding> {
    prop_oneof![
        Just(Padding::SameUpper),
        Just(Padding::SameLower),
        Just(Padding::Valid),
        (0i64..=2, 0i64..=2).prop_map(|(b, e)| Padding::Explicit(b, e)),
    ]
}

fn padded_conv(b: &mut Builder, k: usize, stride: i64, padding: Padding) -> String {
    let w = b.init(&[4, 4, k, k], -0.5, 0.5);
    let mut attrs = vec![new_ints("strides", [stride; 2])];
    attrs.push(match padding {
        Padding::SameUpper => onnx_repvgg::onnx::attr::new_string("auto_pad", "SAME_UPPER"),
        Padding::SameLower => onnx_repvgg::onnx::attr::new_string("auto_pad", "SAME_LOWER"),
        Padding::Valid => onnx_repvgg::onnx::attr::new_string("auto_pad", "VALID"),
        Padding::Explicit(begin, end) => new_ints("pads", [begin, begin, end, end]),
    });
    let c = b.node("Conv", &["x", &w], attrs);
    b.bn(&c, 4, 1e-5)
}

proptest! {
    #![proptest_config(config(48))]

    /// Two branches with any padding — `auto_pad` SAME_UPPER/SAME_LOWER/VALID or asymmetric
    /// pads — any kernel, stride 1 to 3, on even and odd sizes: whenever the model is valid
    /// (the branches' outputs have one size, as tract finds), it folds to one Conv with the
    /// same outputs at the declared size.
    #[test]
    fn any_padding_that_gives_one_output_size_folds(
        size in 4usize..=12,
        stride in 1i64..=3,
        (ka, kb) in (1usize..=5, prop::sample::select(vec![1usize, 3])),
        (pa, pb) in (padding(), padding()),
    ) {
        // Both branches must give outputs of one size (Add would broadcast a 1x1 output).
        let outputs = |k: usize, p: Padding| -> Option<usize> {
            let s = stride as usize;
            match p {
                Padding::SameUpper | Padding::SameLower => Some(size.div_ceil(s)),
                Padding::Valid => size.checked_sub(k).map(|n| n / s + 1),
                Padding::Explicit(b, e) => {
                    (size + b as usize + e as usize).checked_sub(k).map(|n| n / s + 1)
                }
            }
        };
        prop_assume!(outputs(ka, pa).is_some() && outputs(ka, pa) == outputs(kb, pb));
        let mut b = Builder::new(&[1, 4, size as i64, size as i64]);
        let a = padded_conv(&mut b, ka, stride, pa);
        let c = padded_conv(&mut b, kb, stride, pb);
        let y = b.node("Add", &[&a, &c], vec![]);
        b.output(&y, &[1, 4, 1, 1]);
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("in.onnx"), dir.path().join("out.onnx"));
        std::fs::write(&src, b.build()).unwrap();
        let x = Tensor::from(tract_ndarray::ArrayD::from_shape_vec(
            vec![1, 4, size, size],
            (0..4 * size * size).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect(),
        ).unwrap());
        let want = run_tract(&src, &x);
        let (deploy, report) = onnx_repvgg::fuse_model(&b.build(), Default::default())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(report.fused.len(), 1, "{:?}", report.skipped);
        std::fs::write(&dst, deploy).unwrap();
        let ops = op_histogram(&dst);
        prop_assert_eq!(ops.get("Conv"), Some(&1));
        let got = run_tract(&dst, &x);
        let rel = relative_error(&want[0], &got[0]);
        prop_assert!(rel < 1e-5, "relative error {}", rel);
    }
}
