//! Gradient rules for a pattern of several forward nodes, where the op-by-op rules
//! would keep more of the forward alive than the pattern's gradient needs.
//!
//! One pattern: the SwiGLU gate `silu(x)·u` = `Mul(Mul(x, Sigmoid(x)), u)` (Llama,
//! Qwen2, Phi-3, Mistral MLPs as exporters write them). Its gradient is lora-graft's
//! `SwiGluGrad(g, x, u)` (`runtime::swiglu`), which reads `x` and `u` only: `σ(x)` and
//! `silu(x)` are not kept for the backward. `portable` writes it back as default ops.
//!
//! One kernel for a single op: a float32 softmax over the last axis differentiates as
//! lora-graft's `SoftmaxGrad(g, y)` (`runtime::softmax_grad`), one pass in place of
//! four.

use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::{Def, Node, ValueId};
use crate::proto::tensor_proto::DataType;
use crate::runtime::nbits::DOMAIN;
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

/// The SwiGLU gate `node` computes, when it is `Mul(Mul(x, Sigmoid(x)), up)` (operands
/// in either order) on float32 values of one static shape: the fused kernel's case.
pub(super) fn swiglu(e: &Builder, node: &Node) -> Option<SwiGlu> {
    let default_domain = |n: &Node| matches!(n.domain(), "" | "ai.onnx");
    if node.op() != "Mul" || !default_domain(node) || node.inputs.len() != 2 {
        return None;
    }
    let producer = |v: ValueId| match e.graph.value(v).def {
        Def::Node(id, _) => Some(e.graph.node(id)),
        _ => None,
    };
    let float = DataType::Float as i32;
    let same = |a: ValueId, b: ValueId| {
        e.dtypes.get(&a) == Some(&float)
            && e.dtypes.get(&b) == Some(&float)
            && e.shapes.contains_key(&a)
            && e.shapes.get(&a) == e.shapes.get(&b)
    };
    for up_slot in [1, 0] {
        let (silu, up) = (node.inputs[1 - up_slot]?, node.inputs[up_slot]?);
        let Some(m) = producer(silu).filter(|m| m.op() == "Mul" && default_domain(m)) else {
            continue;
        };
        let [Some(a), Some(b)] = m.inputs[..] else {
            continue;
        };
        for (x, sig) in [(a, b), (b, a)] {
            let is_sigmoid_of_x = producer(sig).is_some_and(|s| {
                s.op() == "Sigmoid" && default_domain(s) && s.inputs.first() == Some(&Some(x))
            });
            if is_sigmoid_of_x && same(x, up) && same(x, silu) {
                return Some(SwiGlu { x, up, up_slot });
            }
        }
    }
    None
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
