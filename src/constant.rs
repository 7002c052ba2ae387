//! Constant subgraphs: values computed only from constants, as exporters sometimes leave them
//! (dynamo with `optimize=False` builds zero biases as `Expand(CastLike(0, x), Shape(W)[0:1])`,
//! TorchScript without folding reshapes per-channel parameters with `Reshape`). A small
//! interpreter evaluates the shape and arithmetic operators such subgraphs use, in f64 for float
//! types and i64 for integer ones; anything else, or anything large, is not a constant.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;

use ndarray::{ArrayD, Axis, IxDyn, Slice};

use crate::graph::{GraphIndex, is_default_domain};
use crate::onnx::attr;
use crate::onnx::proto::{NodeProto, TensorProto};
use crate::tensor::{self, FloatType};

/// Nodes deeper than this are not followed.
const MAX_DEPTH: usize = 32;
/// Results up to this many elements are remembered (so shared subgraphs are evaluated once).
const MEMO_ELEMENTS: usize = 1 << 16;
/// Constants up to this many elements may be expanded from fewer (a zero bias from a scalar).
const SMALL: usize = 4096;
/// Results bigger than this many elements are not computed.
const MAX_ELEMENTS: usize = 1 << 26;

/// A computed constant.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Float(ArrayD<f64>, FloatType),
    /// Integers with their ONNX data type code.
    Int(ArrayD<i64>, i32),
}

impl Value {
    fn shape(&self) -> &[usize] {
        match self {
            Value::Float(a, _) => a.shape(),
            Value::Int(a, _) => a.shape(),
        }
    }

    fn ints(&self) -> Option<Vec<i64>> {
        match self {
            Value::Int(a, _) => Some(a.iter().copied().collect()),
            Value::Float(..) => None,
        }
    }

    fn floats(&self) -> ArrayD<f64> {
        match self {
            Value::Float(a, _) => a.clone(),
            Value::Int(a, _) => a.mapv(|v| v as f64),
        }
    }

    /// As an initializer named `name`.
    pub fn to_tensor(&self, name: &str) -> TensorProto {
        match self {
            Value::Float(a, ty) => tensor::new_tensor(name, a, *ty),
            Value::Int(a, _) => TensorProto {
                name: Some(name.to_string()),
                dims: a.shape().iter().map(|&d| d as i64).collect(),
                data_type: Some(7),
                int64_data: a.iter().copied().collect(),
                ..Default::default()
            },
        }
    }

    fn of_type(code: i32, floats: ArrayD<f64>) -> Option<Value> {
        match FloatType::from_code(code) {
            Some(ty) => Some(Value::Float(floats.mapv(|v| ty.round(v)), ty)),
            None if matches!(code, 2 | 3 | 5 | 6 | 7 | 9) => {
                Some(Value::Int(floats.mapv(|v| v as i64), code))
            }
            None => None,
        }
    }

    fn code(&self) -> i32 {
        match self {
            Value::Float(_, ty) => ty.code(),
            Value::Int(_, code) => *code,
        }
    }
}

/// The graph's constants: declared ones, and those its constant subgraphs compute, evaluated
/// once each (a memo shared by every thread). Derefs to the [`GraphIndex`] it reads.
#[derive(Debug)]
pub struct Constants<'i, 'm> {
    pub index: &'i GraphIndex<'m>,
    /// Constant subgraph results, and values found not to be constant.
    memo: Mutex<HashMap<String, Option<Value>>>,
}

impl<'m> std::ops::Deref for Constants<'_, 'm> {
    type Target = GraphIndex<'m>;

    fn deref(&self) -> &GraphIndex<'m> {
        self.index
    }
}

impl<'i, 'm> Constants<'i, 'm> {
    pub fn new(index: &'i GraphIndex<'m>) -> Self {
        Constants {
            index,
            memo: Mutex::default(),
        }
    }

