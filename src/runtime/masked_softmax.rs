//! `MaskedSoftmax`: attention's `softmax(x·scale + mask)` over the last axis as one
//! kernel, in the scores' own buffer.
//!
//! tract runs it as a `Mul`-`Add` chain (one pass over the scores, reading the mask
//! broadcast over the heads) and then its softmax (another). Here each row is scaled,
//! masked, exponentiated and normalized while it is in cache. A term whose exponent is
//! below `exp`'s range (a mask's `-inf` or float minimum) is exactly 0, as in tract's
//! softmax: the products after it skip those blocks (see [`super::matmul`]).
//!
//! [`use_masked_softmax`] finds the pattern in a decluttered model; the training graph
//! and every ONNX file keep the plain ops.

use tract_core::ops::math::Add;
use tract_core::ops::nn::{Softmax, SoftmaxKind};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::pattern::{broadcasts_to, is_binary, replace_with, scalar_mul, single_reader};

/// `softmax(x·scale + mask)` over the last axis; `mask` has x's rank, each of its dims
/// 1 (broadcast) or x's. Float32.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedSoftmax {
    /// The scores' factor (`None`: no `Mul` before the mask).
    scale: Option<f32>,
}

impl MaskedSoftmax {
    /// The scores' factor (`None`: none).
    pub(crate) fn scale(&self) -> Option<f32> {
        self.scale
    }
}

// Ops compare by value; a model's constant factor is never NaN after the pattern read it
// (a NaN factor would make every score NaN, and two such ops are not merged anyway).
impl Eq for MaskedSoftmax {}

impl Op for MaskedSoftmax {
    fn name(&self) -> StaticName {
        "MaskedSoftmax".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("scale: {:?}", self.scale)])
    }

    op_as_typed_op!();
}

impl EvalOp for MaskedSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, mask) = args_2!(inputs);
        let shape: TVec<usize> = x.shape().into();
        let width = shape.last().copied().unwrap_or(1);
        ensure!(
            broadcasts_to(mask.shape(), &shape),
            "MaskedSoftmax: mask {:?} does not broadcast to scores {shape:?}",
            mask.shape()
        );
        // The mask's element strides over x's axes (0 where it broadcasts).
        let mut strides: TVec<isize> = tvec![0; shape.len()];
        let mut s = 1isize;
        for ix in (0..shape.len()).rev() {
            if mask.shape()[ix] != 1 {
                strides[ix] = s;
            }
            s *= mask.shape()[ix] as isize;
        }
        let mut y = x.into_tensor(); // the scores' buffer, when this is their last reader
        if width == 0 || y.len() == 0 {
            return Ok(tvec!(y.into_tvalue()));
        }
        {
            let mask = mask.try_as_plain_ram()?;
            let mask = mask.as_slice::<f32>()?;
            let mut plain = y.try_as_plain_ram_mut()?;
            let y = plain.as_slice_mut::<f32>()?;
            let rows = y.len() / width;
            // The mask's offset for row `r` (x's leading axes, last fastest).
            let mask_row = |mut r: usize| -> isize {
                let mut at = 0;
                for ix in (0..shape.len() - 1).rev() {
                    at += (r % shape[ix]) as isize * strides[ix];
                    r /= shape[ix];
                }
                at
            };
            let last = strides[shape.len() - 1];
            let scale = self.scale;
            // Rows shared among the threads this worker may use (all of them at batch 1).
            let parts = crate::parallel::product_threads().clamp(1, rows);
            let per = rows.div_ceil(parts);
            let chunks: Vec<_> = y.chunks_mut(per * width).collect();
            crate::parallel::for_each_item(chunks, parts, |part, y| {
                for (i, row) in y.chunks_exact_mut(width).enumerate() {
                    let at = mask_row(part * per + i) as usize;
                    let mask = if last == 0 {
                        MaskRow::Splat(mask[at])
                    } else {
                        MaskRow::Slice(&mask[at..at + width])
                    };
                    softmax_row(row, mask, scale);
                }
            });
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

/// A row's mask: its own values, or one value broadcast along the row.
#[derive(Clone, Copy)]
pub(crate) enum MaskRow<'a> {
    Slice(&'a [f32]),
    Splat(f32),
}

/// `softmax(row·scale + mask)` in place, rounded as tract's `Mul`, `Add` and `Softmax`
/// would be but for the `exp` (masked scores are exactly 0).
pub(crate) fn softmax_row(row: &mut [f32], mask: MaskRow<'_>, scale: Option<f32>) {
    pulp::Arch::new().dispatch(Row { row, mask, scale })
}

/// One row of scores (overwritten by its softmax) and its mask, compiled for each
/// instruction set `pulp` dispatches to.
struct Row<'a> {
    row: &'a mut [f32],
    mask: MaskRow<'a>,
    scale: Option<f32>,
}

/// Partial sums and maxima kept apart, so that the loops vectorize.
const LANES: usize = 16;

impl pulp::WithSimd for Row<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Row { row, mask, scale } = self;
        // x·scale, then + mask, rounded one at a time as tract's Mul and Add do.
        let scale = scale.unwrap_or(1.0);
        match mask {
            MaskRow::Slice(m) => row
                .iter_mut()
                .zip(m)
                .for_each(|(v, &m)| *v = *v * scale + m),
            MaskRow::Splat(m) => row.iter_mut().for_each(|v| *v = *v * scale + m),
        }
        let mut maxes = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (m, &v) in maxes.iter_mut().zip(c) {
                *m = if v > *m { v } else { *m };
            }
        }
        let mut max = chunks
            .remainder()
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        max = maxes.iter().fold(max, |m, &v| m.max(v));
        let exp = |v: &mut f32| {
            let d = *v - max;
            // Below exp's range (a masked score): exactly 0.
            *v = if d < -87.3 { 0.0 } else { super::vexp::exp(d) };
            *v
        };
        let mut sums = [0.0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (s, v) in sums.iter_mut().zip(c) {
                *s += exp(v);
            }
        }
        let tail: f32 = chunks.into_remainder().iter_mut().map(exp).sum();
        let inv = 1.0 / (sums.iter().sum::<f32>() + tail);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

