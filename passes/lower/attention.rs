//! Lowerings of onnxruntime's transformer-optimizer attention ops (`Attention`,
//! `MultiHeadAttention`) and the attention core, masks and head layouts every attention
//! lowering shares (`gqa` too).

use super::{dim, input, optional, scalar_of};
use crate::error::{Error, Result};
use crate::ir::build::Builder;
use crate::ir::{Node, ValueId};

/// `from .. to` (int64 `[1]` bounds) as a 1-D int64 range.
pub(super) fn range(b: &mut Builder, from: ValueId, to: ValueId) -> Result<ValueId> {
    let one = b.ints("step", &[1]);
    let (f, t, s) = (scalar_of(b, from)?, scalar_of(b, to)?, scalar_of(b, one)?);
    b.op("Range", &[f, t, s], vec![])
}

/// The score a masked key gets where the op masks by exclusion: the dtype's lowest.
pub(super) fn lowest(b: &mut Builder) -> ValueId {
    let fp16 = b.dtype == crate::proto::tensor_proto::DataType::Float16 as i32;
    b.scalar("masked", if fp16 { -65504.0 } else { -3.0e38 })
}

/// Scaled dot-product attention: `q` `[B, N, S, D]`, `k`, `v` `[B, N, T, D]` (one key
/// head per query head) → `[B, S, N·D]`: softmax over the keys of `edit(scale·q kᵀ)`
/// (`scale` 0: `1/√D`; `edit` adds the op's masks and biases), times `v`.
pub(super) fn attend(
    b: &mut Builder,
    q: ValueId,
    k: ValueId,
    v: ValueId,
    scale: f64,
    edit: impl FnOnce(&mut Builder, ValueId) -> Result<ValueId>,
) -> Result<ValueId> {
    use crate::ir::build::{int_attr, ints_attr};
    let kt = b.op("Transpose", &[k], vec![ints_attr("perm", &[0, 1, 3, 2])])?;
    let scores = b.op("MatMul", &[q, kt], vec![])?; // [B, N, S, T]
    let scale = if scale != 0.0 {
        b.scalar("scale", scale)
    } else {
        let q_shape = b.op("Shape", &[q], vec![])?;
        let d = dim(b, q_shape, 3)?;
        let d = b.op("Cast", &[d], vec![int_attr("to", b.dtype as i64)])?;
        let root = b.op("Sqrt", &[d], vec![])?;
        let one = b.scalar("one", 1.0);
        b.op("Div", &[one, root], vec![])?
    };
    let scores = b.op("Mul", &[scores, scale], vec![])?;
    let scores = edit(b, scores)?;
    let p = b.op("Softmax", &[scores], vec![int_attr("axis", -1)])?;
    let out = b.op("MatMul", &[p, v], vec![])?; // [B, N, S, D]
    let out = b.op("Transpose", &[out], vec![ints_attr("perm", &[0, 2, 1, 3])])?;
    let flat = b.ints("flat", &[0, 0, -1]);
    b.op("Reshape", &[out, flat], vec![])
}

/// `x` split in three along `axis` by `sizes` (an int64 `[3]` value).
pub(super) fn split3(
    b: &mut Builder,
    n: &Node,
    x: ValueId,
    sizes: ValueId,
    axis: i64,
) -> Result<Vec<ValueId>> {
    split(b, n, x, sizes, axis, 3)
}

/// `x` split along `axis` into `parts` pieces of `sizes`.
fn split(
    b: &mut Builder,
    n: &Node,
    x: ValueId,
    sizes: ValueId,
    axis: i64,
    parts: usize,
) -> Result<Vec<ValueId>> {
    let (_, pieces) = b.graph.add_op(
        "Split",
        &format!("{}.Split", n.name()),
        &[x, sizes],
        vec![crate::ir::build::int_attr("axis", axis)],
        parts,
    )?;
    Ok(pieces)
}

