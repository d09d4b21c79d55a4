//! The training graph for other runtimes: lora-graft's own kernels become default-domain
//! ops, so the graph holds those and the model's own again.
//! - `MatMulNBitsInputGrad` (the input gradient of `MatMulNBits` on the packed weight,
//!   which tract runs through `runtime::nbits`) becomes `MatMul(dY, W)` on the weight
//!   dequantized into a float initializer;
//! - `SwiGluGrad(g, x, u)` (`runtime::swiglu`) becomes its formula in elementwise ops;
//! - `SoftmaxGrad(g, y)` (`runtime::softmax_grad`) becomes the softmax's op-by-op
//!   gradient (`rules::softmax_grad`);
//! - `RmsNormGrad(g, x, r)` (`runtime::rms_norm_grad`) becomes its formula,
//!   `r·g − x·r³·Σ(g·x)/N`, in elementwise ops and a `ReduceSum`;
//! - `SoftmaxCrossEntropyGrad` (`runtime::cross_entropy`) becomes the loss's
//!   default-op form (`loss::log_softmax_at`).

use crate::error::{Error, Result};
use crate::ir::build::Builder;
use crate::ir::{Graph, Initializer, Node, NodeId, ValueId};
use crate::runtime::cross_entropy::CROSS_ENTROPY_GRAD_OP;
use crate::runtime::nbits::{DOMAIN, INPUT_GRAD_OP};
use crate::runtime::rms_norm_grad::RMS_NORM_GRAD_OP;
use crate::runtime::softmax_grad::SOFTMAX_GRAD_OP;
use crate::runtime::swiglu::SWIGLU_GRAD_OP;
use crate::tensor::Array;

/// How many of lora-graft's nodes [`portable`] rewrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewritten {
    /// `MatMulNBitsInputGrad`s, now float `MatMul`s.
    pub packed_gradients: usize,
    /// `SwiGluGrad`s, now elementwise ops.
    pub swiglu_gradients: usize,
    /// `SoftmaxGrad`s, now elementwise ops and a `ReduceSum`.
    pub softmax_gradients: usize,
    /// `RmsNormGrad`s, now elementwise ops and a `ReduceSum`.
    pub rms_norm_gradients: usize,
    /// `SoftmaxCrossEntropyGrad`s, now the loss's default ops.
    pub cross_entropies: usize,
}

/// Rewrites every lora-graft kernel of `graph` (a model of default-domain `opset`) as
/// default-domain ops (see the module).
pub fn portable(graph: &mut Graph, opset: i64) -> Result<Rewritten> {
    Ok(Rewritten {
        packed_gradients: packed_gradients(graph)?,
        swiglu_gradients: swiglu_gradients(graph)?,
        softmax_gradients: softmax_gradients(graph, opset)?,
        rms_norm_gradients: rms_norm_gradients(graph, opset)?,
        cross_entropies: cross_entropies(graph, opset)?,
    })
}

/// Every `SoftmaxCrossEntropyGrad(x, t, w)` as `loss::log_softmax_at`; returns how many.
fn cross_entropies(graph: &mut Graph, opset: i64) -> Result<usize> {
    let op = CROSS_ENTROPY_GRAD_OP;
    rewrite_each(graph, opset, op, "logits_shape", |e, node, shape| {
        let [Some(x), Some(t), Some(w)] = node.inputs[..] else {
            return Err(node_error(node, op, "needs its three inputs"));
        };
        let mut column = shape.clone();
        *column.last_mut().expect("non-empty") = 1;
        e.shapes.insert(x, shape);
        e.shapes.insert(t, column.clone());
        e.shapes.insert(w, column);
        let (log_p, dx) = super::loss::log_softmax_at(e, x, t, w)?;
        Ok(vec![log_p, dx])
    })
}

