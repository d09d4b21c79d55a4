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
    // Grouped-query attention with rotary embeddings (onnxruntime-genai's builder):
    // softmax(scale·Q Kᵀ, causal, keys up to seqlens_k) V, each group of num_heads /
    // kv_num_heads query heads on one key/value head; present = past ++ new keys, values.
    (
        "com.microsoft",
        "GroupQueryAttention",
        group_query_attention,
    ),
    // x [B, N, S, H] (or [B, S, N·H], which needs num_heads) rotated at rows position_ids
    // [B, S] of the caches, halves or interleaved pairs (as GroupQueryAttention's)
    ("com.microsoft", "RotaryEmbedding", rotary_embedding),
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

/// An int64 1-D value `[v]` of `shape(x)[axis]`.
fn dim(b: &mut Builder, shape: ValueId, axis: i64) -> Result<ValueId> {
    let (start, end) = (b.ints("dim_start", &[axis]), b.ints("dim_end", &[axis + 1]));
    b.op("Slice", &[shape, start, end], vec![])
}

/// A 1-D `[1]` int64 value as a scalar.
fn scalar_of(b: &mut Builder, v: ValueId) -> Result<ValueId> {
    let axes = b.ints("squeeze_axes", &[0]);
    b.op("Squeeze", &[v, axes], vec![])
}

/// `x[..., start..end]` on the last axis (bounds: int64 `[1]` values).
fn last_axis(b: &mut Builder, x: ValueId, start: ValueId, end: ValueId) -> Result<ValueId> {
    let a = b.ints("axes", &[-1]);
    b.op("Slice", &[x, start, end, a], vec![])
}

/// Rotary embedding of `x` `[B, N, S, D]` at rows `cos`, `sin` `[1, 1, S, w]` (`w` an
/// int64 `[1]` value; `2w` leading dims rotated, the rest passed through): halves
/// `(x1, x2)` → `(x1 cos − x2 sin, x2 cos + x1 sin)`, or, interleaved, the pairs
/// `(x_2i, x_2i+1)`.
fn rotary(
    b: &mut Builder,
    x: ValueId,
    cos: ValueId,
    sin: ValueId,
    w: ValueId,
    interleaved: bool,
) -> Result<ValueId> {
    let zero = b.ints("from", &[0]);
    let two_w = b.op("Add", &[w, w], vec![])?;
    let end = b.ints("to_end", &[i64::MAX]);
    let rot = last_axis(b, x, zero, two_w)?;
    let pass = last_axis(b, x, two_w, end)?;
    let turn = |b: &mut Builder, a: ValueId, c: ValueId, s: ValueId, o: ValueId| {
        // (a·c − o·s, o·c + a·s)
        let ac = b.op("Mul", &[a, c], vec![])?;
        let os = b.op("Mul", &[o, s], vec![])?;
        let first = b.op("Sub", &[ac, os], vec![])?;
        let oc = b.op("Mul", &[o, c], vec![])?;
        let as_ = b.op("Mul", &[a, s], vec![])?;
        let second = b.op("Add", &[oc, as_], vec![])?;
        Ok::<_, Error>((first, second))
    };
    let rotated = if interleaved {
        let to_pairs = b.ints("pairs", &[0, 0, 0, -1, 2]);
        let pairs = b.op("Reshape", &[rot, to_pairs], vec![])?;
        let (one, two) = (b.ints("one", &[1]), b.ints("two", &[2]));
        let (even, odd) = (
            last_axis(b, pairs, zero, one)?,
            last_axis(b, pairs, one, two)?,
        );
        let (c, s) = (b.unsqueeze(cos, &[-1])?, b.unsqueeze(sin, &[-1])?);
        let (re, ro) = turn(b, even, c, s, odd)?;
        let joined = b.op(
            "Concat",
            &[re, ro],
            vec![crate::ir::build::int_attr("axis", -1)],
        )?;
        let back = b.ints("unpair", &[0, 0, 0, -1]);
        b.op("Reshape", &[joined, back], vec![])?
    } else {
        let (x1, x2) = (last_axis(b, rot, zero, w)?, last_axis(b, rot, w, two_w)?);
        let (r1, r2) = turn(b, x1, cos, sin, x2)?;
        b.op(
            "Concat",
            &[r1, r2],
            vec![crate::ir::build::int_attr("axis", -1)],
        )?
    };
    b.op(
        "Concat",
        &[rotated, pass],
        vec![crate::ir::build::int_attr("axis", -1)],
    )
}