/// `x` `[B, S, N·D]` → `[B, N, S, D]`.
pub(super) fn to_heads(b: &mut Builder, x: ValueId, heads: i64) -> Result<ValueId> {
    let shape = b.ints("heads", &[0, 0, heads, -1]);
    let r = b.op("Reshape", &[x, shape], vec![])?;
    b.op(
        "Transpose",
        &[r],
        vec![crate::ir::build::ints_attr("perm", &[0, 2, 1, 3])],
    )
}

/// The additive mask of onnxruntime's `Attention` and `MultiHeadAttention` CPU kernels,
/// `[B or 1, 1, S or 1, T]`: `mask_filter_value` on every key the mask index excludes
/// (a raw `[B, T]` or `[B, S, T]` mask: where it is not positive; `[B]` end positions,
/// or `[2B]` end and start positions: outside them); `None` without a mask index.
/// `cols` is the keys' positions `0..T`.
fn additive_mask(
    b: &mut Builder,
    n: &Node,
    mask_index: Option<ValueId>,
    cols: ValueId,
) -> Result<Option<ValueId>> {
    use crate::ir::build::int_attr;
    let filter = b.scalar(
        "mask_filter_value",
        n.attr_float("mask_filter_value", -10000.0) as f64,
    );
    let zero_f = b.scalar("zero", 0.0);
    let zero = b.ints("zero", &[0]);
    let mut mask = None;
    if let Some(m) = mask_index {
        let rank = crate::ir::infer::rank(b.graph, m);
        let excluded = match rank {
            Some(2) | Some(3) => {
                let m = b.op("Cast", &[m], vec![int_attr("to", 7)])?;
                let keep = b.op("Greater", &[m, zero], vec![])?;
                let out = b.op("Not", &[keep], vec![])?;
                // [B, T] → [B, 1, 1, T]; [B, S, T] → [B, 1, S, T]
                let axes: &[i64] = if rank == Some(2) { &[1, 2] } else { &[1] };
                b.unsqueeze(out, axes)?
            }
            Some(1) => {
                // End positions [B], then start positions when [2B] (else 0).
                let m = b.op("Cast", &[m], vec![int_attr("to", 7)])?;
                let batch = {
                    let s = b.op("Shape", &[input(n, 0)?], vec![])?;
                    dim(b, s, 0)?
                };
                let ends = b.op("Slice", &[m, zero, batch], vec![])?; // [B]
                let double = b.op("Add", &[batch, batch], vec![])?;
                let starts = b.op("Slice", &[m, batch, double], vec![])?; // [B] or [0]
                let none = b.op("Sub", &[ends, ends], vec![])?; // zeros [B]
                let padded = b.op("Concat", &[starts, none], vec![int_attr("axis", 0)])?;
                let starts = b.op("Slice", &[padded, zero, batch], vec![])?; // [B]
                let (ends, starts) = (b.unsqueeze(ends, &[1])?, b.unsqueeze(starts, &[1])?);
                let after = b.op("GreaterOrEqual", &[cols, ends], vec![])?; // [B, T]
                let before = b.op("Less", &[cols, starts], vec![])?;
                let out = b.op("Or", &[after, before], vec![])?;
                b.unsqueeze(out, &[1, 2])?
            }
            other => {
                return Err(Error::Node {
                    node: n.name().to_string(),
                    op: n.op().to_string(),
                    reason: match other {
                        Some(r) => {
                            format!("a {r}-D mask index is not lowered (1-D, 2-D or 3-D are)")
                        }
                        None => "the mask index's rank is not known from the graph".into(),
                    },
                })
            }
        };
        mask = Some(b.op("Where", &[excluded, filter, zero_f], vec![])?);
    }
    Ok(mask)
}

