//! Attention's backward through its softmax in one kernel per head ([`AttentionGrad`]):
//! the softmax's incoming gradient `dP = dO·Vᵀ`, its gradient `dS = P⊙(dP − Σ P·dP)`
//! ([`SoftmaxGrad`]), and the two products that read `dS`, `dQ = dS·K` and
//! `dK = dSᵀ·Q`, a block of 64 query rows at a time, so that `dP` and `dS` live in a
//! cache-sized scratch block and never in memory.
//!
//! Unfused, the four ops write `dP` (the whole scores' size, half of it zeros under a
//! causal mask), read it back with `P` to write `dS`, and read `dS` twice more, each
//! time scanning its zero ends. Here each block computes `dP` only between its first and
//! last unmasked columns (as [`super::restrict_to_live_outputs`] did: the mask says
//! where, read once for the heads that share it), `dS` on those columns, and its share
//! of `dQ` (its own rows) and `dK` (summed over the blocks).
//!
//! It computes what the four ops do: the same products over the same non-zero terms (a
//! masked entry's `dS` is `0·(0 − Σ)`: skipping it is what the unfused products'
//! zero-end cut did) and the same row kernel for `dS`. Only the order of some sums
//! differs, so `dQ` and `dK` may differ in their last bits: `dK` adds the blocks'
//! products one after another where the unfused product summed every row in one pass,
//! and `dQ` sums over the mask's live columns (with zeros where `dS` underflowed) where
//! the unfused product summed over `dS`'s non-zero ones.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::heads::{At, MaskBlocks, Reader, View};
use super::tiles::{Live, EDGE_BLOCK};
use super::{offsets, FaerMatMul, Plan};
use crate::runtime::pattern::{broadcasts_to, replace_outputs_with, single_reader};
use crate::runtime::softmax_grad::{self, SoftmaxGrad};

/// `(dO, V, mask, P, K, Q)` → `(dQ, dK)`: the products `dP = dO·Vᵀ` (read where the mask
/// is live), `dQ = dS·K` and `dK = dSᵀ·Q` around a softmax's gradient
/// `dS = SoftmaxGrad(dP, P)`, in one pass per head ([`fuse_attention_gradients`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionGrad {
    /// `dP = dO·Vᵀ`, with its live-output mask (`Live::UnmaskedRows`).
    scores_grad: FaerMatMul,
    /// `dQ = dS·K`: `dS`'s rows are C's rows, its columns summed.
    query_grad: Reader,
    /// `dK = dSᵀ·Q`: `dS`'s columns are C's rows, its rows summed.
    key_grad: Reader,
}

// As FaerMatMul's: a folded factor is a model's finite constant.
impl Eq for AttentionGrad {}

/// One head's operands: offsets (in elements) of `dO`, `V`, the mask, `dS`/`P` (one
/// shape), `K`, `dQ`, `Q` and `dK`.
#[derive(Debug, Clone, Copy)]
struct Head {
    d_o: isize,
    v: isize,
    mask: isize,
    scores: isize,
    k: isize,
    d_q: isize,
    q: isize,
    d_k: isize,
}

/// The products' plans for one call, lined up head by head.
struct Heads {
    dp: Plan,
    dq: View,
    dk: View,
    heads: Vec<Head>,
}

impl AttentionGrad {
    /// The shapes of `dP` (and `dS`, `P`), `dQ` and `dK` for `dO`, `V`, `K` and `Q`.
    fn shapes<D: DimLike>(
        &self,
        d_o: &[D],
        v: &[D],
        k: &[D],
        q: &[D],
    ) -> TractResult<[TVec<D>; 3]> {
        let scores = self.scores_grad.output_shape(d_o, v)?;
        let d_q = self.query_grad.output_shape(&scores, k)?;
        let d_k = self.key_grad.output_shape(&scores, q)?;
        Ok([scores, d_q, d_k])
    }

