//! A small evaluator for the integer, boolean and light float ops of shape and mask
//! subgraphs, so the fold pass can compute them without tract (whose symbolic
//! dimensions refuse some of them). One table line per op.

use tract_core::ndarray::{ArrayD, Axis, IxDyn};

use crate::ir::Node;
use crate::tensor::Array;

/// An op's evaluation: the node (for attributes) and its inputs (`None` = omitted).
type OpFn = fn(&Node, &[Option<&Array>]) -> Result<Vec<Array>, String>;

/// The ops the evaluator knows, default domain only.
const OPS: &[(&str, OpFn)] = &[
    ("Identity", |_, i| Ok(vec![arg(i, 0)?.clone()])),
    ("Constant", constant),
    ("Cast", cast),
    ("Shape", |n, i| shape_of(n, arg(i, 0)?.shape())),
    ("Size", |_, i| Ok(vec![scalar_i64(arg(i, 0)?.len() as i64)])),
    ("Add", |_, i| {
        arith(i, |a, b| a + b, |a, b| a.wrapping_add(b))
    }),
    ("Sub", |_, i| {
        arith(i, |a, b| a - b, |a, b| a.wrapping_sub(b))
    }),
    ("Mul", |_, i| {
        arith(i, |a, b| a * b, |a, b| a.wrapping_mul(b))
    }),
    ("Div", |_, i| arith(i, |a, b| a / b, int_div)),
    ("Mod", |_, i| arith(i, |a, b| a % b, int_mod)),
    ("Max", |_, i| {
        fold_variadic(i, |a, b| a.max(b), |a, b| a.max(b))
    }),
    ("Min", |_, i| {
        fold_variadic(i, |a, b| a.min(b), |a, b| a.min(b))
    }),
    ("Pow", |_, i| {
        arith(i, f64::powf, |a, b| {
            a.pow(b.clamp(0, u32::MAX as i64) as u32)
        })
    }),
    ("Neg", |_, i| unary(i, |a| -a, |a| a.wrapping_neg())),
    ("Abs", |_, i| unary(i, f64::abs, i64::wrapping_abs)),
    ("Sqrt", |_, i| float_unary(i, f64::sqrt)),
    ("Reciprocal", |_, i| float_unary(i, |a| 1.0 / a)),
    ("Exp", |_, i| float_unary(i, f64::exp)),
    ("Log", |_, i| float_unary(i, f64::ln)),
    ("Cos", |_, i| float_unary(i, f64::cos)),
    ("Sin", |_, i| float_unary(i, f64::sin)),
    ("Floor", |_, i| float_unary(i, f64::floor)),
    ("Ceil", |_, i| float_unary(i, f64::ceil)),
    ("Equal", |_, i| {
        compare(i, |o| o == std::cmp::Ordering::Equal)
    }),
    ("Less", |_, i| compare(i, |o| o == std::cmp::Ordering::Less)),
    ("LessOrEqual", |_, i| {
        compare(i, |o| o != std::cmp::Ordering::Greater)
    }),
    ("Greater", |_, i| {
        compare(i, |o| o == std::cmp::Ordering::Greater)
    }),
    ("GreaterOrEqual", |_, i| {
        compare(i, |o| o != std::cmp::Ordering::Less)
    }),
    ("Not", |_, i| {
        Ok(vec![Array::Bool(bools(arg(i, 0)?)?.mapv(|v| !v))])
    }),
    ("And", |_, i| logic(i, |a, b| a & b)),
    ("Or", |_, i| logic(i, |a, b| a | b)),
    ("Xor", |_, i| logic(i, |a, b| a ^ b)),
    ("Where", where_),
    ("Unsqueeze", unsqueeze),
    ("Squeeze", squeeze),
    ("Reshape", reshape),
    ("Flatten", flatten),
    ("Concat", concat),
    ("Gather", gather),
    ("Slice", slice),
    ("Transpose", transpose),
    ("Expand", expand),
    ("ConstantOfShape", constant_of_shape),
    ("Range", range),
    ("CumSum", cumsum),
    ("Trilu", trilu),
    ("DequantizeLinear", dequantize_linear),
];

