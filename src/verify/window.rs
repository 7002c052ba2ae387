//! The check's own reading of window attributes (pads, `auto_pad`, defaults), as the ONNX Conv
//! and AveragePool definitions state them — on purpose not shared with [`crate::geometry`].

use crate::onnx::attr;
use crate::onnx::proto::NodeProto;

pub(super) fn ints_or(node: &NodeProto, name: &str, default: usize, rank: usize) -> Vec<usize> {
    attr::ints(node, name)
        .map(|v| v.iter().map(|&x| x.max(0) as usize).collect())
        .unwrap_or_else(|| vec![default; rank])
}

/// Begin and end pads of a Conv/AveragePool on an input of `spatial` size.
pub(super) fn pads(
    node: &NodeProto,
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    spatial: &[usize],
) -> Result<(Vec<usize>, Vec<usize>), String> {
    let rank = kernel.len();
    let auto_pad = attr::string(node, "auto_pad").unwrap_or_default();
    match auto_pad.as_str() {
        "" | "NOTSET" => {
            let p = ints_or(node, "pads", 0, 2 * rank);
            if p.len() != 2 * rank {
                return Err("pads of the wrong length".into());
            }
            Ok((p[..rank].to_vec(), p[rank..].to_vec()))
        }
        "VALID" => Ok((vec![0; rank], vec![0; rank])),
        same @ ("SAME_UPPER" | "SAME_LOWER") => {
            let (mut begin, mut end) = (vec![0; rank], vec![0; rank]);
            for a in 0..rank {
                let stride = strides[a].max(1);
                let out = spatial[a].div_ceil(stride);
                let need = dilations[a]
                    .checked_mul(kernel[a].saturating_sub(1))
                    .and_then(|e| e.checked_add(out.saturating_sub(1) * stride + 1))
                    .ok_or("the dilated kernel is too large to check")?;
                let total = need.saturating_sub(spatial[a]);
                let (small, large) = (total / 2, total - total / 2);
                (begin[a], end[a]) = if same == "SAME_UPPER" {
                    (small, large)
                } else {
                    (large, small)
                };
            }
            Ok((begin, end))
        }
        other => Err(format!("auto_pad '{other}'")),
    }
}
