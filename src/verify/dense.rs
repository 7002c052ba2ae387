//! A dense reference evaluator of small ONNX subgraphs: every value computed in full, in f64, by
//! each operator's ONNX definition (default domain, inference semantics). It is the oracle the
//! folds of Linear, ConvTranspose and N-d blocks are proved against, so it shares no code with
//! them: it reads attributes itself ([`crate::onnx::attr`] only) and never touches
//! `crate::geometry`, `crate::layout`, `crate::recipe` or `crate::fold`.
//!
//! Values are looked up in the caller's `given` values first, then the [`Graph`]'s constants,
//! then computed by the node the graph names as their producer (its first output only). Integer
//! tensors (shapes, axes) are held as f64 too, exactly: every integer an input may hold within
//! [`MAX_ELEMENTS`] is below 2^53. `Div` is the float division throughout (an integer `Div` of
//! odd shape arithmetic yields a fraction, which `Reshape` then refuses).
//!
//! Nothing read from the graph can make it panic, exhaust memory or run for long: every
//! operator checks its shapes and attributes, refuses a result over [`MAX_ELEMENTS`] or a node
//! over [`MAX_WORK`] multiply-adds before allocating, and one evaluation runs at most
//! [`MAX_NODES`] nodes (it walks the graph with an explicit stack, so depth costs no stack).
//!
//! - `elementwise.rs`: broadcasting binary operators, unary ones, `BatchNormalization`;
//! - `matmul.rs`: `Gemm`, `MatMul`;
//! - `conv.rs`: `Conv`, `ConvTranspose`;
//! - `pool.rs`: `AveragePool`, `GlobalAveragePool`, `ReduceMean`;
//! - `shape.rs`: `Reshape`, `Flatten`, `Transpose`, `Squeeze`, `Unsqueeze`, `Shape`, `Concat`.

mod conv;
mod elementwise;
mod matmul;
mod pool;
mod shape;

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use ndarray::{ArrayD, IxDyn};

use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

/// A tensor of any element type, as f64 (float tensors; int64 shape tensors are exact here).
pub(crate) type Tensor = ArrayD<f64>;

/// Most elements of any tensor an operator computes (32 MiB of f64).
pub(crate) const MAX_ELEMENTS: usize = 1 << 22;

/// Most multiply-adds (or elements visited) one node may take.
pub(crate) const MAX_WORK: u64 = 1 << 28;

/// Most nodes one [`Evaluator`] runs.
pub(crate) const MAX_NODES: usize = 4096;

/// Where the evaluator finds things: the node producing a value (`None` for a value it must be
/// given or that is a constant), and constants.
pub(crate) trait Graph {
    fn producer(&self, value: &str) -> Option<&NodeProto>;
    fn constant(&self, value: &str) -> Option<Tensor>;
}

/// `value`, computed from `given` (values supplied by the caller, e.g. a random input) by running
/// the nodes `graph` names, each by its ONNX definition; memoised; an error names the node and
/// what it could not do. (The check uses [`Evaluator`], to compute several values sharing the
/// work.)
#[cfg(test)]
pub(crate) fn evaluate(
    graph: &dyn Graph,
    given: &HashMap<String, Tensor>,
    value: &str,
) -> Result<Tensor, String> {
    Evaluator::new(graph, given).value(value)
}

/// Evaluates values of one graph on one set of given values, remembering every value it
/// computes (so values asked for one after the other share their common subgraph).
pub(crate) struct Evaluator<'a> {
    graph: &'a dyn Graph,
    given: &'a HashMap<String, Tensor>,
    memo: HashMap<String, Rc<Tensor>>,
    nodes_run: usize,
}

impl<'a> Evaluator<'a> {
    pub(crate) fn new(graph: &'a dyn Graph, given: &'a HashMap<String, Tensor>) -> Self {
        Evaluator {
            graph,
            given,
            memo: HashMap::new(),
            nodes_run: 0,
        }
    }