/// Whether the evaluator knows `node`'s op.
pub fn supports(node: &Node) -> bool {
    matches!(node.domain(), "" | "ai.onnx") && OPS.iter().any(|(op, _)| *op == node.op())
}

/// Evaluates `node` on `inputs`; an error says why it could not (the caller decides
/// whether that matters).
pub fn eval(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let (_, f) = OPS
        .iter()
        .find(|(op, _)| *op == node.op())
        .ok_or_else(|| format!("the evaluator has no rule for {}", node.op()))?;
    f(node, inputs)
}

fn arg<'a>(inputs: &[Option<&'a Array>], i: usize) -> Result<&'a Array, String> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| format!("input {i} is missing"))
}

fn scalar_i64(v: i64) -> Array {
    Array::I64(ArrayD::from_elem(IxDyn(&[]), v))
}

fn ints(a: &Array) -> Result<Vec<i64>, String> {
    match a {
        Array::I64(x) => Ok(x.iter().copied().collect()),
        Array::I32(x) => Ok(x.iter().map(|&v| v as i64).collect()),
        other => Err(format!(
            "expected integers, got {}",
            crate::dtype::name(other.elem_type())
        )),
    }
}

fn bools(a: &Array) -> Result<ArrayD<bool>, String> {
    match a {
        Array::Bool(x) => Ok(x.clone()),
        other => Err(format!(
            "expected bool, got {}",
            crate::dtype::name(other.elem_type())
        )),
    }
}

fn int_div(a: i64, b: i64) -> i64 {
    if b == 0 {
        0
    } else {
        a.wrapping_div(b)
    }
}

fn int_mod(a: i64, b: i64) -> i64 {
    if b == 0 {
        0
    } else {
        a.wrapping_rem(b)
    }
}

/// Numpy broadcasting of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n {
                a[i + a.len() - n]
            } else {
                1
            };
            let db = if i + b.len() >= n {
                b[i + b.len() - n]
            } else {
                1
            };
            match (da, db) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
            }
        })
        .collect()
}

fn zip_with<A: Clone, B: Clone, C>(
    a: &ArrayD<A>,
    b: &ArrayD<B>,
    f: impl Fn(A, B) -> C,
) -> Result<ArrayD<C>, String> {
    let shape = broadcast_shape(a.shape(), b.shape())?;
    let av = a.broadcast(IxDyn(&shape)).ok_or("broadcast")?;
    let bv = b.broadcast(IxDyn(&shape)).ok_or("broadcast")?;
    let values: Vec<C> = av
        .iter()
        .zip(bv.iter())
        .map(|(x, y)| f(x.clone(), y.clone()))
        .collect();
    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| e.to_string())
}

fn arith(
    inputs: &[Option<&Array>],
    float: fn(f64, f64) -> f64,
    int: fn(i64, i64) -> i64,
) -> Result<Vec<Array>, String> {
    Ok(vec![binary(arg(inputs, 0)?, arg(inputs, 1)?, float, int)?])
}

fn binary(
    a: &Array,
    b: &Array,
    float: fn(f64, f64) -> f64,
    int: fn(i64, i64) -> i64,
) -> Result<Array, String> {
    Ok(match (a, b) {
        (Array::F32(x), Array::F32(y)) => {
            Array::F32(zip_with(x, y, |p, q| float(p as f64, q as f64) as f32)?)
        }
        (Array::F64(x), Array::F64(y)) => Array::F64(zip_with(x, y, float)?),
        (Array::I64(x), Array::I64(y)) => Array::I64(zip_with(x, y, int)?),
        (Array::I32(x), Array::I32(y)) => {
            Array::I32(zip_with(x, y, |p, q| int(p as i64, q as i64) as i32)?)
        }
        // Pow may mix a float base with an integer exponent.
        (Array::F32(x), Array::I64(y)) => {
            Array::F32(zip_with(x, y, |p, q| float(p as f64, q as f64) as f32)?)
        }
        _ => return Err("unsupported operand types".into()),
    })
}

