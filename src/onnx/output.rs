//! Putting the output on disk safely: never over the input (or its external data), always
//! atomically (temporary files in the destination directory, then renames), sidecar first so a
//! model never points to missing data.

use std::path::{Path, PathBuf};

use super::splice::Sink;
use crate::error::{Error, Result};

/// The sidecar path for an output model: `OUT.data` next to it, and its location string.
pub fn sidecar_for(output: &Path) -> Result<(PathBuf, String)> {
    let name = output
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Output {
            path: output.to_path_buf(),
            reason: "the output needs a UTF-8 file name".into(),
        })?;
    let location = format!("{name}.data");
    Ok((output.with_file_name(&location), location))
}

/// The directory a path lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether two paths name the same file (by identity when both exist, else by canonical path).
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    let canon = |p: &Path| {
        parent_dir(p)
            .canonicalize()
            .ok()
            .map(|d| d.join(p.file_name().unwrap_or_default()))
    };
    matches!((canon(a), canon(b)), (Some(x), Some(y)) if x == y)
}

/// Refuses outputs that would overwrite one of `protected` (the input and its data files) and
/// outputs whose directory does not exist.
pub fn check_output(output: &Path, protected: &[PathBuf]) -> Result<()> {
    let fail = |reason: &str| {
        Err(Error::Output {
            path: output.to_path_buf(),
            reason: reason.into(),
        })
    };
    if output.as_os_str().is_empty() {
        return fail("empty output path");
    }
    if protected.iter().any(|p| same_file(output, p)) {
        return fail("refusing to write over the input model or its data");
    }
    if output.is_dir() {
        return fail("is a directory");
    }
    if !parent_dir(output).is_dir() {
        return fail("the output directory does not exist");
    }
    Ok(())
}

/// A file to write: where it goes and how many bytes it will hold.
#[derive(Debug, Clone, Copy)]
pub struct Planned<'a> {
    pub path: &'a Path,
    pub len: u64,
}

/// Writes the model (and its sidecar) atomically: `fill` writes into sinks over temporary files
/// in the destination directory, which are renamed into place only if it succeeds and wrote
/// exactly the planned lengths (sidecar first, so a model never points to missing data);
/// otherwise they vanish. The space is reserved before anything is written, so a full disk is
/// an error at the start. With `sync` the files reach the disk before the renames (durable
/// across a power cut, and as slow as the disk).
pub fn write_with(
    model: Planned,
    sidecar: Option<Planned>,
    sync: bool,
    fill: impl FnOnce(&mut Sink, Option<&mut Sink>) -> Result<()>,
) -> Result<()> {
    let output = model.path;
    let model_tmp = temporary(model)?;
    let sidecar_tmp = sidecar.map(temporary).transpose()?;
    let sink = |tmp: &tempfile::NamedTempFile, path: &Path| -> Result<Sink> {
        let file = tmp.as_file().try_clone().map_err(|e| Error::io(path, e))?;
        // Small fields gather in the buffer; fused tensors come in chunks larger than it, which
        // go to the file directly rather than through another copy.
        Ok(Sink::File(std::io::BufWriter::with_capacity(
            64 << 10,
            file,
        )))
    };
    let mut model_sink = sink(&model_tmp, output)?;
    let mut sidecar_sink = match (&sidecar_tmp, sidecar) {
        (Some(tmp), Some(planned)) => Some(sink(tmp, planned.path)?),
        _ => None,
    };
    fill(&mut model_sink, sidecar_sink.as_mut())?;
    drop((model_sink, sidecar_sink));
    let written = sidecar_tmp.iter().zip(sidecar).chain([(&model_tmp, model)]);
    for (tmp, planned) in written {
        let len = tmp
            .as_file()
            .metadata()
            .map_err(|e| Error::io(planned.path, e))?
            .len();
        if len != planned.len {
            return Err(Error::Output {
                path: planned.path.to_path_buf(),
                reason: format!("{len} bytes written where {} were planned", planned.len),
            });
        }
        if sync {
            let file = tmp.as_file();
            file.sync_data().map_err(|e| Error::io(planned.path, e))?;
        }
    }
    if let (Some(tmp), Some(planned)) = (sidecar_tmp, sidecar) {
        let path = planned.path;
        tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    }
    model_tmp
        .persist(output)
        .map_err(|e| Error::io(output, e.error))?;
    Ok(())
}