    /// The value `value` (see [`evaluate`]).
    pub(crate) fn value(&mut self, value: &str) -> Result<Tensor, String> {
        self.resolve(value)?;
        self.memo
            .get(value)
            .map(|t| t.as_ref().clone())
            .ok_or_else(|| format!("'{value}' was not computed"))
    }

    /// Whether `value` is known now: remembered, given or a constant (remembered from now on;
    /// refused over [`MAX_ELEMENTS`] like every computed value).
    fn is_known(&mut self, value: &str) -> Result<bool, String> {
        if self.memo.contains_key(value) {
            return Ok(true);
        }
        let found = match self.given.get(value) {
            Some(t) => Some(t.clone()),
            None => self.graph.constant(value),
        };
        let Some(t) = found else {
            return Ok(false);
        };
        elements(t.shape()).map_err(|e| format!("'{value}': {e}"))?;
        self.memo.insert(value.to_string(), Rc::new(standard(t)));
        Ok(true)
    }

    /// Computes `target` and every value it needs, depth first with an explicit stack. A value
    /// is *open* from when its producer's inputs are pushed until it is computed: meeting an open
    /// value again as an input is a cycle.
    fn resolve(&mut self, target: &str) -> Result<(), String> {
        let graph = self.graph;
        let mut stack = vec![target.to_string()];
        let mut open: HashSet<String> = HashSet::new();
        while let Some(value) = stack.last().cloned() {
            if self.is_known(&value)? {
                stack.pop();
                continue;
            }
            let node = graph.producer(&value).ok_or_else(|| {
                format!("'{value}' is not given, not a constant, and no node computes it")
            })?;
            // Refused before its inputs are computed.
            check_node(node, &value).map_err(|e| format!("{}: {e}", describe(node)))?;
            let mut missing = Vec::new();
            for input in node.input.iter().filter(|i| !i.is_empty()) {
                if !self.is_known(input)? {
                    missing.push(input.clone());
                }
            }
            if missing.is_empty() {
                self.run(node, &value)?;
                open.remove(&value);
                stack.pop();
                continue;
            }
            if let Some(cycle) = missing.iter().find(|m| open.contains(*m) || **m == value) {
                return Err(format!(
                    "{}: '{cycle}' depends on itself (the graph has a cycle)",
                    describe(node)
                ));
            }
            open.insert(value);
            if open.len() > MAX_NODES {
                return Err(format!(
                    "{}: the subgraph runs more than {MAX_NODES} nodes",
                    describe(node)
                ));
            }
            stack.extend(missing);
        }
        Ok(())
    }

    /// Runs `node` (all its inputs known) and remembers its output `value`.
    fn run(&mut self, node: &NodeProto, value: &str) -> Result<(), String> {
        self.nodes_run += 1;
        if self.nodes_run > MAX_NODES {
            return Err(format!(
                "{}: the subgraph runs more than {MAX_NODES} nodes",
                describe(node)
            ));
        }
        let result = self
            .apply(node, value)
            .map_err(|e| format!("{}: {e}", describe(node)))?;
        self.memo
            .insert(value.to_string(), Rc::new(standard(result)));
        Ok(())
    }

