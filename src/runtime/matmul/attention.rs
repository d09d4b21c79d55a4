//! Attention's forward in one kernel per head ([`Attention`]): the scores `Q·Kᵀ`, their
//! masked softmax `P` ([`MaskedSoftmax`]) and `O = P·V`, a block of 64 query rows at a
//! time, so that each block of `P` is written once and read back by `P·V` while it is
//! in cache.
//!
//! Unfused, the scores are written (with zeros where masked), read and overwritten by
//! the softmax, and read again by `P·V`, which first scans each row for its zero ends.
//! Here each block computes its scores between the first and last unmasked columns of
//! its rows (all of them if a row is masked whole: its softmax is uniform), takes the
//! softmax of its rows in place, and multiplies those columns by `V`. `P` is still
//! written whole: the backward reads it.
//!
//! The scores and `P` are what the three ops compute, bit for bit (the same products
//! over the same terms, the same row kernel on the same rows); `O` sums the same
//! non-zero terms, in faer's order for the block's live columns.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::heads::{At, MaskBlocks, Reader, View};
use super::tiles::Live;
use super::{offsets, FaerMatMul, Plan};
use crate::runtime::masked_softmax::{softmax_row, MaskRow, MaskedSoftmax};
use crate::runtime::pattern::{broadcasts_to, replace_outputs_with, single_reader};

/// `(Q, K, mask, V)` → `(P, O)`: `P = softmax(scale·Q·Kᵀ + mask)` over its last axis and
/// `O = P·V`, in one pass per head ([`fuse_attention`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    /// `Q·Kᵀ` (with its factor).
    scores: FaerMatMul,
    /// The softmax's factor on the scores (`None`: none).
    scale: Option<f32>,
    /// `P·V`: `P`'s rows are C's rows, its columns summed.
    values: Reader,
}

// As FaerMatMul's: a folded factor is a model's finite constant.
impl Eq for Attention {}

/// One head's offsets (in elements) in `Q`, `K`, the mask, `P`, `V` and `O`.
#[derive(Debug, Clone, Copy)]
struct Head {
    q: isize,
    k: isize,
    mask: isize,
    p: isize,
    v: isize,
    o: isize,
}

impl Attention {
    /// The shapes of `P` and `O` for `Q`, `K` and `V`.
    fn shapes<D: DimLike>(&self, q: &[D], k: &[D], v: &[D]) -> TractResult<[TVec<D>; 2]> {
        let p = self.scores.output_shape(q, k)?;
        let o = self.values.output_shape(&p, v)?;
        Ok([p, o])
    }

    /// The scores' plan and `P·V`'s view on these shapes, lined up head by head by
    /// `P`'s offset, when `P`'s rows and the mask's are contiguous (or the mask
    /// broadcasts along them) and `P·V` runs along `P`'s rows; otherwise `None`.
    fn line_up(
        &self,
        [q, k, mask, v]: [&[usize]; 4],
    ) -> TractResult<Option<(Plan, View, Vec<Head>)>> {
        let [p, o] = self.shapes(q, k, v)?;
        let sp = self.scores.plan(q, k, &p, Some(mask))?;
        let (rows, cols) = (sp.m, sp.n);
        // (the softmax runs along the scores' last axis: it must be the columns, whole)
        let last = p.last() == Some(&cols.size);
        if !sp.k_loops.is_empty() || cols.c != 1 || cols.r > 1 || !last {
            return Ok(None);
        }
        let Some(pv) = self.values.view(&p, v, &o, (rows, cols))? else {
            return Ok(None);
        };
        let by_p: std::collections::HashMap<isize, [isize; 2]> =
            pv.loops.iter().map(|&[p, v, o]| (p, [v, o])).collect();
        let mut heads = Vec::new();
        for [q, k, p, mask] in offsets(&sp.loops) {
            let Some(&[v, o]) = by_p.get(&p) else {
                return Ok(None);
            };
            heads.push(Head {
                q,
                k,
                mask,
                p,
                v,
                o,
            });
        }
        if pv.loops.len() != heads.len() {
            return Ok(None);
        }
        Ok(Some((sp, pv, heads)))
    }
}

