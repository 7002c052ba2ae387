//! The up-front memory check: a run's working memory is estimated from the plans (the files
//! themselves are mapped and paged by the kernel, so only what is decoded or built in memory
//! counts) and compared with what the machine — or the cgroup it runs in — has available. A run
//! that would not fit is refused before anything is written, not killed by the OS halfway.
//!
//! `ONNX_REPVGG_MEMORY_LIMIT` (bytes, or with a K/M/G suffix) sets the available memory by hand.

use crate::error::{Error, Result};

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