/// The scores' edit of `Attention` and `MultiHeadAttention`: the additive mask, the
/// attention bias `[B or 1, N or 1, S, T]`, then, when `future` (`[S, T]`, true for key j
/// > query i) is given, those keys excluded outright (onnxruntime's `unidirectional`).
fn add_masks(
    b: &mut Builder,
    scores: ValueId,
    mask: Option<ValueId>,
    bias: Option<ValueId>,
    future: Option<ValueId>,
) -> Result<ValueId> {
    let mut scores = scores;
    if let Some(m) = mask {
        scores = b.op("Add", &[scores, m], vec![])?;
    }
    if let Some(a) = bias {
        scores = b.op("Add", &[scores, a], vec![])?;
    }
    if let Some(f) = future {
        let lowest = lowest(b);
        scores = b.op("Where", &[f, lowest, scores], vec![])?;
    }
    Ok(scores)
}

fn node_error(n: &Node, reason: &str) -> Error {
    Error::Node {
        node: n.name().to_string(),
        op: n.op().to_string(),
        reason: reason.to_string(),
    }
}

/// onnxruntime's `Attention` (the transformer optimizer's BERT and GPT-2 fusion):
/// `[Q K V] = x·W + bias`, split by `qkv_hidden_sizes` (equal thirds by default), then
/// scaled dot-product attention with the additive mask and attention bias.
pub(super) fn attention(b: &mut Builder, n: &Node) -> Result<Vec<Option<ValueId>>> {
    use crate::ir::build::int_attr;
    let heads = n.attr_int("num_heads", 0);
    if heads <= 0 {
        return Err(node_error(n, "num_heads must be positive"));
    }
    if optional(n, 4).is_some() || optional(n, 6).is_some() {
        return Err(node_error(
            n,
            "a past state is not lowered (training runs without one)",
        ));
    }
    if n.attr_int("do_rotary", 0) != 0 {
        return Err(node_error(n, "do_rotary is not lowered"));
    }
    let (x, w) = (input(n, 0)?, input(n, 1)?);
    let mut qkv = b.op("MatMul", &[x, w], vec![])?;
    if let Some(bias) = optional(n, 2) {
        qkv = b.op("Add", &[qkv, bias], vec![])?;
    }
    let sizes: Vec<i64> = match n.attr_ints("qkv_hidden_sizes") {
        Some(s) if s.len() == 3 => s.to_vec(),
        Some(_) => return Err(node_error(n, "qkv_hidden_sizes must hold 3 sizes")),
        None => {
            // Equal thirds of the weight's columns.
            let shape = b.op("Shape", &[w], vec![])?;
            let cols = dim(b, shape, 1)?;
            let three = b.ints("three", &[3]);
            let third = b.op("Div", &[cols, three], vec![])?;
            let sizes = b.op("Concat", &[third, third, third], vec![int_attr("axis", 0)])?;
            return attention_with(b, n, qkv, sizes, heads);
        }
    };
    let sizes = b.ints("qkv_sizes", &sizes);
    attention_with(b, n, qkv, sizes, heads)
}

fn attention_with(
    b: &mut Builder,
    n: &Node,
    qkv: ValueId,
    sizes: ValueId,
    heads: i64,
) -> Result<Vec<Option<ValueId>>> {
    let parts = split3(b, n, qkv, sizes, -1)?;
    let (q, k, v) = (
        to_heads(b, parts[0], heads)?,
        to_heads(b, parts[1], heads)?,
        to_heads(b, parts[2], heads)?,
    );
    let out = masked_attention(b, n, q, k, v, optional(n, 3), optional(n, 5))?;
    Ok(vec![Some(out)])
}

