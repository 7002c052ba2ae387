//! Folding a matched block into one affine convolution: each branch becomes a [`Recipe`] (a Conv's
//! stored weights and bias, then the BatchNormalization as a per-channel scale and shift; the
//! identity as a grouped diagonal kernel), and the branches are summed. Geometry comes from the
//! Conv attributes (ONNX Conv v1/v11/v22) and the BatchNormalization epsilon is read, never
//! assumed. Anything that makes a fold inexact is a named reason to skip the block.

use ndarray::Array1;

use crate::constant::Constants;
use crate::error::Error;
use crate::geometry::Window;
use crate::layout::{AlgebraError, Geometry, Layout};
use crate::onnx::attr;
use crate::pattern::{Block, ChannelOp, Term};
use crate::recipe::{Recipe, Source};
use crate::tensor::{self, FloatType};

/// Why a block was not folded.
#[derive(Debug)]
pub enum FoldError {
    /// The block is valid but cannot be folded exactly; the reason is for people.
    Skip(String),
    /// A BatchNormalization runs in training mode and folding those is not allowed; the reason
    /// is for people.
    Training(String),
    /// The model itself is broken (bad tensor data, impossible statistics).
    Invalid(Error),
}

impl From<Error> for FoldError {
    fn from(e: Error) -> Self {
        FoldError::Invalid(e)
    }
}

fn skip<T>(reason: impl Into<String>) -> Result<T, FoldError> {
    Err(FoldError::Skip(reason.into()))
}

/// How the tree's leaves see the input: from the first Conv leaf, and the input's spatial size
/// when it is static.
#[derive(Debug, Clone)]
struct Context<'s> {
    in_channels: usize,
    out_channels: usize,
    group: usize,
    strides: Vec<usize>,
    spatial: Option<&'s [usize]>,
}

/// Options that change what may be folded.
#[derive(Debug, Clone, Copy, Default)]
pub struct FoldOptions {
    /// Fold BatchNormalization nodes exported in training mode with their running statistics.
    pub allow_training_bn: bool,
}

/// What [`eval`] builds: the recipe of the numbers ([`Recipe`]) or only the shape ([`Layout`]).
/// Both go through the same checks, so a block planned on layouts folds the same way on numbers.
trait Algebra: Sized {
    fn conv(index: &Constants, n: usize, spatial: Option<&[usize]>) -> Result<Self, FoldError>;
    fn identity(channels: usize, group: usize, rank: usize) -> Self;
    fn avg_pool(layout: Layout) -> Self;
    fn layout(&self) -> Layout;
    fn scale_shift(self, scale: &[f64], shift: &[f64]) -> Result<Self, AlgebraError>;
    fn negate(self) -> Self;
    fn sum(parts: Vec<Self>, spatial: Option<&[usize]>) -> Result<Self, AlgebraError>;
}

impl Algebra for Layout {
    fn conv(index: &Constants, n: usize, spatial: Option<&[usize]>) -> Result<Self, FoldError> {
        Ok(conv_layout(index, n, spatial)?.0)
    }
    fn identity(channels: usize, group: usize, rank: usize) -> Self {
        Layout::identity(channels, group, rank)
    }
    fn avg_pool(layout: Layout) -> Self {
        layout
    }
    fn layout(&self) -> Layout {
        self.clone()
    }
    fn scale_shift(self, scale: &[f64], shift: &[f64]) -> Result<Self, AlgebraError> {
        self.check_channels(scale, shift).map(|()| self)
    }
    fn negate(self) -> Self {
        self
    }
    fn sum(parts: Vec<Self>, spatial: Option<&[usize]>) -> Result<Self, AlgebraError> {
        Layout::sum(&parts, spatial)
    }
}

