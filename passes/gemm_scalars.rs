//! Runtime preparation for tract: a non-f32 `Gemm` with alpha or beta ≠ 1 becomes
//! `Gemm` + `Mul` + `Add` with scalars of the model's type (tract makes f32 scalars
//! for alpha and beta, which then clash with f16 or f64 operands).

use tract_core::ndarray::{ArrayD, IxDyn};

use crate::error::Result;
use crate::ir::{Graph, Initializer, ValueId};
use crate::proto::tensor_proto::DataType;
use crate::tensor::Array;

/// The pass: rewrites every such Gemm.
#[derive(Debug, Default)]
pub struct GemmScalars {
    /// How many Gemms it rewrote.
    pub rewritten: usize,
}

impl super::Pass for GemmScalars {
    fn name(&self) -> &'static str {
        "gemm_scalars"
    }

    fn run(&mut self, graph: &mut Graph, _: &super::PassContext) -> Result<()> {
        self.rewritten = rewrite(graph)?;
        Ok(())
    }
}

fn rewrite(graph: &mut Graph) -> Result<usize> {
    let gemms: Vec<_> = graph
        .node_ids()
        .filter(|&id| graph.node(id).op() == "Gemm")
        .collect();
    let mut rewritten = 0;
    for id in gemms {
        let node = graph.node(id).clone();
        let (alpha, beta) = (node.attr_float("alpha", 1.0), node.attr_float("beta", 1.0));
        let c = node.inputs.get(2).copied().flatten();
        let Some(elem) = node
            .inputs
            .get(1)
            .copied()
            .flatten()
            .and_then(|b| crate::ir::infer::declared_type(graph, b))
        else {
            continue;
        };
        let scalar = |v: f32| match DataType::try_from(elem) {
            Ok(DataType::Float16) => Some(Array::F16(ArrayD::from_elem(
                IxDyn(&[]),
                half::f16::from_f32(v),
            ))),
            Ok(DataType::Double) => Some(Array::F64(ArrayD::from_elem(IxDyn(&[]), v as f64))),
            _ => None,
        };
        if scalar(1.0).is_none() || (alpha == 1.0 && (beta == 1.0 || c.is_none())) {
            continue;
        }
        let (Some(a), Some(b), Some(out)) = (node.inputs[0], node.inputs[1], node.outputs[0])
        else {
            continue;
        };
        let name = node.name().to_string();
        graph.remove_node(id);
        let mut proto = node.proto.clone();
        proto
            .attribute
            .retain(|a| a.name() != "alpha" && a.name() != "beta");
        let product = graph.new_value(&format!("{name}.ab"));
        graph.add_node(proto, vec![Some(a), Some(b)], vec![Some(product)])?;
        let constant = |graph: &mut Graph, tag: &str, v: f32| -> ValueId {
            let array = scalar(v).expect("checked above");
            graph.add_initializer(
                &format!("{name}.{tag}"),
                Initializer::new(array.to_proto("")),
            )
        };
        let scaled = if alpha == 1.0 {
            product
        } else {
            let k = constant(graph, "alpha", alpha);
            graph
                .add_op(
                    "Mul",
                    &format!("{name}.alpha_mul"),
                    &[product, k],
                    vec![],
                    1,
                )?
                .1[0]
        };
        let sum_inputs = match c {
            None => vec![Some(scaled)],
            Some(c) if beta == 1.0 => vec![Some(scaled), Some(c)],
            Some(c) => {
                let k = constant(graph, "beta", beta);
                let bc = graph
                    .add_op("Mul", &format!("{name}.beta_mul"), &[c, k], vec![], 1)?
                    .1[0];
                vec![Some(scaled), Some(bc)]
            }
        };
        let op = if sum_inputs.len() == 1 {
            "Identity"
        } else {
            "Add"
        };
        let proto = crate::proto::NodeProto {
            name: Some(graph.fresh_node_name(&format!("{name}.sum"))),
            op_type: Some(op.into()),
            ..Default::default()
        };
        graph.add_node(proto, sum_inputs, vec![Some(out)])?;
        rewritten += 1;
    }
    Ok(rewritten)
}