/// Attention of `q` `[B, N, S, D]` on `k`, `v` `[B, N, T, D]` with `Attention`'s and
/// `MultiHeadAttention`'s masks (`mask_index`, `unidirectional`) and attention bias.
fn masked_attention(
    b: &mut Builder,
    n: &Node,
    q: ValueId,
    k: ValueId,
    v: ValueId,
    mask_index: Option<ValueId>,
    bias: Option<ValueId>,
) -> Result<ValueId> {
    let q_shape = b.op("Shape", &[q], vec![])?;
    let s_len = dim(b, q_shape, 2)?;
    let k_shape = b.op("Shape", &[k], vec![])?;
    let t_len = dim(b, k_shape, 2)?;
    let zero = b.ints("zero", &[0]);
    let cols = range(b, zero, t_len)?; // [T]
    let mask = additive_mask(b, n, mask_index, cols)?;
    let future = if n.attr_int("unidirectional", 0) != 0 {
        // onnxruntime's CPU kernel: key j > i excluded for every query row i but the last,
        // which sees all keys (with as many keys as queries, the causal mask; with more,
        // the last row alone sees the keys past it).
        let rows = range(b, zero, s_len)?;
        let rows = b.unsqueeze(rows, &[1])?; // [S, 1]
        let later = b.op("Greater", &[cols, rows], vec![])?; // [S, T]
        let one = b.ints("one", &[1]);
        let last = b.op("Sub", &[s_len, one], vec![])?;
        let not_last = b.op("Less", &[rows, last], vec![])?; // [S, 1]
        Some(b.op("And", &[later, not_last], vec![])?)
    } else {
        None
    };
    let scale = n.attr_float("scale", 0.0) as f64;
    attend(b, q, k, v, scale, |b, scores| {
        add_masks(b, scores, mask, bias, future)
    })
}

/// onnxruntime's `MultiHeadAttention` (plus `bias` `[D + D + Dv]`), with the key padding
/// mask and the attention bias, on each layout of its query, key and value:
/// - separate query `[B, S, D]`, key `[B, L, D]` and value `[B, L, Dv]`;
/// - key and value already in heads, `[B, N, L, H]` (the bias then applies to the query
///   only, as onnxruntime's kernel does);
/// - packed QKV, query `[B, S, N, 3, H]` with no key or value;
/// - packed KV, key `[B, L, N, 2, H]` with no value (onnxruntime runs these two on CUDA
///   only; the bias is read as for separate inputs, q|k|v each `[N, H]`).
pub(super) fn multi_head_attention(b: &mut Builder, n: &Node) -> Result<Vec<Option<ValueId>>> {
    use crate::ir::build::int_attr;
    let heads = n.attr_int("num_heads", 0);
    if heads <= 0 {
        return Err(node_error(n, "num_heads must be positive"));
    }
    if (6..n.inputs.len()).any(|i| optional(n, i).is_some()) {
        return Err(node_error(
            n,
            "a past state is not lowered (training runs without one)",
        ));
    }
    let query = input(n, 0)?;
    let rank = |b: &Builder, x: ValueId| crate::ir::infer::rank(b.graph, x);
    let layout = match (optional(n, 1), optional(n, 2)) {
        (None, None) if rank(b, query) == Some(5) => MhaLayout::PackedQkv,
        (Some(key), None) if rank(b, key) == Some(5) => MhaLayout::PackedKv(key),
        (Some(key), Some(value)) if rank(b, key) == Some(4) && rank(b, value) == Some(4) => {
            MhaLayout::Heads(key, value)
        }
        (Some(key), Some(value))
            if [query, key, value]
                .iter()
                .all(|&x| rank(b, x).is_none_or(|r| r == 3)) =>
        {
            MhaLayout::Separate(key, value)
        }
        _ => {
            return Err(node_error(
                n,
                "query, key and value must be [batch, sequence, hidden], key and value \
                 [batch, heads, sequence, head size], packed QKV [batch, sequence, heads, 3, \
                 head size] or packed KV [batch, sequence, heads, 2, head size]",
            ))
        }
    };
    // The bias's q, k and v parts, each [D] (or [Dv]).
    let bias_parts = match optional(n, 3) {
        None => None,
        Some(bias) => {
            // [D, D, Dv]: D the query's width (a third of a packed QKV's bias), Dv the rest.
            let len = b.op("Shape", &[bias], vec![])?;
            let d = match layout {
                MhaLayout::PackedQkv => {
                    let three = b.ints("three", &[3]);
                    b.op("Div", &[len, three], vec![])?
                }
                _ => {
                    let q_shape = b.op("Shape", &[query], vec![])?;
                    dim(b, q_shape, 2)?
                }
            };
            let two_d = b.op("Add", &[d, d], vec![])?;
            let dv = b.op("Sub", &[len, two_d], vec![])?;
            let sizes = b.op("Concat", &[d, d, dv], vec![int_attr("axis", 0)])?;
            Some(split3(b, n, bias, sizes, 0)?)
        }
    };
    let bias_of = |i: usize| bias_parts.as_ref().map(|p| p[i]);
    // [B, S, D] (+ bias) → [B, N, S, H]
    let separate = |b: &mut Builder, x: ValueId, bias: Option<ValueId>| -> Result<ValueId> {
        let x = match bias {
            Some(bias) => b.op("Add", &[x, bias], vec![])?,
            None => x,
        };
        to_heads(b, x, heads)
    };
    let (q, k, v) = match layout {
        MhaLayout::Separate(key, value) => (
            separate(b, query, bias_of(0))?,
            separate(b, key, bias_of(1))?,
            separate(b, value, bias_of(2))?,
        ),
        MhaLayout::Heads(key, value) => (separate(b, query, bias_of(0))?, key, value),
        MhaLayout::PackedQkv => {
            let qkv = unpack_heads(b, n, query, 3, bias_parts.as_deref())?;
            (qkv[0], qkv[1], qkv[2])
        }
        MhaLayout::PackedKv(key) => {
            let kv_bias = bias_parts.as_ref().map(|p| [p[1], p[2]]);
            let kv = unpack_heads(b, n, key, 2, kv_bias.as_ref().map(|p| &p[..]))?;
            (separate(b, query, bias_of(0))?, kv[0], kv[1])
        }
    };
    let out = masked_attention(b, n, q, k, v, optional(n, 4), optional(n, 5))?;
    Ok(vec![Some(out)])
}

