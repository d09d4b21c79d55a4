//! Helpers shared by the op files: reading inputs and attributes, axes, reshaping.

use tract_core::ndarray::{ArrayD, IxDyn};

use super::InterpError;
use crate::ir::Node;
use crate::tensor::Array;

/// Input `i`, which the op requires.
pub fn arg<'a>(inputs: &[Option<&'a Array>], i: usize) -> Result<&'a Array, InterpError> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or(InterpError::MissingInput { index: i })
}

/// An int64 scalar.
pub fn scalar_i64(v: i64) -> Array {
    Array::I64(ArrayD::from_elem(IxDyn(&[]), v))
}

/// The values of an int64 or int32 tensor.
pub fn ints(a: &Array) -> Result<Vec<i64>, InterpError> {
    match a {
        Array::I64(x) => Ok(x.iter().copied().collect()),
        Array::I32(x) => Ok(x.iter().map(|&v| v as i64).collect()),
        other => Err(InterpError::dtype("integers", other)),
    }
}

/// The values of a bool tensor.
pub fn bools(a: &Array) -> Result<ArrayD<bool>, InterpError> {
    match a {
        Array::Bool(x) => Ok(x.clone()),
        other => Err(InterpError::dtype("bool", other)),
    }
}

/// The axes of Squeeze and Unsqueeze: input `slot` (opset 13) or attribute `axes`.
pub fn axes_of(
    node: &Node,
    inputs: &[Option<&Array>],
    slot: usize,
) -> Result<Vec<i64>, InterpError> {
    match inputs.get(slot).copied().flatten() {
        Some(a) => ints(a),
        None => Ok(node
            .attr_ints("axes")
            .map(<[i64]>::to_vec)
            .unwrap_or_default()),
    }
}

/// `axis` in `[-rank, rank)` made non-negative.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize, InterpError> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank {
        return Err(InterpError::Axis { axis, rank });
    }
    Ok(a as usize)
}

/// The first value of the integer input `index` (a scalar by the spec).
pub fn first_int(inputs: &[Option<&Array>], index: usize) -> Result<i64, InterpError> {
    ints(arg(inputs, index)?)?
        .first()
        .copied()
        .ok_or_else(|| InterpError::input(index, "empty, expected a scalar"))
}

/// `x` with the same elements in `shape`.
pub fn reshaped(x: &Array, shape: &[usize]) -> Result<Array, InterpError> {
    let err = || InterpError::Reshape {
        from: x.shape().to_vec(),
        to: shape.to_vec(),
    };
    Ok(crate::map_array!(x, a => a.to_shape(IxDyn(shape)).map_err(|_| err())?.to_owned()))
}
