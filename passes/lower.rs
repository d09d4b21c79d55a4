//! Lowering: rewrites onnxruntime's fused contrib ops (com.microsoft) into default-domain
//! ONNX ops with the same numerics, one table line per op. The gradient pass then
//! differentiates them with its default-domain rules, so a model that onnxruntime's
//! transformer optimizer fused (`SkipLayerNormalization`, `BiasGelu`, `FastGelu`, ...)
//! trains as its unfused export does. Ops without a line are left as they are (tract
//! runs `MatMulNBits` and the RMS norms itself; the gradient pass has their rules, and
//! names the ops on an adapter's path that it cannot differentiate).

use std::collections::BTreeMap;
use std::f64::consts::{FRAC_2_SQRT_PI, SQRT_2};

use crate::error::{Error, Result};
use crate::ir::build::Builder;
use crate::ir::{Graph, Node, NodeId, ValueId};

/// Builds the default-domain form of `node` and returns one value per output slot
/// (`None` for an output the lowering does not produce: it must be unused).
type Lowering = fn(&mut Builder, &Node) -> Result<Vec<Option<ValueId>>>;

/// Every lowering: domain, op, and its builder. One line per op.
pub const LOWERINGS: &[(&str, &str, Lowering)] = &[
    // 0.5·x·(1 + erf(x/√2))
    ("com.microsoft", "Gelu", |b, n| {
        Ok(vec![Some(gelu(b, input(n, 0)?)?)])
    }),
    // Gelu(a + bias)
    ("com.microsoft", "BiasGelu", |b, n| {
        let x = b.op("Add", &[input(n, 0)?, input(n, 1)?], vec![])?;
        Ok(vec![Some(gelu(b, x)?)])
    }),
    // y = x (+ bias): 0.5·y·(1 + tanh(√(2/π)·(y + 0.044715·y³)))
    ("com.microsoft", "FastGelu", fast_gelu),
    // x·σ(α·x), α = 1.702 by default
    ("com.microsoft", "QuickGelu", |b, n| {
        let x = input(n, 0)?;
        let alpha = b.scalar("alpha", n.attr_float("alpha", 1.702) as f64);
        let ax = b.op("Mul", &[x, alpha], vec![])?;
        let s = b.op("Sigmoid", &[ax], vec![])?;
        Ok(vec![Some(b.op("Mul", &[x, s], vec![])?)])
    }),
    // x + bias + skip
    ("com.microsoft", "BiasAdd", |b, n| {
        let xb = b.op("Add", &[input(n, 0)?, input(n, 1)?], vec![])?;
        Ok(vec![Some(b.op("Add", &[xb, input(n, 2)?], vec![])?)])
    }),
    // s = input + skip (+ bias); LayerNorm(s)·γ (+ β) over the last axis;
    // outputs: y, mean, inv_std_var, s
    ("com.microsoft", "SkipLayerNormalization", skip_layer_norm),
];

/// The pass: lowers every node that has a line in [`LOWERINGS`].
#[derive(Debug, Default)]
pub struct Lower {
    /// How many nodes of each op it lowered.
    pub lowered: BTreeMap<String, usize>,
}

impl super::Pass for Lower {
    fn name(&self) -> &'static str {
        "lower"
    }

    fn run(&mut self, graph: &mut Graph, cx: &super::PassContext) -> Result<()> {
        let dtypes = crate::ir::infer::value_dtypes(graph)?;
        let nodes: Vec<NodeId> = graph.node_ids().collect();
        for id in nodes {
            let node = graph.node(id);
            let Some(&(_, op, lowering)) = LOWERINGS
                .iter()
                .find(|(d, o, _)| *d == domain(node) && *o == node.op())
            else {
                continue;
            };
            let node = node.clone();
            let dtype = node
                .inputs
                .first()
                .copied()
                .flatten()
                .and_then(|v| dtypes.get(&v).copied())
                .unwrap_or(crate::proto::tensor_proto::DataType::Float as i32);
            let mut b = Builder::new(graph, cx.opset, dtype, node.name().to_string(), '.');
            let outs = lowering(&mut b, &node)
                .map_err(|e| e.context(format!("lowering {op} '{}'", node.name())))?;
            // Each used output keeps its value (and name, and whatever ids a caller holds,
            // such as a target's input), now defined by an Identity of its lowered form.
            let mut keep = Vec::new();
            for (slot, old) in node.outputs.iter().enumerate() {
                let Some(old) = *old else { continue };
                let used = !graph.value(old).users.is_empty() || graph.is_output(old);
                match outs.get(slot).copied().flatten() {
                    Some(new) if used => keep.push((old, new)),
                    None if used => {
                        return Err(Error::Node {
                            node: node.name().to_string(),
                            op: op.to_string(),
                            reason: format!(
                                "output {slot} is used, and its lowering does not compute it"
                            ),
                        })
                    }
                    _ => {}
                }
            }
            graph.remove_node(id);
            for (old, new) in keep {
                let proto = crate::proto::NodeProto {
                    name: Some(graph.fresh_node_name(&format!("{}.out", node.name()))),
                    op_type: Some("Identity".into()),
                    ..Default::default()
                };
                graph.add_node(proto, vec![Some(new)], vec![Some(old)])?;
            }
            *self.lowered.entry(op.to_string()).or_default() += 1;
        }
        Ok(())
    }
}

