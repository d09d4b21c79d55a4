//! Gradient rules for a pattern of several forward nodes, where the op-by-op rules
//! would keep more of the forward alive than the pattern's gradient needs.
//!
//! One pattern: the SwiGLU gate `silu(x)·u` = `Mul(Mul(x, Sigmoid(x)), u)` (Llama,
//! Qwen2, Phi-3, Mistral MLPs as exporters write them). Its gradient is lora-graft's
//! `SwiGluGrad(g, x, u)` (`runtime::swiglu`), which reads `x` and `u` only: `σ(x)` and
//! `silu(x)` are not kept for the backward. `portable` writes it back as default ops.
//!
//! One pattern: an RMS norm's core `x·r`, `r = 1/√(mean(x²) + ε)` over the last axis
//! (`Pow`, `ReduceMean`, `Add`, `Sqrt`, `Reciprocal`, `Mul`, as the dynamo exporter writes
//! Llama's norm). Its gradient with respect to `x`, through both factors, is lora-graft's
//! `RmsNormGrad(g, x, r)` (`runtime::rms_norm_grad`), one pass where the op-by-op rules
//! took six.
//!
//! One kernel for a single op: a float32 softmax over the last axis differentiates as
//! lora-graft's `SoftmaxGrad(g, y)` (`runtime::softmax_grad`), one pass in place of
//! four.

use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::{Def, Node, ValueId};
use crate::proto::tensor_proto::DataType;
use crate::runtime::nbits::DOMAIN;
use crate::runtime::rms_norm_grad::RMS_NORM_GRAD_OP;
use crate::runtime::softmax_grad::SOFTMAX_GRAD_OP;
use crate::runtime::swiglu::SWIGLU_GRAD_OP;

/// A SwiGLU gate found at a `Mul` node: `y = silu(x)·up`.
#[derive(Debug, Clone, Copy)]
pub(super) struct SwiGlu {
    /// The gate's input.
    pub x: ValueId,
    /// The other factor.
    pub up: ValueId,
    /// Which of the `Mul`'s inputs `up` is.
    pub up_slot: usize,
}

/// Whether `n` is a default-domain ONNX op.
fn default_domain(n: &Node) -> bool {
    matches!(n.domain(), "" | "ai.onnx")
}

/// The default-domain `op` node that computes `v`, if that is what computes it.
fn producer<'a>(e: &'a Builder, v: ValueId, op: &str) -> Option<&'a Node> {
    match e.graph.value(v).def {
        Def::Node(id, _) => Some(e.graph.node(id)).filter(|n| n.op() == op && default_domain(n)),
        _ => None,
    }
}

/// The SwiGLU gate `node` computes, when it is `Mul(Mul(x, Sigmoid(x)), up)` (operands
/// in either order) on float32 values of one static shape: the fused kernel's case.
pub(super) fn swiglu(e: &Builder, node: &Node) -> Option<SwiGlu> {
    if node.op() != "Mul" || !default_domain(node) || node.inputs.len() != 2 {
        return None;
    }
    let float = DataType::Float as i32;
    let same = |a: ValueId, b: ValueId| {
        e.dtypes.get(&a) == Some(&float)
            && e.dtypes.get(&b) == Some(&float)
            && e.shapes.contains_key(&a)
            && e.shapes.get(&a) == e.shapes.get(&b)
    };
    for up_slot in [1, 0] {
        let (silu, up) = (node.inputs[1 - up_slot]?, node.inputs[up_slot]?);
        let Some(m) = producer(e, silu, "Mul") else {
            continue;
        };
        let [Some(a), Some(b)] = m.inputs[..] else {
            continue;
        };
        for (x, sig) in [(a, b), (b, a)] {
            let is_sigmoid_of_x =
                producer(e, sig, "Sigmoid").is_some_and(|s| s.inputs.first() == Some(&Some(x)));
            if is_sigmoid_of_x && same(x, up) && same(x, silu) {
                return Some(SwiGlu { x, up, up_slot });
            }
        }
    }
    None
}

/// An RMS norm's core found at a `Mul` node: `y = x·r`, `r = 1/√(mean(x²) + ε)` over
/// `x`'s last axis.
#[derive(Debug, Clone, Copy)]
pub(super) struct RmsNorm {
    /// The norm's input.
    pub x: ValueId,
    /// `1/√(mean(x²) + ε)`, one per row.
    pub r: ValueId,
    /// Which of the `Mul`'s inputs `x` is.
    pub x_slot: usize,
}

