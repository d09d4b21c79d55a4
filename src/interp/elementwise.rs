//! Element-wise ops with numpy broadcasting: arithmetic, comparisons, logic, `Where`.

use std::cmp::Ordering;

use tract_core::ndarray::{ArrayD, ArrayViewD, IxDyn};

use super::common::{arg, bools};
use super::{broadcast_shape, InterpError};
use crate::ir::Node;
use crate::tensor::Array;

/// `a / b` for integers (0 when `b` is 0).
pub fn int_div(a: i64, b: i64) -> i64 {
    if b == 0 {
        0
    } else {
        a.wrapping_div(b)
    }
}

/// `a % b` for integers with the sign of `a` (C's `%`; 0 when `b` is 0).
fn int_rem(a: i64, b: i64) -> i64 {
    if b == 0 {
        0
    } else {
        a.wrapping_rem(b)
    }
}

/// `a % b` for integers with the sign of `b` (Python's `%`; 0 when `b` is 0).
fn int_mod(a: i64, b: i64) -> i64 {
    match int_rem(a, b) {
        r if r != 0 && (r < 0) != (b < 0) => r + b,
        r => r,
    }
}

/// `Mod`: for integers Python's `%` (`fmod = 0`, the default) or C's `%` (`fmod = 1`);
/// for floats C's `fmod` (ONNX requires `fmod = 1` for them).
pub fn modulo(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let int = if node.attr_int("fmod", 0) == 0 {
        int_mod
    } else {
        int_rem
    };
    arith(inputs, |a, b| a % b, int)
}

/// `a` viewed with the broadcast `shape`.
fn view<'a, A>(a: &'a ArrayD<A>, shape: &[usize]) -> Result<ArrayViewD<'a, A>, InterpError> {
    a.broadcast(IxDyn(shape))
        .ok_or_else(|| InterpError::Broadcast {
            a: a.shape().to_vec(),
            b: shape.to_vec(),
        })
}

/// `values` as an array of `shape`.
fn collect<C>(shape: &[usize], values: Vec<C>) -> Result<ArrayD<C>, InterpError> {
    let n = values.len();
    ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|_| InterpError::Reshape {
        from: vec![n],
        to: shape.to_vec(),
    })
}

/// `f` applied to the elements of `a` and `b`, broadcast together.
pub fn zip_with<A: Clone, B: Clone, C>(
    a: &ArrayD<A>,
    b: &ArrayD<B>,
    f: impl Fn(A, B) -> C,
) -> Result<ArrayD<C>, InterpError> {
    let shape = broadcast_shape(a.shape(), b.shape())?;
    let (av, bv) = (view(a, &shape)?, view(b, &shape)?);
    let values: Vec<C> = av
        .iter()
        .zip(bv.iter())
        .map(|(x, y)| f(x.clone(), y.clone()))
        .collect();
    collect(&shape, values)
}

/// A binary arithmetic op: `float` for float inputs, `int` for integer inputs.
pub fn arith(
    inputs: &[Option<&Array>],
    float: fn(f64, f64) -> f64,
    int: fn(i64, i64) -> i64,
) -> Result<Vec<Array>, InterpError> {
    Ok(vec![binary(arg(inputs, 0)?, arg(inputs, 1)?, float, int)?])
}

fn binary(
    a: &Array,
    b: &Array,
    float: fn(f64, f64) -> f64,
    int: fn(i64, i64) -> i64,
) -> Result<Array, InterpError> {
    Ok(match (a, b) {
        (Array::F32(x), Array::F32(y)) => {
            Array::F32(zip_with(x, y, |p, q| float(p as f64, q as f64) as f32)?)
        }
        (Array::F64(x), Array::F64(y)) => Array::F64(zip_with(x, y, float)?),
        (Array::I64(x), Array::I64(y)) => Array::I64(zip_with(x, y, int)?),
        (Array::I32(x), Array::I32(y)) => {
            Array::I32(zip_with(x, y, |p, q| int(p as i64, q as i64) as i32)?)
        }
        _ => return Err(InterpError::operands(&[a, b])),
    })
}

/// `Pow`: a base and an exponent of one type, or a float base with an integer exponent.
pub fn pow(_: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let (base, exponent) = (arg(inputs, 0)?, arg(inputs, 1)?);
    let int_pow = |a: i64, b: i64| a.pow(b.clamp(0, u32::MAX as i64) as u32);
    let widened;
    let exponent = match (base, exponent) {
        (Array::F32(_) | Array::F64(_), Array::I64(_) | Array::I32(_)) => {
            widened = Array::F64(exponent.to_f64());
            &widened
        }
        _ => exponent,
    };
    Ok(vec![match (base, exponent) {
        (Array::F32(x), Array::F64(y)) => {
            Array::F32(zip_with(x, y, |p, q| (p as f64).powf(q) as f32)?)
        }
        _ => binary(base, exponent, f64::powf, int_pow)?,
    }])
}