/// Writes `bytes` to `output` atomically (a model fused in memory), durably with `sync`.
pub fn write_bytes(output: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    check_output(output, &[])?;
    let planned = Planned {
        path: output,
        len: bytes.len() as u64,
    };
    write_with(planned, None, sync, |sink, _| match sink {
        Sink::File(w) => std::io::Write::write_all(w, bytes).map_err(|e| Error::io(output, e)),
        _ => Ok(()),
    })
}

/// A temporary file next to `planned.path`, its space reserved; it vanishes unless persisted.
fn temporary(planned: Planned) -> Result<tempfile::NamedTempFile> {
    let dir = parent_dir(planned.path);
    let mut builder = tempfile::Builder::new();
    builder.prefix(".onnx-repvgg-").suffix(".tmp");
    #[cfg(unix)]
    {
        // Like any new file (0666 less the umask), not tempfile's private 0600.
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    reserve(tmp.as_file(), planned.len).map_err(|e| Error::io(planned.path, e))?;
    Ok(tmp)
}

/// Allocates disk blocks for `len` bytes to the empty file `file` (`fallocate`, keeping its size
/// 0): a full disk fails here, before anything is written, and writes into allocated blocks cost
/// the kernel less (about 15% of a model's write time on ext4). Where the file system cannot,
/// nothing is reserved.
fn reserve(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::io::AsRawFd;
        let Ok(len) = libc::off_t::try_from(len) else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        // Blocks only: the size still grows with what is written, so a short write shows.
        let mode = libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: a plain system call on an open descriptor.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, 0, len) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENOSPC) {
                return Err(error);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (file, len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn refuses_the_input_under_any_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.onnx");
        std::fs::write(&input, b"x").unwrap();
        let protected = vec![input.clone()];
        assert!(check_output(&input, &protected).is_err());
        let dotted = dir.path().join(".").join("in.onnx");
        assert!(check_output(&dotted, &protected).is_err());
        #[cfg(unix)]
        {
            let link = dir.path().join("link.onnx");
            std::os::unix::fs::symlink(&input, &link).unwrap();
            assert!(check_output(&link, &protected).is_err());
        }
        assert!(check_output(&dir.path().join("out.onnx"), &protected).is_ok());
        assert!(check_output(&dir.path().join("no/out.onnx"), &protected).is_err());
        assert!(check_output(dir.path(), &protected).is_err());
    }

    #[test]
    fn writes_atomically_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.onnx");
        let (side, _) = sidecar_for(&out).unwrap();
        let planned = |path, len| Planned { path, len };
        let (model, sidecar) = (planned(&out, 5), Some(planned(&side, 4)));
        write_with(model, sidecar, false, |m, s| {
            for (sink, data) in [(m, &b"model"[..]), (s.unwrap(), &b"data"[..])] {
                if let Sink::File(w) = sink {
                    w.write_all(data).unwrap();
                }
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"model");
        assert_eq!(std::fs::read(&side).unwrap(), b"data");
        // A writer that leaves the file shorter (or longer) than planned fails, and leaves the
        // earlier output as it was.
        for len in [6, 4] {
            let err = write_with(planned(&out, len), None, false, |m, _| {
                if let Sink::File(w) = m {
                    w.write_all(b"other").unwrap();
                }
                Ok(())
            })
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(&format!("5 bytes written where {len} were planned")),
                "{err}"
            );
            assert_eq!(std::fs::read(&out).unwrap(), b"model");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&out).unwrap().permissions().mode();
            assert_ne!(
                mode & 0o044,
                0,
                "output readable only by its owner: {mode:o}"
            );
        }
    }
}