fn group_query_attention(b: &mut Builder, n: &Node) -> Result<Vec<Option<ValueId>>> {
    use crate::ir::build::{int_attr, ints_attr};
    let refuse = |reason: String| Error::Node {
        node: n.name().to_string(),
        op: n.op().to_string(),
        reason,
    };
    let heads = n.attr_int("num_heads", 0);
    let kv_heads = n.attr_int("kv_num_heads", 0);
    if heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 {
        return Err(refuse(format!(
            "num_heads {heads} is not a multiple of kv_num_heads {kv_heads}"
        )));
    }
    if n.attr_int("local_window_size", -1) > 0 {
        return Err(refuse(
            "local_window_size (sliding-window attention) is not lowered yet".into(),
        ));
    }
    if optional(n, 9).is_some() || optional(n, 10).is_some() || optional(n, 11).is_some() {
        return Err(refuse(
            "position_ids, attention_bias and head_sink inputs are not lowered yet".into(),
        ));
    }
    let query = input(n, 0)?;
    let to_heads = |b: &mut Builder, x: ValueId, count: i64| -> Result<ValueId> {
        let shape = b.ints("heads", &[0, 0, count, -1]);
        let r = b.op("Reshape", &[x, shape], vec![])?;
        b.op("Transpose", &[r], vec![ints_attr("perm", &[0, 2, 1, 3])]) // [B, N, S, D]
    };
    let (q, k, v) = match (optional(n, 1), optional(n, 2)) {
        (Some(key), Some(value)) => (
            to_heads(b, query, heads)?,
            to_heads(b, key, kv_heads)?,
            to_heads(b, value, kv_heads)?,
        ),
        (None, None) => {
            // Packed QKV: [B, S, (N + 2·Nkv)·D] → [B, S, N + 2·Nkv, D], split by heads.
            let shape = b.ints("qkv_heads", &[0, 0, heads + 2 * kv_heads, -1]);
            let packed = b.op("Reshape", &[query, shape], vec![])?;
            let sizes = b.ints("qkv_split", &[heads, kv_heads, kv_heads]);
            let (_, outs) = b.graph.add_op(
                "Split",
                &format!("{}.Split", n.name()),
                &[packed, sizes],
                vec![int_attr("axis", 2)],
                3,
            )?;
            let perm = |b: &mut Builder, x: ValueId| {
                b.op("Transpose", &[x], vec![ints_attr("perm", &[0, 2, 1, 3])])
            };
            (perm(b, outs[0])?, perm(b, outs[1])?, perm(b, outs[2])?)
        }
        _ => {
            return Err(refuse(
                "key and value must both be given, or both be packed in query".into(),
            ))
        }
    };
    // Positions past .. past + S: the cache's length, or 0.
    let q_shape = b.op("Shape", &[q], vec![])?;
    let s_len = dim(b, q_shape, 2)?;
    let past = match optional(n, 3) {
        Some(pk) => {
            let shape = b.op("Shape", &[pk], vec![])?;
            dim(b, shape, 2)?
        }
        None => b.ints("no_past", &[0]),
    };
    let end = b.op("Add", &[past, s_len], vec![])?;
    let (q, k) = if n.attr_int("do_rotary", 0) != 0 {
        let (cos_cache, sin_cache) = (input(n, 7)?, input(n, 8)?);
        let cache_shape = b.op("Shape", &[cos_cache], vec![])?;
        let w = dim(b, cache_shape, 1)?; // rotary_dim / 2
        let axis0 = b.ints("rows", &[0]);
        let rows = |b: &mut Builder, cache: ValueId| -> Result<ValueId> {
            let r = b.op("Slice", &[cache, past, end, axis0], vec![])?; // [S, w]
            b.unsqueeze(r, &[0, 1])
        };
        let (cos, sin) = (rows(b, cos_cache)?, rows(b, sin_cache)?);
        let interleaved = n.attr_int("rotary_interleaved", 0) != 0;
        (
            rotary(b, q, cos, sin, w, interleaved)?,
            rotary(b, k, cos, sin, w, interleaved)?,
        )
    } else {
        (q, k)
    };
    let cat2 = |b: &mut Builder, past: Option<ValueId>, new: ValueId| match past {
        Some(p) => b.op("Concat", &[p, new], vec![int_attr("axis", 2)]),
        None => Ok(new),
    };
    let present_k = cat2(b, optional(n, 3), k)?; // [B, Nkv, T, D]
    let present_v = cat2(b, optional(n, 4), v)?;
    // Each key/value head serves num_heads / kv_num_heads query heads.
    let group = heads / kv_heads;
    let repeat = |b: &mut Builder, x: ValueId| -> Result<ValueId> {
        if group == 1 {
            return Ok(x);
        }
        let x5 = b.unsqueeze(x, &[2])?; // [B, Nkv, 1, T, D]
        let reps = b.ints("group", &[1, 1, group, 1, 1]);
        let e = b.op("Expand", &[x5, reps], vec![])?;
        let shape5 = b.op("Shape", &[e], vec![])?;
        let d = dim(b, shape5, 4)?;
        let lead = b.ints("lead", &[0, heads, -1]);
        let target = b.op("Concat", &[lead, d], vec![int_attr("axis", 0)])?;
        b.op("Reshape", &[e, target], vec![])
    };
    let (k_all, v_all) = (repeat(b, present_k)?, repeat(b, present_v)?);
    let kt = b.op(
        "Transpose",
        &[k_all],
        vec![ints_attr("perm", &[0, 1, 3, 2])],
    )?;
    let mut scores = b.op("MatMul", &[q, kt], vec![])?; // [B, N, S, T]
    let scale = n.attr_float("scale", 0.0) as f64;
    let scale = if scale != 0.0 {
        b.scalar("scale", scale)
    } else {
        let d = dim(b, q_shape, 3)?;
        let d = b.op("Cast", &[d], vec![int_attr("to", b.dtype as i64)])?;
        let root = b.op("Sqrt", &[d], vec![])?;
        let one = b.scalar("one", 1.0);
        b.op("Div", &[one, root], vec![])?
    };
    scores = b.op("Mul", &[scores, scale], vec![])?;
    let softcap = n.attr_float("softcap", 0.0) as f64;
    if softcap > 0.0 {
        let c = b.scalar("softcap", softcap);
        let x = b.op("Div", &[scores, c], vec![])?;
        let t = b.op("Tanh", &[x], vec![])?;
        scores = b.op("Mul", &[t, c], vec![])?;
    }
    // Key j is seen by query i (at position past + i) when j ≤ past + i and j ≤ seqlens_k.
    let t_shape = b.op("Shape", &[present_k], vec![])?;
    let t_len = dim(b, t_shape, 2)?;
    let zero = b.ints("zero", &[0]);
    let one = b.ints("step", &[1]);
    let range = |b: &mut Builder, from: ValueId, to: ValueId| -> Result<ValueId> {
        let (f, t, s) = (scalar_of(b, from)?, scalar_of(b, to)?, scalar_of(b, one)?);
        b.op("Range", &[f, t, s], vec![])
    };
    let rows = range(b, past, end)?; // [S]
    let rows = b.unsqueeze(rows, &[1])?; // [S, 1]
    let cols = range(b, zero, t_len)?; // [T]
    let causal = b.op("LessOrEqual", &[cols, rows], vec![])?; // [S, T]
    let mut mask = causal;
    if let Some(seqlens) = optional(n, 5) {
        let lens = b.op("Cast", &[seqlens], vec![int_attr("to", 7)])?; // int64
        let lens = b.unsqueeze(lens, &[1])?; // [B, 1]
        let valid = b.op("LessOrEqual", &[cols, lens], vec![])?; // [B, T]
        let valid = b.unsqueeze(valid, &[1, 2])?; // [B, 1, 1, T]
        mask = b.op("And", &[causal, valid], vec![])?;
    }
    let lowest = b.scalar(
        "masked",
        if b.dtype == crate::proto::tensor_proto::DataType::Float16 as i32 {
            -65504.0
        } else {
            -3.0e38
        },
    );
    scores = b.op("Where", &[mask, scores, lowest], vec![])?;
    let p = b.op("Softmax", &[scores], vec![int_attr("axis", -1)])?;
    let out = b.op("MatMul", &[p, v_all], vec![])?; // [B, N, S, D]
    let out = b.op("Transpose", &[out], vec![ints_attr("perm", &[0, 2, 1, 3])])?;
    let flat = b.ints("flat", &[0, 0, -1]);
    let out = b.op("Reshape", &[out, flat], vec![])?;
    Ok(vec![Some(out), Some(present_k), Some(present_v)])
}

