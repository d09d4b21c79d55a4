//! Lowerings of onnxruntime-genai's attention: `GroupQueryAttention` (grouped key/value
//! heads, rotary embeddings from cos/sin caches, an empty KV cache in training) and
//! `RotaryEmbedding`.

use super::attention::{attend, lowest, range, split3, to_heads};
use super::{dim, input, last_axis, optional};
use crate::error::{Error, Result};
use crate::ir::build::Builder;
use crate::ir::{Node, ValueId};

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

pub(super) fn group_query_attention(b: &mut Builder, n: &Node) -> Result<Vec<Option<ValueId>>> {
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
    if optional(n, 11).is_some() {
        return Err(refuse("the head_sink input is not lowered".into()));
    }

    let query = input(n, 0)?;
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
            let outs = split3(b, n, packed, sizes, 2)?;
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
        // Rows past .. past + S; with position_ids, onnxruntime's CPU kernel reads only
        // position_ids[0, 0] = p and takes rows p .. p + S for every sequence (gathered:
        // the row count stays S, which tract must see).
        let rows = |b: &mut Builder, cache: ValueId| -> Result<ValueId> {
            let r = match optional(n, 9) {
                Some(ids) => {
                    let flat = b.ints("flat", &[-1]);
                    let ids = b.op("Reshape", &[ids, flat], vec![])?;
                    let (zero, one) = (b.ints("zero", &[0]), b.ints("one", &[1]));
                    let first = b.op("Slice", &[ids, zero, one], vec![])?;
                    let first = b.op("Cast", &[first], vec![int_attr("to", 7)])?;
                    let steps = range(b, zero, s_len)?;
                    let at = b.op("Add", &[steps, first], vec![])?; // [S]
                    b.op("Gather", &[cache, at], vec![int_attr("axis", 0)])?
                }
                None => b.op("Slice", &[cache, past, end, axis0], vec![])?,
            }; // [S, w]
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
    let scale = n.attr_float("scale", 0.0) as f64;
    let softcap = n.attr_float("softcap", 0.0) as f64;
    // Key j is seen by query i (at position past + i) when j ≤ past + i and j ≤ seqlens_k.
    let t_shape = b.op("Shape", &[present_k], vec![])?;
    let t_len = dim(b, t_shape, 2)?;
    let zero = b.ints("zero", &[0]);
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
    let window = n.attr_int("local_window_size", -1);
    if window > 0 {
        // Sliding window: key j is seen by query i when i − j < window.
        let w = b.ints("window", &[window]);
        let gap = b.op("Sub", &[rows, cols], vec![])?; // [S, T]
        let near = b.op("Less", &[gap, w], vec![])?;
        mask = b.op("And", &[mask, near], vec![])?;
    }
    let bias = optional(n, 10);
    let out = attend(b, q, k_all, v_all, scale, |b, mut scores| {
        if softcap > 0.0 {
            let c = b.scalar("softcap", softcap);
            let x = b.op("Div", &[scores, c], vec![])?;
            let t = b.op("Tanh", &[x], vec![])?;
            scores = b.op("Mul", &[t, c], vec![])?;
        }
        // The attention bias after the softcap, before the mask.
        if let Some(a) = bias {
            scores = b.op("Add", &[scores, a], vec![])?;
        }
        let lowest = lowest(b);
        b.op("Where", &[mask, scores, lowest], vec![])
    })?;
    Ok(vec![Some(out), Some(present_k), Some(present_v)])
}

pub(super) fn rotary_embedding(b: &mut Builder, n: &Node) -> Result<Vec<Option<ValueId>>> {
    use crate::ir::build::int_attr;
    let (x, pos) = (input(n, 0)?, input(n, 1)?);
    let (cos_cache, sin_cache) = (input(n, 2)?, input(n, 3)?);
    // onnxruntime's CPU kernel ignores `scale` and `is_packed_batching` (checked against
    // it); so does the lowering.
    let heads = n.attr_int("num_heads", 0);
    let interleaved = n.attr_int("interleaved", 0) != 0;
    let cache_shape = b.op("Shape", &[cos_cache], vec![])?;
    let w = dim(b, cache_shape, 1)?;
    // [B, S, N·H] (heads from num_heads, else of size 2w: full rotary), or [B, N, S, H].
    let three_d = heads > 0 || crate::ir::infer::rank(b.graph, x) == Some(3);
    // Positions [B, S], or a start offset [1] for every row.
    let pos = if crate::ir::infer::rank(b.graph, pos) == Some(1) {
        let x_shape = b.op("Shape", &[x], vec![])?;
        let s_len = dim(b, x_shape, if three_d { 1 } else { 2 })?;
        let zero = b.ints("zero", &[0]);
        let steps = range(b, zero, s_len)?;
        let at = b.op("Add", &[steps, pos], vec![])?;
        b.unsqueeze(at, &[0])? // [1, S]
    } else {
        pos
    };
    let rows = |b: &mut Builder, cache: ValueId| -> Result<ValueId> {
        let r = b.op("Gather", &[cache, pos], vec![int_attr("axis", 0)])?; // [B, S, w]
                                                                           // Against [B, N, S, H], or [B, S, N, H] for a 3-D input.
        b.unsqueeze(r, &[if three_d { 2 } else { 1 }])
    };
    let (cos, sin) = (rows(b, cos_cache)?, rows(b, sin_cache)?);
    if three_d {
        let split = if heads > 0 {
            b.ints("per_head", &[0, 0, heads, -1])
        } else {
            let lead = b.ints("heads", &[0, 0, -1]);
            let head = b.op("Add", &[w, w], vec![])?;
            b.op("Concat", &[lead, head], vec![int_attr("axis", 0)])?
        };
        let x4 = b.op("Reshape", &[x, split], vec![])?;
        let out = rotary(b, x4, cos, sin, w, interleaved)?;
        let flat = b.ints("flat", &[0, 0, -1]);
        return Ok(vec![Some(b.op("Reshape", &[out, flat], vec![])?)]);
    }
    Ok(vec![Some(rotary(b, x, cos, sin, w, interleaved)?)])
}