    /// The constant tensor named `value`: an initializer that is not an overridable graph input,
    /// a `Constant` node's tensor, or the result of a constant subgraph.
    pub fn constant(&self, value: &str) -> Option<Cow<'m, TensorProto>> {
        if let Some(t) = self.index.declared_constant(value) {
            return Some(Cow::Borrowed(t));
        }
        self.evaluate(value).map(|v| Cow::Owned(v.to_tensor(value)))
    }

    /// Like [`Self::constant`], but refuses a computed constant bigger than the stored values it
    /// is computed from (a weight the model generates, e.g. with `ConstantOfShape`): folding it
    /// would store in full what the model keeps compact.
    pub fn stored_constant(&self, value: &str) -> Option<Cow<'m, TensorProto>> {
        let t = self.constant(value)?;
        if matches!(t, Cow::Owned(_)) {
            let elements: usize = t.dims.iter().map(|&d| d.max(0) as usize).product();
            if elements > stored_elements(self.index, value) {
                return None;
            }
        }
        Some(t)
    }

    /// The dims of a tensor value: declared (initializer or `Constant`), else computed by its
    /// constant subgraph.
    pub fn tensor_dims(&self, value: &str) -> Option<Vec<i64>> {
        match self.index.declared_tensor(value) {
            Some(t) => Some(t.dims.clone()),
            None => self.constant(value).map(|t| t.dims.clone()),
        }
    }

    /// Evaluates `value` if it depends on constants only.
    pub fn evaluate(&self, value: &str) -> Option<Value> {
        eval(self, value, 0)
    }

    fn memo(&self, value: &str) -> Option<Option<Value>> {
        self.memo.lock().ok()?.get(value).cloned()
    }

    fn remember(&self, value: &str, result: Option<Value>) {
        if let Ok(mut memo) = self.memo.lock() {
            memo.insert(value.to_string(), result);
        }
    }
}

/// How many stored values (initializers, `Constant` tensors and attributes) the constant subgraph
/// computing `value` reads.
pub fn stored_elements(index: &GraphIndex, value: &str) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![value];
    let mut total = 0usize;
    while let Some(v) = stack.pop() {
        if v.is_empty() || !seen.insert(v) || seen.len() > 10_000 {
            continue;
        }
        if let Some(t) = index.declared_tensor(v) {
            total += t.dims.iter().map(|&d| d.max(0) as usize).product::<usize>();
            continue;
        }
        let Some(node) = index.producer(v).map(|p| index.node(p)) else {
            continue;
        };
        for a in &node.attribute {
            total +=
                a.floats.len() + a.ints.len() + a.f.is_some() as usize + a.i.is_some() as usize;
            if let Some(t) = &a.t {
                total += t.dims.iter().map(|&d| d.max(0) as usize).product::<usize>();
            }
        }
        stack.extend(node.input.iter().map(String::as_str));
    }
    total
}

/// A constant tensor read as a [`Value`].
pub fn from_tensor(index: &GraphIndex, t: &TensorProto) -> Option<Value> {
    let code = t.data_type.unwrap_or(0);
    match FloatType::from_code(code) {
        Some(ty) => tensor::read_f64(t, &index.model.external)
            .ok()
            .map(|a| Value::Float(a, ty)),
        None => tensor::read_i64(t, &index.model.external)
            .ok()
            .map(|a| Value::Int(a, code)),
    }
}

fn eval(index: &Constants, value: &str, depth: usize) -> Option<Value> {
    if depth > MAX_DEPTH || value.is_empty() {
        return None;
    }
    if let Some(t) = index.declared_constant(value) {
        return from_tensor(index, t);
    }
    if let Some(known) = index.memo(value) {
        return known;
    }
    let result = eval_node(index, value, depth);
    let small = result
        .as_ref()
        .is_none_or(|v| v.shape().iter().product::<usize>() <= MEMO_ELEMENTS);
    if small {
        index.remember(value, result.clone());
    }
    result
}

fn eval_node(index: &Constants, value: &str, depth: usize) -> Option<Value> {
    let node = index.node(index.producer(value)?);
    if !is_default_domain(node) || node.output.first().map(String::as_str) != Some(value) {
        return None;
    }
    let input = |i: usize| node.input.get(i).and_then(|v| eval(index, v, depth + 1));
    let result = apply(index, node, &input)?;
    (result.shape().iter().product::<usize>() <= MAX_ELEMENTS).then_some(result)
}