fn fold_variadic(
    inputs: &[Option<&Array>],
    float: fn(f64, f64) -> f64,
    int: fn(i64, i64) -> i64,
) -> Result<Vec<Array>, String> {
    let mut acc = arg(inputs, 0)?.clone();
    for i in 1..inputs.len() {
        acc = binary(&acc, arg(inputs, i)?, float, int)?;
    }
    Ok(vec![acc])
}

fn unary(
    inputs: &[Option<&Array>],
    float: fn(f64) -> f64,
    int: fn(i64) -> i64,
) -> Result<Vec<Array>, String> {
    Ok(vec![match arg(inputs, 0)? {
        Array::F32(x) => Array::F32(x.mapv(|v| float(v as f64) as f32)),
        Array::F64(x) => Array::F64(x.mapv(float)),
        Array::I64(x) => Array::I64(x.mapv(int)),
        Array::I32(x) => Array::I32(x.mapv(|v| int(v as i64) as i32)),
        _ => return Err("unsupported operand type".into()),
    }])
}

fn float_unary(inputs: &[Option<&Array>], f: fn(f64) -> f64) -> Result<Vec<Array>, String> {
    Ok(vec![match arg(inputs, 0)? {
        Array::F32(x) => Array::F32(x.mapv(|v| f(v as f64) as f32)),
        Array::F64(x) => Array::F64(x.mapv(f)),
        _ => return Err("expected a float input".into()),
    }])
}

fn compare(
    inputs: &[Option<&Array>],
    test: fn(std::cmp::Ordering) -> bool,
) -> Result<Vec<Array>, String> {
    let (a, b) = (arg(inputs, 0)?, arg(inputs, 1)?);
    let cmp = |x: f64, y: f64| x.partial_cmp(&y).is_some_and(test);
    Ok(vec![Array::Bool(match (a, b) {
        (Array::I64(x), Array::I64(y)) => zip_with(x, y, |p, q| test(p.cmp(&q)))?,
        (Array::I32(x), Array::I32(y)) => zip_with(x, y, |p, q| test(p.cmp(&q)))?,
        (Array::Bool(x), Array::Bool(y)) => zip_with(x, y, |p, q| test(p.cmp(&q)))?,
        (Array::F32(x), Array::F32(y)) => zip_with(x, y, |p, q| cmp(p as f64, q as f64))?,
        (Array::F64(x), Array::F64(y)) => zip_with(x, y, cmp)?,
        _ => return Err("unsupported operand types".into()),
    })])
}

fn logic(inputs: &[Option<&Array>], f: fn(bool, bool) -> bool) -> Result<Vec<Array>, String> {
    let (a, b) = (bools(arg(inputs, 0)?)?, bools(arg(inputs, 1)?)?);
    Ok(vec![Array::Bool(zip_with(&a, &b, f)?)])
}

/// Maps each variant's inner array to the same variant.
macro_rules! same_variant {
    ($value:expr, $a:ident => $body:expr) => {
        match $value {
            Array::F32($a) => Array::F32($body),
            Array::F64($a) => Array::F64($body),
            Array::F16($a) => Array::F16($body),
            Array::BF16($a) => Array::BF16($body),
            Array::I64($a) => Array::I64($body),
            Array::I32($a) => Array::I32($body),
            Array::I8($a) => Array::I8($body),
            Array::U8($a) => Array::U8($body),
            Array::Bool($a) => Array::Bool($body),
        }
    };
}

fn where_(_: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let cond = bools(arg(inputs, 0)?)?;
    let (x, y) = (arg(inputs, 1)?, arg(inputs, 2)?);
    let shape = broadcast_shape(&broadcast_shape(cond.shape(), x.shape())?, y.shape())?;
    let c = cond.broadcast(IxDyn(&shape)).ok_or("broadcast")?.to_owned();
    macro_rules! pick {
        ($a:expr, $b:expr) => {{
            let a = $a.broadcast(IxDyn(&shape)).ok_or("broadcast")?;
            let b = $b.broadcast(IxDyn(&shape)).ok_or("broadcast")?;
            let v: Vec<_> = c
                .iter()
                .zip(a.iter().zip(b.iter()))
                .map(|(&c, (p, q))| if c { *p } else { *q })
                .collect();
            ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| e.to_string())?
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
        _ => return Err("Where branches differ in type".into()),
    }])
}