fn domain(node: &Node) -> &str {
    match node.domain() {
        "ai.onnx" => "",
        d => d,
    }
}

fn input(n: &Node, i: usize) -> Result<ValueId> {
    n.inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| Error::Node {
            node: n.name().to_string(),
            op: n.op().to_string(),
            reason: format!("input {i} is missing"),
        })
}

fn optional(n: &Node, i: usize) -> Option<ValueId> {
    n.inputs.get(i).copied().flatten()
}

/// `0.5·x·(1 + erf(x/√2))`.
fn gelu(b: &mut Builder, x: ValueId) -> Result<ValueId> {
    let r = b.scalar("inv_sqrt2", 1.0 / SQRT_2);
    let xr = b.op("Mul", &[x, r], vec![])?;
    let e = b.op("Erf", &[xr], vec![])?;
    let one = b.scalar("one", 1.0);
    let e1 = b.op("Add", &[e, one], vec![])?;
    let half = b.scalar("half", 0.5);
    let hx = b.op("Mul", &[x, half], vec![])?;
    b.op("Mul", &[hx, e1], vec![])
}

fn fast_gelu(b: &mut Builder, n: &Node) -> Result<Vec<Option<ValueId>>> {
    let mut y = input(n, 0)?;
    if let Some(bias) = optional(n, 1) {
        y = b.op("Add", &[y, bias], vec![])?;
    }
    let c = b.scalar("c", 0.044715);
    let y2 = b.op("Mul", &[y, y], vec![])?;
    let cy2 = b.op("Mul", &[y2, c], vec![])?;
    let one = b.scalar("one", 1.0);
    let inner = b.op("Add", &[cy2, one], vec![])?; // 1 + 0.044715·y²
    let k = b.scalar("sqrt_2_over_pi", FRAC_2_SQRT_PI / SQRT_2);
    let ky = b.op("Mul", &[y, k], vec![])?;
    let arg = b.op("Mul", &[ky, inner], vec![])?;
    let t = b.op("Tanh", &[arg], vec![])?;
    let t1 = b.op("Add", &[t, one], vec![])?;
    let half = b.scalar("half", 0.5);
    let hy = b.op("Mul", &[y, half], vec![])?;
    Ok(vec![Some(b.op("Mul", &[hy, t1], vec![])?)])
}

fn skip_layer_norm(b: &mut Builder, n: &Node) -> Result<Vec<Option<ValueId>>> {
    let (x, skip, gamma) = (input(n, 0)?, input(n, 1)?, input(n, 2)?);
    let eps = n.attr_float("epsilon", 1e-12) as f64;
    let mut s = b.op("Add", &[x, skip], vec![])?;
    if let Some(bias) = optional(n, 4) {
        s = b.op("Add", &[s, bias], vec![])?;
    }
    // Mean and variance over the last axis, in the input's type (as onnxruntime's CPU
    // kernel, which accumulates in float for float16 inputs and rounds the results).
    let mean = b.reduce_op("ReduceMean", s, &[-1], true, "axes", None)?;
    let d = b.op("Sub", &[s, mean], vec![])?;
    let d2 = b.op("Mul", &[d, d], vec![])?;
    let var = b.reduce_op("ReduceMean", d2, &[-1], true, "axes", None)?;
    let e = b.scalar("epsilon", eps);
    let ve = b.op("Add", &[var, e], vec![])?;
    let std = b.op("Sqrt", &[ve], vec![])?;
    let one = b.scalar("one", 1.0);
    let inv = b.op("Div", &[one, std], vec![])?;
    let normed = b.op("Mul", &[d, inv], vec![])?;
    let mut y = b.op("Mul", &[normed, gamma], vec![])?;
    if let Some(beta) = optional(n, 3) {
        y = b.op("Add", &[y, beta], vec![])?;
    }
    Ok(vec![Some(y), Some(mean), Some(inv), Some(s)])
}
