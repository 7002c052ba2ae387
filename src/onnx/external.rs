//! External tensor data (`data_location = EXTERNAL`): the `location`, `offset` and `length`
//! entries of a tensor, resolved against the model's directory. Locations must be relative, stay
//! inside that directory (no `..`, no symlink escaping it) and name regular files; each file is
//! mapped once.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;

use super::proto::TensorProto;
use crate::error::{Error, Result};

/// `TensorProto.DataLocation.EXTERNAL`.
pub const EXTERNAL: i32 = 1;

/// Whether the tensor's data lives in an external file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(EXTERNAL)
}

/// Where one tensor's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    pub location: String,
    pub offset: u64,
    pub length: Option<u64>,
}

impl ExternalRef {
    /// Reads the `external_data` entries of `t`.
    pub fn of(t: &TensorProto) -> Result<ExternalRef> {
        let name = t.name.as_deref().unwrap_or("");
        let mut location = None;
        let mut offset = 0;
        let mut length = None;
        for e in &t.external_data {
            let value = e.value.as_deref().unwrap_or("");
            let number = || {
                value.parse::<u64>().map_err(|_| Error::ExternalData {
                    name: name.to_string(),
                    location: location_or_unknown(t),
                    reason: format!("'{}' is not a number: '{value}'", e.key()),
                })
            };
            match e.key() {
                "location" => location = Some(value.to_string()),
                "offset" => offset = number()?,
                "length" => length = Some(number()?),
                _ => {}
            }
        }
        let location =
            location.ok_or_else(|| Error::tensor(name, "external data without a location"))?;
        Ok(ExternalRef {
            location,
            offset,
            length,
        })
    }
}

fn location_or_unknown(t: &TensorProto) -> String {
    t.external_data
        .iter()
        .find(|e| e.key() == "location")
        .map(|e| e.value().to_string())
        .unwrap_or_default()
}

/// The external files a model refers to, each mapped once.
#[derive(Debug, Default)]
pub struct ExternalStore {
    files: HashMap<String, (Option<super::map::Mapped>, Bytes)>,
    paths: Vec<PathBuf>,
}

impl ExternalStore {
    /// Validates and maps every file named by an external tensor of the model in `dir`
    /// (`None`: a model without a folder, whose tensors must all be inline).
    pub fn open<'a>(
        dir: Option<&Path>,
        tensors: impl IntoIterator<Item = &'a TensorProto>,
    ) -> Result<ExternalStore> {
        let mut store = ExternalStore::default();
        for t in tensors.into_iter().filter(|t| is_external(t)) {
            let r = ExternalRef::of(t)?;
            if store.files.contains_key(&r.location) {
                continue;
            }
            let name = t.name.as_deref().unwrap_or("");
            let Some(dir) = dir else {
                return Err(Error::ExternalData {
                    name: name.to_string(),
                    location: r.location,
                    reason: "a model read from memory or a pipe cannot use external data".into(),
                });
            };
            let path = resolve(dir, &r.location).map_err(|reason| Error::ExternalData {
                name: name.to_string(),
                location: r.location.clone(),
                reason,
            })?;
            let mapped = super::map::map_file(&path).map_err(|e| Error::ExternalData {
                name: name.to_string(),
                location: r.location.clone(),
                reason: match e {
                    Error::Io { error, .. } => error.to_string(),
                    other => other.to_string(),
                },
            })?;
            let bytes = mapped.as_ref().map_or_else(Bytes::new, |m| m.bytes());
            store.files.insert(r.location, (mapped, bytes));
            store.paths.push(path);
        }
        Ok(store)
    }

    /// The files opened, as resolved paths.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The bytes of an external tensor, checked against the file's size.
    pub fn bytes(&self, t: &TensorProto) -> Result<Bytes> {
        let (location, range) = self.range(t)?;
        Ok(self.files[&location].1.slice(range))
    }

    /// The open file and bytes of a location.
    pub fn file(&self, location: &str) -> Result<(Option<&std::fs::File>, &Bytes)> {
        self.files
            .get(location)
            .map(|(m, b)| (m.as_ref().map(|m| &m.file), b))
            .ok_or_else(|| Error::Graph(format!("external data '{location}' was not opened")))
    }

    /// Lets go of the mapped pages (see [`super::map::Mapped::release`]).
    pub fn release_pages(&self) {
        self.files
            .values()
            .filter_map(|(m, _)| m.as_ref())
            .for_each(|m| m.release());
    }

    /// Lets go of the mapped pages under `bytes` (see [`super::map::Mapped::release_range`]).
    pub fn release(&self, bytes: &[u8]) {
        self.files
            .values()
            .filter_map(|(m, _)| m.as_ref())
            .for_each(|m| m.release_range(bytes));
    }

    /// Where an external tensor's bytes lie: its file's location and the byte range in it.
    pub fn range(&self, t: &TensorProto) -> Result<(String, std::ops::Range<usize>)> {
        let r = ExternalRef::of(t)?;
        let name = t.name.as_deref().unwrap_or("");
        let err = |reason: String| Error::ExternalData {
            name: name.to_string(),
            location: r.location.clone(),
            reason,
        };
        let (_, file) = self
            .files
            .get(&r.location)
            .ok_or_else(|| err("file was not opened".into()))?;
        let size = file.len() as u64;
        // Without a `length` (it is optional), the tensor holds what its dims and type need, as
        // ONNX Runtime reads it; only a type of no fixed size takes the rest of the file.
        let length = r
            .length
            .or_else(|| stored_len(t))
            .unwrap_or(size.saturating_sub(r.offset));
        let end = r
            .offset
            .checked_add(length)
            .filter(|&end| end <= size)
            .ok_or_else(|| {
                err(format!(
                    "offset {} + length {length} runs past the end of the file ({size} bytes)",
                    r.offset
                ))
            })?;
        Ok((r.location.clone(), r.offset as usize..end as usize))
    }
}

