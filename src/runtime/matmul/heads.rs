//! What the attention kernels ([`super::attention`], [`super::attention_grad`]) share:
//! the products around a softmax seen from the softmax's side ([`Reader`], [`View`]),
//! the mask's live blocks read once per offset ([`MaskBlocks`]), and raw pointers
//! shared by a call's threads ([`At`]).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::tiles::{live_blocks, Live, Operand};
use super::{offsets, FaerMatMul, Span};

/// A product that reads `dS` (or a softmax `P`), and which of its inputs that is (0: A,
/// 1: B).
#[derive(Debug, Clone, PartialEq)]
pub struct Reader {
    pub op: FaerMatMul,
    pub scores_input: usize,
}

impl Reader {
    /// The product's inputs' shapes, `dS`'s in its place.
    fn inputs<'s, D>(&self, scores: &'s [D], other: &'s [D]) -> [&'s [D]; 2] {
        if self.scores_input == 0 {
            [scores, other]
        } else {
            [other, scores]
        }
    }

    /// C's shape for `dS` and the other operand.
    pub fn output_shape<D: DimLike>(&self, scores: &[D], other: &[D]) -> TractResult<TVec<D>> {
        let [a, b] = self.inputs(scores, other);
        self.op.output_shape(a, b)
    }

    /// The product's plan, seen from `dS`: along which of its strides C runs and which
    /// it sums (`kept`, `summed`), the other operand's and C's strides, and each loop's
    /// offsets `[dS, other, C]`; `None` unless C runs along one axis of `dS` of stride
    /// `kept` and sums the other, of stride `summed`, with no summed axis looped over.
    pub fn view(
        &self,
        scores: &[usize],
        other: &[usize],
        c: &[usize],
        (kept, summed): (Span, Span),
    ) -> TractResult<Option<View>> {
        let [a, b] = self.inputs(scores, other);
        let plan = self.op.plan(a, b, c, None)?;
        // dS's kept axis is m (as A) or n (as B); the other operand's free axis, the
        // head's width, is the other one.
        let (along, width, s_along, s_sum, o_sum, o_width, c_along, c_width) =
            if self.scores_input == 0 {
                let (m, n, k) = (plan.m, plan.n, plan.k);
                (m.size, n.size, m.a, k.a, k.b, n.b, m.c, n.c)
            } else {
                let (m, n, k) = (plan.m, plan.n, plan.k);
                (n.size, m.size, n.b, k.b, k.a, m.a, n.c, m.c)
            };
        let fits = plan.k_loops.is_empty()
            && (along, s_along) == (kept.size, kept.c)
            && (plan.k.size, s_sum) == (summed.size, summed.c);
        if !fits {
            return Ok(None);
        }
        let loops = offsets(&plan.loops)
            .into_iter()
            .map(|[a, b, c, _]| {
                if self.scores_input == 0 {
                    [a, b, c]
                } else {
                    [b, a, c]
                }
            })
            .collect();
        Ok(Some(View {
            width,
            other_sum: o_sum,
            other_width: o_width,
            c_along,
            c_width,
            alpha: self.op.alpha,
            loops,
        }))
    }
}

/// A product reading `dS`, per head: C (`along` × `width`) = `alpha`·(`dS` or `dSᵀ`)
/// times the other operand (summed axis × `width`).
pub struct View {
    /// The head's width (its vectors' length).
    pub width: usize,
    /// The other operand's strides along the summed axis and along the width.
    pub other_sum: isize,
    pub other_width: isize,
    /// C's strides along `dS`'s kept axis and along the width.
    pub c_along: isize,
    pub c_width: isize,
    pub alpha: f32,
    /// Each loop's offsets in `dS`, the other operand and C.
    pub loops: Vec<[isize; 3]>,
}

/// A raw element pointer shared by a call's threads (each writes its own heads).
#[derive(Clone, Copy)]
pub struct At(usize);

impl At {
    pub fn of(data: &[f32]) -> At {
        At(data.as_ptr() as usize)
    }

    pub fn of_mut(data: &mut [f32]) -> At {
        At(data.as_mut_ptr() as usize)
    }

    /// The element `offset` elements in.
    pub fn plus(self, offset: isize) -> *mut f32 {
        (self.0 as *mut f32).wrapping_offset(offset)
    }
}

/// The live column range of each block of rows of the scores, per mask offset: heads
/// that share a mask share its blocks, read once.
pub struct MaskBlocks(Vec<(isize, Vec<LiveBlock>)>);

/// A block of rows of the scores and the columns where its mask is live.
type LiveBlock = (std::ops::Range<usize>, std::ops::Range<usize>);

impl MaskBlocks {
    /// The blocks of the scores' `rows` × `cols` (spans whose `r` strides are the
    /// mask's) for the mask at each of `offsets`; a block with a row masked whole is
    /// live whole (`Live::UnmaskedRows`: that row's softmax is uniform).
    ///
    /// # Safety
    ///
    /// `mask` must broadcast to the scores, so that its strides address rows × cols of
    /// its elements from each offset.
    pub unsafe fn read(
        mask: &[f32],
        offsets: impl IntoIterator<Item = isize>,
        rows: Span,
        cols: Span,
    ) -> MaskBlocks {
        let mut blocks: Vec<(isize, Vec<LiveBlock>)> = Vec::new();
        for at in offsets {
            if blocks.iter().any(|(seen, _)| *seen == at) {
                continue;
            }
            let reference = Operand {
                at: mask.as_ptr().wrapping_offset(at),
                outer: rows.r,
                k: cols.r,
            };
            // SAFETY: the caller's contract.
            let live = unsafe { live_blocks(rows.size, cols.size, reference, Live::UnmaskedRows) };
            blocks.push((at, live));
        }
        MaskBlocks(blocks)
    }

    /// The blocks of the mask at `offset` (one of those [`MaskBlocks::read`] was given).
    pub fn of(&self, offset: isize) -> &[LiveBlock] {
        self.0
            .iter()
            .find(|(at, _)| *at == offset)
            .map_or(&[], |(_, blocks)| blocks)
    }
}
