//! `inspect`, step by step: index the graph, plan the blocks, count each block's parameters and
//! FLOPs at the input size, and on request fold each kernel (writing nothing) for its INT8
//! statistics; then report.

use crate::constant::Constants;
use crate::error::Result;
use crate::graph::GraphIndex;
use crate::onnx::Model;
use crate::plan::{self, Analysis, Plan};
use crate::report::{self, InspectReport, Inspected};
use crate::shapes::Shapes;
use crate::{InspectOptions, cost, fold, memory, producer, quant, tensor};

/// Spatial size assumed where the model's input size is symbolic and none is stated.
pub const DEFAULT_INPUT_SIZE: usize = 224;

/// Finds every block of `model`, with its costs and, on request, INT8 statistics.
pub(crate) fn inspect(model: &Model, options: &InspectOptions) -> Result<InspectReport> {
    let graph = GraphIndex::new(model)?;
    let index = Constants::new(&graph);
    let fold = fold::FoldOptions {
        allow_training_bn: options.allow_training_bn,
    };
    let analysis = plan::analyse(&index, fold)?;
    let shapes = input_shapes(&index, options.input_size.as_deref());
    let cost = |block, layout| cost::of_block(&index, block, layout, &shapes);
    let mut planned: Vec<Inspected> = analysis
        .plans
        .iter()
        .map(|p| Inspected {
            cost: Some(cost(&p.block, Some(&p.layout))),
            int8: None,
        })
        .collect();
    if options.int8 {
        int8(&index, &analysis, &mut planned)?;
    }
    let skipped: Vec<cost::Cost> = analysis
        .skipped
        .iter()
        .map(|s| cost(&s.block, None))
        .collect();
    let input_shape = shapes.input.clone();
    Ok(report::inspection(
        &index,
        &analysis,
        &planned,
        &skipped,
        input_shape,
    ))
}

/// Shapes at the stated input size, else the declared one, else [`DEFAULT_INPUT_SIZE`].
fn input_shapes(index: &Constants, stated: Option<&[usize]>) -> Shapes {
    let shapes = Shapes::infer(index, stated);
    let symbolic = shapes.input.as_ref().is_none_or(|s| s.len() < 3);
    match stated.is_none() && symbolic {
        true => Shapes::infer(index, Some(&[DEFAULT_INPUT_SIZE])),
        false => shapes,
    }
}

/// Folds every plan's kernel (one at a time, writing nothing) for its INT8 statistics.
fn int8(index: &Constants, analysis: &Analysis, planned: &mut [Inspected]) -> Result<()> {
    let weights = |p: &plan::BlockPlan| p.layout.weight_dims().iter().product::<usize>();
    let largest = analysis.plans.iter().map(weights).max().unwrap_or(0) as u64 * 8;
    let plans: Vec<Plan> = analysis.plans.iter().map(Plan::Conv).collect();
    memory::check(
        memory::BASELINE + memory::working_memory(index, &plans) + largest,
        "computing the INT8 statistics of this model",
    )?;
    for (plan, found) in analysis.plans.iter().zip(planned) {
        let mut values = Vec::with_capacity(weights(plan));
        let mut decode = |bytes: &[u8]| {
            tensor::decode_into(bytes, plan.dtype, &mut values);
            Ok(())
        };
        producer::fold_block(index, Plan::Conv(plan), &mut decode, &[])?;
        found.int8 = Some(quant::Int8Stats::of(&values, plan.layout.out_channels));
        index.model.release_pages();
    }
    Ok(())
}
