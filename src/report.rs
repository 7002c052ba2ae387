//! What the tool tells people and pipelines: one [`BlockInfo`] per block found (fused or not, and
//! why not), and the totals of a fusion.

use std::time::Duration;

use crate::graph::GraphIndex;
use crate::onnx::attr;
use crate::pattern::{Block, Branch};

/// A block as a reader of the training structure sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// Module path (`stage1.0`) or the sum node's name.
    pub name: String,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Strides of the branches' convolutions.
    pub stride: Vec<usize>,
    pub groups: usize,
    /// One entry per summand: its kernel (`3x3`, `1x1`) or `identity`.
    pub branches: Vec<String>,
    /// Whether the block is (or would be) folded.
    pub fusable: bool,
    /// Why not, when it is not.
    pub reason: Option<String>,
}

impl BlockInfo {
    /// Whether one summand is the identity.
    pub fn has_identity(&self) -> bool {
        self.branches.iter().any(|b| b == "identity")
    }
}

/// Describes `block` from the graph alone (weight dims and Conv attributes; no tensor data).
pub fn describe(index: &GraphIndex, block: &Block, name: String) -> BlockInfo {
    let mut info = BlockInfo {
        name,
        in_channels: 0,
        out_channels: 0,
        stride: Vec::new(),
        groups: 1,
        branches: Vec::new(),
        fusable: true,
        reason: None,
    };
    for b in &block.branches {
        let Branch::Conv { conv, .. } = *b else {
            info.branches.push("identity".into());
            continue;
        };
        let node = index.node(conv);
        let dims: Vec<usize> = node
            .input
            .get(1)
            .and_then(|w| index.declared_tensor(w))
            .map(|w| w.dims.iter().map(|&d| d.max(0) as usize).collect())
            .unwrap_or_default();
        let kernel = dims.get(2..).unwrap_or(&[]);
        info.branches.push(if kernel.is_empty() {
            "conv".into()
        } else {
            kernel
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join("x")
        });
        if info.stride.is_empty() && dims.len() > 2 {
            let groups = attr::int(node, "group").unwrap_or(1).max(1) as usize;
            info.groups = groups;
            info.out_channels = dims[0];
            info.in_channels = dims[1] * groups;
            info.stride = attr::ints(node, "strides")
                .map(|s| s.iter().map(|&v| v.max(0) as usize).collect())
                .unwrap_or_else(|| vec![1; kernel.len()]);
        }
    }
    info
}

/// The outcome of a fusion.
#[derive(Debug, Clone, Default)]
pub struct FuseReport {
    /// Blocks folded into one Conv each.
    pub fused: Vec<BlockInfo>,
    /// Blocks found but left as they were, with the reason.
    pub skipped: Vec<BlockInfo>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Elements of all initializers.
    pub params_before: u64,
    pub params_after: u64,
    pub elapsed: Duration,
}

impl FuseReport {
    /// Fused blocks that had no identity branch.
    pub fn fused_without_identity(&self) -> usize {
        self.fused.iter().filter(|b| !b.has_identity()).count()
    }
}

/// What `inspect` finds.
#[derive(Debug, Clone, Default)]
pub struct InspectReport {
    pub blocks: Vec<BlockInfo>,
}

impl InspectReport {
    pub fn fusable(&self) -> usize {
        self.blocks.iter().filter(|b| b.fusable).count()
    }

    pub fn without_identity(&self) -> usize {
        self.blocks.iter().filter(|b| !b.has_identity()).count()
    }
}