impl Algebra for Recipe {
    fn conv(index: &Constants, n: usize, spatial: Option<&[usize]>) -> Result<Self, FoldError> {
        let (layout, _) = conv_layout(index, n, spatial)?;
        let node = index.node(n);
        let w = index
            .stored_constant(&node.input[1])
            .ok_or_else(|| FoldError::Skip("weight vanished".into()))?;
        let data = tensor::data(&w, &index.model.external)?;
        let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => match index.constant(b) {
                Some(b) => tensor::read_f64(&b, &index.model.external)?
                    .iter()
                    .copied()
                    .collect(),
                None => return skip("bias vanished"),
            },
            None => vec![0.0; layout.out_channels],
        };
        Ok(Recipe::leaf(layout, Source::Weights(data), 1.0, bias))
    }
    fn identity(channels: usize, group: usize, rank: usize) -> Self {
        let layout = Layout::identity(channels, group, rank);
        Recipe::leaf(layout, Source::Identity, 1.0, vec![0.0; channels])
    }
    fn avg_pool(layout: Layout) -> Self {
        let taps: usize = layout.kernel.iter().product();
        let zeros = vec![0.0; layout.out_channels];
        Recipe::leaf(layout, Source::Mean, 1.0 / taps.max(1) as f64, zeros)
    }
    fn layout(&self) -> Layout {
        self.layout.clone()
    }
    fn scale_shift(self, scale: &[f64], shift: &[f64]) -> Result<Self, AlgebraError> {
        Recipe::scale_shift(self, scale, shift)
    }
    fn negate(self) -> Self {
        Recipe::negate(self)
    }
    fn sum(parts: Vec<Self>, spatial: Option<&[usize]>) -> Result<Self, AlgebraError> {
        Recipe::sum_at(parts, spatial)
    }
}

/// A block's fused Conv, planned without computing it.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The fused Conv's shape and geometry.
    pub layout: Layout,
    /// The fused weights' element type (that of the first Conv's weight).
    pub dtype: FloatType,
    /// Whether the fold holds only for inputs of the block input's static size (pads resolved
    /// from `auto_pad=SAME_*` with strides, or branches whose pads agree only at that size).
    pub sized: bool,
}

/// The fused Conv's shape and element type, without computing it: all the checks of
/// [`recipe`], but reading only per-channel parameters, never weights. `spatial` is the block
/// input's spatial size when static.
pub fn layout(
    index: &Constants,
    block: &Block,
    options: FoldOptions,
    spatial: Option<&[usize]>,
) -> Result<Planned, FoldError> {
    let (ctx, dtype) = context(index, block, spatial)?;
    let layout = eval::<Layout>(index, &block.term, &ctx, options)?;
    check_size(index, block, &layout, spatial)?;
    // A fold that needs the size to hold is one that fails without it.
    let sized = spatial.is_some() && {
        let unsized_ctx = Context {
            spatial: None,
            ..ctx
        };
        eval::<Layout>(index, &block.term, &unsized_ctx, options).is_err()
    };
    Ok(Planned {
        layout,
        dtype,
        sized,
    })
}

/// How many times more weights than its Conv branches hold together a fused kernel may hold
/// (beyond [`SMALL_KERNEL`]).
const GROWTH: usize = 64;
/// Fused kernels up to this many weights are always small enough.
const SMALL_KERNEL: usize = 1 << 20;

/// Spreading taps to a common dilation and shifting kernels by their pads can make the fused
/// kernel far larger than its branches (a 3×3 at dilation 1000 next to a 3×3 becomes 2001×2001);
/// past [`GROWTH`] times, that is no re-parameterization worth writing, and hostile attributes
/// must not exhaust memory.
fn check_size(
    index: &Constants,
    block: &Block,
    layout: &Layout,
    spatial: Option<&[usize]>,
) -> Result<(), FoldError> {
    let elements = |dims: &[usize]| dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let mut branches = 0usize;
    for n in block.convs() {
        let dims = conv_layout(index, n, spatial)?.0.weight_dims();
        branches = branches.saturating_add(elements(&dims).unwrap_or(usize::MAX));
    }
    let limit = SMALL_KERNEL.max(GROWTH.saturating_mul(branches));
    match elements(&layout.weight_dims()) {
        Some(n) if n <= limit => Ok(()),
        fused => skip(format!(
            "the fused kernel {:?} would hold {}, over {GROWTH} times the {branches} weights of \
             its branches (dilations or pads out of proportion)",
            layout.kernel,
            fused.map_or("more weights than can be counted".into(), |n| format!(
                "{n} weights"
            )),
        )),
    }
}

/// The block's fused kernel as a [`Recipe`] over all its output channels (the weights are read
/// only when its rows are encoded), on an input of spatial size `spatial` when static.
pub fn recipe(
    index: &Constants,
    block: &Block,
    options: FoldOptions,
    spatial: Option<&[usize]>,
) -> Result<Recipe, FoldError> {
    let (ctx, _) = context(index, block, spatial)?;
    eval::<Recipe>(index, &block.term, &ctx, options)
}