/// One operator on constant inputs.
fn apply(
    index: &Constants,
    node: &NodeProto,
    input: &dyn Fn(usize) -> Option<Value>,
) -> Option<Value> {
    match node.op_type() {
        "Constant" => constant_node(node),
        "Identity" => input(0),
        "Cast" => Value::of_type(attr::int(node, "to")? as i32, input(0)?.floats()),
        "CastLike" => {
            let code = index.elem_type(node.input.get(1)?)?;
            Value::of_type(code, input(0)?.floats())
        }
        "Shape" => {
            let dims: Vec<i64> = input_shape(index, node.input.first()?)?;
            let (start, end) = range(dims.len(), attr::int(node, "start"), attr::int(node, "end"));
            let dims = dims.get(start..end.max(start))?.to_vec();
            Some(Value::Int(
                ArrayD::from_shape_vec(IxDyn(&[dims.len()]), dims).ok()?,
                7,
            ))
        }
        "Neg" => map(input(0)?, |v| -v),
        "Sqrt" => map(input(0)?, f64::sqrt),
        "Reciprocal" => map(input(0)?, |v| 1.0 / v),
        op @ ("Add" | "Sub" | "Mul" | "Div") => binary(op, input(0)?, input(1)?),
        "Expand" => {
            let a = input(0)?;
            let target = broadcast_shape(a.shape(), &to_dims(&input(1)?.ints()?)?)?;
            compact(&target, count(a.shape()))?;
            reshape_like(&a, |x| x.broadcast(IxDyn(&target)).map(|v| v.to_owned()))
        }
        "Reshape" => {
            let a = input(0)?;
            let spec = input(1)?.ints()?;
            let allowzero = attr::int(node, "allowzero").unwrap_or(0) == 1;
            let dims = reshape_dims(a.shape(), &spec, allowzero)?;
            reshape_like(&a, |x| x.to_shape(IxDyn(&dims)).ok().map(|v| v.to_owned()))
        }
        op @ ("Unsqueeze" | "Squeeze") => {
            let a = input(0)?;
            let axes = match attr::ints(node, "axes") {
                Some(axes) => Some(axes.to_vec()),
                None => node
                    .input
                    .get(1)
                    .filter(|v| !v.is_empty())
                    .and_then(|_| input(1)?.ints()),
            };
            let dims = if op == "Unsqueeze" {
                unsqueeze_dims(a.shape(), &axes?)?
            } else {
                squeeze_dims(a.shape(), axes.as_deref())?
            };
            reshape_like(&a, |x| x.to_shape(IxDyn(&dims)).ok().map(|v| v.to_owned()))
        }
        "Concat" => {
            let parts: Option<Vec<Value>> = (0..node.input.len()).map(input).collect();
            concat(parts?, attr::int(node, "axis")?)
        }
        "Gather" => {
            let a = input(0)?;
            let indices = input(1)?;
            let axis = axis_of(attr::int(node, "axis").unwrap_or(0), a.shape().len())?;
            gather(&a, &indices, axis)
        }
        "Slice" => slice(node, input),
        "ConstantOfShape" => {
            let dims = to_dims(&input(0)?.ints()?)?;
            compact(&dims, 1)?;
            let fill = node
                .attribute
                .iter()
                .find(|a| a.name() == "value")
                .and_then(|a| a.t.as_ref())
                .and_then(|t| from_tensor(index, t))
                .unwrap_or(Value::Float(ArrayD::zeros(IxDyn(&[1])), FloatType::F32));
            let v = fill.floats().iter().next().copied().unwrap_or(0.0);
            Value::of_type(fill.code(), ArrayD::from_elem(IxDyn(&dims), v))
        }
        "Transpose" => {
            let a = input(0)?;
            let rank = a.shape().len();
            let perm: Vec<usize> = match attr::ints(node, "perm") {
                Some(p) => p.iter().map(|&v| v as usize).collect(),
                None => (0..rank).rev().collect(),
            };
            if perm.len() != rank || perm.iter().any(|&p| p >= rank) {
                return None;
            }
            reshape_like(&a, |x| {
                Some(
                    x.clone()
                        .permuted_axes(IxDyn(&perm))
                        .as_standard_layout()
                        .to_owned(),
                )
            })
        }
        _ => None,
    }
}

fn constant_node(node: &NodeProto) -> Option<Value> {
    let a = node.attribute.first()?;
    let vector = |v: Vec<f64>| ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).ok();
    match a.name() {
        "value_float" => Some(Value::Float(
            ArrayD::from_elem(IxDyn(&[]), a.f? as f64),
            FloatType::F32,
        )),
        "value_floats" => Some(Value::Float(
            vector(a.floats.iter().map(|&v| v as f64).collect())?,
            FloatType::F32,
        )),
        "value_int" => Some(Value::Int(ArrayD::from_elem(IxDyn(&[]), a.i?), 7)),
        "value_ints" => Some(Value::Int(
            ArrayD::from_shape_vec(IxDyn(&[a.ints.len()]), a.ints.clone()).ok()?,
            7,
        )),
        _ => None,
    }
}

