//! Read-only memory maps of the input's files (the model and its external data): tensor bytes
//! point into them without a copy, and their pages can be let go once read.

use std::path::Path;

use bytes::Bytes;

use crate::error::{Error, Result};

/// A file and its read-only memory map.
#[derive(Debug)]
pub struct Mapped {
    pub file: std::fs::File,
    map: std::sync::Arc<memmap2::Mmap>,
}

impl Mapped {
    /// Tells the kernel the mapped pages may be dropped from this process (they stay in the page
    /// cache): tensor data read once does not add up in the resident set.
    pub fn release(&self) {
        // SAFETY: a read-only shared file mapping: dropped pages are read back from the file if
        // touched again, so no data is lost and no reference is invalidated.
        let _ = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }

    /// [`Mapped::release`] for the pages under `bytes`, when they lie in this map (whole pages:
    /// the first and last may hold other data too, which is read back if touched).
    pub fn release_range(&self, bytes: &[u8]) {
        let base = self.map.as_ptr() as usize;
        let start = bytes.as_ptr() as usize;
        let Some(offset) = start.checked_sub(base) else {
            return;
        };
        if bytes.is_empty()
            || offset
                .checked_add(bytes.len())
                .is_none_or(|e| e > self.map.len())
        {
            return;
        }
        // SAFETY: as in `release`.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, bytes.len())
        };
    }
}

/// Lets `Bytes` own a shared map.
struct MapOwner(std::sync::Arc<memmap2::Mmap>);

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Mapped {
    /// The whole file, sharing the map.
    pub fn bytes(&self) -> Bytes {
        Bytes::from_owner(MapOwner(self.map.clone()))
    }
}

/// Opens and maps a whole file read-only; `None` for an empty file (which cannot be mapped).
pub(crate) fn map_file(path: &Path) -> Result<Option<Mapped>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
        ));
    }
    if meta.len() == 0 {
        return Ok(None);
    }
    // SAFETY: the map is read-only; a file truncated by another process while we read it is
    // outside what any reader of a memory-mapped file can defend against.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Some(Mapped {
        file,
        map: std::sync::Arc::new(map),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident kilobytes of the mapping that starts at `start` (from /proc/self/smaps).
    #[cfg(target_os = "linux")]
    fn resident_kb(start: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        let head = format!("{start:x}-");
        lines.by_ref().find(|l| l.starts_with(&head)).unwrap();
        let rss = lines.find(|l| l.starts_with("Rss:")).unwrap();
        rss.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn releasing_a_range_drops_its_pages_and_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let mapped = map_file(&path).unwrap().unwrap();
        let bytes = mapped.bytes();
        let start = bytes.as_ptr() as usize;
        assert_eq!(
            bytes.iter().map(|&b| b as u64).sum::<u64>(),
            data.iter().map(|&b| b as u64).sum::<u64>()
        );
        let before = resident_kb(start);
        assert!(before >= 4000, "{before} kB");
        // A slice from elsewhere is none of this map's business.
        mapped.release_range(&data[1 << 20..2 << 20]);
        assert_eq!(resident_kb(start), before);
        mapped.release_range(&bytes[(1 << 20) + 100..(3 << 20) - 100]);
        let after = resident_kb(start);
        // At least the range's pages go; maybe more: where the kernel maps the file with huge
        // pages, each one the range touches goes whole (and is read back when touched).
        assert!(before - after >= 2040, "{before} → {after} kB");
        assert_eq!(&bytes[..], &data[..]);
    }
}
