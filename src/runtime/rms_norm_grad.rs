//! `RmsNormGrad`: the gradient of an RMS norm's core `y = x·r`, with
//! `r = 1/√(mean(x²) + ε)` over the last axis, with respect to `x` through both factors:
//! `dx = r·g − x·r³·Σ(g·x)/N` for rows of `N`, one pass over each row (read twice while
//! it is in cache) in the incoming gradient's own buffer.
//!
//! Differentiated op by op (`passes::grad::rules`, which `passes::grad::portable`
//! writes back for other runtimes), the norm took six passes over the hidden states
//! (`g·r`; `g·x` and its sum; the mean's gradient broadcast, times `2x`; the two paths
//! added) and three temporaries of their size.

use tract_onnx::tract_hir::internal::*;

use super::softmax_grad::dot_f64;

/// The op's name in the training graph (domain [`super::nbits::DOMAIN`]):
/// `RmsNormGrad(g, x, r)` → `dx`, float32; `g`, `x` and `dx` of one shape, `r` of that
/// shape with 1 as its last axis.
pub const RMS_NORM_GRAD_OP: &str = "RmsNormGrad";

/// [`RMS_NORM_GRAD_OP`] in tract.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RmsNormGrad;

super::kernel::kernel_op!(RmsNormGrad, RMS_NORM_GRAD_OP, inputs: 3, shapes: [1]);

impl EvalOp for RmsNormGrad {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (g, x, r) = args_3!(inputs);
        let width = x.shape().last().copied().unwrap_or(1).max(1);
        let mut row_shape: TVec<usize> = x.shape().into();
        if let Some(last) = row_shape.last_mut() {
            *last = 1;
        }
        ensure!(
            g.shape() == x.shape() && r.shape() == &*row_shape,
            "{RMS_NORM_GRAD_OP}: gradient {:?}, input {:?} and scale {:?} do not fit",
            g.shape(),
            x.shape(),
            r.shape()
        );
        let mut dx = g.into_tensor(); // the gradient's buffer, when this is its last reader
        {
            let (x, r) = (x.try_as_plain_ram()?, r.try_as_plain_ram()?);
            let (x, r) = (x.as_slice::<f32>()?, r.as_slice::<f32>()?);
            let mut plain = dx.try_as_plain_ram_mut()?;
            let dx = plain.as_slice_mut::<f32>()?;
            // Rows shared among the threads this worker may use (all of them at batch 1).
            let rows = r.len();
            let parts = crate::parallel::product_threads().clamp(1, rows.max(1));
            let per = rows.div_ceil(parts).max(1);
            let chunks: Vec<_> = dx
                .chunks_mut(per * width)
                .zip(x.chunks(per * width))
                .zip(r.chunks(per))
                .collect();
            crate::parallel::for_each_item(chunks, parts, |_, ((dx, x), r)| {
                self::rows(dx, x, r, width)
            });
        }
        Ok(tvec!(dx.into_tvalue()))
    }
}

/// `dx = r·g − x·r³·Σ(g·x)/N` on each row of `width` of `dx` (holding `g`, overwritten),
/// `x` and its `r`.
pub(crate) fn rows(dx: &mut [f32], x: &[f32], r: &[f32], width: usize) {
    pulp::Arch::new().dispatch(Rows { dx, x, r, width })
}

/// Rows of an RMS norm's input and of its incoming gradient (overwritten by `dx`),
/// compiled for each instruction set `pulp` dispatches to.
struct Rows<'a> {
    dx: &'a mut [f32],
    x: &'a [f32],
    r: &'a [f32],
    width: usize,
}

impl pulp::WithSimd for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let rows = self
            .dx
            .chunks_exact_mut(self.width)
            .zip(self.x.chunks_exact(self.width));
        for ((g, x), &r) in rows.zip(self.r) {
            let r64 = r as f64;
            let c = (r64 * r64 * r64 * dot_f64(g, x) / self.width as f64) as f32;
            for (g, &x) in g.iter_mut().zip(x) {
                *g = r * *g - c * x;
            }
        }
    }
}

impl TypedOp for RmsNormGrad {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [g, x, r] = inputs else {
            bail!("{RMS_NORM_GRAD_OP} expects 3 inputs");
        };
        ensure!(
            [g, x, r].iter().all(|f| f.datum_type == f32::datum_type()),
            "{RMS_NORM_GRAD_OP} computes in float32"
        );
        Ok(tvec!(f32::fact(x.shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel against the formula in f64 and against central differences of the
    /// norm itself (in f64), on rows whose width is not a multiple of the vector size.
    #[test]
    fn rms_norm_gradients_follow_the_derivative() {
        let (rows_n, width, eps) = (5, 37, 1e-6f64);
        let x: Vec<f32> = (0..rows_n * width)
            .map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0)
            .collect();
        let g: Vec<f32> = (0..rows_n * width)
            .map(|i| ((i * 104729) % 97) as f32 / 40.0 - 1.2)
            .collect();
        let scale = |row: &[f64]| {
            1.0 / (row.iter().map(|v| v * v).sum::<f64>() / width as f64 + eps).sqrt()
        };
        let r: Vec<f32> = x
            .chunks(width)
            .map(|row| scale(&row.iter().map(|&v| v as f64).collect::<Vec<_>>()) as f32)
            .collect();
        let mut dx = g.clone();
        rows(&mut dx, &x, &r, width);
        for row in 0..rows_n {
            let xs: Vec<f64> = x[row * width..][..width]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let gs = &g[row * width..][..width];
            // loss = Σ g·x·r(x): its derivative by central differences.
            let loss = |xs: &[f64]| -> f64 {
                let r = scale(xs);
                xs.iter().zip(gs).map(|(&x, &g)| g as f64 * x * r).sum()
            };
            for j in 0..width {
                let h = 1e-5;
                let (mut up, mut down) = (xs.clone(), xs.clone());
                up[j] += h;
                down[j] -= h;
                let fd = (loss(&up) - loss(&down)) / (2.0 * h);
                let got = dx[row * width + j] as f64;
                // f32 kernel against an f64 derivative: a few f32 units of the terms.
                assert!(
                    (got - fd).abs() <= 1e-5 * (1.0 + fd.abs()),
                    "row {row}, column {j}: {got} against {fd}"
                );
            }
        }
    }
}
