//! Errors of loading and running a model: each names the file, key or tensor at fault.

use std::path::PathBuf;

/// Everything that can go wrong between a checkpoint on disk and a running model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error (shown in the message, not chained, so it is printed once).
        cause: std::io::Error,
    },
    /// A file was read but its contents are not what they should be.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        message: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("{path}: tensor `{name}` is missing (expected shape {expected:?})")]
    MissingTensor {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's key in the checkpoint.
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
    },
    /// A tensor has a shape the config does not allow.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's key in the checkpoint.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a type this loader cannot read.
    #[error("{path}: tensor `{name}` has unsupported type {dtype}{hint}")]
    UnsupportedDtype {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's key.
        name: String,
        /// The type as the file names it.
        dtype: String,
        /// What is supported, to help the user convert.
        hint: String,
    },
    /// The model configuration is invalid or unsupported.
    #[error("{path}: {message}")]
    Config {
        /// The config file (or GGUF file for metadata).
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer or chat template could not be built or applied.
    #[error("{context}: {message}")]
    Tokenizer {
        /// The file or step.
        context: String,
        /// What went wrong.
        message: String,
    },
}

impl LoadError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn tokenizer(context: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::Tokenizer {
            context: context.into(),
            message: message.to_string(),
        }
    }
}

/// Result of loading.
pub type Result<T> = std::result::Result<T, LoadError>;