    fn apply(&self, node: &NodeProto, value: &str) -> Result<Tensor, String> {
        check_node(node, value)?;
        let inputs = Inputs {
            node,
            values: node
                .input
                .iter()
                .map(|i| (!i.is_empty()).then(|| self.memo.get(i).cloned()).flatten())
                .collect(),
        };
        match node.op_type() {
            "Identity" => Ok(inputs.get(0)?.clone()),
            "Constant" => constant_node(node),
            "Add" | "Sub" | "Mul" | "Div" | "Sum" => elementwise::binary(node, &inputs),
            "Neg" | "Relu" | "Sigmoid" | "Erf" | "HardSwish" => elementwise::unary(node, &inputs),
            "BatchNormalization" => elementwise::batch_normalization(node, &inputs),
            "Gemm" => matmul::gemm(node, &inputs),
            "MatMul" => matmul::matmul(&inputs),
            "Conv" => conv::conv(node, &inputs),
            "ConvTranspose" => conv::conv_transpose(node, &inputs),
            "AveragePool" => pool::average_pool(node, &inputs),
            "GlobalAveragePool" => pool::global_average_pool(&inputs),
            "ReduceMean" => pool::reduce_mean(node, &inputs),
            "Reshape" => shape::reshape(node, &inputs),
            "Flatten" => shape::flatten(node, &inputs),
            "Transpose" => shape::transpose(node, &inputs),
            "Squeeze" => shape::squeeze(node, &inputs),
            "Unsqueeze" => shape::unsqueeze(node, &inputs),
            "Shape" => shape::shape(node, &inputs),
            "Concat" => shape::concat(node, &inputs),
            op => Err(format!("the operator {op} is not evaluated")),
        }
    }
}

/// The operators [`Evaluator`] runs (default domain).
pub(crate) const OPERATORS: &[&str] = &[
    "Identity",
    "Constant",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Sum",
    "Neg",
    "Relu",
    "Sigmoid",
    "Erf",
    "HardSwish",
    "BatchNormalization",
    "Gemm",
    "MatMul",
    "Conv",
    "ConvTranspose",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Shape",
    "Concat",
];

/// Refuses a node the evaluator cannot run for `value`, whatever its inputs: another domain, an
/// operator not in [`OPERATORS`], `value` not its first output.
fn check_node(node: &NodeProto, value: &str) -> Result<(), String> {
    if !matches!(node.domain(), "" | "ai.onnx") {
        return Err(format!("domain '{}' is not evaluated", node.domain()));
    }
    if !OPERATORS.contains(&node.op_type()) {
        return Err(format!("the operator {} is not evaluated", node.op_type()));
    }
    match node.output.iter().position(|o| o == value) {
        Some(0) => Ok(()),
        Some(i) => Err(format!("only output 0 is evaluated, not output {i}")),
        None => Err(format!("'{value}' is not among its outputs")),
    }
}

/// A node's inputs, by position (`None`: absent or named "").
pub(super) struct Inputs<'n> {
    node: &'n NodeProto,
    values: Vec<Option<Rc<Tensor>>>,
}

impl Inputs<'_> {
    /// Input `i`, which the operator requires.
    fn get(&self, i: usize) -> Result<&Tensor, String> {
        self.optional(i)
            .ok_or_else(|| match self.node.input.get(i) {
                Some(name) if !name.is_empty() => format!("input {i} '{name}' was not computed"),
                _ => format!("input {i} is missing"),
            })
    }

    /// Input `i`, if present.
    fn optional(&self, i: usize) -> Option<&Tensor> {
        self.values.get(i).and_then(|v| v.as_deref())
    }

    /// How many inputs the node names (empty names included).
    fn len(&self) -> usize {
        self.values.len()
    }
}

/// "Conv 'name'", as errors name a node.
fn describe(node: &NodeProto) -> String {
    format!("{} '{}'", node.op_type(), node.name())
}

/// `t` in standard (row-major, contiguous) layout, which every operator may assume of its inputs.
fn standard(t: Tensor) -> Tensor {
    if t.is_standard_layout() {
        t
    } else {
        t.as_standard_layout().into_owned()
    }
}

/// The elements of a tensor in row-major order (every value held is standard, see [`standard`]).
fn flat(t: &Tensor) -> Result<&[f64], String> {
    t.as_slice()
        .ok_or_else(|| "a tensor is not contiguous".to_string())
}

/// How many elements a tensor of `shape` holds, refused over [`MAX_ELEMENTS`] — counting an
/// empty axis as 1, so that an empty tensor may not have huge dims either: the product of any
/// dims of any tensor held is then at most [`MAX_ELEMENTS`], and never overflows.
fn elements(shape: &[usize]) -> Result<usize, String> {
    let bound = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d.max(1)));
    match bound {
        Some(n) if n <= MAX_ELEMENTS => Ok(shape.iter().product()),
        _ => Err(format!(
            "a result of shape {shape:?} is over the {MAX_ELEMENTS} elements evaluated"
        )),
    }
}