fn context<'s>(
    index: &Constants,
    block: &Block,
    spatial: Option<&'s [usize]>,
) -> Result<(Context<'s>, FloatType), FoldError> {
    let Some(&first) = block.convs().first() else {
        return skip("no Conv branch");
    };
    let (probe, dtype) = conv_layout(index, first, spatial)?;
    let ctx = Context {
        in_channels: probe.in_channels(),
        out_channels: probe.out_channels,
        group: probe.geometry.group,
        strides: probe.geometry.strides.clone(),
        spatial,
    };
    Ok((ctx, dtype))
}

/// A per-channel scale and shift.
type ScaleShift = (Vec<f64>, Vec<f64>);

/// The full per-channel scale and shift of channel node `node`.
fn channel_params(
    index: &Constants,
    node: usize,
    op: &ChannelOp,
    o: usize,
    rank: usize,
    options: FoldOptions,
) -> Result<ScaleShift, FoldError> {
    Ok(match op {
        ChannelOp::BatchNorm => bn_scale_shift(index, node, o, options)?,
        ChannelOp::Mul(c) => (per_channel(index, node, c, o, rank)?, vec![0.0; o]),
        ChannelOp::Div(c) => {
            let d = per_channel(index, node, c, o, rank)?;
            if d.contains(&0.0) {
                return skip(format!("'{}' divides by zero", index.node(node).name()));
            }
            (d.iter().map(|v| 1.0 / v).collect(), vec![0.0; o])
        }
        ChannelOp::Add(c) => (vec![1.0; o], per_channel(index, node, c, o, rank)?),
        ChannelOp::Sub(c) => {
            let v = per_channel(index, node, c, o, rank)?;
            (vec![1.0; o], v.iter().map(|x| -x).collect())
        }
        ChannelOp::SubFrom(c) => (vec![-1.0; o], per_channel(index, node, c, o, rank)?),
    })
}

fn eval<A: Algebra>(
    index: &Constants,
    term: &Term,
    ctx: &Context,
    options: FoldOptions,
) -> Result<A, FoldError> {
    match term {
        Term::Conv(n) => A::conv(index, *n, ctx.spatial),
        Term::AvgPool(n) => Ok(A::avg_pool(avg_pool_layout(index, *n, ctx)?)),
        Term::Raw(_) => {
            identity_check(ctx, "identity")?;
            Ok(A::identity(ctx.in_channels, ctx.group, ctx.strides.len()))
        }
        Term::Channel { node, op, inner } => {
            let inner: A = eval(index, inner, ctx, options)?;
            let layout = inner.layout();
            let (o, rank) = (ctx.out_channels, layout.geometry.rank());
            let params = channel_params(index, *node, op, o, rank, options)?;
            let name = index.node(*node).name();
            inner
                .scale_shift(&params.0, &params.1)
                .map_err(|e| FoldError::Skip(format!("'{name}': {e}")))
        }
        Term::Sum { terms, .. } => {
            let mut parts = Vec::with_capacity(terms.len());
            for (negate, t) in terms {
                let part: A = eval(index, t, ctx, options)?;
                parts.push(if *negate { part.negate() } else { part });
            }
            A::sum(parts, ctx.spatial).map_err(|e| FoldError::Skip(e.to_string()))
        }
    }
}

/// An identity branch (raw x, or the input of BN(x)) needs C_in = C_out and stride 1.
fn identity_check(ctx: &Context, what: &str) -> Result<(), FoldError> {
    if ctx.in_channels != ctx.out_channels {
        return skip(format!(
            "{what} branch needs as many input as output channels ({} → {})",
            ctx.in_channels, ctx.out_channels
        ));
    }
    if ctx.strides.iter().any(|&s| s != 1) {
        return skip(format!(
            "{what} branch needs stride 1 (strides {:?})",
            ctx.strides
        ));
    }
    Ok(())
}

/// An `AveragePool` of the input as the layout of a depthwise convolution with weights 1/k.
fn avg_pool_layout(index: &Constants, n: usize, ctx: &Context) -> Result<Layout, FoldError> {
    let node = index.node(n);
    let name = node.name();
    let window =
        Window::of(node, None).map_err(|r| FoldError::Skip(format!("AvgPool '{name}': {r}")))?;
    if window.ceil_mode {
        return skip(format!("AvgPool '{name}' has ceil_mode=1"));
    }
    let geometry = window
        .geometry(ctx.spatial)
        .map_err(|r| FoldError::Skip(format!("AvgPool '{name}': {r}")))?;
    let kernel = window.kernel;
    let padded = geometry
        .pads_begin
        .iter()
        .chain(&geometry.pads_end)
        .any(|&p| p > 0);
    if padded && attr::int(node, "count_include_pad").unwrap_or(0) == 0 {
        return skip(format!(
            "AvgPool '{name}' has count_include_pad=0: at the borders it divides by fewer taps, \
             which no convolution does"
        ));
    }
    if ctx.in_channels != ctx.out_channels {
        return skip(format!(
            "AvgPool branch '{name}' needs as many input as output channels ({} → {})",
            ctx.in_channels, ctx.out_channels
        ));
    }
    Ok(Layout {
        out_channels: ctx.out_channels,
        in_per_group: ctx.out_channels / ctx.group.max(1),
        kernel,
        geometry: Geometry {
            group: ctx.group,
            ..geometry
        },
    })
}

