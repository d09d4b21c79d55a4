//! `InterpError`: why the interpreter could not compute a node or a value.

use crate::tensor::Array;

/// Why the interpreter could not compute a node or a value. [`super::eval`] wraps an
/// op's error in [`InterpError::Node`], naming the node and its op.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InterpError {
    /// The interpreter has no rule for the op.
    #[error("the evaluator has no rule for {op}")]
    Unsupported { op: String },
    /// [`super::eval_shape_op`] was given an op other than `Shape` or `Size`.
    #[error("{op} is not a shape op")]
    NotAShapeOp { op: String },
    /// A required input is omitted (or not passed).
    #[error("input {index} is missing")]
    MissingInput { index: usize },
    /// An attribute is missing, of the wrong kind or has a value the op rejects.
    #[error("attribute '{name}': {reason}")]
    BadAttribute { name: String, reason: String },
    /// An input has a value the op rejects (a zero step, a bad reshape dim, ...).
    #[error("input {index}: {reason}")]
    BadInput { index: usize, reason: String },
    /// An input has an element type the op does not take here.
    #[error("expected {expected}, got {got}")]
    DType {
        expected: &'static str,
        got: &'static str,
    },
    /// The inputs' element types have no rule together (or differ where they must agree).
    #[error("unsupported operand types ({})", .types.join(", "))]
    OperandTypes { types: Vec<&'static str> },
    /// Two shapes do not broadcast (numpy rules).
    #[error("shapes {a:?} and {b:?} do not broadcast")]
    Broadcast { a: Vec<usize>, b: Vec<usize> },
    /// Inputs that must agree in type or shape do not.
    #[error("{0}")]
    Mismatch(String),
    /// The element count does not allow the requested shape.
    #[error("cannot reshape {from:?} to {to:?}")]
    Reshape { from: Vec<usize>, to: Vec<usize> },
    /// An axis is outside `[-rank, rank)`.
    #[error("axis {axis} out of range for rank {rank}")]
    Axis { axis: i64, rank: usize },
    /// An index is outside `[-dim, dim)`.
    #[error("index {index} out of range for dim {dim}")]
    Index { index: i64, dim: i64 },
    /// A `Cast` to an element type the interpreter does not hold.
    #[error("Cast to {to} is not supported")]
    Cast { to: String },
    /// An initializer's element type cannot be decoded.
    #[error("tensor '{name}' of type {dtype} cannot be read")]
    UnreadableTensor { name: String, dtype: &'static str },
    /// An initializer's bytes disagree with its dims.
    #[error("tensor '{name}': {reason}")]
    Tensor { name: String, reason: String },
    /// [`super::evaluate`] reached a value that no initializer chain computes.
    #[error("'{value}' is not computed from initializers")]
    NotConstant { value: String },
    /// An error of the node `node` (op `op`).
    #[error("node '{node}' ({op}): {source}")]
    Node {
        node: String,
        op: String,
        #[source]
        source: Box<InterpError>,
    },
}

impl InterpError {
    /// The error without the [`InterpError::Node`] wrapper (what went wrong).
    pub fn cause(&self) -> &InterpError {
        match self {
            InterpError::Node { source, .. } => source.cause(),
            other => other,
        }
    }

    /// Operand types error for `arrays`.
    pub(crate) fn operands(arrays: &[&Array]) -> InterpError {
        InterpError::OperandTypes {
            types: arrays
                .iter()
                .map(|a| crate::dtype::name(a.elem_type()))
                .collect(),
        }
    }

    /// A [`InterpError::DType`] for `got`.
    pub(crate) fn dtype(expected: &'static str, got: &Array) -> InterpError {
        InterpError::DType {
            expected,
            got: crate::dtype::name(got.elem_type()),
        }
    }

    /// A [`InterpError::BadAttribute`].
    pub(crate) fn attr(name: &str, reason: impl Into<String>) -> InterpError {
        InterpError::BadAttribute {
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// A [`InterpError::BadInput`].
    pub(crate) fn input(index: usize, reason: impl Into<String>) -> InterpError {
        InterpError::BadInput {
            index,
            reason: reason.into(),
        }
    }
}