fn constant(node: &Node, _: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let a = node
        .proto
        .attribute
        .first()
        .ok_or("Constant without a value")?;
    let value = match a.name() {
        "value" => Array::from_proto(a.t.as_ref().ok_or("no tensor")?, None)
            .map_err(|e| format!("{e:?}"))?,
        "value_int" => scalar_i64(a.i()),
        "value_ints" => {
            Array::I64(ArrayD::from_shape_vec(IxDyn(&[a.ints.len()]), a.ints.clone()).unwrap())
        }
        "value_float" => Array::F32(ArrayD::from_elem(IxDyn(&[]), a.f())),
        "value_floats" => {
            Array::F32(ArrayD::from_shape_vec(IxDyn(&[a.floats.len()]), a.floats.clone()).unwrap())
        }
        other => return Err(format!("Constant attribute '{other}' is not supported")),
    };
    Ok(vec![value])
}

fn cast(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    use crate::proto::tensor_proto::DataType as D;
    let x = arg(inputs, 0)?;
    let to = D::try_from(node.attr_int("to", 0) as i32).map_err(|_| "bad 'to'")?;
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
        D::Float => Array::F32(f.mapv(|v| v as f32)),
        D::Double => Array::F64(f),
        D::Float16 => Array::F16(f.mapv(half::f16::from_f64)),
        D::Bfloat16 => Array::BF16(f.mapv(half::bf16::from_f64)),
        D::Int64 => Array::I64(ints()),
        D::Int32 => Array::I32(ints().mapv(|v| v as i32)),
        D::Int8 => Array::I8(ints().mapv(|v| v as i8)),
        D::Uint8 => Array::U8(ints().mapv(|v| v as u8)),
        D::Bool => Array::Bool(f.mapv(|v| v != 0.0)),
        other => return Err(format!("Cast to {other:?} is not supported")),
    }])
}

fn shape_of(node: &Node, shape: &[usize]) -> Result<Vec<Array>, String> {
    let rank = shape.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
    let start = clamp(node.attr_int("start", 0));
    let end = clamp(node.attr_int("end", rank));
    let dims: Vec<i64> = shape[start..end.max(start)]
        .iter()
        .map(|&d| d as i64)
        .collect();
    Ok(vec![Array::I64(
        ArrayD::from_shape_vec(IxDyn(&[dims.len()]), dims).unwrap(),
    )])
}

/// The output of a `Shape` or `Size` node whose input has the known `shape`.
pub fn eval_shape_op(node: &Node, shape: &[usize]) -> Result<Array, String> {
    match node.op() {
        "Shape" => shape_of(node, shape).map(|mut v| v.remove(0)),
        "Size" => Ok(scalar_i64(shape.iter().product::<usize>() as i64)),
        op => Err(format!("{op} is not a shape op")),
    }
}

fn axes_of(node: &Node, inputs: &[Option<&Array>], slot: usize) -> Result<Vec<i64>, String> {
    match inputs.get(slot).copied().flatten() {
        Some(a) => ints(a),
        None => Ok(node
            .attr_ints("axes")
            .map(<[i64]>::to_vec)
            .unwrap_or_default()),
    }
}