/// A constant operand of a Mul/Div/Add/Sub as one value per output channel: its shape must
/// broadcast against `[N, C, spatial…]` only along the channel axis.
fn per_channel(
    index: &Constants,
    node: usize,
    name: &str,
    channels: usize,
    rank: usize,
) -> Result<Vec<f64>, FoldError> {
    let op = index.node(node);
    let Some(t) = index.constant(name) else {
        return skip(format!("'{name}' of '{}' is not a constant", op.name()));
    };
    let values = tensor::read_f64(&t, &index.model.external)?;
    let dims = values.shape();
    let full = rank + 2;
    let not_per_channel = || {
        FoldError::Skip(format!(
            "'{name}' of '{}' has shape {dims:?}: not one value per channel",
            op.name()
        ))
    };
    if dims.len() > full || (dims.len() == full && dims[0] != 1) {
        return Err(not_per_channel());
    }
    let channel_axis = (dims.len() + 1).checked_sub(full);
    for (axis, &d) in dims.iter().enumerate() {
        if Some(axis) != channel_axis && d != 1 {
            return Err(not_per_channel());
        }
    }
    let v: Vec<f64> = values.iter().copied().collect();
    match v.len() {
        1 => Ok(vec![v[0]; channels]),
        n if n == channels => Ok(v),
        _ => Err(not_per_channel()),
    }
}

/// A Conv node's layout and weight type, checked without reading its weight; `spatial` is its
/// input's spatial size when static.
fn conv_layout(
    index: &Constants,
    i: usize,
    spatial: Option<&[usize]>,
) -> Result<(Layout, FloatType), FoldError> {
    let node = index.node(i);
    let name = node.name();
    let Some(w_name) = node.input.get(1) else {
        return skip(format!("Conv '{name}' has no weight input"));
    };
    let Some(w) = index.stored_constant(w_name) else {
        return skip(format!(
            "Conv '{name}': weight '{w_name}' {}",
            not_constant(index, w_name)
        ));
    };
    tensor::check_known_type(&w)?;
    let Ok(dtype) = tensor::float_type(&w) else {
        return skip(format!(
            "Conv '{name}': weight '{w_name}' has data type {}, not a float type",
            w.data_type()
        ));
    };
    tensor::check_data(&w, &index.model.external)?;
    let (dims, _) = tensor::shape(&w)?;
    if dims.len() < 3 {
        return skip(format!(
            "Conv '{name}': weight '{w_name}' has {} dims",
            dims.len()
        ));
    }
    let out_channels = dims[0];
    if dims[1..].contains(&0) {
        return skip(format!(
            "Conv '{name}': weight '{w_name}' has dims {dims:?}: an empty kernel"
        ));
    }
    if let Some(b_name) = node.input.get(2).filter(|b| !b.is_empty()) {
        let Some(b) = index.constant(b_name) else {
            return skip(format!(
                "Conv '{name}': bias '{b_name}' {}",
                not_constant(index, b_name)
            ));
        };
        tensor::check_data(&b, &index.model.external)?;
        if tensor::shape(&b)?.0 != [out_channels] {
            let reason = format!(
                "bias of Conv '{name}' has shape {:?} for {out_channels} channels",
                b.dims
            );
            return Err(Error::tensor(b_name, reason).into());
        }
    }
    let geometry = Window::of(node, Some(&dims[2..]))
        .and_then(|w| w.geometry(spatial))
        .map_err(|r| FoldError::Skip(format!("Conv '{name}': {r}")))?;
    if out_channels % geometry.group != 0 || out_channels == 0 {
        return skip(format!(
            "Conv '{name}': {out_channels} output channels do not split into {} groups",
            geometry.group
        ));
    }
    let layout = Layout {
        out_channels,
        in_per_group: dims[1],
        kernel: dims[2..].to_vec(),
        geometry,
    };
    Ok((layout, dtype))
}