/// A tensor of `shape` from row-major `values` (as many as [`elements`] allows).
fn from_vec(shape: &[usize], values: Vec<f64>) -> Result<Tensor, String> {
    ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|e| e.to_string())
}

/// Refuses a node whose work — the product of `factors` — is over [`MAX_WORK`].
fn charge(factors: &[usize]) -> Result<(), String> {
    let work = factors
        .iter()
        .try_fold(1u64, |w, &f| w.checked_mul(f as u64));
    match work {
        Some(w) if w <= MAX_WORK => Ok(()),
        _ => Err(format!(
            "the node takes {} multiply-adds, over the {MAX_WORK} evaluated",
            work.map_or("too many".to_string(), |w| w.to_string())
        )),
    }
}

/// `axis` of a tensor of rank `rank`, negative counting from the end (`-rank..rank`).
fn axis(value: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    if !(-r..r).contains(&value) {
        return Err(format!("axis {value} is out of range for rank {rank}"));
    }
    Ok(if value < 0 { value + r } else { value } as usize)
}

/// Distinct axes of a tensor of rank `rank` (see [`axis`]), in the order given.
fn axes(values: &[i64], rank: usize) -> Result<Vec<usize>, String> {
    let mut out = Vec::with_capacity(values.len());
    for &v in values {
        let a = axis(v, rank)?;
        if out.contains(&a) {
            return Err(format!("axis {v} is repeated in {values:?}"));
        }
        out.push(a);
    }
    Ok(out)
}

/// The values of an integer tensor (shapes, axes): each must be a whole number in i64's range.
fn integers(t: &Tensor) -> Result<Vec<i64>, String> {
    t.iter()
        .map(|&v| {
            if v.fract() == 0.0 && v.abs() < 9.2e18 {
                Ok(v as i64)
            } else {
                Err(format!("{v} is not an integer"))
            }
        })
        .collect()
}

/// An INT attribute that must be 0 or 1 (`default` when absent).
fn flag(node: &NodeProto, name: &str, default: bool) -> Result<bool, String> {
    match attr::int(node, name) {
        None => Ok(default),
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        Some(v) => Err(format!("{name}={v} is neither 0 nor 1")),
    }
}

/// The tensor of a `Constant` node (`value`, `value_float(s)` or `value_int(s)`).
fn constant_node(node: &NodeProto) -> Result<Tensor, String> {
    let found = node
        .attribute
        .iter()
        .find(|a| a.name().starts_with("value"));
    let a = found.ok_or("no value attribute")?;
    match a.name() {
        "value" => {
            let t = a.t.as_ref().ok_or("value is not a tensor")?;
            let (_, count) = crate::tensor::shape(t).map_err(|e| e.to_string())?;
            elements(&[count])?;
            let store = crate::onnx::external::ExternalStore::default();
            match crate::tensor::read_f64(t, &store) {
                Ok(v) => Ok(v),
                Err(_) => crate::tensor::read_i64(t, &store)
                    .map(|v| v.mapv(|x| x as f64))
                    .map_err(|e| e.to_string()),
            }
        }
        "value_float" => Ok(Tensor::from_elem(IxDyn(&[]), a.f.unwrap_or(0.0) as f64)),
        "value_int" => Ok(Tensor::from_elem(IxDyn(&[]), a.i.unwrap_or(0) as f64)),
        "value_floats" => from_vec(
            &[a.floats.len()],
            a.floats.iter().map(|&v| v as f64).collect(),
        ),
        "value_ints" => from_vec(&[a.ints.len()], a.ints.iter().map(|&v| v as f64).collect()),
        other => Err(format!("the attribute {other} is not evaluated")),
    }
}

#[cfg(test)]
mod tests;