impl Op for Attention {
    fn name(&self) -> StaticName {
        "Attention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = self.scores.info()?;
        info.push(format!("scale: {:?}", self.scale));
        info.extend(self.values.op.info()?);
        Ok(info)
    }

    op_as_typed_op!();
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, mask, v) = args_4!(inputs);
        let [p_shape, o_shape] = self.shapes(q.shape(), k.shape(), v.shape())?;
        ensure!(
            broadcasts_to(mask.shape(), &p_shape),
            "Attention: mask {:?} for scores {p_shape:?}",
            mask.shape()
        );
        let Some((sp, pv, heads)) =
            self.line_up([q.shape(), k.shape(), mask.shape(), v.shape()])?
        else {
            bail!("Attention: the products no longer line up on these shapes");
        };
        // SAFETY: every element of both is written below: each block's rows of P whole
        // (scores and zeros), and of O.
        let (mut p, mut o) = unsafe {
            (
                Tensor::uninitialized::<f32>(&p_shape)?,
                Tensor::uninitialized::<f32>(&o_shape)?,
            )
        };
        let plain = [&q, &k, &mask, &v].map(|t| t.try_as_plain_ram());
        let [q, k, mask, v] = plain;
        let [q, k, mask, v] = [q?, k?, mask?, v?];
        let [q, k, mask, v] = [
            q.as_slice::<f32>()?,
            k.as_slice::<f32>()?,
            mask.as_slice::<f32>()?,
            v.as_slice::<f32>()?,
        ];
        let (rows, cols) = (sp.m, sp.n);
        // SAFETY: the mask broadcasts to the scores (checked above).
        let blocks = unsafe { MaskBlocks::read(mask, heads.iter().map(|h| h.mask), rows, cols) };
        {
            let mut p_plain = p.try_as_plain_ram_mut()?;
            let mut o_plain = o.try_as_plain_ram_mut()?;
            let out = (
                At::of_mut(p_plain.as_slice_mut::<f32>()?),
                At::of_mut(o_plain.as_slice_mut::<f32>()?),
            );
            let inputs = [q, k, v].map(At::of);
            let threads = crate::parallel::product_threads();
            crate::parallel::for_each_part(heads.len(), threads, |h| {
                let head = heads[h];
                let live = blocks.of(head.mask);
                for (block, span) in live {
                    let span = if span.is_empty() {
                        0..cols.size
                    } else {
                        span.clone()
                    };
                    // SAFETY: the offsets and strides come from the plans on these
                    // shapes (the mask's too); each head writes only its own P and O.
                    unsafe {
                        self.block(&head, block.clone(), span, (&sp, &pv), inputs, mask, out)
                    };
                }
            });
        }
        Ok(tvec!(p.into_tvalue(), o.into_tvalue()))
    }
}