/// The static shape of a constant or declared value.
fn input_shape(index: &Constants, value: &str) -> Option<Vec<i64>> {
    match index.declared_constant(value) {
        Some(t) => Some(t.dims.clone()),
        None => index
            .evaluate(value)
            .map(|v| v.shape().iter().map(|&d| d as i64).collect()),
    }
}

/// `[start, end)` of ONNX's Shape-17 start/end attributes on `len` items.
fn range(len: usize, start: Option<i64>, end: Option<i64>) -> (usize, usize) {
    let clamp = |v: i64| -> usize {
        let v = if v < 0 { v + len as i64 } else { v };
        v.clamp(0, len as i64) as usize
    };
    (clamp(start.unwrap_or(0)), end.map_or(len, clamp))
}

fn axis_of(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

fn count(dims: &[usize]) -> usize {
    dims.iter().product()
}

/// `Some` when an op may produce a tensor of `dims` from inputs of `source` elements: at most
/// [`SMALL`] elements, or no more than its inputs hold. A model that generates a big tensor from a
/// few values (`ConstantOfShape` weights, as in ONNX's "light" test models) keeps it generated:
/// folding it would store every value.
fn compact(dims: &[usize], source: usize) -> Option<()> {
    let n = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
    (n <= MAX_ELEMENTS && n <= SMALL.max(source)).then_some(())
}

fn to_dims(v: &[i64]) -> Option<Vec<usize>> {
    v.iter().map(|&d| usize::try_from(d).ok()).collect()
}

fn map(a: Value, f: impl Fn(f64) -> f64) -> Option<Value> {
    match a {
        Value::Float(x, ty) => Some(Value::Float(x.mapv(|v| ty.round(f(v))), ty)),
        Value::Int(..) => None,
    }
}

fn reshape_like(a: &Value, f: impl Fn(&ArrayD<f64>) -> Option<ArrayD<f64>>) -> Option<Value> {
    match a {
        Value::Float(x, ty) => Some(Value::Float(f(x)?, *ty)),
        Value::Int(x, code) => Some(Value::Int(
            f(&x.mapv(|v| v as f64))?.mapv(|v| v as i64),
            *code,
        )),
    }
}

/// Numpy-style broadcast of two shapes.
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let at = |s: &[usize], i: usize| {
        if i + s.len() >= rank {
            s[i + s.len() - rank]
        } else {
            1
        }
    };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

fn binary(op: &str, a: Value, b: Value) -> Option<Value> {
    let shape = broadcast_shape(a.shape(), b.shape())?;
    compact(&shape, count(a.shape()) + count(b.shape()))?;
    let f = |x: f64, y: f64| match op {
        "Add" => x + y,
        "Sub" => x - y,
        "Mul" => x * y,
        _ => x / y,
    };
    match (&a, &b) {
        (Value::Int(x, code), Value::Int(y, _)) => {
            let x = x.broadcast(IxDyn(&shape))?;
            let y = y.broadcast(IxDyn(&shape))?;
            let out = ndarray::Zip::from(&x)
                .and(&y)
                .map_collect(|&p, &q| match op {
                    "Add" => p.wrapping_add(q),
                    "Sub" => p.wrapping_sub(q),
                    "Mul" => p.wrapping_mul(q),
                    _ => p.checked_div(q).unwrap_or(0),
                });
            Some(Value::Int(out, *code))
        }
        (Value::Float(_, ty), _) | (_, Value::Float(_, ty)) => {
            let (x, y) = (a.floats(), b.floats());
            let x = x.broadcast(IxDyn(&shape))?;
            let y = y.broadcast(IxDyn(&shape))?;
            let out = ndarray::Zip::from(&x)
                .and(&y)
                .map_collect(|&p, &q| ty.round(f(p, q)));
            Some(Value::Float(out, *ty))
        }
    }
}

fn reshape_dims(input: &[usize], spec: &[i64], allowzero: bool) -> Option<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut dims: Vec<usize> = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                dims.push(1);
            }
            0 if !allowzero => dims.push(*input.get(i)?),
            d if d >= 0 => dims.push(d as usize),
            _ => return None,
        }
    }
    if let Some(i) = infer {
        let known: usize = dims.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return None;
        }
        dims[i] = total / known;
    }
    (dims.iter().product::<usize>() == total).then_some(dims)
}

