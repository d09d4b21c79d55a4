//! Where a branch meets the linear node `y = x Wᵀ (+ b)`: the node's compute type, its
//! bias, and the splice of a variant's branch as its [`Splice`] says (a delta on the
//! output, around the pre- or post-bias output, or on the input).

use std::collections::{BTreeMap, HashMap};

use super::GraftOptions;
use crate::error::Result;
use crate::ir::build::{int_attr, Builder};
use crate::ir::{Graph, ValueId};
use crate::passes::target::Target;
use crate::passes::variants::Splice;
use crate::proto::tensor_proto::DataType;

/// The element type the linear node computes in: its weight's (a MatMulNBits its
/// scales').
pub(super) fn compute_dtype(graph: &Graph, dtypes: &HashMap<ValueId, i32>, t: &Target) -> i32 {
    if t.op == "MatMulInteger" {
        // Float in and out around the integer product (dynamic quantization).
        return dtypes
            .get(&t.output)
            .copied()
            .unwrap_or(DataType::Float as i32);
    }
    let node = graph.node(t.node);
    let slot = if t.op == "MatMulNBits" { 2 } else { 1 };
    node.inputs
        .get(slot)
        .copied()
        .flatten()
        .and_then(|w| dtypes.get(&w).copied())
        .unwrap_or(DataType::Float as i32)
}

/// A target's bias: a separate `Add` of a constant after the node, or the node's own
/// bias input (Gemm's C, MatMulNBits' bias).
#[derive(Debug, Clone, Copy)]
pub struct Bias {
    /// The bias tensor.
    pub value: ValueId,
    /// The output with the bias added.
    pub post: ValueId,
    /// Whether the node adds it itself (Gemm's C, scaled by `beta`).
    pub inner: bool,
    /// Gemm's beta (1 otherwise).
    pub beta: f32,
}

/// The bias of target `t`, if it has one.
pub fn bias(graph: &Graph, t: &Target) -> Option<Bias> {
    let node = graph.node(t.node);
    let slot = match t.op.as_str() {
        "Gemm" => Some(2),
        "MatMulNBits" => Some(5),
        _ => None,
    };
    if let Some(value) = slot.and_then(|i| node.inputs.get(i).copied().flatten()) {
        let beta = if t.op == "Gemm" {
            node.attr_float("beta", 1.0)
        } else {
            1.0
        };
        return Some(Bias {
            value,
            post: t.output,
            inner: true,
            beta,
        });
    }
    graph.value(t.output).users.iter().find_map(|&u| {
        let n = graph.node(u);
        if n.op() != "Add" {
            return None;
        }
        let value = n.inputs.iter().flatten().copied().find(|&i| {
            i != t.output
                && graph
                    .initializer(i)
                    .is_some_and(|init| crate::dtype::numel(init.dims()) == Some(t.d_out as u64))
        })?;
        let post = n.outputs.first().copied().flatten()?;
        Some(Bias {
            value,
            post,
            inner: false,
            beta: 1.0,
        })
    })
}

/// Splices the variant's branch around target `t` as its [`Splice`] says, casting to
/// and from the adapter dtype when the model computes in another.
pub(super) fn splice(
    graph: &mut Graph,
    dtypes: &HashMap<ValueId, i32>,
    opset: i64,
    module: &str,
    t: &Target,
    ids: &BTreeMap<&'static str, ValueId>,
    opts: &GraftOptions,
) -> Result<()> {
    let variant = opts.variant;
    let model_dtype = compute_dtype(graph, dtypes, t);
    let adapter_dtype = opts.adapter_dtype;
    let kind = variant.splice();
    let bias = bias(graph, t);
    // The value the branch replaces or adds to.
    let point = match kind {
        Splice::Delta | Splice::PreBias => t.output,
        Splice::PostBias => bias.map_or(t.output, |b| b.post),
        Splice::Input => t.input,
    };
    let readers = graph.value(point).users.clone();
    let prefix = format!("{module}.lora");
    let mut b = Builder::new(graph, opset, adapter_dtype, prefix, '.');
    let cast = |b: &mut Builder, v: ValueId, to: i32| -> Result<ValueId> {
        if model_dtype == adapter_dtype {
            Ok(v)
        } else {
            b.op("Cast", &[v], vec![int_attr("to", to as i64)])
        }
    };
    let x = cast(&mut b, t.input, adapter_dtype)?;
    if kind == Splice::Delta {
        // y' = y + Cast(branch(x))
        let delta = variant.branch(&mut b, x, x, ids, &opts.cfg)?;
        let delta = cast(&mut b, delta, model_dtype)?;
        let (add, outs) = b.graph.add_op(
            "Add",
            &format!("{module}.lora.Add"),
            &[t.output, delta],
            vec![],
            1,
        )?;
        b.graph.replace_uses(t.output, outs[0], &[add]);
        return Ok(());
    }
    let mut y = if kind == Splice::Input {
        x
    } else {
        cast(&mut b, point, adapter_dtype)?
    };
    // A bias the node adds itself is taken out before a pre-bias branch, added after.
    let inner = bias.filter(|bias| kind == Splice::PreBias && bias.inner);
    let inner = match inner {
        Some(bias) => {
            let mut c = cast(&mut b, bias.value, adapter_dtype)?;
            if bias.beta != 1.0 {
                let beta = b.scalar("beta", bias.beta as f64);
                c = b.op("Mul", &[c, beta], vec![])?;
            }
            y = b.op("Sub", &[y, c], vec![])?;
            Some(c)
        }
        None => None,
    };
    let mut out = variant.branch(&mut b, x, y, ids, &opts.cfg)?;
    if let Some(c) = inner {
        out = b.op("Add", &[out, c], vec![])?;
    }
    let out = cast(&mut b, out, model_dtype)?;
    if kind == Splice::Input {
        graph.set_input(t.node, 0, Some(out));
    } else {
        let new_readers: Vec<_> = graph
            .value(point)
            .users
            .iter()
            .copied()
            .filter(|u| !readers.contains(u))
            .collect();
        graph.replace_uses(point, out, &new_readers);
    }
    Ok(())
}
