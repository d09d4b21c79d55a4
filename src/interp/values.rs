//! Ops that make or convert values: `Constant`, `Cast`, `ConstantOfShape`, `Range`,
//! `CumSum`, `Trilu`, `DequantizeLinear`.

use tract_core::ndarray::{ArrayD, Axis, IxDyn};

use super::common::{arg, first_int, ints, norm_axis, scalar_i64};
use super::elementwise::zip_with;
use super::InterpError;
use crate::ir::Node;
use crate::tensor::{Array, DecodeError};

/// The reason a tensor attribute could not be decoded.
fn decode_reason(e: DecodeError) -> String {
    match e {
        DecodeError::Unsupported(t) => format!("tensor of type {t} cannot be read"),
        DecodeError::Inconsistent(r) => r,
    }
}

pub fn constant(node: &Node, _: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let a = node
        .proto
        .attribute
        .first()
        .ok_or_else(|| InterpError::attr("value", "Constant without a value"))?;
    let value = match a.name() {
        "value" => Array::from_proto(
            a.t.as_ref()
                .ok_or_else(|| InterpError::attr("value", "no tensor"))?,
            None,
        )
        .map_err(|e| InterpError::attr("value", decode_reason(e)))?,
        "value_int" => scalar_i64(a.i()),
        "value_ints" => {
            Array::I64(ArrayD::from_shape_vec(IxDyn(&[a.ints.len()]), a.ints.clone()).expect("1-D"))
        }
        "value_float" => Array::F32(ArrayD::from_elem(IxDyn(&[]), a.f())),
        "value_floats" => Array::F32(
            ArrayD::from_shape_vec(IxDyn(&[a.floats.len()]), a.floats.clone()).expect("1-D"),
        ),
        other => return Err(InterpError::attr(other, "not supported")),
    };
    Ok(vec![value])
}

pub fn cast(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    use crate::proto::tensor_proto::DataType as D;
    let x = arg(inputs, 0)?;
    let to = node
        .attr("to")
        .and_then(|a| a.i)
        .ok_or_else(|| InterpError::attr("to", "missing"))?;
    let to = D::try_from(to as i32)
        .map_err(|_| InterpError::attr("to", format!("{to} is not an ONNX element type")))?;
    let f = x.to_f64();
    let ints = || -> ArrayD<i64> {
        match x {
            Array::I64(a) => a.clone(),
            Array::I32(a) => a.mapv(i64::from),
            Array::I8(a) => a.mapv(i64::from),
            Array::U8(a) => a.mapv(i64::from),
            Array::Bool(a) => a.mapv(i64::from),
            _ => f.mapv(|v| v as i64),
        }
    };
    Ok(vec![match to {
        // Straight from int64: through f64 would round twice above 2^53.
        D::Float => Array::F32(match x {
            Array::I64(a) => a.mapv(|v| v as f32),
            _ => f.mapv(|v| v as f32),
        }),
        D::Double => Array::F64(f),
        D::Float16 => Array::F16(f.mapv(half::f16::from_f64)),
        D::Bfloat16 => Array::BF16(f.mapv(half::bf16::from_f64)),
        D::Int64 => Array::I64(ints()),
        D::Int32 => Array::I32(ints().mapv(|v| v as i32)),
        D::Int8 => Array::I8(ints().mapv(|v| v as i8)),
        D::Uint8 => Array::U8(ints().mapv(|v| v as u8)),
        D::Bool => Array::Bool(f.mapv(|v| v != 0.0)),
        other => {
            return Err(InterpError::Cast {
                to: format!("{other:?}"),
            })
        }
    }])
}

pub fn constant_of_shape(
    node: &Node,
    inputs: &[Option<&Array>],
) -> Result<Vec<Array>, InterpError> {
    let shape: Vec<usize> = ints(arg(inputs, 0)?)?
        .iter()
        .map(|&d| d.max(0) as usize)
        .collect();
    let value = match node.attr("value").and_then(|a| a.t.as_ref()) {
        Some(t) => {
            Array::from_proto(t, None).map_err(|e| InterpError::attr("value", decode_reason(e)))?
        }
        None => Array::F32(ArrayD::zeros(IxDyn(&[1]))),
    };
    Ok(vec![crate::map_array!(&value, a => {
        let v = a
            .iter()
            .next()
            .cloned()
            .ok_or_else(|| InterpError::attr("value", "empty tensor"))?;
        ArrayD::from_elem(IxDyn(&shape), v)
    })])
}

pub fn range(_: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let (s, l, d) = (arg(inputs, 0)?, arg(inputs, 1)?, arg(inputs, 2)?);
    let count =
        |start: f64, limit: f64, delta: f64| ((limit - start) / delta).ceil().max(0.0) as usize;
    Ok(vec![match (s, l, d) {
        (Array::I64(_), _, _) | (Array::I32(_), _, _) => {
            let (a, b, c) = (
                first_int(inputs, 0)?,
                first_int(inputs, 1)?,
                first_int(inputs, 2)?,
            );
            if c == 0 {
                return Err(InterpError::input(2, "Range delta 0"));
            }
            let n = count(a as f64, b as f64, c as f64);
            let v: Vec<i64> = (0..n as i64).map(|i| a + i * c).collect();
            let arr = ArrayD::from_shape_vec(IxDyn(&[n]), v).expect("1-D");
            if matches!(s, Array::I32(_)) {
                Array::I32(arr.mapv(|v| v as i32))
            } else {
                Array::I64(arr)
            }
        }
        _ => {
            let first = |a: &Array, index| {
                a.to_f64()
                    .iter()
                    .next()
                    .copied()
                    .ok_or_else(|| InterpError::input(index, "empty, expected a scalar"))
            };
            let (a, b, c) = (first(s, 0)?, first(l, 1)?, first(d, 2)?);
            if c == 0.0 || ((b - a) / c).is_infinite() {
                return Err(InterpError::input(2, "Range delta 0 or infinite range"));
            }
            let n = count(a, b, c);
            let v: Vec<f64> = (0..n).map(|i| a + i as f64 * c).collect();
            let arr = ArrayD::from_shape_vec(IxDyn(&[n]), v).expect("1-D");
            match s {
                Array::F32(_) => Array::F32(arr.mapv(|v| v as f32)),
                _ => Array::F64(arr),
            }
        }
    }])
}

