//! What a block costs before and after fusion: parameters (elements of the constant tensors its
//! nodes read) and FLOPs at a stated input size (a multiply-add counts 2; bias, BatchNormalization
//! and the sums count one or two per output element).

use crate::constant::Constants;
use crate::layout::Layout;
use crate::pattern::Block;
use crate::shapes::Shapes;

/// A block's parameters and FLOPs, before → after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    pub params_before: u64,
    /// `None` when the block is not fused.
    pub params_after: Option<u64>,
    /// `None` when a shape on the way is unknown.
    pub flops_before: Option<u64>,
    pub flops_after: Option<u64>,
}

/// Counts `block`; `layout` is the fused Conv's, when the block folds.
pub fn of_block(
    index: &Constants,
    block: &Block,
    layout: Option<&Layout>,
    shapes: &Shapes,
) -> Cost {
    let elements = |value: &str| -> u64 {
        index
            .tensor_dims(value)
            .map_or(0, |d| product(d.iter().map(|&v| v.max(0) as u64)))
    };
    let nodes = block.nodes();
    let mut params_before = 0u64;
    let mut flops_before = Some(0u64);
    for &n in &nodes {
        let node = index.node(n);
        let constants = node.input.iter().filter(|v| {
            !v.is_empty()
                && *v != &block.input
                && index.producer(v).is_none_or(|p| !nodes.contains(&p))
        });
        params_before =
            constants.fold(params_before, |sum: u64, v| sum.saturating_add(elements(v)));
        let out = node
            .output
            .first()
            .and_then(|o| shapes.get(index, o))
            .map(|s| product(s.iter().map(|&d| d as u64)));
        let flops = out.and_then(|out| node_flops(index, node, out));
        flops_before = flops_before.zip(flops).map(|(a, b)| a.saturating_add(b));
    }
    let out = shapes
        .get(index, block.output(index))
        .map(|s| product(s.iter().map(|&d| d as u64)));
    let params_after = layout.map(|l| {
        let dims = l.weight_dims();
        product(dims.iter().map(|&d| d as u64)).saturating_add(dims[0] as u64)
    });
    let flops_after = layout.zip(out).map(|(l, out)| {
        let per_output = product(l.weight_dims()[1..].iter().map(|&d| d as u64));
        out.saturating_mul(per_output.saturating_mul(2).saturating_add(1))
    });
    Cost {
        params_before,
        params_after,
        flops_before,
        flops_after,
    }
}

/// FLOPs of one node producing `out` elements.
fn node_flops(index: &Constants, node: &crate::onnx::proto::NodeProto, out: u64) -> Option<u64> {
    match node.op_type() {
        "Conv" => {
            let w = index.tensor_dims(node.input.get(1)?)?;
            let per_output = product(w.iter().skip(1).map(|&d| d.max(0) as u64));
            let bias = u64::from(node.input.get(2).is_some_and(|b| !b.is_empty()));
            Some(out.saturating_mul(per_output.saturating_mul(2).saturating_add(bias)))
        }
        "AveragePool" => {
            let window = crate::geometry::Window::of(node, None).ok()?;
            let kernel = product(window.kernel.iter().map(|&k| k as u64));
            Some(out.saturating_mul(kernel))
        }
        "BatchNormalization" => Some(out.saturating_mul(2)),
        "Add" | "Sub" | "Mul" | "Div" | "Sum" => {
            Some(out.saturating_mul(node.input.len().saturating_sub(1) as u64))
        }
        _ => Some(out),
    }
}

/// The product of `dims`, saturating: hostile declared shapes make huge counts, never a panic.
fn product(dims: impl Iterator<Item = u64>) -> u64 {
    dims.fold(1, u64::saturating_mul)
}
