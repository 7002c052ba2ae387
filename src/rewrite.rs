//! Plans → patch: the one place that decides how the graph changes. Each block's root sum is
//! replaced by a Conv that keeps the sum's output name (so every consumer and graph output is
//! untouched); the block's other nodes go. Each linear fold's first operator is replaced by the
//! fused one (a `MatMul` with its bias `Add`), which writes the value the fold ended at; its other
//! operators and scales go, and kept nodes that read a scale which goes read past it. Then
//! whatever only fed what went (Identity and Constant nodes, initializers, value_info entries)
//! goes too, and nothing else. Existing initializers are never modified: the fused weights are
//! new tensors.

use std::collections::{HashMap, HashSet};

use crate::graph::GraphIndex;
use crate::linear::{Kind, LinearPlan};
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;
use crate::patch::{NewTensor, Patch};
use crate::plan::{Analysis, BlockPlan, Plan};

/// Builds the patch that applies every plan of `analysis`.
pub fn build(index: &GraphIndex, analysis: &Analysis) -> Patch {
    let mut patch = Patch::default();
    let mut uses = Uses::new(index);
    // The nodes that go, each with the output that stays (written by its replacement), if any.
    let mut dropped: Vec<(usize, &str)> = Vec::new();
    for (plan_index, plan) in analysis.all().into_iter().enumerate() {
        patch.new_tensors.extend(new_tensors(plan_index, plan));
        let (at, input, replacement) = match plan {
            Plan::Conv(plan) => {
                let output = plan.block.output(index);
                dropped.extend(plan.block.nodes().into_iter().map(|n| (n, output)));
                let conv = vec![new_conv(index, plan)];
                (plan.block.root, plan.block.input.as_str(), conv)
            }
            Plan::Linear(plan) => {
                let heads = plan.heads.iter().map(|h| h.node);
                let nodes = heads.chain(plan.removed.iter().copied());
                dropped.extend(nodes.map(|n| (n, plan.output.as_str())));
                (plan.at(), plan.input.as_str(), new_linear(index, plan))
            }
        };
        uses.add(input, 1);
        patch.replaced.insert(at, replacement);
    }
    dropped.extend(analysis.linear.pushed.iter().map(|&n| (n, "")));
    let mut worklist: Vec<&str> = Vec::new();
    let mut gone: HashSet<&str> = HashSet::new();
    for (n, kept) in dropped {
        let node = index.node(n);
        for input in node.input.iter().filter(|v| !v.is_empty()) {
            uses.add(input, -1);
            worklist.push(input);
        }
        if !patch.replaced.contains_key(&n) {
            patch.removed_nodes.insert(n);
        }
        let outputs = node.output.iter().map(String::as_str);
        gone.extend(outputs.filter(|o| !o.is_empty() && *o != kept));
    }
    for rewire in &analysis.linear.rewired {
        let node = patch
            .replaced
            .entry(rewire.node)
            .or_insert_with(|| vec![index.node(rewire.node).clone()]);
        let slot = &mut node[0].input[rewire.slot];
        uses.add(index.node(rewire.node).input[rewire.slot].as_str(), -1);
        uses.add(&rewire.value, 1);
        *slot = rewire.value.clone();
    }
    let model = index.model;
    let initializers: HashMap<&str, usize> = model
        .initializers
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name(), i))
        .collect();
    while let Some(value) = worklist.pop() {
        if uses.get(value) > 0 || index.is_output(value) || index.is_overridable_input(value) {
            continue;
        }
        if let Some(&i) = initializers.get(value) {
            patch.removed_initializers.insert(i);
            continue;
        }
        let Some(p) = index.producer(value) else {
            continue;
        };
        if patch.removed_nodes.contains(&p) || patch.replaced.contains_key(&p) {
            continue;
        }
        let node = index.node(p);
        let outputs = || node.output.iter().filter(|o| !o.is_empty());
        if outputs().any(|o| uses.get(o) > 0 || index.is_output(o)) {
            continue;
        }
        patch.removed_nodes.insert(p);
        gone.extend(outputs().map(String::as_str));
        for input in node.input.iter().filter(|v| !v.is_empty()) {
            uses.add(input, -1);
            worklist.push(input);
        }
    }
    for (i, v) in model.value_info.iter().enumerate() {
        if gone.contains(v.name()) {
            patch.removed_value_info.insert(i);
        }
    }
    if model.initializers_listed_as_inputs() {
        list_initializers_as_inputs(index, &mut patch);
    }
    patch
}

