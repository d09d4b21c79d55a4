//! The training graph for other runtimes: lora-graft's own `MatMulNBitsInputGrad`
//! (the input gradient of `MatMulNBits` on the packed weight, which tract runs through
//! `runtime::nbits`) becomes `MatMul(dY, W)` on the weight dequantized into a float
//! initializer, so the graph holds default-domain ops and the model's own again.

use crate::error::{Error, Result};
use crate::ir::{Graph, Initializer, NodeId};
use crate::runtime::nbits::{DOMAIN, INPUT_GRAD_OP};
use crate::tensor::Array;

/// Rewrites every `MatMulNBitsInputGrad` of `graph` as a float `MatMul`; returns how
/// many. The dequantized weight takes the gradient's element type.
pub fn portable(graph: &mut Graph) -> Result<usize> {
    let found: Vec<NodeId> = graph
        .node_ids()
        .filter(|&id| {
            let n = graph.node(id);
            n.domain() == DOMAIN && n.op() == INPUT_GRAD_OP
        })
        .collect();
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
