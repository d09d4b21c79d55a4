//! `SwiGluGrad`: the gradient of a SwiGLU gate, `y = silu(x)·u` with
//! `silu(x) = x·σ(x)`, in one pass over memory.
//!
//! Differentiated op by op, the gate keeps four tensors of the MLP's width from the
//! forward to the backward (`x`, `u`, `σ(x)` and `silu(x)`) and spends five elementwise
//! passes on them. This op takes the incoming gradient with `x` and `u` only, and
//! recomputes `σ(x)` where it needs it:
//!
//! `du = g·x·σ(x)`, `dx = g·u·σ(x)·(1 + x·(1 − σ(x)))`.
//!
//! Because it reads `g`, tract runs it only when the backward reaches the gate, so
//! `σ(x)` and `silu(x)` die in the forward (half the MLP's saved activations). Runs in
//! tract only; portable graphs get the default-domain ops instead
//! (`passes::grad::portable`).

use tract_onnx::tract_hir::internal::*;

/// The op's name in the training graph (domain [`super::nbits::DOMAIN`]):
/// `SwiGluGrad(g, x, u)` → `(dx, du)`, all float32 of one shape.
pub const SWIGLU_GRAD_OP: &str = "SwiGluGrad";

/// [`SWIGLU_GRAD_OP`] in tract.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SwiGluGrad;

super::kernel::kernel_op!(SwiGluGrad, SWIGLU_GRAD_OP, inputs: 3, shapes: [1, 1]);

impl EvalOp for SwiGluGrad {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (g, x, u) = args_3!(inputs);
        ensure!(
            g.shape() == x.shape() && x.shape() == u.shape(),
            "SwiGluGrad: gradient {:?}, gate {:?} and up {:?} must have one shape",
            g.shape(),
            x.shape(),
            u.shape()
        );
        let shape: TVec<usize> = x.shape().into();
        let (g, x, u) = (
            g.try_as_plain_ram()?,
            x.try_as_plain_ram()?,
            u.try_as_plain_ram()?,
        );
        let (g, x, u) = (
            g.as_slice::<f32>()?,
            x.as_slice::<f32>()?,
            u.as_slice::<f32>()?,
        );
        // SAFETY: every element of both is written below (the chunks cover them).
        let (mut dx, mut du) = unsafe {
            (
                Tensor::uninitialized::<f32>(&shape)?,
                Tensor::uninitialized::<f32>(&shape)?,
            )
        };
        {
            let (mut dx_plain, mut du_plain) =
                (dx.try_as_plain_ram_mut()?, du.try_as_plain_ram_mut()?);
            let (dx, du) = (
                dx_plain.as_slice_mut::<f32>()?,
                du_plain.as_slice_mut::<f32>()?,
            );
            // Shared among the threads this worker may use (all of them at batch 1), in
            // chunks of whole cache lines.
            let threads = crate::parallel::product_threads();
            let per = x.len().div_ceil(threads).next_multiple_of(16).max(16);
            let chunks: Vec<_> = (dx.chunks_mut(per).zip(du.chunks_mut(per)))
                .zip(g.chunks(per).zip(x.chunks(per)).zip(u.chunks(per)))
                .collect();
            crate::parallel::for_each_item(chunks, threads, |_, ((dx, du), ((g, x), u))| {
                pulp::Arch::new().dispatch(Gate { g, x, u, dx, du })
            });
        }
        Ok(tvec!(dx.into_tvalue(), du.into_tvalue()))
    }
}

/// The pass over the gate's tensors, compiled for each instruction set `pulp`
/// dispatches to.
struct Gate<'a> {
    g: &'a [f32],
    x: &'a [f32],
    u: &'a [f32],
    dx: &'a mut [f32],
    du: &'a mut [f32],
}

impl pulp::WithSimd for Gate<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let inputs = self.g.iter().zip(self.x).zip(self.u);
        for (((&g, &x), &u), (dx, du)) in inputs.zip(self.dx.iter_mut().zip(self.du.iter_mut())) {
            let s = 1.0 / (1.0 + super::vexp::exp(-x));
            *du = g * x * s;
            *dx = g * u * s * (1.0 + x * (1.0 - s));
        }
    }
}

impl TypedOp for SwiGluGrad {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [g, x, u] = inputs else {
            bail!("SwiGluGrad expects 3 inputs");
        };
        ensure!(
            [g, x, u].iter().all(|f| f.datum_type == f32::datum_type()),
            "SwiGluGrad computes in float32"
        );
        Ok(tvec!(
            f32::fact(x.shape.clone()),
            f32::fact(x.shape.clone())
        ))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SwiGluGrad` on `n` elements on `threads` threads, against the formula in f64:
    /// `du = g·silu(x)`, `dx = g·u·s·(1 + x·(1 − s))` with `s = σ(x)`.
    fn check(n: usize, threads: usize) {
        let value = |i: usize, p: usize| ((i * p) % 211) as f32 / 25.0 - 4.0;
        let (g, x, u): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            (0..n).map(|i| value(i, 7919)).collect(),
            (0..n).map(|i| value(i, 104729)).collect(),
            (0..n).map(|i| value(i, 1299709)).collect(),
        );
        let shape = [n];
        let mut model = TypedModel::default();
        let sources: Vec<_> = ["g", "x", "u"]
            .iter()
            .map(|name| model.add_source(*name, f32::fact(shape)).unwrap())
            .collect();
        let grads = model.wire_node("grad", SwiGluGrad, &sources).unwrap();
        model.select_output_outlets(&grads).unwrap();
        let plan = model.into_runnable().unwrap();
        let inputs = [&g, &x, &u]
            .iter()
            .map(|v| Tensor::from_shape(&shape, v).unwrap().into_tvalue())
            .collect();
        crate::parallel::set_product_threads(threads);
        let out = plan.run(inputs).unwrap();
        crate::parallel::set_product_threads(1);
        let (dx, du) = (
            out[0].to_plain_array_view::<f32>().unwrap(),
            out[1].to_plain_array_view::<f32>().unwrap(),
        );
        for i in 0..n {
            let (g, x, u) = (g[i] as f64, x[i] as f64, u[i] as f64);
            let s = 1.0 / (1.0 + (-x).exp());
            let (want_dx, want_du) = (g * u * s * (1.0 + x * (1.0 - s)), g * x * s);
            // f32 arithmetic on values up to 4 (|dx| up to about 18): 1e-5 relative,
            // 1e-6 absolute near 0.
            for (got, want) in [(dx[i], want_dx), (du[i], want_du)] {
                let err = (got as f64 - want).abs();
                assert!(err <= 1e-6 + 1e-5 * want.abs(), "{i}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn swiglu_gradients_follow_the_formula_on_any_threads() {
        check(1000, 1);
        check(1000, 3);
        check(5, 2);
        check(0, 2);
    }
}
