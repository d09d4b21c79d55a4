//! Typed errors. Each names the file, tensor or node at fault and says what to do.

use std::path::PathBuf;

/// Everything that can go wrong in lora-graft's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a decodable ONNX protobuf.
    #[error("{}: not a readable ONNX model ({reason}); check that the file is a complete .onnx file", path.display())]
    Decode { path: PathBuf, reason: String },
    /// A tensor's bytes (embedded or external) are inconsistent or unsafe to read.
    #[error("{}: tensor '{tensor}': {reason}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// The graph breaks an ONNX structural rule.
    #[error("invalid graph: {0}")]
    Graph(String),
    /// A node cannot be handled by a pass or the evaluator.
    #[error("node '{node}' ({op}): {reason}")]
    Node {
        node: String,
        op: String,
        reason: String,
    },
    /// An adapter file is not a readable safetensors file.
    #[error("{}: not a safetensors adapter file: {reason}", path.display())]
    AdapterFile { path: PathBuf, reason: String },
    /// The target filters left no linear layer to adapt.
    #[error("no target left: found {found} linear layers; {removed}")]
    NoTarget {
        /// Linear layers found before filtering.
        found: usize,
        /// What each filter removed.
        removed: String,
    },
    /// No trainable tensor lies on a path to the loss.
    #[error("the loss does not depend on any trainable tensor")]
    NoGradientPath,
    /// The user asked for something that cannot be done as asked.
    #[error("{0}")]
    Usage(String),
    /// tract refused or failed to run the model.
    #[error("tract: {0}")]
    Runtime(String),
    /// An error with the pass or step it happened in.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

/// Result with lora-graft's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps the error with the name of the step that was running.
    pub fn context(self, context: impl Into<String>) -> Error {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// Shorthand for an I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Adds the name of a step to an error result.
pub trait ResultExt<T> {
    /// Wraps the error, if any, with `context`.
    fn context(self, context: impl Into<String>) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| e.context(context))
    }
}

/// A regex's error on one line: regex draws a caret under the pattern over several
/// lines, and its last line says what is wrong.
pub fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let last = last.trim();
    last.strip_prefix("error: ").unwrap_or(last).to_string()
}
