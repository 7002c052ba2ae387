//! Criterion benchmarks of the fold kernels on a RepVGG-B-sized block (512 → 512 channels): the
//! recipe the tool runs (stored float32 bytes → BN → 3x3 + 1x1 + identity → float32 bytes), and
//! the dense algebra's steps (BN as scale/shift, the sum, encoding to float32).
//! Run with `cargo bench`; figures are in the README.

use criterion::{Criterion, criterion_group, criterion_main};
use ndarray::{Array1, ArrayD, IxDyn};
use onnx_repvgg::layout::Geometry;
use onnx_repvgg::layout::Layout;
use onnx_repvgg::recipe::spec::DenseConv;
use onnx_repvgg::recipe::{Recipe, Rows, Source};
use onnx_repvgg::tensor::{Data, FloatType, to_le_bytes};
use std::hint::black_box;

fn conv(o: usize, c: usize, k: usize, pad: usize) -> DenseConv {
    let n = o * c * k * k;
    DenseConv {
        weight: ArrayD::from_shape_vec(
            IxDyn(&[o, c, k, k]),
            (0..n).map(|i| (i % 97) as f64 * 0.01).collect(),
        )
        .unwrap(),
        bias: Array1::from_elem(o, 0.1),
        geometry: Geometry {
            strides: vec![1, 1],
            dilations: vec![1, 1],
            pads_begin: vec![pad, pad],
            pads_end: vec![pad, pad],
            group: 1,
        },
    }
}

/// The branch as the tool sees it: float32 bytes in the file.
fn stored(conv: &DenseConv) -> Recipe {
    let bytes = to_le_bytes(&conv.weight, FloatType::F32);
    let data = Data::Raw(bytes.into(), FloatType::F32);
    let bias = conv.bias.to_vec();
    Recipe::leaf(conv.layout(), Source::Weights(data), 1.0, bias)
}

fn bench(c: &mut Criterion) {
    let channels = 512;
    let scale: Vec<f64> = (0..channels).map(|i| 1.0 + i as f64 * 1e-3).collect();
    let shift: Vec<f64> = (0..channels).map(|i| i as f64 * 1e-3).collect();
    let dense = conv(channels, channels, 3, 1);
    let point = conv(channels, channels, 1, 0);
    c.bench_function("scale_shift 512x512x3x3", |b| {
        b.iter(|| black_box(dense.clone().scale_shift(&scale, &shift).unwrap()))
    });
    c.bench_function("sum 3x3 + 1x1 + identity (512)", |b| {
        b.iter(|| {
            let id = DenseConv::identity(channels, 1, 2);
            black_box(DenseConv::sum(vec![dense.clone(), point.clone(), id]).unwrap())
        })
    });
    let recipe = Recipe::sum(vec![
        stored(&dense).scale_shift(&scale, &shift).unwrap(),
        stored(&point).scale_shift(&scale, &shift).unwrap(),
        Recipe::leaf(
            Layout::identity(channels, 1, 2),
            Source::Identity,
            1.0,
            shift.clone(),
        )
        .scale_shift(&scale, &shift)
        .unwrap(),
    ])
    .unwrap();
    c.bench_function(
        "recipe: fold and encode 512x512x3x3 + 1x1 + identity",
        |b| {
            let (mut acc, mut scratch) = (Vec::new(), Vec::new());
            // Exactly the rows' bytes: `encode_rows` fills the slice it is given.
            let mut out = vec![0u8; channels * recipe.row_len() * 4];
            recipe.encode_rows(
                0..channels,
                FloatType::F32,
                &mut out,
                &mut acc,
                &mut scratch,
            );
            // The same fold on dense numbers: what the bytes must hold.
            let want = DenseConv::sum(vec![
                dense.clone().scale_shift(&scale, &shift).unwrap(),
                point.clone().scale_shift(&scale, &shift).unwrap(),
                DenseConv::identity(channels, 1, 2)
                    .scale_shift(&scale, &shift)
                    .unwrap(),
            ])
            .unwrap();
            let got = onnx_repvgg::tensor::decode(&out, FloatType::F32);
            let close = |(g, w): (&f64, &f64)| (g - w).abs() <= 1e-6 * (1.0 + w.abs());
            assert!(got.iter().zip(want.weight.iter()).all(close));
            b.iter(|| {
                let rows = 0..channels;
                black_box(recipe.encode_rows(
                    rows,
                    FloatType::F32,
                    &mut out,
                    &mut acc,
                    &mut scratch,
                ));
            })
        },
    );
    let folded = DenseConv::sum(vec![dense.clone(), point.clone()]).unwrap();
    c.bench_function("encode float32 512x512x3x3", |b| {
        b.iter(|| black_box(to_le_bytes(&folded.weight, FloatType::F32)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
