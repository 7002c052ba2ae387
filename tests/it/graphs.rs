//! "This graph becomes that graph": hand-built models for each shape the block finder must
//! accept or refuse, fused by the real binary and compared with the original in tract.

use std::collections::BTreeMap;

use crate::common::builder::{Builder, ConvSpec};
use crate::common::*;
use tract_onnx::prelude::*;

const SHAPE: [i64; 4] = [1, 4, 6, 6];

/// Fuses the model; asserts the number of fused blocks and the ops left; compares outputs.
fn fuse_and_compare(b: &Builder, fused: usize, ops: &[(&str, usize)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.onnx");
    let output = dir.path().join("out.onnx");
    std::fs::write(&input, b.build()).unwrap();
    let run = fuse(&input, &output, &["-v"]);
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // A model without any candidate block says so instead of "fused 0 blocks".
    assert!(
        stdout.starts_with(&format!("fused {fused} blocks"))
            || (fused == 0 && stdout.starts_with("nothing to fuse: ")),
        "{stdout}"
    );
    let want: BTreeMap<String, usize> = ops.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    assert_eq!(op_histogram(&output), want, "{stdout}");
    if fused == 0 {
        assert_eq!(
            std::fs::read(&output).unwrap(),
            std::fs::read(&input).unwrap()
        );
    }
    let shape: Vec<usize> = b.graph.input[0]
        .r#type
        .as_ref()
        .and_then(|t| match &t.value {
            Some(onnx_repvgg::onnx::proto::type_proto::Value::TensorType(t)) => t.shape.as_ref(),
            _ => None,
        })
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(
                        onnx_repvgg::onnx::proto::tensor_shape_proto::dimension::Value::DimValue(v),
                    ) => v as usize,
                    _ => 1,
                })
                .collect()
        })
        .unwrap();
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 211) as f32 / 105.0) - 1.0)
        .collect();
    let x = Tensor::from(tract_ndarray::ArrayD::from_shape_vec(shape, data).unwrap());
    let a = run_tract(&input, &x);
    let c = run_tract(&output, &x);
    for (a, c) in a.iter().zip(&c) {
        let rel = relative_error(a, c);
        assert!(rel < 1e-5, "relative error {rel:.3e}\n{stdout}");
    }
    stdout
}

/// The classic RepVGG block on x: 3x3+BN, 1x1+BN, BN(x), in the given operand order.
fn repvgg(b: &mut Builder, x: &str, c: usize, order: &str) -> String {
    let c3 = b.conv(x, ConvSpec::k3(c, c));
    let d = b.bn(&c3, c, 1e-5);
    let c1 = b.conv(x, ConvSpec::k1(c, c));
    let o = b.bn(&c1, c, 1e-5);
    let id = b.bn(x, c, 1e-5);
    match order {
        "dense first" => {
            let s = b.node("Add", &[&d, &o], vec![]);
            b.node("Add", &[&s, &id], vec![])
        }
        "identity first" => {
            let s = b.node("Add", &[&o, &d], vec![]);
            b.node("Add", &[&id, &s], vec![])
        }
        "right nested" => {
            let s = b.node("Add", &[&o, &id], vec![]);
            b.node("Add", &[&d, &s], vec![])
        }
        _ => b.node("Sum", &[&id, &o, &d], vec![]),
    }
}

#[test]
fn every_operand_order_and_sum_fold() {
    for order in ["dense first", "identity first", "right nested", "sum"] {
        let mut b = Builder::new(&SHAPE);
        let y = repvgg(&mut b, "x", 4, order);
        let r = b.node("Relu", &[&y], vec![]);
        b.output(&r, &SHAPE);
        fuse_and_compare(&b, 1, &[("Conv", 1), ("Relu", 1)]);
    }
}

#[test]
fn stacked_blocks_and_a_block_feeding_the_graph_output() {
    let mut b = Builder::new(&SHAPE);
    let y1 = repvgg(&mut b, "x", 4, "dense first");
    let r1 = b.node("Relu", &[&y1], vec![]);
    let y2 = repvgg(&mut b, &r1, 4, "sum");
    b.output(&y2, &SHAPE);
    let out = fuse_and_compare(&b, 2, &[("Conv", 2), ("Relu", 1)]);
    assert!(
        out.contains("3x3 + 1x1 + identity  yes       fused"),
        "{out}"
    );
}