pub fn cumsum(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let x = arg(inputs, 0)?;
    let axis = norm_axis(first_int(inputs, 1)?, x.shape().len())?;
    let exclusive = node.attr_int("exclusive", 0) != 0;
    let reverse = node.attr_int("reverse", 0) != 0;
    macro_rules! scan {
        ($a:expr, $zero:expr) => {{
            let mut out = $a.clone();
            for mut lane in out.lanes_mut(Axis(axis)) {
                let vals: Vec<_> = lane.iter().cloned().collect();
                let n = vals.len();
                let mut acc = $zero;
                for k in 0..n {
                    let i = if reverse { n - 1 - k } else { k };
                    if exclusive {
                        lane[i] = acc;
                        acc += vals[i];
                    } else {
                        acc += vals[i];
                        lane[i] = acc;
                    }
                }
            }
            out
        }};
    }
    Ok(vec![match x {
        Array::I64(a) => Array::I64(scan!(a, 0i64)),
        Array::I32(a) => Array::I32(scan!(a, 0i32)),
        Array::F32(a) => Array::F32(scan!(a, 0f32)),
        Array::F64(a) => Array::F64(scan!(a, 0f64)),
        other => return Err(InterpError::operands(&[other])),
    }])
}

pub fn trilu(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let x = arg(inputs, 0)?;
    let k = match inputs.get(1).copied().flatten() {
        Some(_) => first_int(inputs, 1)?,
        None => 0,
    };
    let upper = node.attr_int("upper", 1) != 0;
    let rank = x.shape().len();
    if rank < 2 {
        return Err(InterpError::input(
            0,
            format!("Trilu needs rank >= 2, got {rank}"),
        ));
    }
    let keep = |i: usize, j: usize| {
        let d = j as i64 - i as i64;
        if upper {
            d >= k
        } else {
            d <= k
        }
    };
    Ok(vec![crate::map_array!(x, a => {
        let mut out = a.clone();
        for (idx, v) in out.indexed_iter_mut() {
            if !keep(idx[rank - 2], idx[rank - 1]) {
                *v = Default::default();
            }
        }
        out
    })])
}

/// `(x - zero_point) * scale`, per tensor or along `axis` (no block quantization).
pub fn dequantize_linear(
    node: &Node,
    inputs: &[Option<&Array>],
) -> Result<Vec<Array>, InterpError> {
    let x = arg(inputs, 0)?;
    let scale = arg(inputs, 1)?;
    let rank = x.shape().len();
    let xf = x.to_f64();
    let sf = scale.to_f64();
    let zf = match inputs.get(2).copied().flatten() {
        Some(z) => z.to_f64(),
        None => ArrayD::zeros(sf.raw_dim()),
    };
    let block = node.attr_int("block_size", 0);
    let (sf, zf) = if block > 0 && sf.ndim() == rank && rank > 0 {
        // Blocked (opset 21): along `axis`, entry j of the scale covers values
        // j·block .. (j+1)·block; each scale and zero point is repeated over its block.
        let axis = norm_axis(node.attr_int("axis", 1), rank)?;
        let (len, block) = (x.shape()[axis], block as usize);
        let widen = |a: ArrayD<f64>, index: usize| {
            if a.shape()[axis] != len.div_ceil(block) {
                return Err(InterpError::BadInput {
                    index,
                    reason: format!(
                        "shape {:?} does not block axis {axis} of {:?} by {block}",
                        a.shape(),
                        x.shape()
                    ),
                });
            }
            let picks: Vec<usize> = (0..len).map(|i| i / block).collect();
            Ok(a.select(Axis(axis), &picks))
        };
        (widen(sf, 1)?, widen(zf, 2)?)
    } else if sf.ndim() == 1 && rank > 0 {
        let axis = norm_axis(node.attr_int("axis", 1), rank)?;
        let mut shape = vec![1; rank];
        shape[axis] = sf.len();
        let along = |a: ArrayD<f64>, index: usize| {
            let from = a.shape().to_vec();
            a.into_shape_with_order(IxDyn(&shape))
                .map_err(|_| InterpError::BadInput {
                    index,
                    reason: format!("shape {from:?} does not fit axis {axis} of {:?}", x.shape()),
                })
        };
        (along(sf, 1)?, along(zf, 2)?)
    } else {
        (sf, zf)
    };
    let y = zip_with(&zip_with(&xf, &zf, |a, b| a - b)?, &sf, |a, b| a * b)?;
    Ok(vec![match scale {
        Array::F16(_) => Array::F16(y.mapv(half::f16::from_f64)),
        Array::BF16(_) => Array::BF16(y.mapv(half::bf16::from_f64)),
        Array::F64(_) => Array::F64(y),
        _ => Array::F32(y.mapv(|v| v as f32)),
    }])
}
