//! Plans → patch: the one place that decides how the graph changes. Each block's root sum is
//! replaced by a Conv that keeps the sum's output name (so every consumer and graph output is
//! untouched); the block's other nodes go; then whatever only fed them (Identity and Constant
//! nodes, initializers, value_info entries) goes too, and nothing else. Existing initializers are
//! never modified: the fused weights are new tensors.

use std::collections::{HashMap, HashSet};

use crate::graph::GraphIndex;
use crate::onnx::attr;
use crate::onnx::proto::NodeProto;
use crate::patch::{NewTensor, Patch};
use crate::plan::BlockPlan;

/// Builds the patch that applies every plan.
pub fn build(index: &GraphIndex, plans: &[BlockPlan]) -> Patch {
    let mut patch = Patch::default();
    let mut uses = Uses::new(index);
    let mut worklist: Vec<&str> = Vec::new();
    let mut gone: HashSet<&str> = HashSet::new();
    for (plan_index, plan) in plans.iter().enumerate() {
        let conv = new_conv(index, plan);
        uses.add(&plan.block.input, 1);
        patch.new_tensors.extend(new_tensors(plan_index, plan));
        for n in plan.block.nodes() {
            let node = index.node(n);
            for input in node.input.iter().filter(|v| !v.is_empty()) {
                uses.add(input, -1);
                worklist.push(input);
            }
            if n != plan.block.root {
                patch.removed_nodes.insert(n);
                gone.extend(node.output.iter().map(String::as_str));
            }
        }
        patch.replaced.insert(plan.block.root, conv);
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

/// The fused weight and bias of plan `index`, in the weight's element type.
fn new_tensors(index: usize, plan: &BlockPlan) -> [NewTensor; 2] {
    let layout = &plan.layout;
    [
        NewTensor {
            name: format!("{}.weight", plan.node_name),
            dims: layout.weight_dims(),
            dtype: plan.dtype,
            plan: index,
            slot: 0,
        },
        NewTensor {
            name: format!("{}.bias", plan.node_name),
            dims: vec![layout.out_channels],
            dtype: plan.dtype,
            plan: index,
            slot: 1,
        },
    ]
}