/// Bits per element of a `TensorProto.DataType`; `None` for strings and unknown codes.
fn element_bits(code: i32) -> Option<u64> {
    Some(match code {
        2 | 3 | 9 | 17..=20 | 24 => 8,
        4 | 5 | 10 | 16 => 16,
        1 | 6 | 12 => 32,
        7 | 11 | 13 | 14 => 64,
        15 => 128,
        21..=23 => 4,
        25 | 26 => 2,
        27 | 28 => 6,
        _ => return None,
    })
}

/// The bytes a tensor's dims and type call for (sub-byte types packed), when both are known.
fn stored_len(t: &TensorProto) -> Option<u64> {
    let bits = element_bits(t.data_type?)?;
    let count = t
        .dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?))?;
    Some(count.checked_mul(bits)?.div_ceil(8))
}

/// Resolves a location relative to `dir`, refusing anything that could leave it.
fn resolve(dir: &Path, location: &str) -> Result<PathBuf, String> {
    let rel = Path::new(location);
    if location.is_empty() {
        return Err("empty location".into());
    }
    if rel.is_absolute() {
        return Err("absolute locations are not allowed".into());
    }
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err("locations may not contain '..'".into());
    }
    let path = dir.join(rel);
    let real = path.canonicalize().map_err(|e| e.to_string())?;
    let real_dir = if dir.as_os_str().is_empty() {
        Path::new(".").canonicalize()
    } else {
        dir.canonicalize()
    }
    .map_err(|e| e.to_string())?;
    if !real.starts_with(&real_dir) {
        return Err("the location leaves the model's directory (symlink?)".into());
    }
    if !real.is_file() {
        return Err("not a regular file".into());
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_paths_leaving_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            resolve(dir.path(), "/etc/passwd")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(resolve(dir.path(), "../x").unwrap_err().contains(".."));
        assert!(resolve(dir.path(), "a/../../x").unwrap_err().contains(".."));
        assert!(resolve(dir.path(), "missing.data").is_err());
        std::fs::write(dir.path().join("ok.data"), b"1234").unwrap();
        assert!(resolve(dir.path(), "ok.data").is_ok());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link.data")).unwrap();
            assert!(
                resolve(dir.path(), "link.data")
                    .unwrap_err()
                    .contains("leaves")
            );
        }
    }
}
