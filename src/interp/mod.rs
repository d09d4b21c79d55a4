//! A small ONNX interpreter for the integer, boolean and light float ops of shape and
//! mask subgraphs, so the fold pass can compute them without tract (whose symbolic
//! dimensions refuse some of them), and passes can read a weight through its chain of
//! Transpose, Cast, DequantizeLinear, ... nodes.
//!
//! The ops are data: [`OPS`] maps each op name to its function, one line per op; it is
//! what [`supports`] and [`eval`] read, and what `tests/interp.rs` checks op by op
//! against tract.

mod common;
mod elementwise;
mod error;
mod movement;
mod values;

use std::cmp::Ordering;

use crate::ir::{Graph, Node, ValueId};
use crate::tensor::{Array, DecodeError};

pub use common::norm_axis;
use common::{arg, bools, scalar_i64};
use elementwise::{arith, compare, float_unary, fold_variadic, int_div, logic, unary};
pub use error::InterpError;

/// An op's evaluation: the node (for attributes) and its inputs (`None` = omitted).
pub type OpFn = fn(&Node, &[Option<&Array>]) -> Result<Vec<Array>, InterpError>;

/// The ops the interpreter knows, default domain only.
pub const OPS: &[(&str, OpFn)] = &[
    ("Identity", |_, i| Ok(vec![arg(i, 0)?.clone()])),
    ("Constant", values::constant),
    ("Cast", values::cast),
    ("Shape", |n, i| movement::shape_of(n, arg(i, 0)?.shape())),
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
    ("Mod", elementwise::modulo),
    // A NaN loses to a number, as in tract (numpy's maximum would propagate it).
    ("Max", |_, i| {
        fold_variadic(i, |a, b| a.max(b), |a, b| a.max(b))
    }),
    ("Min", |_, i| {
        fold_variadic(i, |a, b| a.min(b), |a, b| a.min(b))
    }),
    ("Pow", elementwise::pow),
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
    ("Equal", |_, i| compare(i, |o| o == Ordering::Equal)),
    ("Less", |_, i| compare(i, |o| o == Ordering::Less)),
    ("LessOrEqual", |_, i| compare(i, |o| o != Ordering::Greater)),
    ("Greater", |_, i| compare(i, |o| o == Ordering::Greater)),
    ("GreaterOrEqual", |_, i| compare(i, |o| o != Ordering::Less)),
    ("Not", |_, i| {
        Ok(vec![Array::Bool(bools(arg(i, 0)?)?.mapv(|v| !v))])
    }),
    ("And", |_, i| logic(i, |a, b| a & b)),
    ("Or", |_, i| logic(i, |a, b| a | b)),
    ("Xor", |_, i| logic(i, |a, b| a ^ b)),
    ("Where", elementwise::where_),
    ("Unsqueeze", movement::unsqueeze),
    ("Squeeze", movement::squeeze),
    ("Reshape", movement::reshape),
    ("Flatten", movement::flatten),
    ("Concat", movement::concat),
    ("Gather", movement::gather),
    ("Slice", movement::slice),
    ("Transpose", movement::transpose),
    ("Expand", movement::expand),
    ("ConstantOfShape", values::constant_of_shape),
    ("Range", values::range),
    ("CumSum", values::cumsum),
    ("Trilu", values::trilu),
    ("DequantizeLinear", values::dequantize_linear),
];

/// The names of the ops the interpreter knows, in table order.
pub fn ops() -> impl Iterator<Item = &'static str> {
    OPS.iter().map(|(op, _)| *op)
}

/// The rule for `op`, if any.
fn rule(op: &str) -> Option<OpFn> {
    OPS.iter().find(|(name, _)| *name == op).map(|(_, f)| *f)
}

/// `error` with the node it happened in.
fn at(node: &Node, error: InterpError) -> InterpError {
    InterpError::Node {
        node: node.name().to_string(),
        op: node.op().to_string(),
        source: Box::new(error),
    }
}

/// Whether the interpreter knows `node`'s op (default domain only).
pub fn supports(node: &Node) -> bool {
    matches!(node.domain(), "" | "ai.onnx") && rule(node.op()).is_some()
}

/// Evaluates `node` on `inputs`; an error (naming the node) says why it could not (the
/// caller decides whether that matters). The domain is not checked: that is
/// [`supports`]'s job.
pub fn eval(node: &Node, inputs: &[Option<&Array>]) -> Result<Vec<Array>, InterpError> {
    let f = rule(node.op()).ok_or_else(|| {
        at(
            node,
            InterpError::Unsupported {
                op: node.op().to_string(),
            },
        )
    })?;
    f(node, inputs).map_err(|e| at(node, e))
}

/// The output of a `Shape` or `Size` node whose input has the known `shape`.
pub fn eval_shape_op(node: &Node, shape: &[usize]) -> Result<Array, InterpError> {
    match node.op() {
        "Shape" => movement::shape_of(node, shape)
            .map(|mut v| v.remove(0))
            .map_err(|e| at(node, e)),
        "Size" => Ok(scalar_i64(shape.iter().product::<usize>() as i64)),
        op => Err(at(node, InterpError::NotAShapeOp { op: op.to_string() })),
    }
}

/// Numpy broadcasting of two shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, InterpError> {
    let n = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| {
        if i + s.len() >= n {
            s[i + s.len() - n]
        } else {
            1
        }
    };
    (0..n)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            _ => Err(InterpError::Broadcast {
                a: a.to_vec(),
                b: b.to_vec(),
            }),
        })
        .collect()
}

/// The value of `v`, computed from initializers alone (a weight through its chain of
/// Transpose, Cast, DequantizeLinear, ... nodes). Reads whole initializers: use it for
/// one weight at a time.
pub fn evaluate(graph: &Graph, v: ValueId) -> Result<Array, InterpError> {
    if let Some(init) = graph.initializer(v) {
        let name = || init.proto.name().to_string();
        return Array::from_proto(&init.proto, init.raw_bytes()).map_err(|e| match e {
            DecodeError::Unsupported(dtype) => InterpError::UnreadableTensor {
                name: name(),
                dtype,
            },
            DecodeError::Inconsistent(reason) => InterpError::Tensor {
                name: name(),
                reason,
            },
        });
    }
    let n = graph.producer(v).ok_or_else(|| InterpError::NotConstant {
        value: graph.value(v).name.clone(),
    })?;
    let node = graph.node(n);
    let inputs: Vec<Option<Array>> = node
        .inputs
        .iter()
        .map(|i| i.map(|i| evaluate(graph, i)).transpose())
        .collect::<Result<_, _>>()?;
    let refs: Vec<Option<&Array>> = inputs.iter().map(Option::as_ref).collect();
    let slot = node.outputs.iter().position(|o| *o == Some(v)).unwrap_or(0);
    let mut outs = eval(node, &refs)?;
    Ok(outs.swap_remove(slot))
}