impl TypedOp for MaskedSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 2 && inputs.iter().all(|f| f.datum_type == f32::datum_type()),
            "MaskedSoftmax takes two float32 inputs"
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Runs every float32 `Softmax` over the last axis of `Add(x·c, mask)` (or
/// `Add(x, mask)`) as [`MaskedSoftmax`], when the intermediates have no other reader
/// and the mask only broadcasts. Returns how many it fused.
pub fn use_masked_softmax(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(softmax) = node.op_as::<Softmax>() else {
            continue;
        };
        let fact = model.outlet_fact(OutletId::new(id, 0))?;
        let Some(shape) = fact.shape.as_concrete().map(|s| s.to_vec()) else {
            continue;
        };
        let rank = shape.len();
        if softmax.kind != SoftmaxKind::Softmax
            || softmax.quant_output_dt.is_some()
            || softmax.axes.as_slice() != [rank - 1]
            || fact.datum_type != f32::datum_type()
        {
            continue;
        }
        let add_out = node.inputs[0];
        let add = &model.nodes[add_out.node];
        if !is_binary::<Add>(model, add_out.node) || !single_reader(model, add_out) {
            continue;
        }
        // Which side is the scores (x's full shape, its own reader) and which the mask.
        let pick = (0..2).find_map(|side| {
            let (scores, mask) = (add.inputs[side], add.inputs[1 - side]);
            let mask_fact = model.outlet_fact(mask).ok()?;
            let mask_shape = mask_fact.shape.as_concrete()?;
            let scores_fact = model.outlet_fact(scores).ok()?;
            let broadcasts = mask_fact.datum_type == f32::datum_type()
                && broadcasts_to(mask_shape, &shape)
                && scores_fact.shape.as_concrete() == Some(&shape[..])
                && scores_fact.datum_type == f32::datum_type();
            broadcasts.then_some((scores, mask))
        });
        let Some((scores, mask)) = pick else {
            continue;
        };
        let (x, scale) = match scalar_mul(model, scores.node) {
            Some((x, factor)) if single_reader(model, scores) => (x, Some(factor)),
            _ => (scores, None),
        };
        if model.outlet_fact(x)?.shape.as_concrete() != Some(&shape[..]) {
            continue;
        }
        let (name, op) = (node.name.clone(), MaskedSoftmax { scale });
        replace_with(model, name, op, &[x, mask], OutletId::new(id, 0))?;
        fused += 1;
    }
    Ok(fused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::binary::TypedBinOp;
    use tract_core::ops::math::Mul;

    /// `softmax(x·0.125 + mask)` with a causal mask of the float minimum broadcast over
    /// heads, as PyTorch exports it: fused, within 1e-6 of tract's ops, and exact zeros
    /// where masked; without the scale too; on 1 and 2 threads.
    #[test]
    fn masked_softmax_equals_tracts_ops() {
        let (b, h, s) = (2, 3, 40);
        for with_scale in [true, false] {
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([b, h, s, s])).unwrap();
            let mask: Vec<f32> = (0..s * s)
                .map(|i| if i % s > i / s { f32::MIN } else { 0.0 })
                .collect();
            let mask = model
                .add_const("mask", Tensor::from_shape(&[1, 1, s, s], &mask).unwrap())
                .unwrap();
            let mut scores = x;
            if with_scale {
                let c = model.add_const("c", tensor4(&[[[[0.125f32]]]])).unwrap();
                let mul = TypedBinOp(Box::new(Mul), None);
                scores = model.wire_node("mul", mul, &[x, c]).unwrap()[0];
            }
            let add = TypedBinOp(Box::new(Add), None);
            let z = model.wire_node("add", add, &[scores, mask]).unwrap()[0];
            let softmax = Softmax::new(tvec![3], None, SoftmaxKind::Softmax);
            let y = model.wire_node("softmax", softmax, &[z]).unwrap();
            model.select_output_outlets(&y).unwrap();
            let mut fused = model.clone();
            assert_eq!(use_masked_softmax(&mut fused).unwrap(), 1);
            let n = b * h * s * s;
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 401) as f32 / 20.0 - 10.0)
                .collect();
            let input = Tensor::from_shape(&[b, h, s, s], &xs).unwrap();
            let run = |m: &TypedModel, threads: usize| {
                crate::parallel::set_product_threads(threads);
                let plan = m.clone().into_runnable().unwrap();
                let out = plan.run(tvec!(input.clone().into_tvalue())).unwrap();
                crate::parallel::set_product_threads(1);
                out[0].clone().into_tensor()
            };
            let want = run(&model, 1);
            let want = want.to_plain_array_view::<f32>().unwrap();
            for threads in [1, 2] {
                let got = run(&fused, threads);
                let got = got.to_plain_array_view::<f32>().unwrap();
                for (i, (w, g)) in want.iter().zip(got.iter()).enumerate() {
                    // Probabilities <= 1; two exp implementations within a few ulp.
                    assert!((w - g).abs() <= 1e-6, "{i}: {w} vs {g}");
                    if i % s > (i / s) % s {
                        assert_eq!(*g, 0.0, "{i}: masked but not zero");
                    }
                }
            }
        }
    }
}