fn rotary_embedding(b: &mut Builder, n: &Node) -> Result<Vec<Option<ValueId>>> {
    use crate::ir::build::int_attr;
    let (x, pos) = (input(n, 0)?, input(n, 1)?);
    let (cos_cache, sin_cache) = (input(n, 2)?, input(n, 3)?);
    if n.attr_int("is_packed_batching", 0) != 0 || n.attr_float("scale", 1.0) != 1.0 {
        return Err(Error::Node {
            node: n.name().to_string(),
            op: n.op().to_string(),
            reason: "packed batching and a scale other than 1 are not lowered yet".into(),
        });
    }
    let heads = n.attr_int("num_heads", 0);
    let interleaved = n.attr_int("interleaved", 0) != 0;
    let cache_shape = b.op("Shape", &[cos_cache], vec![])?;
    let w = dim(b, cache_shape, 1)?;
    let rows = |b: &mut Builder, cache: ValueId| -> Result<ValueId> {
        let r = b.op("Gather", &[cache, pos], vec![int_attr("axis", 0)])?; // [B, S, w]
                                                                           // Against [B, N, S, H], or [B, S, N, H] for a 3-D input.
        b.unsqueeze(r, &[if heads > 0 { 2 } else { 1 }])
    };
    let (cos, sin) = (rows(b, cos_cache)?, rows(b, sin_cache)?);
    if heads > 0 {
        let split = b.ints("per_head", &[0, 0, heads, -1]);
        let x4 = b.op("Reshape", &[x, split], vec![])?;
        let out = rotary(b, x4, cos, sin, w, interleaved)?;
        let flat = b.ints("flat", &[0, 0, -1]);
        return Ok(vec![Some(b.op("Reshape", &[out, flat], vec![])?)]);
    }
    Ok(vec![Some(rotary(b, x, cos, sin, w, interleaved)?)])
}