fn norm_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank.max(1) && rank > 0 {
        return Err(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(a as usize)
}

fn reshaped(x: &Array, shape: &[usize]) -> Result<Array, String> {
    Ok(same_variant!(x, a => a.to_shape(IxDyn(shape)).map_err(|e| e.to_string())?.to_owned()))
}

fn unsqueeze(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
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

fn squeeze(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
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

fn reshape(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
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
            0 if !allow_zero => shape.push(*x.shape().get(i).ok_or("0 past the input rank")?),
            d if d >= 0 => shape.push(d as usize),
            _ => return Err(format!("bad reshape dim {d}")),
        }
    }
    if let Some(i) = infer {
        let known: usize = shape.iter().product();
        if known == 0 || x.len() % known != 0 {
            return Err("cannot infer the -1 dim".into());
        }
        shape[i] = x.len() / known;
    }
    Ok(vec![reshaped(x, &shape)?])
}

fn flatten(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let x = arg(inputs, 0)?;
    let rank = x.shape().len();
    let axis = node.attr_int("axis", 1);
    let axis = if axis < 0 { axis + rank as i64 } else { axis } as usize;
    let outer: usize = x.shape()[..axis.min(rank)].iter().product();
    Ok(vec![reshaped(x, &[outer, x.len() / outer.max(1)])?])
}

fn concat(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let rank = arg(inputs, 0)?.shape().len();
    let axis = norm_axis(node.attr_int("axis", 0), rank)?;
    let parts = (0..inputs.len())
        .map(|i| arg(inputs, i))
        .collect::<Result<Vec<_>, _>>()?;
    let joined = Array::concat(&parts, axis)
        .ok_or_else(|| "Concat inputs differ in type or shape".to_string())?;
    Ok(vec![joined])
}

fn gather(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
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
                Err(format!("index {i} out of range for dim {dim}"))
            }
        })
        .collect::<Result<_, _>>()?;
    let mut shape = x.shape()[..axis].to_vec();
    shape.extend_from_slice(idx_arr.shape());
    shape.extend_from_slice(&x.shape()[axis + 1..]);
    let picked = same_variant!(x, a => a.select(Axis(axis), &idx));
    Ok(vec![reshaped(&picked, &shape)?])
}

fn slice(_: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
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
    let mut out = x.clone();
    for (k, &axis) in axes.iter().enumerate() {
        let axis = norm_axis(axis, rank)?;
        let dim = x.shape()[axis] as i64;
        let step = steps[k];
        if step == 0 {
            return Err("Slice step 0".into());
        }
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
        out = same_variant!(&out, a => a.select(Axis(axis), &idx));
    }
    Ok(vec![out])
}

fn transpose(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let x = arg(inputs, 0)?;
    let rank = x.shape().len();
    let perm: Vec<usize> = match node.attr_ints("perm") {
        Some(p) => p
            .iter()
            .map(|&a| norm_axis(a, rank))
            .collect::<Result<_, _>>()?,
        None => (0..rank).rev().collect(),
    };
    Ok(vec![
        same_variant!(x, a => a.clone().permuted_axes(IxDyn(&perm)).as_standard_layout().to_owned()),
    ])
}

fn expand(_: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let x = arg(inputs, 0)?;
    let target: Vec<usize> = ints(arg(inputs, 1)?)?
        .iter()
        .map(|&d| d.max(0) as usize)
        .collect();
    let shape = broadcast_shape(x.shape(), &target)?;
    Ok(vec![
        same_variant!(x, a => a.broadcast(IxDyn(&shape)).ok_or("broadcast")?.to_owned()),
    ])
}

fn constant_of_shape(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let shape: Vec<usize> = ints(arg(inputs, 0)?)?
        .iter()
        .map(|&d| d.max(0) as usize)
        .collect();
    let value = match node.attr("value").and_then(|a| a.t.as_ref()) {
        Some(t) => Array::from_proto(t, None).map_err(|e| format!("{e:?}"))?,
        None => Array::F32(ArrayD::zeros(IxDyn(&[1]))),
    };
    Ok(vec![same_variant!(&value, a => {
        let v = a.iter().next().cloned().ok_or("empty value")?;
        ArrayD::from_elem(IxDyn(&shape), v)
    })])
}

fn range(_: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let (s, l, d) = (arg(inputs, 0)?, arg(inputs, 1)?, arg(inputs, 2)?);
    let count =
        |start: f64, limit: f64, delta: f64| ((limit - start) / delta).ceil().max(0.0) as usize;
    Ok(vec![match (s, l, d) {
        (Array::I64(_), _, _) | (Array::I32(_), _, _) => {
            let (a, b, c) = (ints(s)?[0], ints(l)?[0], ints(d)?[0]);
            if c == 0 {
                return Err("Range delta 0".into());
            }
            let n = count(a as f64, b as f64, c as f64);
            let v: Vec<i64> = (0..n as i64).map(|i| a + i * c).collect();
            let arr = ArrayD::from_shape_vec(IxDyn(&[n]), v).unwrap();
            if matches!(s, Array::I32(_)) {
                Array::I32(arr.mapv(|v| v as i32))
            } else {
                Array::I64(arr)
            }
        }
        _ => {
            let (a, b, c) = (s.to_f64()[[]], l.to_f64()[[]], d.to_f64()[[]]);
            let n = count(a, b, c);
            let v: Vec<f64> = (0..n).map(|i| a + i as f64 * c).collect();
            let arr = ArrayD::from_shape_vec(IxDyn(&[n]), v).unwrap();
            match s {
                Array::F32(_) => Array::F32(arr.mapv(|v| v as f32)),
                _ => Array::F64(arr),
            }
        }
    }])
}

