//! The up-front memory check: a run's working memory is estimated from the plans (the files
//! themselves are mapped and paged by the kernel, so only what is decoded or built in memory
//! counts) and compared with what the machine — or the cgroup it runs in — has available. A run
//! that would not fit is refused before anything is written, not killed by the OS halfway.
//!
//! `ONNX_REPVGG_MEMORY_LIMIT` (bytes, or with a K/M/G suffix) sets the available memory by hand.

use crate::constant::Constants;
use crate::error::{Error, Result};
use crate::plan::BlockPlan;

/// Memory a run needs whatever the model: code, index, buffers.
pub const BASELINE: u64 = 32 << 20;

/// The environment variable that overrides the available memory.
pub const LIMIT_VARIABLE: &str = "ONNX_REPVGG_MEMORY_LIMIT";

/// Bytes of memory this process may still use: the override, else the smaller of the system's
/// available memory and the cgroup's headroom; `None` when nothing tells.
pub fn available() -> Option<u64> {
    if let Ok(text) = std::env::var(LIMIT_VARIABLE) {
        return parse_size(&text);
    }
    let system = read_kb("/proc/meminfo", "MemAvailable:").map(|kb| kb * 1024);
    let cgroup = cgroup_headroom();
    match (system, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Refuses `need` bytes for `what` when they exceed what is available.
pub fn check(need: u64, what: &str) -> Result<()> {
    match available() {
        Some(have) if need > have => Err(Error::Resources(format!(
            "{what} would need about {} MiB of memory but only {} MiB are available",
            need.div_ceil(1 << 20),
            have >> 20
        ))),
        _ => Ok(()),
    }
}

/// Memory folding the plans takes beyond the mapped files, for the hungriest block (blocks are
/// written one at a time, and checked one behind): the encoded chunks in flight (those folded
/// ahead of the writer and those being folded), each worker's row buffers (at most a row each),
/// the sampled rows of up to three blocks as written (the check decodes one row at a time) and,
/// for tensors stored as typed fields rather than raw bytes, their values decoded whole.
pub fn working_memory(index: &Constants, plans: &[BlockPlan]) -> u64 {
    let threads = crate::producer::workers() as u64;
    let block = |p: &BlockPlan| {
        let row = p.layout.weight_dims()[1..].iter().product::<usize>() as u64;
        let chunk = row.max(crate::producer::CHUNK_ELEMENTS as u64) * p.dtype.size() as u64;
        let in_flight = (crate::producer::AHEAD_PER_WORKER as u64 + 1) * threads * chunk;
        let rows = threads * 2 * row * 8;
        let sampled =
            crate::verify::sample(&p.layout, &p.name).len() as u64 * row * p.dtype.size() as u64;
        let checked = 3 * sampled + row * 8;
        let typed = p
            .block
            .nodes()
            .iter()
            .flat_map(|&n| &index.node(n).input)
            .filter_map(|v| index.declared_tensor(v))
            .filter(|t| t.raw_data.is_none() && !crate::onnx::external::is_external(t))
            .map(|t| {
                t.dims
                    .iter()
                    .fold(8u64, |n, &d| n.saturating_mul(d.max(0) as u64))
            })
            .fold(0u64, u64::saturating_add);
        [in_flight, rows, checked, typed]
            .into_iter()
            .fold(0u64, u64::saturating_add)
    };
    plans.iter().map(block).max().unwrap_or(0)
}

/// `123`, `64K`, `512M`, `2G` (powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 10),
        (i, 'm' | 'M') => (&text[..i], 20),
        (i, 'g' | 'G') => (&text[..i], 30),
        _ => (text, 0),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn read_kb(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// cgroup v2: `memory.max − memory.current` of this process's group, when limited.
fn cgroup_headroom() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?; // "max" means no limit
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size(" 2g "), Some(2 << 30));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("99999999999999G"), None);
    }

    #[test]
    fn this_machine_reports_some_memory() {
        if std::env::var(LIMIT_VARIABLE).is_err() {
            assert!(available().is_some_and(|m| m > 0));
        }
    }
}
