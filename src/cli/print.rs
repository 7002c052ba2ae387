//! What the commands print: the summary line and table of a fusion, the warnings about it, the
//! tables of `inspect` (blocks, INT8). Text only; where it goes (stdout, stderr) is the
//! commands' business.

use std::fmt::Write as _;
use std::path::Path;

use crate::report::{FoldInfo, Stay};
use crate::{BlockInfo, FuseReport, InspectReport};

/// What a model without any candidate block gets, from `fuse` and `inspect` alike.
pub(crate) const NOTHING_TO_FUSE: &str = "nothing to fuse: no re-parameterizable blocks found";

/// The summary of a fusion (one line; a second for half-precision weights) and, with `verbose`,
/// a row per block: fused, not fused, and the sums that are no blocks.
pub(crate) fn fuse_summary(out: &mut String, r: &FuseReport, verbose: bool) {
    if r.fused.is_empty() && r.skipped.is_empty() && r.folds.is_empty() {
        let _ = writeln!(out, "{NOTHING_TO_FUSE}{}", left(r.bn_left.len()));
    } else {
        let mut what = Vec::new();
        if !r.fused.is_empty() || !r.skipped.is_empty() {
            let mut blocks = format!(
                "fused {} blocks ({} without identity)",
                r.fused.len(),
                r.fused_without_identity()
            );
            if !r.skipped.is_empty() {
                blocks += &format!(", {} not fused", r.skipped.len());
            }
            what.push(blocks);
        }
        if !r.folds.is_empty() {
            what.push(folds(&r.folds, r.bn_folded));
        }
        let _ = writeln!(
            out,
            "{}{}: {} → {} nodes, {} → {} parameters, {}{:.1} ms",
            what.join(", "),
            left(r.bn_left.len()),
            r.nodes_before,
            r.nodes_after,
            r.params_before,
            r.params_after,
            match r.worst() {
                Some((name, d)) => format!("verified (worst {:.1e} relative, {name}), ", d.rel),
                None => String::new(),
            },
            r.elapsed.as_secs_f64() * 1e3
        );
    }
    let rounding = r
        .fused
        .iter()
        .map(|b| b.rounding_error)
        .chain(r.folds.iter().map(|f| f.rounding_error))
        .flatten()
        .fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
    if let Some(e) = rounding {
        let _ = writeln!(
            out,
            "  half-precision weights: folded in f64, rounded once (largest change {e:.1e} of the largest weight)"
        );
    }
    if verbose {
        let blocks: Vec<&BlockInfo> = r
            .fused
            .iter()
            .chain(&r.skipped)
            .chain(&r.not_blocks)
            .collect();
        if !blocks.is_empty() {
            table(out, &blocks, "  ", ["status", "fused"]);
        }
        fold_table(out, &r.folds, "  ", "folded");
        bn_left(out, &r.bn_left, "  ");
    }
}

/// `2 linear folds (3 BatchNormalization)`.
fn folds(folds: &[FoldInfo], bns: usize) -> String {
    let n = folds.len();
    match bns {
        0 => format!("{n} linear fold{}", plural(n)),
        b => format!("{n} linear fold{} ({b} BatchNormalization)", plural(n)),
    }
}

/// `, 2 BatchNormalization left` (nothing when none is).
fn left(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!(", {n} BatchNormalization left"),
    }
}

/// One row per linear fold: its kind, operator, features, what it took in, parameters, and
/// `status` (`folded, verified …` or `foldable`).
fn fold_table(out: &mut String, folds: &[FoldInfo], indent: &str, yes: &str) {
    if folds.is_empty() {
        return;
    }
    let rows: Vec<[String; 7]> = folds
        .iter()
        .map(|f| {
            [
                f.name.clone(),
                f.kind.clone(),
                match f.heads {
                    1 => f.op.clone(),
                    h => format!("{h}×{}", f.op),
                },
                format!("{}→{}", f.in_features, f.out_features),
                f.folded.join(" + "),
                format!("{} → {}", count(f.params_before), count(f.params_after)),
                match f.deviation {
                    Some(d) => format!("{yes}, verified {:.1e}", d.rel),
                    None => yes.to_string(),
                },
            ]
        })
        .collect();
    let header = [
        "fold", "kind", "op", "features", "takes in", "params", "status",
    ];
    rows_under(out, indent, &header.map(String::from), &rows);
}