fn cumsum(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let x = arg(inputs, 0)?;
    let axis = norm_axis(ints(arg(inputs, 1)?)?[0], x.shape().len())?;
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
        _ => return Err("CumSum of an unsupported type".into()),
    }])
}

fn trilu(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let x = arg(inputs, 0)?;
    let k = match inputs.get(1).copied().flatten() {
        Some(a) => ints(a)?[0],
        None => 0,
    };
    let upper = node.attr_int("upper", 1) != 0;
    let rank = x.shape().len();
    if rank < 2 {
        return Err("Trilu needs rank >= 2".into());
    }
    let keep = |i: usize, j: usize| {
        let d = j as i64 - i as i64;
        if upper {
            d >= k
        } else {
            d <= k
        }
    };
    Ok(vec![same_variant!(x, a => {
        let mut out = a.clone();
        for (idx, v) in out.indexed_iter_mut() {
            if !keep(idx[rank - 2], idx[rank - 1]) {
                *v = Default::default();
            }
        }
        out
    })])
}

/// The value of `v`, computed from initializers alone (a weight through its chain of
/// Transpose, Cast, DequantizeLinear, ... nodes). Reads whole initializers: use it for
/// one weight at a time.
pub fn evaluate(graph: &crate::ir::Graph, v: crate::ir::ValueId) -> Result<Array, String> {
    if let Some(init) = graph.initializer(v) {
        return Array::from_proto(&init.proto, init.raw_bytes()).map_err(|e| match e {
            crate::tensor::DecodeError::Unsupported(t) => {
                format!("tensor '{}' of type {t} cannot be read", init.proto.name())
            }
            crate::tensor::DecodeError::Inconsistent(r) => {
                format!("tensor '{}': {r}", init.proto.name())
            }
        });
    }
    let n = graph.producer(v).ok_or_else(|| {
        format!(
            "'{}' is not computed from initializers",
            graph.value(v).name
        )
    })?;
    let node = graph.node(n);
    let inputs: Vec<Option<Array>> = node
        .inputs
        .iter()
        .map(|i| i.map(|i| evaluate(graph, i)).transpose())
        .collect::<Result<_, _>>()?;
    let refs: Vec<Option<&Array>> = inputs.iter().map(Option::as_ref).collect();
    let slot = node.outputs.iter().position(|o| *o == Some(v)).unwrap_or(0);
    let mut outs =
        eval(node, &refs).map_err(|e| format!("node '{}' ({}): {e}", node.name(), node.op()))?;
    Ok(outs.swap_remove(slot))
}

/// `(x - zero_point) * scale`, per tensor or along `axis` (no block quantization).
fn dequantize_linear(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, String> {
    let x = arg(inputs, 0)?;
    let scale = arg(inputs, 1)?;
    let rank = x.shape().len();
    let xf = x.to_f64();
    let sf = scale.to_f64();
    let zf = match inputs.get(2).copied().flatten() {
        Some(z) => z.to_f64(),
        None => ArrayD::zeros(sf.raw_dim()),
    };
    let (sf, zf) = if sf.ndim() == 1 && rank > 0 {
        let axis = norm_axis(node.attr_int("axis", 1), rank)?;
        let mut shape = vec![1; rank];
        shape[axis] = sf.len();
        (
            sf.into_shape_with_order(IxDyn(&shape))
                .map_err(|e| e.to_string())?,
            zf.into_shape_with_order(IxDyn(&shape))
                .map_err(|e| e.to_string())?,
        )
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