/// Where `MultiHeadAttention` finds its key and value.
#[derive(Clone, Copy)]
enum MhaLayout {
    /// Separate `[B, L, D]` key and value.
    Separate(ValueId, ValueId),
    /// Key and value in heads, `[B, N, L, H]`.
    Heads(ValueId, ValueId),
    /// All three packed in the query, `[B, S, N, 3, H]`.
    PackedQkv,
    /// Key and value packed in the key, `[B, L, N, 2, H]`.
    PackedKv(ValueId),
}

/// The `parts` tensors packed in `x` `[B, S, N, parts, H]`, each in heads `[B, N, S, H]`,
/// with `bias[i]` (`[N·H]`) added to the i-th.
fn unpack_heads(
    b: &mut Builder,
    n: &Node,
    x: ValueId,
    parts: usize,
    bias: Option<&[ValueId]>,
) -> Result<Vec<ValueId>> {
    use crate::ir::build::ints_attr;
    let sizes = b.ints("ones", &vec![1; parts]);
    let pieces = split(b, n, x, sizes, 3, parts)?;
    let mut out = Vec::with_capacity(parts);
    for (i, piece) in pieces.into_iter().enumerate() {
        let axis = b.ints("axis", &[3]);
        let mut p = b.op("Squeeze", &[piece, axis], vec![])?; // [B, S, N, H]
        if let Some(bias) = bias {
            let heads_shape = b.op("Shape", &[p], vec![])?;
            let n_heads = dim(b, heads_shape, 2)?;
            let minus_one = b.ints("minus_one", &[-1]);
            let shape = b.op(
                "Concat",
                &[n_heads, minus_one],
                vec![crate::ir::build::int_attr("axis", 0)],
            )?;
            let bias = b.op("Reshape", &[bias[i], shape], vec![])?; // [N, H]
            p = b.op("Add", &[p, bias], vec![])?;
        }
        out.push(b.op("Transpose", &[p], vec![ints_attr("perm", &[0, 2, 1, 3])])?);
    }
    Ok(out)
}