#[test]
fn identity_nodes_are_looked_through() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let d = b.bn(&c3, 4, 1e-5);
    let d = b.node("Identity", &[&d], vec![]);
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let c1 = b.node("Identity", &[&c1], vec![]);
    let o = b.bn(&c1, 4, 1e-5);
    let xi = b.node("Identity", &["x"], vec![]);
    let s = b.node("Add", &[&d, &o], vec![]);
    let s = b.node("Identity", &[&s], vec![]);
    let y = b.node("Add", &[&s, &xi], vec![]);
    b.output(&y, &SHAPE);
    fuse_and_compare(&b, 1, &[("Conv", 1)]);
}

#[test]
fn raw_identity_biased_convs_and_yolo_epsilon() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv(
        "x",
        ConvSpec {
            bias: true,
            ..ConvSpec::k3(4, 4)
        },
    );
    let d = b.bn(&c3, 4, 1e-3);
    let c1 = b.conv(
        "x",
        ConvSpec {
            bias: true,
            ..ConvSpec::k1(4, 4)
        },
    );
    let s = b.node("Add", &[&d, &c1], vec![]);
    let y = b.node("Add", &["x", &s], vec![]);
    b.output(&y, &SHAPE);
    fuse_and_compare(&b, 1, &[("Conv", 1)]);
}

#[test]
fn stride_two_block_with_channel_change_has_no_identity() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv(
        "x",
        ConvSpec {
            stride: 2,
            ..ConvSpec::k3(4, 8)
        },
    );
    let d = b.bn(&c3, 8, 1e-5);
    let c1 = b.conv(
        "x",
        ConvSpec {
            stride: 2,
            ..ConvSpec::k1(4, 8)
        },
    );
    let o = b.bn(&c1, 8, 1e-5);
    let y = b.node("Add", &[&d, &o], vec![]);
    b.output(&y, &[1, 8, 3, 3]);
    let out = fuse_and_compare(&b, 1, &[("Conv", 1)]);
    assert!(out.contains("fused 1 blocks (1 without identity)"), "{out}");
}

#[test]
fn grouped_and_depthwise_identities() {
    for group in [2, 4] {
        let mut b = Builder::new(&SHAPE);
        let c3 = b.conv(
            "x",
            ConvSpec {
                group,
                ..ConvSpec::k3(4, 4)
            },
        );
        let d = b.bn(&c3, 4, 1e-5);
        let c1 = b.conv(
            "x",
            ConvSpec {
                group,
                ..ConvSpec::k1(4, 4)
            },
        );
        let o = b.bn(&c1, 4, 1e-5);
        let id = b.bn("x", 4, 1e-5);
        let s = b.node("Add", &[&d, &o], vec![]);
        let y = b.node("Add", &[&s, &id], vec![]);
        b.output(&y, &SHAPE);
        fuse_and_compare(&b, 1, &[("Conv", 1)]);
    }
}

#[test]
fn same_auto_pad_with_stride_one_folds() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv_auto_pad("x", 4, 4, 3, "SAME_UPPER");
    let c1 = b.conv_auto_pad("x", 4, 4, 1, "VALID");
    let y = b.node("Add", &[&c3, &c1], vec![]);
    b.output(&y, &SHAPE);
    fuse_and_compare(&b, 1, &[("Conv", 1)]);
}