    /// The products' plans on these shapes, lined up head by head by `dS`'s offset,
    /// when each head is one matrix product each (no summed axis looped over), `dS`'s
    /// rows are contiguous, and `dQ`'s product runs along `dS`'s rows and sums its
    /// columns while `dK`'s does the reverse; otherwise `None`.
    fn line_up(&self, [d_o, v, mask, k, q]: [&[usize]; 5]) -> TractResult<Option<Heads>> {
        let [scores, d_q, d_k] = self.shapes(d_o, v, k, q)?;
        let dp = self.scores_grad.plan(d_o, v, &scores, Some(mask))?;
        let (rows, cols) = (dp.m, dp.n);
        // (the softmax runs along the scores' last axis: it must be the columns, whole)
        if !dp.k_loops.is_empty() || cols.c != 1 || scores.last() != Some(&cols.size) {
            return Ok(None);
        }
        let (Some(dq), Some(dk)) = (
            self.query_grad.view(&scores, k, &d_q, (rows, cols))?,
            self.key_grad.view(&scores, q, &d_k, (cols, rows))?,
        ) else {
            return Ok(None);
        };
        let by_scores = |view: &View| -> std::collections::HashMap<isize, [isize; 2]> {
            view.loops.iter().map(|&[s, o, c]| (s, [o, c])).collect()
        };
        let (dq_at, dk_at) = (by_scores(&dq), by_scores(&dk));
        let mut heads = Vec::new();
        for [d_o, v, scores, mask] in offsets(&dp.loops) {
            let (Some(&[k, d_q]), Some(&[q, d_k])) = (dq_at.get(&scores), dk_at.get(&scores))
            else {
                return Ok(None);
            };
            heads.push(Head {
                d_o,
                v,
                mask,
                scores,
                k,
                d_q,
                q,
                d_k,
            });
        }
        if dq.loops.len() != heads.len() || dk.loops.len() != heads.len() {
            return Ok(None);
        }
        Ok(Some(Heads { dp, dq, dk, heads }))
    }
}

impl Op for AttentionGrad {
    fn name(&self) -> StaticName {
        "AttentionGrad".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let ops = [&self.scores_grad, &self.query_grad.op, &self.key_grad.op];
        Ok(ops
            .iter()
            .flat_map(|op| op.info().unwrap_or_default())
            .collect())
    }

    op_as_typed_op!();
}

impl EvalOp for AttentionGrad {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (d_o, v, mask, p, k, q) = args_6!(inputs);
        let [scores, d_q_shape, d_k_shape] =
            self.shapes(d_o.shape(), v.shape(), k.shape(), q.shape())?;
        ensure!(
            p.shape() == &scores[..] && broadcasts_to(mask.shape(), &scores),
            "AttentionGrad: softmax {:?} and mask {:?} for scores {scores:?}",
            p.shape(),
            mask.shape()
        );
        let Some(Heads { dp, dq, dk, heads }) =
            self.line_up([d_o.shape(), v.shape(), mask.shape(), k.shape(), q.shape()])?
        else {
            bail!("AttentionGrad: the products no longer line up on these shapes");
        };
        // SAFETY: every element of dQ is written below: each block's rows, from its
        // product or as zeros.
        let mut d_q = unsafe { Tensor::uninitialized::<f32>(&d_q_shape)? };
        let mut d_k = Tensor::zero::<f32>(&d_k_shape)?;
        let plain = [&d_o, &v, &mask, &p, &k, &q].map(|t| t.try_as_plain_ram());
        let [d_o, v, mask, p, k, q] = plain;
        let [d_o, v, mask, p, k, q] = [d_o?, v?, mask?, p?, k?, q?];
        let (d_o, v, mask) = (
            d_o.as_slice::<f32>()?,
            v.as_slice::<f32>()?,
            mask.as_slice::<f32>()?,
        );
        let (p, k, q) = (
            p.as_slice::<f32>()?,
            k.as_slice::<f32>()?,
            q.as_slice::<f32>()?,
        );
        let (rows, cols) = (dp.m, dp.n);
        // SAFETY: the mask broadcasts to the scores (checked above).
        let blocks = unsafe { MaskBlocks::read(mask, heads.iter().map(|h| h.mask), rows, cols) };
        {
            let mut d_q_plain = d_q.try_as_plain_ram_mut()?;
            let mut d_k_plain = d_k.try_as_plain_ram_mut()?;
            let out = (
                At::of_mut(d_q_plain.as_slice_mut::<f32>()?),
                At::of_mut(d_k_plain.as_slice_mut::<f32>()?),
            );
            let inputs = [d_o, v, p, k, q].map(At::of);
            let threads = crate::parallel::product_threads();
            crate::parallel::for_each_part(heads.len(), threads, |h| {
                let head = heads[h];
                let live = blocks.of(head.mask);
                let mut scratch = vec![0f32; EDGE_BLOCK * cols.size];
                for (block, span) in live {
                    // SAFETY: the offsets and strides come from the products' plans on
                    // these shapes; each head writes only its own rows of dQ and its own
                    // dK, and reads the scratch it owns.
                    unsafe {
                        self.block(
                            &head,
                            block.clone(),
                            span.clone(),
                            (&dp, &dq, &dk),
                            inputs,
                            out,
                            &mut scratch,
                        )
                    };
                }
            });
        }
        Ok(tvec!(d_q.into_tvalue(), d_k.into_tvalue()))
    }
}