/// The BatchNormalization nodes left, one line each with the reason.
fn bn_left(out: &mut String, left: &[Stay], indent: &str) {
    for stay in left {
        let _ = writeln!(
            out,
            "{indent}BatchNormalization '{}' stays: {}",
            stay.node, stay.reason
        );
    }
}

/// The warnings a fusion of `input` deserves, one line each (without the `onnx-repvgg:
/// warning:` prefix): BatchNormalization folded in training mode, candidates not fused.
pub(crate) fn fuse_warnings(input: &Path, r: &FuseReport) -> Vec<String> {
    let mut warnings = Vec::new();
    if r.training_bn_folded > 0 {
        warnings.push(format!(
            "{}: folded {} BatchNormalization nodes exported in training mode with their running \
             statistics (the export's own forward pass updated them); re-exporting after \
             model.eval() is safer",
            input.display(),
            r.training_bn_folded
        ));
    }
    for b in &r.skipped {
        warnings.push(format!(
            "{}: block '{}' ({}, {}) not fused: {}",
            input.display(),
            b.name,
            channels(b),
            shape(b),
            b.reason.as_deref().unwrap_or("")
        ));
    }
    warnings
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `C_in→C_out`, or `?` where the weights are not constants.
fn channels(b: &BlockInfo) -> String {
    match (b.in_channels, b.out_channels) {
        (0, 0) => "?".into(),
        (i, o) => format!("{i}→{o}"),
    }
}

/// Branches, then what follows their sum: `3x3 + 1x1 + identity → BatchNormalization`.
fn shape(b: &BlockInfo) -> String {
    let mut s = b.branches.join(" + ");
    for op in &b.post {
        s += &format!(" → {op}");
    }
    s
}

fn stride(b: &BlockInfo) -> String {
    match b.stride.as_slice() {
        [] => "?".into(),
        [first, rest @ ..] if rest.iter().all(|s| s == first) => first.to_string(),
        all => all
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("x"),
    }
}

/// `, for 32x32 inputs only` where the fold holds at the block input's static size only.
fn sized(b: &BlockInfo) -> String {
    let Some(size) = &b.sized_for else {
        return String::new();
    };
    let axes: Vec<String> = size.iter().map(usize::to_string).collect();
    format!(", for {} inputs only", axes.join("x"))
}

/// One row per block, columns padded to the widest cell; the last column says fused/fusable,
/// or why not. `[header, yes]`: the last column's title and what it says of a fusable block.
fn table(out: &mut String, blocks: &[&BlockInfo], indent: &str, [last, yes]: [&str; 2]) {
    let rows: Vec<[String; 9]> = blocks
        .iter()
        .map(|b| {
            let before_after = |before: Option<u64>, after: Option<u64>| match (before, after) {
                (Some(x), Some(y)) => format!("{} → {}", count(x), count(y)),
                (Some(x), None) => count(x),
                _ => String::new(),
            };
            [
                b.name.clone(),
                channels(b),
                stride(b),
                b.groups.to_string(),
                shape(b),
                if b.has_identity() { "yes" } else { "none" }.into(),
                b.cost.map_or(String::new(), |c| {
                    before_after(Some(c.params_before), c.params_after)
                }),
                b.cost.map_or(String::new(), |c| {
                    before_after(c.flops_before, c.flops_after)
                }),
                match (&b.reason, b.deviation) {
                    (None, Some(d)) => format!("{yes}, verified {:.1e}{}", d.rel, sized(b)),
                    (None, None) => format!("{yes}{}", sized(b)),
                    // The reason of a sum that is no block says so itself.
                    (Some(r), _) if !b.candidate => r.clone(),
                    (Some(r), _) => format!("no: {r}"),
                },
            ]
        })
        .collect();
    let header = [
        "block", "channels", "stride", "groups", "branches", "identity", "params", "FLOPs", last,
    ]
    .map(String::from);
    rows_under(out, indent, &header, &rows);
}

/// Rows under a header, columns padded to the widest cell; columns empty in every row are left
/// out.
fn rows_under<const N: usize>(
    out: &mut String,
    indent: &str,
    header: &[String; N],
    rows: &[[String; N]],
) {
    let used: Vec<usize> = (0..N)
        .filter(|&c| rows.is_empty() || rows.iter().any(|r| !r[c].is_empty()))
        .collect();
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(header).chain(rows) {
        let cells: Vec<String> = used
            .iter()
            .map(|&c| format!("{:<w$}", row[c], w = widths[c]))
            .collect();
        let _ = writeln!(out, "{indent}{}", cells.join("  ").trim_end());
    }
}

/// `inspect`'s table, totals and, with `--int8`, the INT8 table.
pub(crate) fn inspect(out: &mut String, r: &InspectReport) {
    let blocks: Vec<&BlockInfo> = r.blocks.iter().collect();
    if !blocks.is_empty() {
        table(out, &blocks, "", ["fusable", "yes"]);
    }
    let candidates = r.candidates().count();
    let not_blocks = match r.not_blocks() {
        0 => String::new(),
        1 => "; 1 sum that is no block".into(),
        n => format!("; {n} sums that are no blocks"),
    };
    if candidates == 0 && r.folds.is_empty() {
        let _ = writeln!(
            out,
            "{NOTHING_TO_FUSE}{not_blocks}{}",
            left(r.bn_left.len())
        );
        bn_left(out, &r.bn_left, "");
        return;
    }
    if candidates > 0 {
        let _ = writeln!(
            out,
            "{candidates} block{}, {} without identity, {} fusable{not_blocks}",
            plural(candidates),
            r.without_identity(),
            r.fusable()
        );
    }
    let [pb, pa, fb, fa] = r.totals();
    if candidates > 0
        && let (Some(pb), Some(pa)) = (pb, pa)
    {
        let _ = write!(out, "blocks' parameters {} → {}", count(pb), count(pa));
        if let (Some(fb), Some(fa)) = (fb, fa) {
            let _ = write!(out, ", FLOPs {} → {}", count(fb), count(fa));
            if let Some(shape) = &r.input_shape {
                let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
                let _ = write!(out, " at input {}", dims.join("x"));
            }
        }
        let _ = writeln!(out);
    }
    if !r.folds.is_empty() {
        let _ = writeln!(out);
        fold_table(out, &r.folds, "", "foldable");
        let _ = writeln!(
            out,
            "{}{}",
            folds(&r.folds, r.bn_folded),
            left(r.bn_left.len())
        );
    }
    bn_left(out, &r.bn_left, "");
    if let Some(risky) = r.int8_risky() {
        let _ = writeln!(out);
        int8(out, r, risky);
    }
}

/// The INT8 readiness table: one row per fused kernel, and what they add up to.
fn int8(out: &mut String, r: &InspectReport, [risky, risky_per_channel]: [usize; 2]) {
    let header = [
        "block",
        "min",
        "max",
        "channel spread",
        ">3σ",
        "SQNR tensor",
        "SQNR channel",
        "INT8",
    ]
    .map(String::from);
    let db = |v: f64| match v.is_finite() {
        true => format!("{v:.1} dB"),
        false => "exact".into(),
    };
    let rows: Vec<[String; 8]> = r
        .blocks
        .iter()
        .filter_map(|b| b.int8.map(|q| (b, q)))
        .map(|(b, q)| {
            [
                b.name.clone(),
                format!("{:.3}", q.min),
                format!("{:.3}", q.max),
                format!("{:.1}", q.channel_spread),
                format!("{:.2}%", 100.0 * q.outliers),
                db(q.sqnr_per_tensor_db),
                db(q.sqnr_per_channel_db),
                q.advice().text().into(),
            ]
        })
        .collect();
    rows_under(out, "", &header, &rows);
    let _ = write!(
        out,
        "{risky} of {} fused kernels below {} dB SQNR with per-tensor INT8",
        rows.len(),
        crate::quant::RISK_SQNR_DB
    );
    if risky_per_channel > 0 {
        let _ = write!(out, ", {risky_per_channel} of them also per channel");
    }
    let _ = writeln!(out);
}

/// 1234567 → `1.23M`.
fn count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2}M", n as f64 / 1e6),
        _ => format!("{:.2}G", n as f64 / 1e9),
    }
}