#[test]
fn constant_node_weights_fold_and_their_nodes_go() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    // Move the 1x1 weight into a Constant node.
    let w = b.graph.initializer.pop().unwrap();
    let name = w.name.clone().unwrap();
    b.graph.node.insert(
        0,
        onnx_repvgg::onnx::proto::NodeProto {
            output: vec![name],
            name: Some("weight_constant".into()),
            op_type: Some("Constant".into()),
            attribute: vec![onnx_repvgg::onnx::proto::AttributeProto {
                name: Some("value".into()),
                r#type: Some(4),
                t: Some(w),
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let y = b.node("Add", &[&c3, &c1], vec![]);
    b.output(&y, &SHAPE);
    fuse_and_compare(&b, 1, &[("Conv", 1)]);
}

#[test]
fn a_statistic_shared_with_a_bn_outside_the_block_is_kept_intact() {
    let mut b = Builder::new(&SHAPE);
    let y = repvgg(&mut b, "x", 4, "dense first");
    let r = b.node("Relu", &[&y], vec![]);
    // Another BN outside any block reads the same (deduplicated) variance tensor as the first BN.
    let shared_var = b.graph.node[1].input[4].clone();
    let other = b.bn(&r, 4, 1e-5);
    let last = b.graph.node.len() - 1;
    b.graph.node[last].input[4] = shared_var;
    b.output(&other, &SHAPE);
    fuse_and_compare(
        &b,
        1,
        &[("Conv", 1), ("Relu", 1), ("BatchNormalization", 1)],
    );
}

#[test]
fn a_branch_value_used_elsewhere_blocks_the_fold() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let y = b.node("Add", &[&c3, &c1], vec![]);
    b.output(&y, &SHAPE);
    b.output(&c3, &SHAPE);
    let out = fuse_and_compare(&b, 0, &[("Conv", 2), ("Add", 1)]);
    assert!(out.contains("is also used elsewhere"), "{out}");
}

#[test]
fn branches_reading_different_inputs_are_no_block() {
    let mut b = Builder::new(&SHAPE);
    let r = b.node("Relu", &["x"], vec![]);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let c1 = b.conv(&r, ConvSpec::k1(4, 4));
    let y = b.node("Add", &[&c3, &c1], vec![]);
    b.output(&y, &SHAPE);
    fuse_and_compare(&b, 0, &[("Conv", 2), ("Add", 1), ("Relu", 1)]);
}

#[test]
fn an_outer_residual_leaves_the_inner_block_fusable() {
    let mut b = Builder::new(&SHAPE);
    let r = b.node("Relu", &["x"], vec![]);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let s = b.node("Add", &[&c3, &c1], vec![]);
    let y = b.node("Add", &[&s, &r], vec![]);
    b.output(&y, &SHAPE);
    fuse_and_compare(&b, 1, &[("Conv", 1), ("Add", 1), ("Relu", 1)]);
}

#[test]
fn mismatched_groups_are_skipped_with_the_reason() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv(
        "x",
        ConvSpec {
            group: 2,
            ..ConvSpec::k3(4, 4)
        },
    );
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let y = b.node("Add", &[&c3, &c1], vec![]);
    b.output(&y, &SHAPE);
    let out = fuse_and_compare(&b, 0, &[("Conv", 2), ("Add", 1)]);
    assert!(
        out.contains("no: branches use group=2 and group=1"),
        "{out}"
    );
}

#[test]
fn a_weight_that_is_also_a_graph_input_is_not_a_constant() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let w = b.graph.node[1].input[1].clone();
    b.graph
        .input
        .push(crate::common::builder::value_info(&w, &[4, 4, 1, 1]));
    let y = b.node("Add", &[&c3, &c1], vec![]);
    b.output(&y, &SHAPE);
    let out = fuse_and_compare(&b, 0, &[("Conv", 2), ("Add", 1)]);
    assert!(out.contains("is a graph input, not a constant"), "{out}");
}

#[test]
fn value_info_of_removed_values_goes_and_the_rest_stays() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let y = b.node("Add", &[&c3, &c1], vec![]);
    let r = b.node("Relu", &[&y], vec![]);
    b.output(&r, &SHAPE);
    for v in [&c3, &c1, &y] {
        b.graph
            .value_info
            .push(crate::common::builder::value_info(v, &SHAPE));
    }
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.onnx"), dir.path().join("out.onnx"));
    std::fs::write(&input, b.build()).unwrap();
    assert!(fuse(&input, &output, &[]).status.success());
    let model = tract_onnx::onnx().proto_model_for_path(&output).unwrap();
    let kept: Vec<String> = model
        .graph
        .unwrap()
        .value_info
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(kept, vec![y]);
}

#[test]
fn qarepvgg_post_sum_batch_norm_folds_in() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let d = b.bn(&c3, 4, 1e-5);
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let s = b.node("Add", &[&d, &c1], vec![]);
    let s = b.node("Add", &[&s, "x"], vec![]);
    let y = b.bn(&s, 4, 1e-5);
    let r = b.node("Relu", &[&y], vec![]);
    b.output(&r, &SHAPE);
    let out = fuse_and_compare(&b, 1, &[("Conv", 1), ("Relu", 1)]);
    assert!(
        out.contains("3x3 + 1x1 + identity → BatchNormalization"),
        "{out}"
    );
}

#[test]
fn sub_and_per_channel_mul_add_div_fold() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let scale = b.constant(&[1, 4, 1, 1], vec![0.5, -1.0, 2.0, 1.5]);
    let m = b.node("Mul", &[&scale, &c3], vec![]);
    let shift = b.constant(&[4, 1, 1], vec![0.1, 0.2, -0.3, 0.4]);
    let a = b.node("Add", &[&m, &shift], vec![]);
    let c1 = b.conv("x", ConvSpec::k1(4, 4));
    let two = b.constant(&[], vec![2.0]);
    let d = b.node("Div", &[&c1, &two], vec![]);
    let s = b.node("Sub", &[&a, &d], vec![]);
    let one = b.constant(&[1], vec![1.0]);
    let y = b.node("Sub", &[&one, &s], vec![]);
    b.output(&y, &SHAPE);
    let out = fuse_and_compare(&b, 1, &[("Conv", 1)]);
    assert!(out.contains("3x3 + −1x1 → Sub"), "{out}");
}

