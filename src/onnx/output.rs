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

/// What to check on the written files before they are put into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Nothing: the file is not a model (a picture, a report).
    None,
    /// The model invariant ([`super::audit`]): a violation is an internal error and nothing is
    /// published.
    Model,
}

/// Writes the model (and its sidecar) atomically: `fill` writes into sinks over temporary files
/// in the destination directory, which are put into place only if it succeeds and wrote exactly
/// the planned lengths (sidecar first, so a model never points to missing data), and, with
/// [`Check::Model`], the model as written passes the output invariant; otherwise they vanish.
/// The space is reserved before anything is written, so a full disk is an error at the start.
/// With `sync` the files reach the disk before they appear (durable across a power cut, and as
/// slow as the disk).
pub fn write_with(
    model: Planned,
    sidecar: Option<Planned>,
    sync: bool,
    check: Check,
    fill: impl FnOnce(&mut Sink, Option<&mut Sink>) -> Result<()>,
) -> Result<()> {
    let output = model.path;
    let model_tmp = Temporary::new(model)?;
    let sidecar_tmp = sidecar.map(Temporary::new).transpose()?;
    let sink = |tmp: &Temporary, path: &Path| -> Result<Sink> {
        let file = tmp.file().try_clone().map_err(|e| Error::io(path, e))?;
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
            .file()
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
            let file = tmp.file();
            file.sync_data().map_err(|e| Error::io(planned.path, e))?;
        }
    }
    if check == Check::Model {
        audit_written(&model_tmp, output, sidecar)?;
    }
    if let (Some(tmp), Some(planned)) = (sidecar_tmp, sidecar) {
        let path = planned.path;
        tmp.persist(path).map_err(|e| Error::io(path, e))?;
    }
    model_tmp
        .persist(output)
        .map_err(|e| Error::io(output, e))?;
    Ok(())
}

/// Maps the written model and checks the output invariant on it.
fn audit_written(tmp: &Temporary, output: &Path, sidecar: Option<Planned>) -> Result<()> {
    // SAFETY: a read-only map of our own temporary file, which nothing else can reach (it has
    // no name, or a random hidden one) and which nothing writes any more.
    let map = unsafe { memmap2::Mmap::map(tmp.file()) }.map_err(|e| Error::io(output, e))?;
    let location = sidecar.and_then(|s| s.path.file_name()?.to_str());
    let sidecar = sidecar
        .zip(location)
        .map(|(s, location)| super::audit::Sidecar {
            location,
            len: s.len,
        });
    super::audit::audit(bytes::Bytes::from_owner(map), sidecar).map_err(Error::Internal)
}

/// Writes `bytes` to `output` atomically (a model fused in memory and checked there, or a
/// picture), durably with `sync`.
pub fn write_bytes(output: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    check_output(output, &[])?;
    let planned = Planned {
        path: output,
        len: bytes.len() as u64,
    };
    write_with(planned, None, sync, Check::None, |sink, _| match sink {
        Sink::File(w) => std::io::Write::write_all(w, bytes).map_err(|e| Error::io(output, e)),
        _ => Ok(()),
    })
}

/// A file being written next to its destination, invisible to everyone until it is persisted.
enum Temporary {
    /// Linux `O_TMPFILE`: a file with no name at all until it is linked into place; if the
    /// process dies — even by SIGKILL — the kernel frees it and nothing is left behind.
    #[cfg(target_os = "linux")]
    Unnamed { file: std::fs::File, dir: PathBuf },
    /// Where the file system (or the system) cannot: a hidden file with a random name, removed
    /// when dropped and, in the binary, on SIGINT, SIGTERM and SIGHUP ([`clean_up_on_signals`]).
    Named {
        tmp: tempfile::NamedTempFile,
        _pending: pending::Registered,
    },
}

impl Temporary {
    /// A temporary file next to `planned.path`, its space reserved.
    fn new(planned: Planned) -> Result<Temporary> {
        let dir = parent_dir(planned.path);
        let tmp = match Temporary::unnamed(dir) {
            Some(tmp) => tmp,
            None => Temporary::named(dir).map_err(|e| Error::io(dir, e))?,
        };
        reserve(tmp.file(), planned.len).map_err(|e| Error::io(planned.path, e))?;
        Ok(tmp)
    }

