//! Shape and data-movement ops: `Shape`, `Unsqueeze`, `Squeeze`, `Reshape`, `Flatten`,
//! `Concat`, `Gather`, `Slice`, `Transpose`, `Expand`.

use tract_core::ndarray::{ArrayD, Axis, IxDyn};

use super::common::{arg, axes_of, ints, norm_axis, reshaped};
use super::{broadcast_shape, InterpError};
use crate::ir::Node;
use crate::tensor::Array;

/// `Shape` of an input of shape `shape` (`start` and `end` attributes, opset 15).
pub fn shape_of(node: &Node, shape: &[usize]) -> Result<Vec<Array>, InterpError> {
    let rank = shape.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
    let start = clamp(node.attr_int("start", 0));
    let end = clamp(node.attr_int("end", rank));
    let dims: Vec<i64> = shape[start..end.max(start)]
        .iter()
        .map(|&d| d as i64)
        .collect();
    Ok(vec![Array::I64(
        ArrayD::from_shape_vec(IxDyn(&[dims.len()]), dims).expect("1-D"),
    )])
}

pub fn unsqueeze(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let x = arg(inputs, 0)?;
    let axes = axes_of(node, inputs, 1)?;
    let rank = x.shape().len() + axes.len();
    let mut axes: Vec<usize> = axes
        .iter()
        .map(|&a| norm_axis(a, rank))
        .collect::<Result<_, _>>()?;
    axes.sort_unstable();
    let mut shape = x.shape().to_vec();
    for a in axes {
        shape.insert(a, 1);
    }
    Ok(vec![reshaped(x, &shape)?])
}

pub fn squeeze(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let x = arg(inputs, 0)?;
    let rank = x.shape().len();
    let axes: Vec<usize> = match axes_of(node, inputs, 1)? {
        a if a.is_empty() => (0..rank).filter(|&i| x.shape()[i] == 1).collect(),
        a => a
            .iter()
            .map(|&a| norm_axis(a, rank))
            .collect::<Result<_, _>>()?,
    };
    let shape: Vec<usize> = x
        .shape()
        .iter()
        .enumerate()
        .filter(|(i, _)| !axes.contains(i))
        .map(|(_, &d)| d)
        .collect();
    Ok(vec![reshaped(x, &shape)?])
}

pub fn reshape(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let x = arg(inputs, 0)?;
    let spec = ints(arg(inputs, 1)?)?;
    let allow_zero = node.attr_int("allowzero", 0) != 0;
    let mut shape: Vec<usize> = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &d) in spec.iter().enumerate() {
        match d {
            -1 => {
                infer = Some(i);
                shape.push(1);
            }
            0 if !allow_zero => shape.push(
                *x.shape()
                    .get(i)
                    .ok_or_else(|| InterpError::input(1, "0 past the input rank"))?,
            ),
            d if d >= 0 => shape.push(d as usize),
            _ => return Err(InterpError::input(1, format!("bad reshape dim {d}"))),
        }
    }
    if let Some(i) = infer {
        let known: usize = shape.iter().product();
        if known == 0 || x.len() % known != 0 {
            return Err(InterpError::input(1, "cannot infer the -1 dim"));
        }
        shape[i] = x.len() / known;
    }
    Ok(vec![reshaped(x, &shape)?])
}

pub fn flatten(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let x = arg(inputs, 0)?;
    let rank = x.shape().len();
    let axis = node.attr_int("axis", 1);
    let axis = if axis < 0 { axis + rank as i64 } else { axis } as usize;
    let (outer, inner) = x.shape().split_at(axis.min(rank));
    let shape = [outer.iter().product(), inner.iter().product()];
    Ok(vec![reshaped(x, &shape)?])
}

pub fn concat(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let rank = arg(inputs, 0)?.shape().len();
    let axis = norm_axis(node.attr_int("axis", 0), rank)?;
    let parts = (0..inputs.len())
        .map(|i| arg(inputs, i))
        .collect::<Result<Vec<_>, _>>()?;
    let joined = Array::concat(&parts, axis)
        .ok_or_else(|| InterpError::Mismatch("Concat inputs differ in type or shape".into()))?;
    Ok(vec![joined])
}