#[test]
fn a_constant_that_is_not_per_channel_is_refused() {
    let mut b = Builder::new(&SHAPE);
    let c3 = b.conv("x", ConvSpec::k3(4, 4));
    let mask = b.constant(&[1, 1, 6, 6], vec![0.5; 36]);
    let m = b.node("Mul", &[&c3, &mask], vec![]);
    b.output(&m, &SHAPE);
    let out = fuse_and_compare(&b, 0, &[("Conv", 1), ("Mul", 1)]);
    assert!(out.contains("not one value per channel"), "{out}");
}

#[test]
fn standalone_conv_batch_norm_and_conv_bias_add_fold() {
    let mut b = Builder::new(&SHAPE);
    let c = b.conv("x", ConvSpec::k3(4, 4));
    let n = b.bn(&c, 4, 1e-5);
    let r = b.node("Relu", &[&n], vec![]);
    let c2 = b.conv(&r, ConvSpec::k1(4, 4));
    let bias = b.constant(&[1, 4, 1, 1], vec![0.1, -0.2, 0.3, 0.0]);
    let y = b.node("Add", &[&c2, &bias], vec![]);
    b.output(&y, &SHAPE);
    fuse_and_compare(&b, 2, &[("Conv", 2), ("Relu", 1)]);
}

#[test]
fn mobileone_style_add_of_a_zero_constant_and_many_branches() {
    let mut b = Builder::new(&SHAPE);
    let scale = b.conv("x", ConvSpec::k1(4, 4));
    let scale = b.bn(&scale, 4, 1e-5);
    let skip = b.bn("x", 4, 1e-5);
    let zero = b.constant(&[], vec![0.0]);
    let mut out = b.node("Add", &[&scale, &zero], vec![]);
    out = b.node("Add", &[&out, &skip], vec![]);
    for _ in 0..4 {
        let c = b.conv(
            "x",
            ConvSpec {
                group: 4,
                ..ConvSpec::k3(4, 4)
            },
        );
        let c = b.bn(&c, 4, 1e-5);
        out = b.node("Add", &[&out, &c], vec![]);
    }
    b.output(&out, &SHAPE);
    fuse_and_compare(&b, 0, &[("Conv", 5), ("Add", 6), ("BatchNormalization", 6)]);
}

#[test]
fn avg_pool_branch_folds_with_count_include_pad_and_is_refused_without() {
    for (count_include_pad, fused) in [(1, 1), (0, 0)] {
        let mut b = Builder::new(&SHAPE);
        let c3 = b.conv("x", ConvSpec::k3(4, 4));
        let p = b.avg_pool("x", 3, 1, count_include_pad);
        let y = b.node("Add", &[&c3, &p], vec![]);
        b.output(&y, &SHAPE);
        let ops: &[(&str, usize)] = if fused == 1 {
            &[("Conv", 1)]
        } else {
            &[("Conv", 1), ("AveragePool", 1), ("Add", 1)]
        };
        let out = fuse_and_compare(&b, fused, ops);
        if fused == 0 {
            assert!(out.contains("count_include_pad=0"), "{out}");
        }
    }
}

#[test]
fn acnet_asymmetric_kernels_fold() {
    let mut b = Builder::new(&SHAPE);
    let c33 = b.conv_pads("x", 4, 4, [3, 3], [1, 1, 1, 1]);
    let c31 = b.conv_pads("x", 4, 4, [3, 1], [1, 0, 1, 0]);
    let c13 = b.conv_pads("x", 4, 4, [1, 3], [0, 1, 0, 1]);
    let s = b.node("Add", &[&c33, &c31], vec![]);
    let y = b.node("Add", &[&s, &c13], vec![]);
    b.output(&y, &SHAPE);
    let out = fuse_and_compare(&b, 1, &[("Conv", 1)]);
    assert!(out.contains("3x3 + 3x1 + 1x3"), "{out}");
}