/// The RMS norm `node` computes, when it is `Mul(x, Reciprocal(Sqrt(Add(ReduceMean(
/// Pow(x, 2) or Mul(x, x), last axis, keepdims), ε))))` (operands of `Mul` and `Add` in
/// either order, `ε` a constant) on float32 `x` of a static shape: the fused kernel's
/// case.
pub(super) fn rms_norm(e: &Builder, node: &Node) -> Option<RmsNorm> {
    if node.op() != "Mul" || !default_domain(node) || node.inputs.len() != 2 {
        return None;
    }
    let producer = |v: ValueId, op: &str| producer(e, v, op);
    let constant = |v: ValueId| crate::interp::evaluate(e.graph, v).ok();
    let float = DataType::Float as i32;
    let at_slot = |x_slot: usize| -> Option<RmsNorm> {
        let (x, r) = (node.inputs[x_slot]?, node.inputs[1 - x_slot]?);
        let shape = e.shapes.get(&x)?;
        let rank = shape.len();
        let mut row = shape.clone();
        *row.last_mut()? = 1;
        if e.dtypes.get(&x) != Some(&float) || e.shapes.get(&r) != Some(&row) {
            return None;
        }
        let sqrt = producer(producer(r, "Reciprocal")?.inputs[0]?, "Sqrt")?;
        let add = producer(sqrt.inputs[0]?, "Add")?;
        let [Some(a), Some(b)] = add.inputs[..] else {
            return None;
        };
        let (mean, eps) = match (producer(a, "ReduceMean"), producer(b, "ReduceMean")) {
            (Some(mean), None) => (mean, b),
            (None, Some(mean)) => (mean, a),
            _ => return None,
        };
        if constant(eps)?.to_f64().len() != 1
            || mean.attr_int("keepdims", 1) != 1
            || super::rules::reduce_axes(e, mean, rank).ok()? != [rank - 1]
        {
            return None;
        }
        let square = mean.inputs[0]?;
        let squares_x = match (producer(square, "Mul"), producer(square, "Pow")) {
            (Some(mul), _) => mul.inputs[..] == [Some(x), Some(x)],
            (_, Some(pow)) => match pow.inputs[..] {
                [Some(a), Some(p)] => {
                    a == x && constant(p).is_some_and(|p| p.to_f64().iter().eq([2.0].iter()))
                }
                _ => false,
            },
            _ => false,
        };
        squares_x.then_some(RmsNorm { x, r, x_slot })
    };
    at_slot(0).or_else(|| at_slot(1))
}

/// `dx` of the norm for the incoming gradient `g` of its `x·r`, as one `RmsNormGrad`
/// node; its attribute `shape` lets `portable` write the default ops back.
pub(super) fn rms_norm_grad(e: &mut Builder, norm: RmsNorm, g: ValueId) -> Result<ValueId> {
    let shape = e.shape(norm.x)?;
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let attrs = vec![crate::ir::build::ints_attr("shape", &dims)];
    Ok(kernel(
        e,
        RMS_NORM_GRAD_OP,
        &[g, norm.x, norm.r],
        attrs,
        vec![shape],
    )?[0])
}

/// `(dx, dup)` of the gate for the incoming gradient `g`, as one `SwiGluGrad` node.
pub(super) fn swiglu_grad(e: &mut Builder, gate: SwiGlu, g: ValueId) -> Result<(ValueId, ValueId)> {
    let shape = e.shapes.get(&gate.x).cloned().unwrap_or_default();
    let inputs = [g, gate.x, gate.up];
    let outs = kernel(
        e,
        SWIGLU_GRAD_OP,
        &inputs,
        vec![],
        vec![shape.clone(), shape],
    )?;
    Ok((outs[0], outs[1]))
}

/// `dx` of a float32 softmax over the last axis (`y` its output) for the incoming
/// gradient `g`, as one `SoftmaxGrad` node (`runtime::softmax_grad`); its attribute
/// `shape` lets `portable` write the default ops back.
pub(super) fn softmax_grad(e: &mut Builder, y: ValueId, g: ValueId) -> Result<ValueId> {
    let shape = e.shape(y)?;
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let attrs = vec![crate::ir::build::ints_attr("shape", &dims)];
    Ok(kernel(e, SOFTMAX_GRAD_OP, &[g, y], attrs, vec![shape])?[0])
}

/// A node of lora-graft's kernel `op` on `inputs` with `attrs`, with one float32 output
/// of each shape of `shapes`.
pub(super) fn kernel(
    e: &mut Builder,
    op: &str,
    inputs: &[ValueId],
    attrs: Vec<crate::proto::AttributeProto>,
    shapes: Vec<Vec<usize>>,
) -> Result<Vec<ValueId>> {
    let name = format!("{}/{op}", e.prefix);
    let (id, outs) = e.graph.add_op(op, &name, inputs, attrs, shapes.len())?;
    e.graph.node_mut(id).proto.domain = Some(DOMAIN.into());
    for (&o, shape) in outs.iter().zip(shapes) {
        e.shapes.insert(o, shape);
        e.dtypes.insert(o, DataType::Float as i32);
    }
    Ok(outs)
}
