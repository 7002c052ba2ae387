//! Where a model comes from: a file, or `-` for standard input (read whole, within the memory
//! available); and what a file that is no ONNX model seems to be, so that the error says "not
//! an ONNX model" before the protobuf detail.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use super::{Failure, Result};

/// How errors name standard input.
pub(crate) const STDIN: &str = "<stdin>";

/// `-`: standard input or output.
pub(crate) fn is_pipe(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// A model to read: a file, or standard input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    File(PathBuf),
    Stdin,
}

impl Source {
    pub(crate) fn new(path: PathBuf) -> Source {
        match is_pipe(&path) {
            true => Source::Stdin,
            false => Source::File(path),
        }
    }

    /// How messages name it.
    pub(crate) fn name(&self) -> PathBuf {
        match self {
            Source::File(path) => path.clone(),
            Source::Stdin => PathBuf::from(STDIN),
        }
    }
}

/// Reads standard input whole. The model and what is built from it sit in memory: at most a
/// third of the memory available is read.
pub(crate) fn read_stdin() -> Result<bytes::Bytes> {
    let cap = crate::memory::available()?.map_or(u64::MAX, |m| m / 3);
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::Failed(format!("{STDIN}: {e}")))?;
    if bytes.len() as u64 > cap {
        return Err(Failure::Failed(format!(
            "{STDIN}: not enough memory: a model over {} MiB cannot be read through a pipe here; pass it as a file",
            cap >> 20
        )));
    }
    Ok(bytes.into())
}

/// The library's error, with what the input seems to be when it is no ONNX model at all: "not
/// an ONNX model (a ZIP archive, …)" first, the protobuf detail second. `head` is the start of
/// the input when it is at hand (standard input); files are read again.
pub(crate) fn explain(error: crate::Error, head: Option<&[u8]>) -> Failure {
    let crate::Error::Malformed { path, reason } = &error else {
        return error.into();
    };
    let mut start = [0u8; 512];
    let head = match head {
        Some(head) => &head[..head.len().min(start.len())],
        // Only a regular file is read again: a named pipe would wait for a writer.
        None => match std::fs::metadata(path)
            .ok()
            .filter(|m| m.is_file())
            .and_then(|_| std::fs::File::open(path).ok())
        {
            Some(mut file) => {
                let n = read_up_to(&mut file, &mut start);
                &start[..n]
            }
            None => return error.into(),
        },
    };
    match kind(head) {
        Some(kind) => Failure::Failed(format!(
            "{}: not an ONNX model ({kind}): {reason}",
            path.display()
        )),
        None => error.into(),
    }
}

fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// What a file whose first bytes are `head` seems to be, when it is recognizably no ONNX model.
fn kind(head: &[u8]) -> Option<&'static str> {
    const MAGIC: &[(&[u8], &str)] = &[
        (
            b"PK\x03\x04",
            "a ZIP archive, such as NumPy .npz or a PyTorch checkpoint",
        ),
        (b"\x93NUMPY", "a NumPy .npy array"),
        (
            b"\x89HDF\r\n\x1a\n",
            "an HDF5 file, such as a Keras .h5 model",
        ),
        (b"\x1f\x8b", "a gzip archive: decompress it first"),
        (b"\x89PNG", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"%PDF", "a PDF document"),
    ];
    if let Some((_, what)) = MAGIC.iter().find(|(magic, _)| head.starts_with(magic)) {
        return Some(what);
    }
    // Pickle protocol 2 to 5 (torch.save before the ZIP format).
    if let [0x80, 2..=5, ..] = head {
        return Some("a Python pickle, such as a PyTorch checkpoint");
    }
    let text = match std::str::from_utf8(head) {
        Ok(text) => text,
        // A multi-byte character cut at the end of the sample.
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&head[..e.valid_up_to()]).ok()?,
        Err(_) => return None,
    };
    let printable = text
        .chars()
        .all(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t'));
    (!text.is_empty() && printable).then_some("it is text")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_what_people_pass_by_mistake() {
        assert_eq!(kind(b"hello, world\n"), Some("it is text"));
        assert_eq!(kind("naïve\n".as_bytes()), Some("it is text"));
        assert!(kind(b"PK\x03\x04\x14\x00").unwrap().contains("ZIP"));
        assert!(kind(b"\x93NUMPY\x01\x00").unwrap().contains(".npy"));
        assert!(kind(b"\x80\x02}q\x00").unwrap().contains("pickle"));
        // What an ONNX model starts with: ir_version (field 1, varint).
        assert_eq!(kind(b"\x08\x08\x12\x07pytorch"), None);
        assert_eq!(kind(b""), None);
    }
}
