//! The single error type of the core. The binding layer maps each variant to one Python
//! exception class in one place (`python::to_py_err`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Error {
    /// An argument is outside its domain. The message names the argument and the problem
    /// (e.g. "variances[17] is NaN"). Python: `ValueError`.
    InvalidArgument(String),
    /// A pool file is truncated, corrupt or not a pool file at all. Python: `ValueError`.
    BadFile { path: PathBuf, problem: String },
    /// The operating system refused a file operation. Python: `OSError` (or its subclass
    /// matching the error kind, e.g. `FileNotFoundError`).
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }

    pub fn bad_file(path: &Path, problem: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }

    pub fn io(path: &Path, action: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(message) => f.write_str(message),
            Error::BadFile { path, problem } => {
                write!(
                    f,
                    "{} is not a valid PassRatePool file: {}",
                    path.display(),
                    problem
                )
            }
            Error::Io {
                path,
                action,
                source,
            } => {
                write!(f, "cannot {} {}: {}", action, path.display(), source)
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
