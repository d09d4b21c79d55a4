//! `SoftmaxGrad`: the gradient of a softmax over the last axis, `dx = y·(g − Σ g·y)`,
//! in one pass over each row, in the incoming gradient's own buffer.
//!
//! Differentiated op by op (`passes::grad::rules`, which `passes::grad::portable`
//! writes back for other runtimes), it takes four passes over attention's largest
//! tensors (`Mul`, `ReduceSum`, `Sub`, `Mul`) and makes two temporaries of their size.
//! Here each row is read twice while it is in cache and overwritten: the incoming
//! gradient's only reader is this op in tract, so it hands over its buffer.

use tract_onnx::tract_hir::internal::*;

/// The op's name in the training graph (domain [`super::nbits::DOMAIN`]):
/// `SoftmaxGrad(g, y)` → `dx`, float32 of one shape, the softmax `y` over the last axis.
pub const SOFTMAX_GRAD_OP: &str = "SoftmaxGrad";

/// [`SOFTMAX_GRAD_OP`] in tract.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SoftmaxGrad;

super::kernel::kernel_op!(SoftmaxGrad, SOFTMAX_GRAD_OP, inputs: 2, shapes: [1]);

impl EvalOp for SoftmaxGrad {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (g, y) = args_2!(inputs);
        ensure!(
            g.shape() == y.shape(),
            "{SOFTMAX_GRAD_OP}: gradient {:?} and softmax {:?} must have one shape",
            g.shape(),
            y.shape()
        );
        let width = y.shape().last().copied().unwrap_or(1).max(1);
        let mut dx = g.into_tensor(); // the gradient's buffer, when this is its last reader
        {
            let y = y.try_as_plain_ram()?;
            let y = y.as_slice::<f32>()?;
            let mut plain = dx.try_as_plain_ram_mut()?;
            let dx = plain.as_slice_mut::<f32>()?;
            let rows = dx.len() / width;
            // Rows shared among the threads this worker may use (all of them at batch 1).
            let parts = crate::parallel::product_threads().clamp(1, rows.max(1));
            let per = rows.div_ceil(parts).max(1) * width;
            let chunks: Vec<_> = dx.chunks_mut(per).zip(y.chunks(per)).collect();
            crate::parallel::for_each_item(chunks, parts, |_, (dx, y)| self::rows(dx, y, width));
        }
        Ok(tvec!(dx.into_tvalue()))
    }
}

/// `dx = y·(g − Σ g·y)` on each row of `width` of `dx` (holding `g`, overwritten) and
/// `y`.
pub(crate) fn rows(dx: &mut [f32], y: &[f32], width: usize) {
    pulp::Arch::new().dispatch(Rows { dx, y, width })
}

/// Rows of a softmax and of its incoming gradient (overwritten by `dx`), compiled for
/// each instruction set `pulp` dispatches to.
struct Rows<'a> {
    dx: &'a mut [f32],
    y: &'a [f32],
    width: usize,
}

impl pulp::WithSimd for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for (g, y) in self
            .dx
            .chunks_exact_mut(self.width)
            .zip(self.y.chunks_exact(self.width))
        {
            let dot = dot_f64(g, y) as f32;
            for (g, &y) in g.iter_mut().zip(y) {
                *g = y * (*g - dot);
            }
        }
    }
}

/// Partial sums of the dot product kept apart, so that it vectorizes (one f64 sum in
/// order is a chain of dependent adds: it made the op latency-bound).
const LANES: usize = 8;

/// `Σ g·y` in f64: [`LANES`] partial sums of the products in order, then their sum.
#[inline(always)]
pub(crate) fn dot_f64(g: &[f32], y: &[f32]) -> f64 {
    let mut sums = [0.0f64; LANES];
    let (gc, yc) = (g.chunks_exact(LANES), y.chunks_exact(LANES));
    let tail: f64 = (gc.remainder().iter().zip(yc.remainder()))
        .map(|(&g, &y)| g as f64 * y as f64)
        .sum();
    for (g, y) in gc.zip(yc) {
        for ((s, &g), &y) in sums.iter_mut().zip(g).zip(y) {
            *s += g as f64 * y as f64;
        }
    }
    sums.iter().sum::<f64>() + tail
}

impl TypedOp for SoftmaxGrad {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [g, y] = inputs else {
            bail!("{SOFTMAX_GRAD_OP} expects 2 inputs");
        };
        ensure!(
            g.datum_type == f32::datum_type() && y.datum_type == f32::datum_type(),
            "{SOFTMAX_GRAD_OP} computes in float32"
        );
        Ok(tvec!(f32::fact(y.shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SoftmaxGrad` on rows of `width`, against the formula in f64.
    fn check(width: usize, rows: usize, threads: usize) {
        let n = width * rows;
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0)
            .collect();
        let mut y: Vec<f32> = (0..n).map(|i| ((i * 104729) % 97) as f32 + 1.0).collect();
        for row in y.chunks_mut(width) {
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s);
        }
        let shape = [rows, width];
        let mut model = TypedModel::default();
        let sg = model.add_source("g", f32::fact(shape)).unwrap();
        let sy = model.add_source("y", f32::fact(shape)).unwrap();
        let dx = model.wire_node("dx", SoftmaxGrad, &[sg, sy]).unwrap();
        model.select_output_outlets(&dx).unwrap();
        let plan = model.into_runnable().unwrap();
        let inputs = tvec!(
            Tensor::from_shape(&shape, &g).unwrap().into_tvalue(),
            Tensor::from_shape(&shape, &y).unwrap().into_tvalue()
        );
        crate::parallel::set_product_threads(threads);
        let out = plan.run(inputs).unwrap().remove(0).into_tensor();
        crate::parallel::set_product_threads(1);
        let got = out.to_plain_array_view::<f32>().unwrap();
        let got = got.as_slice().unwrap();
        for r in 0..rows {
            let (g, y) = (&g[r * width..][..width], &y[r * width..][..width]);
            let dot: f64 = g.iter().zip(y).map(|(&g, &y)| g as f64 * y as f64).sum();
            for i in 0..width {
                let want = y[i] as f64 * (g[i] as f64 - dot);
                // f32 sums of `width` terms of size <= 2: within 1e-6 absolute.
                let err = (got[r * width + i] as f64 - want).abs();
                assert!(
                    err <= 1e-6,
                    "row {r} col {i}: {} vs {want}",
                    got[r * width + i]
                );
            }
        }
    }

    #[test]
    fn softmax_gradients_follow_the_formula() {
        check(7, 5, 1);
        check(128, 33, 3);
        check(1, 4, 2);
    }
}