impl Attention {
    /// One block of query rows of one head: its scores on the live columns `span` into
    /// `P`'s rows (zeros elsewhere), their softmax in place, then its rows of `O`.
    ///
    /// # Safety
    ///
    /// `head`'s offsets and the plans' strides address `[Q, K, V]`, the mask and
    /// `(P, O)` within their buffers; no other thread writes this head's `P` or `O`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        head: &Head,
        block: std::ops::Range<usize>,
        span: std::ops::Range<usize>,
        (sp, pv): (&Plan, &View),
        [q, k, v]: [At; 3],
        mask: &[f32],
        (p, o): (At, At),
    ) {
        let (height, live, width) = (block.len(), span.len(), sp.n.size);
        let (first, start) = (block.start as isize, span.start as isize);
        let row = |i: usize| unsafe {
            std::slice::from_raw_parts_mut(p.plus(head.p + (first + i as isize) * sp.m.c), width)
        };
        for i in 0..height {
            let row = row(i);
            row[..span.start].fill(0.0);
            row[span.end..].fill(0.0);
        }
        unsafe {
            matmul(
                MatMut::<f32>::from_raw_parts_mut(
                    p.plus(head.p + first * sp.m.c + start),
                    height,
                    live,
                    sp.m.c,
                    1,
                ),
                Accum::Replace,
                MatRef::<f32>::from_raw_parts(
                    q.plus(head.q + first * sp.m.a),
                    height,
                    sp.k.size,
                    sp.m.a,
                    sp.k.a,
                ),
                MatRef::<f32>::from_raw_parts(
                    k.plus(head.k + start * sp.n.b),
                    sp.k.size,
                    live,
                    sp.k.b,
                    sp.n.b,
                ),
                self.scores.alpha,
                Par::Seq,
            );
        }
        for i in 0..height {
            let at = (head.mask + (first + i as isize) * sp.m.r) as usize;
            let mask = if sp.n.r == 0 {
                MaskRow::Splat(mask[at])
            } else {
                MaskRow::Slice(&mask[at..at + width])
            };
            softmax_row(row(i), mask, self.scale);
        }
        unsafe {
            matmul(
                MatMut::<f32>::from_raw_parts_mut(
                    o.plus(head.o + first * pv.c_along),
                    height,
                    pv.width,
                    pv.c_along,
                    pv.c_width,
                ),
                Accum::Replace,
                MatRef::<f32>::from_raw_parts(
                    p.plus(head.p + first * sp.m.c + start),
                    height,
                    live,
                    sp.m.c,
                    1,
                ),
                MatRef::<f32>::from_raw_parts(
                    v.plus(head.v + start * pv.other_sum),
                    live,
                    pv.width,
                    pv.other_sum,
                    pv.other_width,
                ),
                pv.alpha,
                Par::Seq,
            );
        }
    }
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 4 && inputs.iter().all(|f| f.datum_type == f32::datum_type()),
            "Attention takes four float32 inputs"
        );
        let [p, o] = self.shapes(&inputs[0].shape, &inputs[1].shape, &inputs[3].shape)?;
        Ok(tvec!(f32::fact(p), f32::fact(o)))
    }

    as_op!();
}