fn unsqueeze_dims(input: &[usize], axes: &[i64]) -> Option<Vec<usize>> {
    let rank = input.len() + axes.len();
    let mut axes: Vec<usize> = axes
        .iter()
        .map(|&a| axis_of(a, rank))
        .collect::<Option<_>>()?;
    axes.sort_unstable();
    let mut dims = input.to_vec();
    for a in axes {
        (a <= dims.len()).then(|| dims.insert(a, 1))?;
    }
    Some(dims)
}

fn squeeze_dims(input: &[usize], axes: Option<&[i64]>) -> Option<Vec<usize>> {
    let rank = input.len();
    let remove: Vec<usize> = match axes {
        Some(axes) => axes
            .iter()
            .map(|&a| axis_of(a, rank))
            .collect::<Option<_>>()?,
        None => (0..rank).filter(|&i| input[i] == 1).collect(),
    };
    if remove.iter().any(|&a| input[a] != 1) {
        return None;
    }
    Some(
        (0..rank)
            .filter(|i| !remove.contains(i))
            .map(|i| input[i])
            .collect(),
    )
}

fn concat(parts: Vec<Value>, axis: i64) -> Option<Value> {
    let first = parts.first()?.clone();
    let axis = axis_of(axis, first.shape().len())?;
    let floats: Vec<ArrayD<f64>> = parts.iter().map(Value::floats).collect();
    let views: Vec<_> = floats.iter().map(|a| a.view()).collect();
    let joined = ndarray::concatenate(Axis(axis), &views).ok()?;
    reshape_like(&first, |_| Some(joined.clone()))
}

fn gather(a: &Value, indices: &Value, axis: usize) -> Option<Value> {
    let idx = indices.ints()?;
    let len = a.shape()[axis] as i64;
    let picked: Vec<usize> = idx
        .iter()
        .map(|&i| {
            let i = if i < 0 { i + len } else { i };
            (0..len).contains(&i).then_some(i as usize)
        })
        .collect::<Option<_>>()?;
    let out_shape: Vec<usize> = a.shape()[..axis]
        .iter()
        .chain(indices.shape())
        .chain(&a.shape()[axis + 1..])
        .copied()
        .collect();
    reshape_like(a, |x| {
        let selected = x.select(Axis(axis), &picked);
        selected
            .to_shape(IxDyn(&out_shape))
            .ok()
            .map(|v| v.to_owned())
    })
}

fn slice(node: &NodeProto, input: &dyn Fn(usize) -> Option<Value>) -> Option<Value> {
    let a = input(0)?;
    let rank = a.shape().len();
    let (starts, ends, axes, steps) = match attr::ints(node, "starts") {
        Some(starts) => (
            starts.to_vec(),
            attr::ints(node, "ends")?.to_vec(),
            attr::ints(node, "axes").map(<[i64]>::to_vec),
            None,
        ),
        None => {
            let optional = |i: usize| {
                node.input
                    .get(i)
                    .filter(|v| !v.is_empty())
                    .map(|_| input(i).and_then(|v| v.ints()))
            };
            let axes = optional(3).map(|v| v.ok_or(())).transpose().ok()?;
            let steps = optional(4).map(|v| v.ok_or(())).transpose().ok()?;
            (input(1)?.ints()?, input(2)?.ints()?, axes, steps)
        }
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return None;
    }
    let mut slices = vec![Slice::from(..); rank];
    for i in 0..starts.len() {
        let axis = axis_of(axes[i], rank)?;
        let len = a.shape()[axis] as i64;
        if steps[i] != 1 {
            return None;
        }
        let clamp = |v: i64| {
            let v = if v < 0 { v + len } else { v };
            v.clamp(0, len)
        };
        let (s, e) = (clamp(starts[i]), clamp(ends[i]));
        slices[axis] = Slice::from(s as isize..e.max(s) as isize);
    }
    reshape_like(&a, |x| {
        Some(x.slice_each_axis(|ax| slices[ax.axis.index()]).to_owned())
    })
}