pub fn gather(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let x = arg(inputs, 0)?;
    let idx_arr = arg(inputs, 1)?;
    let rank = x.shape().len();
    let axis = norm_axis(node.attr_int("axis", 0), rank)?;
    let dim = x.shape()[axis] as i64;
    let idx: Vec<usize> = ints(idx_arr)?
        .iter()
        .map(|&i| {
            let j = if i < 0 { i + dim } else { i };
            if (0..dim).contains(&j) {
                Ok(j as usize)
            } else {
                Err(InterpError::Index { index: i, dim })
            }
        })
        .collect::<Result<_, _>>()?;
    let mut shape = x.shape()[..axis].to_vec();
    shape.extend_from_slice(idx_arr.shape());
    shape.extend_from_slice(&x.shape()[axis + 1..]);
    let picked = crate::map_array!(x, a => a.select(Axis(axis), &idx));
    Ok(vec![reshaped(&picked, &shape)?])
}

pub fn slice(_: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let x = arg(inputs, 0)?;
    let starts = ints(arg(inputs, 1)?)?;
    let ends = ints(arg(inputs, 2)?)?;
    let rank = x.shape().len();
    let axes = match inputs.get(3).copied().flatten() {
        Some(a) => ints(a)?,
        None => (0..starts.len() as i64).collect(),
    };
    let steps = match inputs.get(4).copied().flatten() {
        Some(a) => ints(a)?,
        None => vec![1; starts.len()],
    };
    for (index, len) in [(2, ends.len()), (3, axes.len()), (4, steps.len())] {
        if len != starts.len() {
            let n = starts.len();
            return Err(InterpError::input(
                index,
                format!("{len} values for {n} starts"),
            ));
        }
    }
    let mut out = x.clone();
    for (k, &axis) in axes.iter().enumerate() {
        let axis = norm_axis(axis, rank)?;
        let dim = x.shape()[axis] as i64;
        let step = steps[k];
        if step == 0 {
            return Err(InterpError::input(4, "Slice step 0"));
        }
        // A negative step clamps the start to [-1, dim - 1], like numpy, tract and the
        // ONNX reference implementation (the spec's text says [0, dim - 1], which
        // would take element 0 for a start below -dim).
        let fix = |v: i64, lo: i64, hi: i64| (if v < 0 { v + dim } else { v }).clamp(lo, hi);
        let idx: Vec<usize> = if step > 0 {
            let (s, e) = (fix(starts[k], 0, dim), fix(ends[k], 0, dim));
            (s..e).step_by(step as usize).map(|i| i as usize).collect()
        } else {
            let (s, e) = (fix(starts[k], -1, dim - 1), fix(ends[k], -1, dim - 1));
            let mut v = Vec::new();
            let mut i = s;
            while i > e {
                v.push(i as usize);
                i += step;
            }
            v
        };
        out = crate::map_array!(&out, a => a.select(Axis(axis), &idx));
    }
    Ok(vec![out])
}

pub fn transpose(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let x = arg(inputs, 0)?;
    let rank = x.shape().len();
    let perm: Vec<usize> = match node.attr_ints("perm") {
        Some(p) => p
            .iter()
            .map(|&a| norm_axis(a, rank))
            .collect::<Result<_, _>>()?,
        None => (0..rank).rev().collect(),
    };
    let mut sorted = perm.clone();
    sorted.sort_unstable();
    if sorted != (0..rank).collect::<Vec<_>>() {
        return Err(InterpError::attr(
            "perm",
            format!("{perm:?} is not a permutation of the {rank} axes"),
        ));
    }
    Ok(vec![
        crate::map_array!(x, a => a.clone().permuted_axes(IxDyn(&perm)).as_standard_layout().to_owned()),
    ])
}

pub fn expand(_: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let x = arg(inputs, 0)?;
    let target: Vec<usize> = ints(arg(inputs, 1)?)?
        .iter()
        .map(|&d| d.max(0) as usize)
        .collect();
    let shape = broadcast_shape(x.shape(), &target)?;
    let err = || InterpError::Broadcast {
        a: x.shape().to_vec(),
        b: shape.clone(),
    };
    Ok(vec![
        crate::map_array!(x, a => a.broadcast(IxDyn(&shape)).ok_or_else(err)?.to_owned()),
    ])
}
