//! The up-front memory check: a run's working memory is estimated from the plans (the files
//! themselves are mapped and paged by the kernel, so only what is decoded or built in memory
//! counts) and compared with what the machine — or the cgroup it runs in — has available. A run
//! that would not fit is refused before anything is written, not killed by the OS halfway.
//!
//! `ONNX_REPVGG_MEMORY_LIMIT` sets the available memory by hand: bytes, or a number with a unit
//! K, M, G or T (also written KB/KiB, MB/MiB, …; all powers of 1024, as `free` and Docker
//! count), e.g. `512M`, `1.5GiB`. A value that is not such a size is an error naming the
//! variable, never ignored.

use crate::constant::Constants;
use crate::error::{Error, Result};
use crate::plan::Plan;

/// Memory a run needs whatever the model: code, index, buffers.
pub const BASELINE: u64 = 32 << 20;

/// The environment variable that overrides the available memory.
pub const LIMIT_VARIABLE: &str = "ONNX_REPVGG_MEMORY_LIMIT";

/// [`LIMIT_VARIABLE`] when it is set and not empty, in bytes; an error naming the variable when
/// its value is not a size.
pub fn limit_from_env() -> Result<Option<u64>> {
    let Some(raw) = std::env::var_os(LIMIT_VARIABLE) else {
        return Ok(None);
    };
    let value = raw.to_string_lossy();
    if value.trim().is_empty() {
        return Ok(None);
    }
    parse_size(&value)
        .map(Some)
        .map_err(|reason| Error::Environment {
            variable: LIMIT_VARIABLE,
            value: value.into_owned(),
            reason,
        })
}

/// Bytes of memory this process may still use: the override, else the smaller of the system's
/// available memory and the cgroup's headroom; `None` when nothing tells.
pub fn available() -> Result<Option<u64>> {
    if let Some(limit) = limit_from_env()? {
        return Ok(Some(limit));
    }
    let system = read_kb("/proc/meminfo", "MemAvailable:").map(|kb| kb * 1024);
    let cgroup = cgroup_headroom();
    Ok(match (system, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// The up-front check of a run: the environment that sizes it is valid
/// ([`crate::producer::threads_from_env`], [`limit_from_env`]), and `need` bytes for `what` fit
/// in what is available.
pub fn check(need: u64, what: &str) -> Result<()> {
    crate::producer::threads_from_env()?;
    match available()? {
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
/// what the check holds and, for tensors stored as typed fields rather than raw bytes, their
/// values decoded whole.
pub fn working_memory(index: &Constants, plans: &[Plan]) -> u64 {
    let threads = crate::producer::workers() as u64;
    let block = |p: &Plan| {
        let dims = p.weight_dims();
        let size = p.dtype().size() as u64;
        let row = dims[1..].iter().product::<usize>() as u64;
        let chunk = row.max(crate::producer::CHUNK_ELEMENTS as u64) * size;
        let in_flight = (crate::producer::AHEAD_PER_WORKER as u64 + 1) * threads * chunk;
        let rows = threads * 2 * row * 8;
        let checked = match p {
            // Sampled rows of up to three blocks as written; the check decodes one at a time.
            Plan::Conv(p) => {
                let sampled = crate::verify::sample(&p.layout, &p.name).len() as u64;
                3 * sampled * row * size + row * 8
            }
            // A linear fold's whole weight as written, then in f64 in both graphs the check
            // evaluates, and the values they compute (about four of its input's size).
            Plan::Linear(p) => {
                let weights = dims[0] as u64 * row;
                let values = p.source_shape.iter().product::<usize>() as u64;
                weights * size + 2 * weights * 8 + 4 * values * 8
            }
        };
        let typed = p
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

/// `123`, `64K`, `512M`, `512MB`, `1MiB`, `1.5G`, `2T`: a positive number of bytes; units are
/// powers of 1024 and case does not matter. Otherwise the reason, for an error message.
pub fn parse_size(text: &str) -> Result<u64, String> {
    const HOW: &str = "not a size: use bytes, or a number with a unit K, M, G or T (KB or KiB \
                       alike: powers of 1024), e.g. 512M or 1.5GiB";
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(HOW.into()),
    };
    let bytes = match number.split_once('.') {
        None => number
            .parse::<u64>()
            .map_err(|_| HOW.to_string())?
            .checked_mul(1 << shift)
            .ok_or_else(|| "too large".to_string())?,
        Some((whole, fraction)) => {
            let valid = |s: &str| s.chars().all(|c| c.is_ascii_digit());
            if (whole.is_empty() && fraction.is_empty()) || !valid(whole) || !valid(fraction) {
                return Err(HOW.into());
            }
            let value =
                number.parse::<f64>().map_err(|_| HOW.to_string())? * (1u64 << shift) as f64;
            if value.is_nan() || value >= u64::MAX as f64 {
                return Err("too large".into());
            }
            value.round() as u64
        }
    };
    match bytes {
        0 => Err("a memory limit must be more than 0 bytes".into()),
        n => Ok(n),
    }
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
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size(" 2g "), Ok(2 << 30));
        for mib in ["512M", "512MB", "512MiB", "512 mib", "0.5G", "0.5GiB"] {
            assert_eq!(parse_size(mib), Ok(512 << 20), "{mib}");
        }
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in [
            "lots", "abc", "", "M", "1.2.3M", ".", "-1M", "1MX", "12 34", "0", "0K",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size("99999999999999G"), Err("too large".into()));
        assert_eq!(parse_size("99999999999999.5T"), Err("too large".into()));
    }

    #[test]
    fn this_machine_reports_some_memory() {
        if std::env::var(LIMIT_VARIABLE).is_err() {
            assert!(available().is_ok_and(|m| m.is_some_and(|m| m > 0)));
        }
    }
}