impl AttentionGrad {
    /// One block of query rows of one head: `dP` on the live columns `span` into
    /// `scratch` (rows of the scores' width), `dS` in place, then the block's rows of
    /// `dQ` and its terms of `dK`.
    ///
    /// # Safety
    ///
    /// `head`'s offsets and the plans' strides address the inputs `[dO, V, P, K, Q]` and
    /// the outputs `(dQ, dK)` within their buffers; no other thread writes this head's
    /// rows of dQ or its dK; `scratch` holds `EDGE_BLOCK` rows of the scores' width.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        head: &Head,
        block: std::ops::Range<usize>,
        span: std::ops::Range<usize>,
        (dp, dq, dk): (&Plan, &View, &View),
        [d_o, v, p, k, q]: [At; 5],
        (d_q, d_k): (At, At),
        scratch: &mut [f32],
    ) {
        let (height, live) = (block.len(), span.len());
        let (first, start, end) = (block.start as isize, span.start as isize, span.end);
        let stride = dp.n.size; // the scratch's row length: the scores' width
        let d_q_rows = unsafe {
            MatMut::<f32>::from_raw_parts_mut(
                d_q.plus(head.d_q + first * dq.c_along),
                height,
                dq.width,
                dq.c_along,
                dq.c_width,
            )
        };
        if span.is_empty() {
            let mut d_q_rows = d_q_rows;
            d_q_rows.fill(0.0); // every column masked: dS is 0 on these rows
            return;
        }
        // dP on the live columns; zeros before them, so that dS's row kernel sums from
        // the row's start as SoftmaxGrad does (and stops at the last live column, past
        // which it adds only zeros).
        for row in scratch.chunks_exact_mut(stride).take(height) {
            row[..span.start].fill(0.0);
        }
        let scratch_at = scratch.as_mut_ptr();
        unsafe {
            matmul(
                MatMut::<f32>::from_raw_parts_mut(
                    scratch_at.wrapping_offset(start),
                    height,
                    live,
                    stride as isize,
                    1,
                ),
                Accum::Replace,
                MatRef::<f32>::from_raw_parts(
                    d_o.plus(head.d_o + first * dp.m.a),
                    height,
                    dp.k.size,
                    dp.m.a,
                    dp.k.a,
                ),
                MatRef::<f32>::from_raw_parts(
                    v.plus(head.v + start * dp.n.b),
                    dp.k.size,
                    live,
                    dp.k.b,
                    dp.n.b,
                ),
                self.scores_grad.alpha,
                Par::Seq,
            );
        }
        // dS = P⊙(dP − Σ P·dP), row by row on [0, end).
        for (i, row) in scratch.chunks_exact_mut(stride).take(height).enumerate() {
            let at = head.scores + (first + i as isize) * dp.m.c;
            let y = unsafe { std::slice::from_raw_parts(p.plus(at), end) };
            softmax_grad::rows(&mut row[..end], y, end);
        }
        let d_s = |transposed: bool| unsafe {
            let at = scratch_at.wrapping_offset(start) as *const f32;
            if transposed {
                MatRef::<f32>::from_raw_parts(at, live, height, 1, stride as isize)
            } else {
                MatRef::<f32>::from_raw_parts(at, height, live, stride as isize, 1)
            }
        };
        unsafe {
            // dQ's rows: dS (the live columns) times K's matching rows.
            matmul(
                d_q_rows,
                Accum::Replace,
                d_s(false),
                MatRef::<f32>::from_raw_parts(
                    k.plus(head.k + start * dq.other_sum),
                    live,
                    dq.width,
                    dq.other_sum,
                    dq.other_width,
                ),
                dq.alpha,
                Par::Seq,
            );
            // dK's live rows: dSᵀ times Q's rows of this block, added up over blocks.
            matmul(
                MatMut::<f32>::from_raw_parts_mut(
                    d_k.plus(head.d_k + start * dk.c_along),
                    live,
                    dk.width,
                    dk.c_along,
                    dk.c_width,
                ),
                Accum::Add,
                d_s(true),
                MatRef::<f32>::from_raw_parts(
                    q.plus(head.q + first * dk.other_sum),
                    height,
                    dk.width,
                    dk.other_sum,
                    dk.other_width,
                ),
                dk.alpha,
                Par::Seq,
            );
        }
    }
}

