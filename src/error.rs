//! The library's one error type. Every variant names what it is about: a file, a node or a
//! tensor, so that the binary can print it on one line. Messages are complete in `Display`;
//! wrapped errors are not exposed as `source()` so that chains never print a cause twice.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, analysing or writing a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, mapped, written or renamed.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The bytes are not a well-formed ONNX model.
    #[error("{}: not a valid ONNX model: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    /// A tensor's declaration and its data disagree, or its type cannot be used.
    #[error("tensor '{name}': {reason}")]
    Tensor { name: String, reason: String },
    /// External data of a tensor cannot be resolved safely.
    #[error("tensor '{name}': external data '{location}': {reason}")]
    ExternalData {
        name: String,
        location: String,
        reason: String,
    },
    /// The graph's structure is inconsistent (dangling references, duplicates, cycles).
    #[error("graph: {0}")]
    Graph(String),
    /// The output path is not usable.
    #[error("{}: {reason}", path.display())]
    Output { path: PathBuf, reason: String },
    /// A fused block failed its numerical check (nothing was written).
    #[error("block '{block}' failed verification: {reason}")]
    Verify { block: String, reason: String },
    /// The run would need more memory than is available (see [`crate::memory`]).
    #[error("not enough memory: {0}")]
    Resources(String),
    /// `strict` was asked for and some candidate blocks cannot be fused.
    #[error("strict: {0}")]
    Strict(String),
    /// An error about one input file, with the file named.
    #[error("{}: {error}", path.display())]
    InFile { path: PathBuf, error: Box<Error> },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }

    pub(crate) fn tensor(name: &str, reason: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.to_string(),
            reason: reason.into(),
        }
    }

    /// Names `path` in front of errors that do not name a file already.
    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> Self {
        match self {
            Error::Io { .. }
            | Error::Malformed { .. }
            | Error::Output { .. }
            | Error::InFile { .. } => self,
            other => Error::InFile {
                path: path.into(),
                error: Box::new(other),
            },
        }
    }
}