/// A variadic op (`Max`, `Min`): `binary` folded over the inputs.
pub fn fold_variadic(
    inputs: &[Option<&Array>],
    float: fn(f64, f64) -> f64,
    int: fn(i64, i64) -> i64,
) -> Result<Vec<Array>, InterpError> {
    let mut acc = arg(inputs, 0)?.clone();
    for i in 1..inputs.len() {
        acc = binary(&acc, arg(inputs, i)?, float, int)?;
    }
    Ok(vec![acc])
}

/// A unary op on floats and integers.
pub fn unary(
    inputs: &[Option<&Array>],
    float: fn(f64) -> f64,
    int: fn(i64) -> i64,
) -> Result<Vec<Array>, InterpError> {
    Ok(vec![match arg(inputs, 0)? {
        Array::F32(x) => Array::F32(x.mapv(|v| float(v as f64) as f32)),
        Array::F64(x) => Array::F64(x.mapv(float)),
        Array::I64(x) => Array::I64(x.mapv(int)),
        Array::I32(x) => Array::I32(x.mapv(|v| int(v as i64) as i32)),
        other => return Err(InterpError::operands(&[other])),
    }])
}

/// A unary op on floats only, computed in f64.
pub fn float_unary(
    inputs: &[Option<&Array>],
    f: fn(f64) -> f64,
) -> Result<Vec<Array>, InterpError> {
    Ok(vec![match arg(inputs, 0)? {
        Array::F32(x) => Array::F32(x.mapv(|v| f(v as f64) as f32)),
        Array::F64(x) => Array::F64(x.mapv(f)),
        other => return Err(InterpError::dtype("float", other)),
    }])
}

/// A comparison: `test` of the ordering of each pair (false when unordered: NaN).
pub fn compare(
    inputs: &[Option<&Array>],
    test: fn(Ordering) -> bool,
) -> Result<Vec<Array>, InterpError> {
    let (a, b) = (arg(inputs, 0)?, arg(inputs, 1)?);
    let cmp = |x: f64, y: f64| x.partial_cmp(&y).is_some_and(test);
    Ok(vec![Array::Bool(match (a, b) {
        (Array::I64(x), Array::I64(y)) => zip_with(x, y, |p, q| test(p.cmp(&q)))?,
        (Array::I32(x), Array::I32(y)) => zip_with(x, y, |p, q| test(p.cmp(&q)))?,
        (Array::Bool(x), Array::Bool(y)) => zip_with(x, y, |p, q| test(p.cmp(&q)))?,
        (Array::F32(x), Array::F32(y)) => zip_with(x, y, |p, q| cmp(p as f64, q as f64))?,
        (Array::F64(x), Array::F64(y)) => zip_with(x, y, cmp)?,
        _ => return Err(InterpError::operands(&[a, b])),
    })])
}

/// A binary op on bools.
pub fn logic(
    inputs: &[Option<&Array>],
    f: fn(bool, bool) -> bool,
) -> Result<Vec<Array>, InterpError> {
    let (a, b) = (bools(arg(inputs, 0)?)?, bools(arg(inputs, 1)?)?);
    Ok(vec![Array::Bool(zip_with(&a, &b, f)?)])
}

/// `Where(cond, x, y)`.
pub fn where_(_: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let cond = bools(arg(inputs, 0)?)?;
    let (x, y) = (arg(inputs, 1)?, arg(inputs, 2)?);
    let shape = broadcast_shape(&broadcast_shape(cond.shape(), x.shape())?, y.shape())?;
    let c = view(&cond, &shape)?;
    macro_rules! pick {
        ($a:expr, $b:expr) => {{
            let (a, b) = (view($a, &shape)?, view($b, &shape)?);
            let v: Vec<_> = c
                .iter()
                .zip(a.iter().zip(b.iter()))
                .map(|(&c, (p, q))| if c { *p } else { *q })
                .collect();
            collect(&shape, v)?
        }};
    }
    Ok(vec![match (x, y) {
        (Array::F32(a), Array::F32(b)) => Array::F32(pick!(a, b)),
        (Array::F64(a), Array::F64(b)) => Array::F64(pick!(a, b)),
        (Array::F16(a), Array::F16(b)) => Array::F16(pick!(a, b)),
        (Array::BF16(a), Array::BF16(b)) => Array::BF16(pick!(a, b)),
        (Array::I64(a), Array::I64(b)) => Array::I64(pick!(a, b)),
        (Array::I32(a), Array::I32(b)) => Array::I32(pick!(a, b)),
        (Array::Bool(a), Array::Bool(b)) => Array::Bool(pick!(a, b)),
        _ => return Err(InterpError::operands(&[x, y])),
    }])
}