#[test]
fn large_kernel_and_dilated_depthwise_branches_fold() {
    let shape = [1, 4, 12, 12];
    let mut b = Builder::new(&shape);
    let big = b.conv_nd("x", 4, 4, &[7, 7], 3, 1, 4);
    let mut sum = b.bn(&big, 4, 1e-5);
    for (k, d) in [(5, 1), (3, 2), (3, 3)] {
        let pad = d * (k as i64 - 1) / 2;
        let c = b.conv_nd("x", 4, 4, &[k, k], pad, d, 4);
        let c = b.bn(&c, 4, 1e-5);
        sum = b.node("Add", &[&sum, &c], vec![]);
    }
    b.output(&sum, &shape);
    let out = fuse_and_compare(&b, 1, &[("Conv", 1)]);
    assert!(out.contains("7x7 + 5x5 + 3x3 d2x2 + 3x3 d3x3"), "{out}");
}

#[test]
fn one_and_three_dimensional_blocks_fold() {
    for shape in [&[1i64, 4, 9][..], &[1, 4, 5, 5, 5][..]] {
        let rank = shape.len() - 2;
        let mut b = Builder::new(shape);
        let c3 = b.conv_nd("x", 4, 4, &vec![3; rank], 1, 1, 1);
        let c3 = b.bn(&c3, 4, 1e-5);
        let c1 = b.conv_nd("x", 4, 4, &vec![1; rank], 0, 1, 1);
        let c1 = b.bn(&c1, 4, 1e-5);
        let id = b.bn("x", 4, 1e-5);
        let s = b.node("Add", &[&c3, &c1], vec![]);
        let y = b.node("Add", &[&s, &id], vec![]);
        b.output(&y, shape);
        fuse_and_compare(&b, 1, &[("Conv", 1)]);
    }
}

#[test]
fn same_auto_pad_with_stride_two_folds_when_the_input_size_is_declared() {
    let build = |declared: bool| {
        let mut b = Builder::new(&[1, 4, 7, 7]);
        if !declared {
            let t = b.graph.input[0].r#type.as_mut().unwrap();
            if let Some(onnx_repvgg::onnx::proto::type_proto::Value::TensorType(t)) =
                t.value.as_mut()
            {
                t.shape.as_mut().unwrap().dim[3].value = Some(
                    onnx_repvgg::onnx::proto::tensor_shape_proto::dimension::Value::DimParam(
                        "w".into(),
                    ),
                );
            }
        }
        let w3 = b.init(&[4, 4, 3, 3], -0.5, 0.5);
        let w1 = b.init(&[4, 4, 1, 1], -0.5, 0.5);
        let attrs = |pad: &str| {
            vec![
                onnx_repvgg::onnx::attr::new_ints("strides", [2, 2]),
                onnx_repvgg::onnx::proto::AttributeProto {
                    name: Some("auto_pad".into()),
                    r#type: Some(3),
                    s: Some(pad.as_bytes().to_vec().into()),
                    ..Default::default()
                },
            ]
        };
        let c3 = b.node("Conv", &["x", &w3], attrs("SAME_UPPER"));
        let c1 = b.node("Conv", &["x", &w1], attrs("SAME_LOWER"));
        let y = b.node("Add", &[&c3, &c1], vec![]);
        b.output(&y, &[1, 4, 4, 4]);
        b
    };
    fuse_and_compare(&build(true), 1, &[("Conv", 1)]);
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.onnx"), dir.path().join("out.onnx"));
    std::fs::write(&input, build(false).build()).unwrap();
    let run = fuse(&input, &output, &[]);
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    // The block not fused is a warning on stderr, with the reason.
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(
        stdout.starts_with("fused 0 blocks") && stderr.contains("depends on the input size"),
        "{stdout}{stderr}"
    );
}

