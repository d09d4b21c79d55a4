//! Lowering: rewrites onnxruntime's fused contrib ops (com.microsoft) into default-domain
//! ONNX ops with the same numerics, one table line per op. The gradient pass then
//! differentiates them with its default-domain rules, so a model that onnxruntime's
//! transformer optimizer fused (`SkipLayerNormalization`, `BiasGelu`, `FastGelu`, ...)
//! trains as its unfused export does. Ops without a line are left as they are (tract
//! runs `MatMulNBits`, on the packed weight, through `runtime::nbits`, and the RMS norms
//! itself; the gradient pass has their rules, and
//! names the ops on an adapter's path that it cannot differentiate).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::ir::build::Builder;
use crate::ir::{Graph, Node, NodeId, ValueId};

mod attention;
mod elementwise;
mod gqa;

use attention::{attention, multi_head_attention};
use elementwise::{embed_layer_norm, fast_gelu, gelu, skip_layer_norm};
use gqa::{group_query_attention, rotary_embedding};

/// Builds the default-domain form of `node` and returns one value per output slot
/// (`None` for an output the lowering does not produce: it must be unused).
type Lowering = fn(&mut Builder, &Node) -> Result<Vec<Option<ValueId>>>;

/// Whether a line applies to a node (most apply to every node of their op).
type Applies = fn(&Node) -> bool;

fn always(_: &Node) -> bool {
    true
}

/// Every lowering: domain, op, and its builder. One line per op.
pub const LOWERINGS: &[(&str, &str, Applies, Lowering)] = &[
    // 0.5·x·(1 + erf(x/√2))
    ("com.microsoft", "Gelu", always, |b, n| {
        Ok(vec![Some(gelu(b, input(n, 0)?)?)])
    }),
    // Gelu(a + bias)
    ("com.microsoft", "BiasGelu", always, |b, n| {
        let x = b.op("Add", &[input(n, 0)?, input(n, 1)?], vec![])?;
        Ok(vec![Some(gelu(b, x)?)])
    }),
    // y = x (+ bias): 0.5·y·(1 + tanh(√(2/π)·(y + 0.044715·y³)))
    ("com.microsoft", "FastGelu", always, fast_gelu),
    // x·σ(α·x), α = 1.702 by default
    ("com.microsoft", "QuickGelu", always, |b, n| {
        let x = input(n, 0)?;
        let alpha = b.scalar("alpha", n.attr_float("alpha", 1.702) as f64);
        let ax = b.op("Mul", &[x, alpha], vec![])?;
        let s = b.op("Sigmoid", &[ax], vec![])?;
        Ok(vec![Some(b.op("Mul", &[x, s], vec![])?)])
    }),
    // x + bias + skip
    ("com.microsoft", "BiasAdd", always, |b, n| {
        let xb = b.op("Add", &[input(n, 0)?, input(n, 1)?], vec![])?;
        Ok(vec![Some(b.op("Add", &[xb, input(n, 2)?], vec![])?)])
    }),
    // s = input + skip (+ bias); LayerNorm(s)·γ (+ β) over the last axis;
    // outputs: y, mean, inv_std_var, s
    (
        "com.microsoft",
        "SkipLayerNormalization",
        always,
        skip_layer_norm,
    ),
    // Grouped-query attention with rotary embeddings (onnxruntime-genai's builder):
    // softmax(scale·Q Kᵀ, causal, keys up to seqlens_k) V, each group of num_heads /
    // kv_num_heads query heads on one key/value head; present = past ++ new keys, values.
    (
        "com.microsoft",
        "GroupQueryAttention",
        always,
        group_query_attention,
    ),
    // onnxruntime's fused BERT/GPT-2 attention: [Q K V] = x·W + bias, then softmax(scale·Q Kᵀ
    // + mask + attention_bias) V, the mask additive (mask_filter_value) as its CPU kernel's
    ("com.microsoft", "Attention", always, attention),
    // The same on separate query, key and value (+ bias), with the key padding mask
    (
        "com.microsoft",
        "MultiHeadAttention",
        always,
        multi_head_attention,
    ),
    // LayerNorm(word[ids] + position[position_ids or 0..S] + segment[segment_ids])·γ + β;
    // outputs: y, mask_index (the mask's ones per row), the sum before the norm
    (
        "com.microsoft",
        "EmbedLayerNormalization",
        always,
        embed_layer_norm,
    ),
    // x [B, N, S, H] (or [B, S, N·H]: num_heads, else heads of twice the cache width)
    // rotated at rows position_ids [B, S] (or a start offset [1]) of the caches, halves or
    // interleaved pairs (as GroupQueryAttention's)
    ("com.microsoft", "RotaryEmbedding", always, rotary_embedding),
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
            let Some(&(_, op, _, lowering)) = LOWERINGS
                .iter()
                .find(|(d, o, applies, _)| *d == domain(node) && *o == node.op() && applies(node))
            else {
                continue;
            };
            let node = node.clone();
            // The compute type: the first floating-point input's (EmbedLayerNormalization
            // reads token ids first).
            let dtype = node
                .inputs
                .iter()
                .flatten()
                .filter_map(|v| dtypes.get(v).copied())
                .find(|&t| crate::dtype::is_float(t))
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

pub(super) fn input(n: &Node, i: usize) -> Result<ValueId> {
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

pub(super) fn optional(n: &Node, i: usize) -> Option<ValueId> {
    n.inputs.get(i).copied().flatten()
}

/// An int64 1-D value `[v]` of `shape(x)[axis]`.
pub(super) fn dim(b: &mut Builder, shape: ValueId, axis: i64) -> Result<ValueId> {
    let (start, end) = (b.ints("dim_start", &[axis]), b.ints("dim_end", &[axis + 1]));
    b.op("Slice", &[shape, start, end], vec![])
}

/// A 1-D `[1]` int64 value as a scalar.
pub(super) fn scalar_of(b: &mut Builder, v: ValueId) -> Result<ValueId> {
    let axes = b.ints("squeeze_axes", &[0]);
    b.op("Squeeze", &[v, axes], vec![])
}

/// `x[..., start..end]` on the last axis (bounds: int64 `[1]` values).
pub(super) fn last_axis(
    b: &mut Builder,
    x: ValueId,
    start: ValueId,
    end: ValueId,
) -> Result<ValueId> {
    let a = b.ints("axes", &[-1]);
    b.op("Slice", &[x, start, end, a], vec![])
}
