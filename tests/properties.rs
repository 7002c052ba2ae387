//! Property tests: random block geometries — kernel sizes, pads, strides, dilations, groups
//! (depthwise included), which branches are present, BN statistics — built as ONNX, fused by the
//! real binary and compared with the unfused model in tract; and random look-alikes that are no
//! block (branches reading different inputs, a shared internal value) must come out unchanged.

mod common;

use common::builder::{Builder, value_info};
use common::*;
use onnx_repvgg::onnx::attr::{new_int, new_ints};
use proptest::prelude::*;
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

fn input(g: &Geometry, seed: u64) -> Tensor {
    let n = g.channels * g.size * g.size;
    let data: Vec<f32> = (0..n)
        .map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Tensor::from(
        tract_ndarray::ArrayD::from_shape_vec(vec![1, g.channels, g.size, g.size], data).unwrap(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

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