impl TypedOp for AttentionGrad {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 6 && inputs.iter().all(|f| f.datum_type == f32::datum_type()),
            "AttentionGrad takes six float32 inputs"
        );
        let [_, d_q, d_k] = self.shapes(
            &inputs[0].shape,
            &inputs[1].shape,
            &inputs[4].shape,
            &inputs[5].shape,
        )?;
        Ok(tvec!(f32::fact(d_q), f32::fact(d_k)))
    }

    as_op!();
}

/// Runs each [`SoftmaxGrad`] whose incoming gradient is a product read where a mask is
/// live (`dP = dO·Vᵀ`, from [`super::restrict_to_live_outputs`]) and whose output is
/// read by exactly two products, as either operand (`dS·K` along its rows and `dSᵀ·Q`
/// along its columns), together with those three products as one [`AttentionGrad`],
/// when their shapes line up head by head. Returns how many.
pub fn fuse_attention_gradients(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in 0..model.nodes.len() {
        if !model.nodes[id].op_is::<SoftmaxGrad>() {
            continue;
        }
        let (d_p, p) = (model.nodes[id].inputs[0], model.nodes[id].inputs[1]);
        let d_s = OutletId::new(id, 0);
        let product = |outlet: OutletId| model.nodes[outlet.node].op_as::<FaerMatMul>();
        let Some(scores_grad) = product(d_p) else {
            continue;
        };
        let readers = model.outlet_successors(d_s);
        let plain = |inlet: &InletId| {
            let node = &model.nodes[inlet.node];
            node.inputs.len() == 2
                && node.inputs[1 - inlet.slot] != d_s
                && node
                    .op_as::<FaerMatMul>()
                    .is_some_and(|op| op.live.is_none() && !op.add_to)
        };
        if scores_grad.live != Some(Live::UnmaskedRows)
            || scores_grad.add_to
            || !single_reader(model, d_p)
            || model.outputs.contains(&d_s)
            || readers.len() != 2
            || !readers.iter().all(plain)
        {
            continue;
        }
        let shape = |outlet: OutletId| -> TractResult<Option<TVec<usize>>> {
            Ok(model
                .outlet_fact(outlet)?
                .shape
                .as_concrete()
                .map(|s| s.into()))
        };
        let dp_node = &model.nodes[d_p.node];
        let [d_o, v, mask] = [dp_node.inputs[0], dp_node.inputs[1], dp_node.inputs[2]];
        let reader = |inlet: &InletId| {
            let node = &model.nodes[inlet.node];
            let op = node.op_as::<FaerMatMul>().expect("checked").clone();
            let other = node.inputs[1 - inlet.slot];
            let reader = Reader {
                op,
                scores_input: inlet.slot,
            };
            (reader, inlet.node, other)
        };
        let (first, second) = (reader(&readers[0]), reader(&readers[1]));
        let mut chosen = None;
        for ((query_grad, dq_node, k), (key_grad, dk_node, q)) in
            [(first.clone(), second.clone()), (second, first)]
        {
            let [Some(s_do), Some(s_v), Some(s_mask), Some(s_k), Some(s_q)] =
                [d_o, v, mask, k, q].map(|o| shape(o).ok().flatten())
            else {
                break;
            };
            let op = AttentionGrad {
                scores_grad: scores_grad.clone(),
                query_grad,
                key_grad,
            };
            let lined_up = op.line_up([&s_do, &s_v, &s_mask, &s_k, &s_q]);
            if lined_up.ok().flatten().is_some() {
                chosen = Some((op, dq_node, dk_node, k, q));
                break;
            }
        }
        let Some((op, dq_node, dk_node, k, q)) = chosen else {
            continue;
        };
        let name = format!("{}.attention_grad", model.nodes[id].name);
        replace_outputs_with(
            model,
            name,
            op,
            &[d_o, v, mask, p, k, q],
            &[OutletId::new(dq_node, 0), OutletId::new(dk_node, 0)],
        )?;
        fused += 1;
    }
    Ok(fused)
}

#[cfg(test)]
mod tests;
