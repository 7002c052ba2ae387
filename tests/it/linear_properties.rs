//! Property tests of the linear folds, one per rule, on random shapes and attributes built as
//! ONNX: a BatchNormalization after a Gemm (any `transA`/`transB`, `alpha`, `beta`, any C)
//! or a MatMul on tokens behind Transposes; before a Gemm (through pooling and Flatten) or an
//! unpadded Conv (any stride, dilation, group); after a ConvTranspose (any stride, group,
//! pads); summed Gemm heads then `/ 2`. Each is fused by the real binary: no
//! BatchNormalization is left and tract computes the same outputs as for the original. Then
//! scales the same for every feature (`x + x`, a scalar `Mul`), and float16 models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::builder::Builder;
use crate::common::*;
use crate::properties::config;
use onnx_repvgg::onnx::attr::{new_float, new_int, new_ints};
use onnx_repvgg::onnx::proto::ModelProto;
use proptest::prelude::*;
use prost::Message;
use tract_onnx::prelude::*;

/// `shape`'s worth of pseudo-random values in [-1, 1), the same for the same seed.
fn values(shape: &[usize], seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    let n: usize = shape.iter().product();
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    (0..n).map(|_| next()).collect()
}

/// A float32 input of `shape` (see [`values`]).
fn input(shape: &[usize], seed: u64) -> Tensor {
    let values = values(shape, seed);
    tract_ndarray::ArrayD::from_shape_vec(shape, values)
        .unwrap()
        .into()
}

/// Writes `model` to `dir/in.onnx` and fuses it into `dir/out.onnx` (a failed run fails the
/// test): the two paths and the fused model's op histogram.
fn fused(dir: &Path, model: &[u8]) -> (PathBuf, PathBuf, BTreeMap<String, usize>) {
    let (src, dst) = (dir.join("in.onnx"), dir.join("out.onnx"));
    std::fs::write(&src, model).unwrap();
    let run = fuse(&src, &dst, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let ops = op_histogram(&dst);
    (src, dst, ops)
}

/// Fuses `model`, checks that no BatchNormalization is left and that tract computes the same
/// outputs for an input of `shape` as for the original.
fn folds_exactly(model: &[u8], shape: &[usize], seed: u64) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, ops) = fused(dir.path(), model);
    prop_assert_eq!(ops.get("BatchNormalization"), None, "{:?}", ops);
    let x = input(shape, seed);
    let (want, got) = (run_tract(&src, &x), run_tract(&dst, &x));
    let rel = relative_error(&want[0], &got[0]);
    prop_assert!(rel < 1e-5, "relative error {}", rel);
    Ok(())
}