/// IR < 4 models list every initializer among the graph inputs: keep them in step.
fn list_initializers_as_inputs(index: &GraphIndex, patch: &mut Patch) {
    let model = index.model;
    let removed: HashSet<&str> = patch
        .removed_initializers
        .iter()
        .map(|&i| model.initializers[i].name())
        .collect();
    for (i, v) in model.inputs.iter().enumerate() {
        if removed.contains(v.name()) {
            patch.removed_inputs.insert(i);
        }
    }
    patch.new_inputs = patch
        .new_tensors
        .iter()
        .map(|t| crate::onnx::info::tensor(&t.name, t.dtype.code(), &t.header().dims))
        .collect();
}

/// How many node inputs read each value once the patch applies.
struct Uses<'a, 'm> {
    index: &'a GraphIndex<'m>,
    delta: HashMap<&'a str, isize>,
}

impl<'a, 'm> Uses<'a, 'm> {
    fn new(index: &'a GraphIndex<'m>) -> Self {
        Uses {
            index,
            delta: HashMap::new(),
        }
    }

    fn add(&mut self, value: &'a str, by: isize) {
        *self.delta.entry(value).or_default() += by;
    }

    fn get(&self, value: &str) -> isize {
        self.index.consumers(value).len() as isize + self.delta.get(value).copied().unwrap_or(0)
    }
}

/// The Conv that replaces a block: explicit geometry, the block's input, new weight and bias.
fn new_conv(index: &GraphIndex, plan: &BlockPlan) -> NodeProto {
    let g = &plan.layout.geometry;
    let as_i64 = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
    let pads = [as_i64(&g.pads_begin), as_i64(&g.pads_end)].concat();
    NodeProto {
        input: vec![
            plan.block.input.clone(),
            format!("{}.weight", plan.node_name),
            format!("{}.bias", plan.node_name),
        ],
        output: vec![plan.block.output(index).to_string()],
        name: Some(plan.node_name.clone()),
        op_type: Some("Conv".into()),
        attribute: vec![
            attr::new_ints("dilations", as_i64(&g.dilations)),
            attr::new_int("group", g.group as i64),
            attr::new_ints("kernel_shape", as_i64(&plan.layout.kernel)),
            attr::new_ints("pads", pads),
            attr::new_ints("strides", as_i64(&g.strides)),
        ],
        ..Default::default()
    }
}

/// The node(s) that replace a linear fold: its operator with the fused weight and bias (alpha
/// and beta folded in); a MatMul, which has no bias, then adds it.
fn new_linear(index: &GraphIndex, plan: &LinearPlan) -> Vec<NodeProto> {
    let first = index.node(plan.at());
    let weight = format!("{}.weight", plan.node_name);
    let bias = plan.has_bias().then(|| format!("{}.bias", plan.node_name));
    let node = |op: &str, input: Vec<String>, output: &str, name: String| NodeProto {
        input,
        output: vec![output.to_string()],
        name: Some(name),
        op_type: Some(op.into()),
        ..Default::default()
    };
    let inputs = |weight: String| {
        [
            vec![plan.input.clone(), weight],
            bias.iter().cloned().collect(),
        ]
        .concat()
    };
    match (plan.kind, &bias) {
        (Kind::MatMul, Some(bias)) if !plan.as_gemm => {
            let product = format!("{}.matmul", plan.node_name);
            vec![
                node(
                    "MatMul",
                    vec![plan.input.clone(), weight],
                    &product,
                    plan.node_name.clone(),
                ),
                node(
                    "Add",
                    vec![product, bias.clone()],
                    &plan.output,
                    format!("{}.add", plan.node_name),
                ),
            ]
        }
        (Kind::MatMul, _) => vec![node(
            plan.op(),
            inputs(weight),
            &plan.output,
            plan.node_name.clone(),
        )],
        (kind, _) => {
            let keep = |a: &&crate::onnx::proto::AttributeProto| {
                !(matches!(kind, Kind::Gemm { .. }) && matches!(a.name(), "alpha" | "beta"))
            };
            vec![NodeProto {
                attribute: first.attribute.iter().filter(keep).cloned().collect(),
                ..node(
                    kind.op(),
                    inputs(weight),
                    &plan.output,
                    plan.node_name.clone(),
                )
            }]
        }
    }
}

/// The fused weight and bias of plan `index`, in the weight's element type (no bias for a
/// linear fold that has none).
fn new_tensors(index: usize, plan: Plan) -> Vec<NewTensor> {
    let tensor = |suffix: &str, dims: Vec<usize>, slot: usize| NewTensor {
        name: format!("{}.{suffix}", plan.node_name()),
        dims,
        dtype: plan.dtype(),
        plan: index,
        slot,
    };
    let bias = match plan {
        Plan::Linear(p) => p.has_bias(),
        Plan::Conv(_) => true,
    };
    let mut tensors = vec![tensor("weight", plan.weight_dims(), 0)];
    if bias {
        tensors.push(tensor("bias", vec![plan.outputs()], 1));
    }
    tensors
}