/// Every `SoftmaxGrad(g, y)` as `rules::softmax_grad` over the last axis; returns how
/// many.
fn softmax_gradients(graph: &mut Graph, opset: i64) -> Result<usize> {
    let op = SOFTMAX_GRAD_OP;
    rewrite_each(graph, opset, op, "shape", |e, node, shape| {
        let [Some(g), Some(y)] = node.inputs[..] else {
            return Err(node_error(node, op, "needs its two inputs"));
        };
        let last = shape.len() - 1;
        e.shapes.insert(g, shape.clone());
        e.shapes.insert(y, shape);
        Ok(vec![super::rules::softmax_grad(e, y, g, &[last])?])
    })
}

/// Every `RmsNormGrad(g, x, r)` as `r·g − x·(r³·Σ(g·x)/N)` over the last axis; returns
/// how many.
fn rms_norm_gradients(graph: &mut Graph, opset: i64) -> Result<usize> {
    let op = RMS_NORM_GRAD_OP;
    rewrite_each(graph, opset, op, "shape", |e, node, shape| {
        let [Some(g), Some(x), Some(r)] = node.inputs[..] else {
            return Err(node_error(node, op, "needs its three inputs"));
        };
        let last = shape.len() - 1;
        let mut row = shape.clone();
        row[last] = 1;
        let inv_n = 1.0 / shape[last] as f64;
        e.shapes.insert(g, shape.clone());
        e.shapes.insert(x, shape);
        e.shapes.insert(r, row);
        let gx = e.bin("Mul", g, x)?;
        let sum = e.reduce_sum(gx, &[last], true)?;
        let r2 = e.bin("Mul", r, r)?;
        let r3 = e.bin("Mul", r2, r)?;
        let c = e.bin("Mul", sum, r3)?;
        let inv_n = e.scalar("c", inv_n);
        let c = e.bin("Mul", c, inv_n)?;
        let along_x = e.bin("Mul", x, c)?;
        let along_g = e.bin("Mul", g, r)?;
        Ok(vec![e.bin("Sub", along_g, along_x)?])
    })
}

/// Rewrites every node of lora-graft's float32 kernel `op` in default ops:
/// `rewrite(builder, node, shape)` (the shape from the node's ints attribute
/// `shape_attr`) builds them and returns the values that replace the node's outputs, in
/// order. Returns how many nodes it rewrote.
fn rewrite_each(
    graph: &mut Graph,
    opset: i64,
    op: &str,
    shape_attr: &str,
    rewrite: impl Fn(&mut Builder, &Node, Vec<usize>) -> Result<Vec<ValueId>>,
) -> Result<usize> {
    let found = own_nodes(graph, op);
    for &id in &found {
        let node = graph.node(id).clone();
        let shape: Vec<usize> = node
            .attr(shape_attr)
            .map(|a| a.ints.iter().map(|&d| d as usize).collect())
            .filter(|s: &Vec<usize>| !s.is_empty())
            .ok_or_else(|| node_error(&node, op, &format!("no {shape_attr}")))?;
        graph.remove_node(id);
        let float = crate::proto::tensor_proto::DataType::Float as i32;
        let mut e = Builder::new(graph, opset, float, node.name().into(), '/');
        let new = rewrite(&mut e, &node, shape)?;
        if new.len() != node.outputs.len() {
            return Err(node_error(&node, op, "has an unexpected number of outputs"));
        }
        for (old, new) in node.outputs.iter().zip(new) {
            if let Some(old) = old {
                graph.replace_uses(*old, new, &[]);
            }
        }
    }
    Ok(found.len())
}

/// The error for `node` of lora-graft's `op`.
fn node_error(node: &Node, op: &str, reason: &str) -> Error {
    Error::Node {
        node: node.name().to_string(),
        op: op.into(),
        reason: reason.into(),
    }
}

/// The nodes of lora-graft's `op`.
fn own_nodes(graph: &Graph, op: &str) -> Vec<NodeId> {
    graph
        .node_ids()
        .filter(|&id| {
            let n = graph.node(id);
            n.domain() == DOMAIN && n.op() == op
        })
        .collect()
}