proptest! {
    #![proptest_config(config(16))]

    /// `Gemm(x, W, C) → BatchNormalization` with every transposition, alpha, beta and C shape.
    #[test]
    fn gemm_then_bn(
        (m, k, n) in (1usize..4, 1usize..7, 1usize..7),
        (trans_a, trans_b) in (any::<bool>(), any::<bool>()),
        (alpha, beta) in (0.25f32..2.0, 0.25f32..2.0),
        c in 0u8..4,
        eps in prop::sample::select(vec![1e-5f32, 1e-3, 0.1]),
        seed in 0u64..1000,
    ) {
        let x_shape = if trans_a { [k, m] } else { [m, k] };
        let mut b = Builder::new(&[x_shape[0] as i64, x_shape[1] as i64]).seeded(seed);
        let w = b.init(&if trans_b { [n, k] } else { [k, n] }, -0.5, 0.5);
        let mut inputs = vec!["x".to_string(), w];
        match c {
            1 => inputs.push(b.init(&[n], -0.5, 0.5)),
            2 => inputs.push(b.init(&[1, n], -0.5, 0.5)),
            3 => inputs.push(b.init(&[1], -0.5, 0.5)),
            _ => {}
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let attrs = vec![
            new_int("transA", trans_a as i64),
            new_int("transB", trans_b as i64),
            new_float("alpha", alpha),
            new_float("beta", beta),
        ];
        let y = b.node("Gemm", &refs, attrs);
        let z = b.bn(&y, n, eps);
        b.output(&z, &[m as i64, n as i64]);
        folds_exactly(&b.build(), &x_shape, seed)?;
    }

    /// `MatMul → Add → Transpose → BatchNormalization → Transpose` on `[B, T, C]` tokens.
    #[test]
    fn matmul_on_tokens_then_bn(
        (batch, tokens, c, d) in (1usize..3, 1usize..6, 1usize..7, 1usize..7),
        eps in prop::sample::select(vec![1e-5f32, 1e-3]),
        seed in 0u64..1000,
    ) {
        let mut b = Builder::new(&[batch as i64, tokens as i64, c as i64]).seeded(seed);
        let w = b.init(&[c, d], -0.5, 0.5);
        let bias = b.init(&[d], -0.5, 0.5);
        let y = b.node("MatMul", &["x", &w], vec![]);
        let y = b.node("Add", &[&bias, &y], vec![]);
        let t = b.node("Transpose", &[&y], vec![new_ints("perm", [0, 2, 1])]);
        let t = b.bn(&t, d, eps);
        let z = b.node("Transpose", &[&t], vec![new_ints("perm", [0, 2, 1])]);
        let z = b.node("Relu", &[&z], vec![]);
        b.output(&z, &[batch as i64, tokens as i64, d as i64]);
        folds_exactly(&b.build(), &[batch, tokens, c], seed)?;
    }

    /// `BatchNormalization → GlobalAveragePool → Flatten → Gemm`, and `BatchNormalization →
    /// Gemm` on a matrix.
    #[test]
    fn bn_then_gemm(
        (c, n, hw) in (1usize..7, 1usize..7, 1usize..4),
        pooled in any::<bool>(),
        trans_b in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let shape: Vec<usize> = if pooled { vec![1, c, hw, hw] } else { vec![2, c] };
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let mut b = Builder::new(&dims).seeded(seed);
        let x = b.node("Relu", &["x"], vec![]);
        let mut y = b.bn(&x, c, 1e-5);
        if pooled {
            y = b.node("GlobalAveragePool", &[&y], vec![]);
            y = b.node("Flatten", &[&y], vec![new_int("axis", 1)]);
        }
        let w = b.init(&if trans_b { [n, c] } else { [c, n] }, -0.5, 0.5);
        let bias = b.init(&[n], -0.5, 0.5);
        let z = b.node("Gemm", &[&y, &w, &bias], vec![new_int("transB", trans_b as i64)]);
        b.output(&z, &[shape[0] as i64, n as i64]);
        folds_exactly(&b.build(), &shape, seed)?;
    }

    /// `BatchNormalization → Conv` without padding: any kernel, stride, dilation, group.
    #[test]
    fn bn_then_unpadded_conv(
        (groups, per_in, per_out) in (1usize..4, 1usize..4, 1usize..4),
        (k, stride, dilation) in (1usize..4, 1usize..3, 1usize..3),
        size in 6usize..10,
        seed in 0u64..1000,
    ) {
        let (c, out) = (groups * per_in, groups * per_out);
        let mut b = Builder::new(&[1, c as i64, size as i64, size as i64]).seeded(seed);
        let x = b.node("Relu", &["x"], vec![]);
        let y = b.bn(&x, c, 1e-5);
        let w = b.init(&[out, per_in, k, k], -0.5, 0.5);
        let attrs = vec![
            new_int("group", groups as i64),
            new_ints("strides", [stride as i64; 2]),
            new_ints("dilations", [dilation as i64; 2]),
        ];
        let z = b.node("Conv", &[&y, &w], attrs);
        let o = (size - dilation * (k - 1) - 1) / stride + 1;
        b.output(&z, &[1, out as i64, o as i64, o as i64]);
        folds_exactly(&b.build(), &[1, c, size, size], seed)?;
    }

    /// `ConvTranspose → BatchNormalization`: any kernel, stride, group, pads.
    #[test]
    fn conv_transpose_then_bn(
        (groups, per_in, per_out) in (1usize..4, 1usize..4, 1usize..4),
        (k, stride, pad) in (1usize..4, 1usize..3, 0usize..2),
        size in 2usize..5,
        seed in 0u64..1000,
    ) {
        prop_assume!(pad < k);
        let (c, out) = (groups * per_in, groups * per_out);
        let mut b = Builder::new(&[1, c as i64, size as i64, size as i64]).seeded(seed);
        let w = b.init(&[c, per_out, k, k], -0.5, 0.5);
        let bias = b.init(&[out], -0.5, 0.5);
        let attrs = vec![
            new_int("group", groups as i64),
            new_ints("strides", [stride as i64; 2]),
            new_ints("pads", [pad as i64; 4]),
        ];
        let y = b.node("ConvTranspose", &["x", &w, &bias], attrs);
        let z = b.bn(&y, out, 1e-5);
        let o = (size - 1) * stride + k - 2 * pad;
        b.output(&z, &[1, out as i64, o as i64, o as i64]);
        folds_exactly(&b.build(), &[1, c, size, size], seed)?;
    }

    /// Two Gemm heads on one input, each after its own BatchNormalization, summed, `/ 2`.
    #[test]
    fn summed_heads_then_half(
        (m, c, n) in (1usize..4, 1usize..7, 1usize..7),
        seed in 0u64..1000,
    ) {
        let mut b = Builder::new(&[m as i64, c as i64]).seeded(seed);
        let x = b.node("Relu", &["x"], vec![]);
        let mut heads = Vec::new();
        for _ in 0..2 {
            let y = b.bn(&x, c, 1e-5);
            let w = b.init(&[n, c], -0.5, 0.5);
            let bias = b.init(&[n], -0.5, 0.5);
            heads.push(b.node("Gemm", &[&y, &w, &bias], vec![new_int("transB", 1)]));
        }
        let sum = b.node("Add", &[&heads[0], &heads[1]], vec![]);
        let two = b.constant(&[], vec![2.0]);
        let z = b.node("Div", &[&sum, &two], vec![]);
        b.output(&z, &[m as i64, n as i64]);
        folds_exactly(&b.build(), &[m, c], seed)?;
    }
}

/// A scale the same for every feature — `x + x`, a scalar `Mul` — folds on whichever axis the
/// operator beside it sums over, before or after it; no bias is added where none is needed.
#[test]
fn uniform_scales_fold_on_any_axis() {
    // Each case builds its graph on `x` and returns its output and the output's shape.
    type Case = (&'static str, fn(&mut Builder) -> (String, Vec<i64>));
    let cases: [Case; 4] = [
        ("x + x → Gemm", |b| {
            let x = b.node("Relu", &["x"], vec![]);
            let d = b.node("Add", &[&x, &x], vec![]);
            let w = b.init(&[4, 6], -0.5, 0.5);
            let bias = b.init(&[4], -0.5, 0.5);
            (
                b.node("Gemm", &[&d, &w, &bias], vec![new_int("transB", 1)]),
                vec![2, 4],
            )
        }),
        ("Gemm → y + y", |b| {
            let w = b.init(&[4, 6], -0.5, 0.5);
            let y = b.node("Gemm", &["x", &w], vec![new_int("transB", 1)]);
            (b.node("Add", &[&y, &y], vec![]), vec![2, 4])
        }),
        ("scalar Mul → MatMul on tokens", |b| {
            let x = b.node("Relu", &["x"], vec![]);
            let s = b.constant(&[1], vec![0.5]);
            let m = b.node("Mul", &[&x, &s], vec![]);
            let w = b.init(&[6, 4], -0.5, 0.5);
            (b.node("MatMul", &[&m, &w], vec![]), vec![2, 3, 4])
        }),
        ("scalar Mul → Conv", |b| {
            let x = b.node("Relu", &["x"], vec![]);
            let s = b.constant(&[], vec![-1.5]);
            let m = b.node("Mul", &[&s, &x], vec![]);
            let w = b.init(&[4, 6, 1, 1], -0.5, 0.5);
            (b.node("Conv", &[&m, &w], vec![]), vec![1, 4, 3, 3])
        }),
    ];
    let inputs: [&[usize]; 4] = [&[2, 6], &[2, 6], &[2, 3, 6], &[1, 6, 3, 3]];
    for ((label, build), shape) in cases.into_iter().zip(inputs) {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let mut b = Builder::new(&dims);
        let (z, out) = build(&mut b);
        b.output(&z, &out);
        let dir = tempfile::tempdir().unwrap();
        let (src, dst, ops) = fused(dir.path(), &b.build());
        assert!(
            !ops.contains_key("Add") && !ops.contains_key("Mul"),
            "{label}: {ops:?}"
        );
        let x = input(shape, 7);
        let rel = relative_error(&run_tract(&src, &x)[0], &run_tract(&dst, &x)[0]);
        assert!(rel < 1e-6, "{label}: relative error {rel}");
    }
}

/// Float16 models fold in f64 and keep float16 weights: MatMul → BN, ConvTranspose → BN and
/// BN → Conv, compared (in tract) with the same values computed in float32.
#[test]
fn float16_folds_keep_half_weights_and_close_outputs() {
    use crate::properties::{round_to_f16, to_f16};
    type Case = (
        &'static str,
        fn(&mut Builder) -> (String, Vec<i64>),
        &'static [usize],
    );
    let cases: [Case; 3] = [
        (
            // (tract runs no float16 Gemm: tokens keep it a MatMul.)
            "MatMul → BN on tokens",
            |b| {
                let w = b.init(&[6, 5], -0.5, 0.5);
                let y = b.node("MatMul", &["x", &w], vec![]);
                let t = b.node("Transpose", &[&y], vec![new_ints("perm", [0, 2, 1])]);
                let t = b.bn(&t, 5, 1e-5);
                let z = b.node("Transpose", &[&t], vec![new_ints("perm", [0, 2, 1])]);
                (z, vec![2, 3, 5])
            },
            &[2, 3, 6],
        ),
        (
            "ConvTranspose → BN",
            |b| {
                let w = b.init(&[4, 3, 2, 2], -0.5, 0.5);
                let attrs = vec![new_ints("strides", [2, 2]), new_int("group", 2)];
                let y = b.node("ConvTranspose", &["x", &w], attrs);
                (b.bn(&y, 6, 1e-5), vec![1, 6, 6, 6])
            },
            &[1, 4, 3, 3],
        ),
        (
            "BN → Conv",
            |b| {
                let x = b.node("Relu", &["x"], vec![]);
                let y = b.bn(&x, 4, 1e-3);
                let w = b.init(&[6, 4, 1, 1], -0.5, 0.5);
                (b.node("Conv", &[&y, &w], vec![]), vec![1, 6, 3, 3])
            },
            &[1, 4, 3, 3],
        ),
    ];
    for (label, build, shape) in cases {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let model = |half: bool| {
            let mut b = Builder::new(&dims);
            let (z, out) = build(&mut b);
            b.output(&z, &out);
            match half {
                true => to_f16(&mut b, false),
                false => round_to_f16(&mut b),
            }
            b.build()
        };
        let dir = tempfile::tempdir().unwrap();
        let (_, out, ops) = fused(dir.path(), &model(true));
        assert!(!ops.contains_key("BatchNormalization"), "{label}: {ops:?}");
        let bytes = std::fs::read(&out).unwrap();
        let graph = ModelProto::decode(bytes.as_slice()).unwrap().graph.unwrap();
        for t in &graph.initializer {
            let name = t.name();
            assert_eq!(t.data_type, Some(10), "{label}: {name} is not float16");
        }
        let single = dir.path().join("single.onnx");
        std::fs::write(&single, model(false)).unwrap();
        let values = values(shape, 9);
        let half: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
        let x16: Tensor = tract_ndarray::ArrayD::from_shape_vec(shape, half)
            .unwrap()
            .into();
        let x32 = input(shape, 9);
        let want = run_tract(&single, &x32);
        let got = run_tract(&out, &x16);
        let rel = relative_error(&want[0], &got[0]);
        assert!(rel < 1e-2, "{label}: relative error {rel}");
    }
}