#[test]
fn weights_and_biases_computed_by_constant_subgraphs_fold() {
    use onnx_repvgg::onnx::attr::{new_int, new_ints};
    let mut b = Builder::new(&SHAPE);
    // Zero bias as the dynamo exporter builds it without optimization.
    let w = b.init(&[4, 4, 3, 3], -0.5, 0.5);
    let shape = b.node("Shape", &[&w], vec![new_int("start", 0), new_int("end", 1)]);
    let zero = b.constant(&[], vec![0.0]);
    let typed_zero = b.node("CastLike", &[&zero, "x"], vec![]);
    let bias = b.node("Expand", &[&typed_zero, &shape], vec![]);
    let c3 = b.node(
        "Conv",
        &["x", &w, &bias],
        vec![new_ints("pads", [1, 1, 1, 1])],
    );
    // A weight computed as W + C (TorchScript without constant folding).
    let w1 = b.init(&[4, 4, 1, 1], -0.5, 0.5);
    let delta = b.init(&[4, 4, 1, 1], -0.1, 0.1);
    let w1 = b.node("Add", &[&w1, &delta], vec![]);
    let c1 = b.node("Conv", &["x", &w1], vec![]);
    // A per-channel scale reshaped from a flat vector.
    let scale = b.constant(&[4], vec![0.5, 1.5, -1.0, 2.0]);
    let dims = b.graph.initializer.len();
    b.graph
        .initializer
        .push(onnx_repvgg::onnx::proto::TensorProto {
            name: Some(format!("dims{dims}")),
            dims: vec![3],
            data_type: Some(7),
            int64_data: vec![-1, 1, 1],
            ..Default::default()
        });
    let scale = b.node("Reshape", &[&scale, &format!("dims{dims}")], vec![]);
    let s = b.node("Add", &[&c3, &c1], vec![]);
    let y = b.node("Mul", &[&s, &scale], vec![]);
    b.output(&y, &SHAPE);
    fuse_and_compare(&b, 1, &[("Conv", 1)]);
}

#[test]
fn training_mode_batch_norms_fold_only_when_allowed() {
    let input = testdata().join("models/tiny/ts_train_op17.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let run = fuse(&input, &out, &["--allow-training"]);
    assert!(run.status.success());
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stdout.starts_with("fused 7 blocks (5 without identity)"),
        "{stdout}"
    );
    assert!(
        stderr.contains("folded 16 BatchNormalization nodes exported in training mode"),
        "{stderr}"
    );
    assert_eq!(op_histogram(&out).get("BatchNormalization"), None);
}

#[test]
fn a_deep_self_doubling_constant_subgraph_is_evaluated_once_per_value() {
    // v(i+1) = v(i) + v(i): without memoization the evaluator would take 2^depth steps.
    let mut b = Builder::new(&SHAPE);
    let mut v = b.constant(&[4, 1, 1], vec![0.5, 1.0, 1.5, 2.0]);
    for _ in 0..30 {
        v = b.node("Add", &[&v, &v], vec![]);
    }
    let c = b.conv("x", ConvSpec::k3(4, 4));
    let y = b.node("Mul", &[&c, &v], vec![]);
    b.output(&y, &SHAPE);
    fuse_and_compare(&b, 1, &[("Conv", 1)]);
}

#[test]
fn batch_norm_15_with_float16_statistics_folds() {
    // BatchNormalization-15 allows mean/var of another float type than the input. tract runs
    // only uniform types, so the reference is the same model with the statistics as float32
    // (float16 values are exact in float32).
    let build = |half: bool| {
        let mut b = Builder::new(&SHAPE);
        let c3 = b.conv("x", ConvSpec::k3(4, 4));
        let c1 = b.conv("x", ConvSpec::k1(4, 4));
        let s = b.node("Add", &[&c3, &c1], vec![]);
        let y = b.bn(&s, 4, 1e-5);
        b.output(&y, &SHAPE);
        for t in b.graph.initializer.iter_mut().rev().take(2) {
            let values: Vec<half::f16> = t
                .float_data
                .iter()
                .map(|&v| half::f16::from_f32(v))
                .collect();
            t.float_data = values.iter().map(|v| v.to_f32()).collect();
            if half {
                t.data_type = Some(10);
                t.int32_data = values.iter().map(|v| v.to_bits() as i32).collect();
                t.float_data.clear();
            }
        }
        b
    };
    let dir = tempfile::tempdir().unwrap();
    let (input, output, reference) = (
        dir.path().join("in.onnx"),
        dir.path().join("out.onnx"),
        dir.path().join("ref.onnx"),
    );
    std::fs::write(&input, build(true).build()).unwrap();
    std::fs::write(&reference, build(false).build()).unwrap();
    let run = fuse(&input, &output, &[]);
    assert!(String::from_utf8_lossy(&run.stdout).starts_with("fused 1 blocks"));
    let shape = [1usize, 4, 6, 6];
    let data: Vec<f32> = (0..144)
        .map(|i| ((i * 37 % 17) as f32 / 8.0) - 1.0)
        .collect();
    let x = Tensor::from(tract_ndarray::ArrayD::from_shape_vec(&shape[..], data).unwrap());
    let want = run_tract(&reference, &x);
    let got = run_tract(&output, &x);
    assert!(relative_error(&want[0], &got[0]) < 1e-5);
}