/// Every `SwiGluGrad(g, x, u)` as `s = σ(x)`, `du = g·(x·s)`,
/// `dx = (g·u)·s·(1 + x·(1 − s))`; returns how many.
fn swiglu_gradients(graph: &mut Graph) -> Result<usize> {
    let found = own_nodes(graph, SWIGLU_GRAD_OP);
    for &id in &found {
        let node = graph.node(id).clone();
        let [Some(g), Some(x), Some(u)] = node.inputs[..] else {
            return Err(Error::Node {
                node: node.name().to_string(),
                op: SWIGLU_GRAD_OP.into(),
                reason: "needs its three inputs".into(),
            });
        };
        graph.remove_node(id);
        let one = crate::tensor::Array::from_f32(
            tract_core::ndarray::ArrayD::from_elem(tract_core::ndarray::IxDyn(&[]), 1.0),
            crate::proto::tensor_proto::DataType::Float as i32,
        )
        .expect("float32");
        let one_name = graph.fresh_name(&format!("{}.one", node.name()));
        let one = graph.add_initializer(&one_name, Initializer::from_array(&one)?);
        let mut op = |op: &str, inputs: &[ValueId], out: Option<ValueId>| -> Result<ValueId> {
            let name = format!("{}/{op}", node.name());
            match out {
                None => Ok(graph.add_op(op, &name, inputs, vec![], 1)?.1[0]),
                Some(out) => {
                    let proto = crate::proto::NodeProto {
                        name: Some(graph.fresh_node_name(&name)),
                        op_type: Some(op.into()),
                        ..Default::default()
                    };
                    graph.add_node(
                        proto,
                        inputs.iter().map(|&v| Some(v)).collect(),
                        vec![Some(out)],
                    )?;
                    Ok(out)
                }
            }
        };
        let s = op("Sigmoid", &[x], None)?;
        let xs = op("Mul", &[x, s], None)?;
        if let Some(du) = node.outputs.get(1).copied().flatten() {
            op("Mul", &[g, xs], Some(du))?;
        }
        if let Some(dx) = node.outputs.first().copied().flatten() {
            let rest = op("Sub", &[one, s], None)?;
            let x_rest = op("Mul", &[x, rest], None)?;
            let factor = op("Add", &[one, x_rest], None)?;
            let gu = op("Mul", &[g, u], None)?;
            let gus = op("Mul", &[gu, s], None)?;
            op("Mul", &[gus, factor], Some(dx))?;
        }
    }
    Ok(found.len())
}

/// Every `MatMulNBitsInputGrad` as a float `MatMul`; returns how many. The dequantized
/// weight takes the gradient's element type.
fn packed_gradients(graph: &mut Graph) -> Result<usize> {
    let found = own_nodes(graph, INPUT_GRAD_OP);
    if found.is_empty() {
        return Ok(0);
    }
    let dtypes = crate::ir::infer::value_dtypes(graph)?;
    for &id in &found {
        let node = graph.node(id).clone();
        let fail = |reason: String| Error::Node {
            node: node.name().to_string(),
            op: INPUT_GRAD_OP.into(),
            reason,
        };
        let gradient = node.inputs[0].ok_or_else(|| fail("no gradient input".into()))?;
        // [N, K]: `dY [.., N] · W` is a plain MatMul.
        let weight = crate::quant::dequantize_nbits(graph, &node).map_err(fail)?;
        let dtype = dtypes
            .get(&gradient)
            .copied()
            .unwrap_or(crate::proto::tensor_proto::DataType::Float as i32);
        let weight = Array::from_f32(weight.into_dyn(), dtype)
            .ok_or_else(|| fail(format!("a {} gradient", crate::dtype::name(dtype))))?;
        let name = graph.fresh_name(&format!("{}.weight", node.name()));
        let weight = graph.add_initializer(&name, Initializer::from_array(&weight)?);
        graph.remove_node(id);
        let proto = crate::proto::NodeProto {
            name: Some(graph.fresh_node_name(node.name())),
            op_type: Some("MatMul".into()),
            ..Default::default()
        };
        graph.add_node(
            proto,
            vec![Some(gradient), Some(weight)],
            node.outputs.clone(),
        )?;
        for v in node.inputs.iter().skip(1).flatten() {
            graph.remove_if_dead(*v);
        }
    }
    Ok(found.len())
}