/// Why a value is no constant to fold: generated in bulk, computed at run time, or an input.
fn not_constant(index: &Constants, value: &str) -> String {
    let Some(node) = index.producer(value).map(|p| index.node(p)) else {
        return match index.is_sparse(value) {
            true => "is a sparse initializer (passed through, never folded)".into(),
            false => "is a graph input, not a constant".into(),
        };
    };
    let generated = matches!(node.op_type(), "ConstantOfShape" | "Expand" | "Tile")
        || index.evaluate(value).is_some();
    if generated {
        format!(
            "is generated by {} '{}' rather than stored; folding would store it in full",
            node.op_type(),
            node.name()
        )
    } else {
        format!(
            "is computed at run time by {} '{}'",
            node.op_type(),
            node.name()
        )
    }
}

/// Whether BatchNormalization node `i` was exported in training mode: `training_mode=1`
/// (v14+), extra outputs (v9 and older), or `is_test` unset before opset 7.
pub fn is_training_bn(index: &Constants, i: usize) -> bool {
    let node = index.node(i);
    attr::int(node, "training_mode") == Some(1)
        || node.output.iter().skip(1).any(|o| !o.is_empty())
        || (index.model.default_opset().is_some_and(|v| v < 7)
            && attr::int(node, "is_test") != Some(1))
}

/// `t = γ / sqrt(σ² + ε)` and `β − μ·t` of an inference-mode BatchNormalization.
pub(crate) fn bn_scale_shift(
    index: &Constants,
    i: usize,
    channels: usize,
    options: FoldOptions,
) -> Result<(Vec<f64>, Vec<f64>), FoldError> {
    let node = index.node(i);
    let name = node.name();
    if is_training_bn(index, i) && !options.allow_training_bn {
        return Err(FoldError::Training(format!(
            "BatchNormalization '{name}' runs in training mode (the export ran the model in \
             train mode and updated its running statistics): re-export after model.eval(), or pass \
             --allow-training to fold it with its running statistics"
        )));
    }
    if attr::int(node, "spatial") == Some(0) {
        return skip(format!("BatchNormalization '{name}' has spatial=0"));
    }
    let epsilon = attr::float(node, "epsilon").unwrap_or(1e-5) as f64;
    let mut params = Vec::with_capacity(4);
    for (slot, what) in [(1, "scale"), (2, "B"), (3, "mean"), (4, "var")] {
        let Some(v) = node.input.get(slot).filter(|v| !v.is_empty()) else {
            let reason = format!("BatchNormalization '{name}' has no {what} input");
            return Err(Error::Graph(reason).into());
        };
        let Some(t) = index.constant(v) else {
            return skip(format!(
                "BatchNormalization '{name}': {what} '{v}' is not a constant"
            ));
        };
        let values = tensor::read_f64(&t, &index.model.external)?;
        if values.ndim() != 1 {
            let reason = format!("{what} of BatchNormalization '{name}' is not 1-D");
            return Err(Error::tensor(v, reason).into());
        }
        if values.iter().any(|x| !x.is_finite()) {
            return Err(Error::tensor(
                v,
                format!("{what} of BatchNormalization '{name}' is not finite"),
            )
            .into());
        }
        params.push((v, Array1::from_iter(values.iter().copied())));
    }
    // An invalid model, not an unfoldable block: every parameter has one value per channel.
    for ((v, values), what) in params.iter().zip(["scale", "B", "mean", "var"]) {
        if values.len() != channels {
            let reason = format!(
                "{what} of BatchNormalization '{name}' has {} values for {channels} channels",
                values.len()
            );
            return Err(Error::tensor(v, reason).into());
        }
    }
    let [(_, gamma), (_, beta), (_, mean), (var_name, var)] = params
        .try_into()
        .map_err(|_| FoldError::Skip("BatchNormalization parameters".into()))?;
    let n = channels;
    if var.iter().any(|&v| v + epsilon <= 0.0) {
        return Err(Error::tensor(
            var_name,
            format!("variance of BatchNormalization '{name}' is negative"),
        )
        .into());
    }
    let scale: Vec<f64> = (0..n)
        .map(|c| gamma[c] / (var[c] + epsilon).sqrt())
        .collect();
    let shift: Vec<f64> = (0..n).map(|c| beta[c] - mean[c] * scale[c]).collect();
    Ok((scale, shift))
}