    #[cfg(target_os = "linux")]
    fn unnamed(dir: &Path) -> Option<Temporary> {
        use std::os::unix::fs::OpenOptionsExt;
        // Linking the file into place goes through /proc/self/fd.
        if !Path::new("/proc/self/fd").is_dir() {
            return None;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            // Like any new file (0666 less the umask), not a private 0600.
            .mode(0o666)
            .open(dir)
            .ok()?;
        Some(Temporary::Unnamed {
            file,
            dir: dir.to_path_buf(),
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn unnamed(_dir: &Path) -> Option<Temporary> {
        None
    }

    fn named(dir: &Path) -> std::io::Result<Temporary> {
        let mut builder = tempfile::Builder::new();
        builder.prefix(".onnx-repvgg-").suffix(".tmp");
        #[cfg(unix)]
        {
            // Like any new file (0666 less the umask), not tempfile's private 0600.
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let tmp = builder.tempfile_in(dir)?;
        let _pending = pending::Registered::new(tmp.path());
        Ok(Temporary::Named { tmp, _pending })
    }

    fn file(&self) -> &std::fs::File {
        match self {
            #[cfg(target_os = "linux")]
            Temporary::Unnamed { file, .. } => file,
            Temporary::Named { tmp, .. } => tmp.as_file(),
        }
    }

    /// Puts the file at `path` in one step, replacing what was there.
    fn persist(self, path: &Path) -> std::io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            Temporary::Unnamed { file, dir } => {
                use std::os::unix::io::AsRawFd;
                let fd = file.as_raw_fd();
                match link_fd(fd, path) {
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        // Replacing a file takes a name first, then a rename over it.
                        let temp = link_hidden(fd, &dir)?;
                        let renamed = std::fs::rename(temp.path(), path);
                        if renamed.is_err() {
                            let _ = std::fs::remove_file(temp.path());
                        }
                        renamed
                    }
                    other => other,
                }
            }
            Temporary::Named { tmp, _pending } => tmp.persist(path).map(drop).map_err(|e| e.error),
        }
    }
}

/// Gives the unnamed file `fd` the name `to` (fails with `AlreadyExists` if taken).
#[cfg(target_os = "linux")]
fn link_fd(fd: std::os::unix::io::RawFd, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two NUL-terminated paths; linkat only reads them.
    let done = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    match done {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Gives the unnamed file `fd` a fresh hidden name in `dir`, registered as pending while the
/// guard lives.
#[cfg(target_os = "linux")]
fn link_hidden(fd: std::os::unix::io::RawFd, dir: &Path) -> std::io::Result<pending::Registered> {
    let mut attempt = 0u32;
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            ".onnx-repvgg-{}-{nanos:x}-{attempt}.tmp",
            std::process::id()
        );
        let temp = pending::Registered::new(&dir.join(name));
        match link_fd(fd, temp.path()) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 64 => attempt += 1,
            linked => return linked.map(|()| temp),
        }
    }
}

/// Named temporary files that exist right now, to remove if the process is interrupted.
mod pending {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    fn files() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
        FILES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A path listed as pending while this guard lives.
    #[derive(Debug)]
    pub struct Registered(PathBuf);

    impl Registered {
        pub fn new(path: &Path) -> Registered {
            files().push(path.to_path_buf());
            Registered(path.to_path_buf())
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Registered {
        fn drop(&mut self) {
            files().retain(|p| *p != self.0);
        }
    }

    /// Removes every pending file.
    pub fn remove_all() {
        for path in files().drain(..) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// For a program: on SIGINT, SIGTERM or SIGHUP, removes the named temporary files being written
/// (where unnamed ones are not available) and then dies of the signal as it would have. Call it
/// once, early; the library never installs signal handlers by itself.
pub fn clean_up_on_signals() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    pending::remove_all();
                    let _ = signal_hook::low_level::emulate_default_handler(signal);
                    std::process::exit(128 + signal);
                }
            })?;
    }
    Ok(())
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
    fn named_temporaries_are_listed_until_persisted_and_removed_on_interruption() {
        let dir = tempfile::tempdir().unwrap();
        let count = || std::fs::read_dir(dir.path()).unwrap().count();
        let kept = Temporary::named(dir.path()).unwrap();
        let interrupted = Temporary::named(dir.path()).unwrap();
        assert_eq!(count(), 2);
        kept.persist(&dir.path().join("out.onnx")).unwrap();
        // What a signal does before the process dies: the one still being written goes.
        pending::remove_all();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["out.onnx"]);
        drop(interrupted);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn unnamed_temporaries_have_no_name_until_linked_and_replace_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.onnx");
        std::fs::write(&out, b"old").unwrap();
        let tmp = Temporary::unnamed(dir.path()).expect("O_TMPFILE on this file system");
        std::io::Write::write_all(&mut tmp.file(), b"new").unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        tmp.persist(&out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let fresh = dir.path().join("fresh.onnx");
        Temporary::unnamed(dir.path())
            .unwrap()
            .persist(&fresh)
            .unwrap();
        assert!(fresh.exists());
    }

    #[test]
    fn writes_atomically_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.onnx");
        let (side, _) = sidecar_for(&out).unwrap();
        let planned = |path, len| Planned { path, len };
        let (model, sidecar) = (planned(&out, 5), Some(planned(&side, 4)));
        write_with(model, sidecar, false, Check::None, |m, s| {
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
            let err = write_with(planned(&out, len), None, false, Check::None, |m, _| {
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