/// Runs each [`MaskedSoftmax`] whose scores are a product read where its mask is live
/// (from [`super::restrict_to_live_outputs`]) together with that product and a product
/// that reads the softmax along its rows (`P·V`) as one [`Attention`], when their shapes
/// line up head by head. The softmax's other readers (the backward) read the new op's
/// `P`. Returns how many.
pub fn fuse_attention(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in 0..model.nodes.len() {
        let Some(softmax) = model.nodes[id].op_as::<MaskedSoftmax>() else {
            continue;
        };
        let (scores, mask) = (model.nodes[id].inputs[0], model.nodes[id].inputs[1]);
        let p = OutletId::new(id, 0);
        let Some(scores_op) = model.nodes[scores.node].op_as::<FaerMatMul>() else {
            continue;
        };
        let scores_node = &model.nodes[scores.node];
        if scores_op.live != Some(Live::Unmasked)
            || scores_op.add_to
            || scores_node.inputs.get(2) != Some(&mask)
            || !single_reader(model, scores)
        {
            continue;
        }
        let shape = |outlet: OutletId| -> Option<TVec<usize>> {
            let fact = model.outlet_fact(outlet).ok()?;
            fact.shape.as_concrete().map(|s| s.into())
        };
        let [q, k] = [scores_node.inputs[0], scores_node.inputs[1]];
        let [Some(s_q), Some(s_k), Some(s_mask)] = [q, k, mask].map(shape) else {
            continue;
        };
        let mut chosen = None;
        for inlet in model.outlet_successors(p) {
            let node = &model.nodes[inlet.node];
            let Some(op) = node.op_as::<FaerMatMul>() else {
                continue;
            };
            if op.live.is_some() || op.add_to || node.inputs.len() != 2 {
                continue;
            }
            let v = node.inputs[1 - inlet.slot];
            let Some(s_v) = shape(v).filter(|_| v != p) else {
                continue;
            };
            let attention = Attention {
                scores: scores_op.clone(),
                scale: softmax.scale(),
                values: Reader {
                    op: op.clone(),
                    scores_input: inlet.slot,
                },
            };
            let lined_up = attention.line_up([&s_q, &s_k, &s_mask, &s_v]);
            if lined_up.ok().flatten().is_some() {
                chosen = Some((attention, inlet.node, v));
                break;
            }
        }
        let Some((attention, values_node, v)) = chosen else {
            continue;
        };
        let name = format!("{}.attention", model.nodes[id].name);
        replace_outputs_with(
            model,
            name,
            attention,
            &[q, k, mask, v],
            &[p, OutletId::new(values_node, 0)],
        )?;
        fused += 1;
    }
    Ok(fused)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{
        assert_all_close, attention_mask, optimized, tensor, wire_probabilities, wire_product,
    };
    use super::super::{fold_scalar_factors, restrict_to_live_outputs, use_faer_matmuls};
    use super::*;
    use crate::runtime::masked_softmax::use_masked_softmax;

    /// Attention's forward as an exported model has it, `P = softmax(q·kᵀ·scale + mask)`
    /// and `O = P·v` in the layout of `exprs` (scores, output), both outputs: the fused
    /// model's `P` bit for bit the unfused kernels', and both within 1e-5 of tract's own
    /// ops, on `threads` threads.
    fn check(shape: &[usize], exprs: [&str; 2], mask: Vec<f32>, threads: usize) {
        let mut model = TypedModel::default();
        let [q, k, v] = ["q", "k", "v"].map(|n| model.add_source(n, f32::fact(shape)).unwrap());
        let p = wire_probabilities(&mut model, exprs[0], [q, k], mask);
        let o = wire_product(&mut model, "o", exprs[1], [p, v], false);
        model.select_output_outlets(&[p, o]).unwrap();
        let model = model.into_decluttered().unwrap();
        let mut unfused = model.clone();
        assert!(use_faer_matmuls(&mut unfused).unwrap());
        fold_scalar_factors(&mut unfused).unwrap();
        assert_eq!(use_masked_softmax(&mut unfused).unwrap(), 1);
        assert_eq!(restrict_to_live_outputs(&mut unfused).unwrap(), 1);
        let mut fused = unfused.clone();
        assert_eq!(fuse_attention(&mut fused).unwrap(), 1, "{exprs:?}");
        let inputs: TVec<TValue> = (0..3).map(|i| tensor(shape, i).into_tvalue()).collect();
        let (want, unfused) = (optimized(model, &inputs), optimized(unfused, &inputs));
        crate::parallel::set_product_threads(threads);
        let got = optimized(fused, &inputs);
        crate::parallel::set_product_threads(1);
        assert_eq!(got[0], unfused[0], "P, fused and not");
        // Probabilities, and sums of them times values of size <= 1: within 1e-5.
        assert_all_close(&want, &got, 1e-5);
    }

    #[test]
    fn fused_attention_equals_tracts() {
        let heads_first = ["hqd,hkd->hqk", "hqk,hkd->hqd"];
        let tokens_first = ["aqhd,akhd->ahqk", "ahqk,akhd->aqhd"];
        // (shape, layout, mask: s, causal, row masked whole, padding; threads)
        let cases: [(&[usize], _, _, _); 4] = [
            (&[2, 150, 16], heads_first, (150, true, 100, 0), 1),
            (&[2, 150, 16], heads_first, (150, true, 100, 0), 2),
            (&[2, 70, 3, 8], tokens_first, (70, true, 69, 5), 2),
            (&[2, 70, 16], heads_first, (70, false, 200, 20), 1),
        ];
        for (shape, exprs, (s, causal, whole, pad), threads) in cases {
            check(shape, exprs, attention_mask(s, causal, whole, pad), threads);
        }
    }
}
