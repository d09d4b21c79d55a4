//! `SoftmaxCrossEntropyGrad`: a cross-entropy's value and gradient over the logits in
//! one pass, in the logits' own buffer.
//!
//! `SoftmaxCrossEntropyGrad(x [.., V], target [.., 1] int64, weight [.., 1])` →
//! `(log_p [.., 1], dx [.., V])`, per row: `log_p = log softmax(x)[target]
//! = x_t − max x − log Σ exp(x − max x)`, `dx = (softmax(x) − onehot(target))·weight`.
//!
//! Written with default ops, the loss keeps the logits, their softmax and its weighted
//! copy alive together and spends eight passes over them (`passes::grad::loss`, which
//! `passes::grad::portable` writes back for other runtimes). Here the logits are read
//! once and overwritten by `dx` when this op holds their only reference, which it does
//! in tract: it is their one reader.

use tract_onnx::tract_hir::internal::*;

/// The op's name in the training graph (domain [`super::nbits::DOMAIN`]).
pub const CROSS_ENTROPY_GRAD_OP: &str = "SoftmaxCrossEntropyGrad";

/// [`CROSS_ENTROPY_GRAD_OP`] in tract.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SoftmaxCrossEntropyGrad;

super::kernel::kernel_op!(SoftmaxCrossEntropyGrad, CROSS_ENTROPY_GRAD_OP, inputs: 3, shapes: [1, 0]);

impl EvalOp for SoftmaxCrossEntropyGrad {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, target, weight) = args_3!(inputs);
        let mut dx = x.into_tensor(); // the logits' buffer, when this is their last reader
        let width = dx.shape().last().copied().unwrap_or(0);
        let rows = dx.len().checked_div(width).unwrap_or(0);
        let mut column: TVec<usize> = dx.shape().into();
        if let Some(last) = column.last_mut() {
            *last = 1;
        }
        ensure!(
            target.len() == rows && weight.len() == rows,
            "{CROSS_ENTROPY_GRAD_OP}: {rows} rows of logits, {} targets and {} weights",
            target.len(),
            weight.len()
        );
        let target = target.cast_to::<i64>()?;
        let (target, weight) = (target.try_as_plain_ram()?, weight.try_as_plain_ram()?);
        let (target, weight) = (target.as_slice::<i64>()?, weight.as_slice::<f32>()?);
        if let Some(&t) = target.iter().find(|&&t| t < 0 || t as usize >= width) {
            bail!("{CROSS_ENTROPY_GRAD_OP}: target {t} outside 0..{width}");
        }
        let mut log_p = vec![0f32; rows];
        {
            let mut plain = dx.try_as_plain_ram_mut()?;
            let logits = plain.as_slice_mut::<f32>()?;
            // Rows shared among the threads this worker may use (all of them at batch 1).
            let parts = crate::parallel::product_threads().clamp(1, rows.max(1));
            let per = rows.div_ceil(parts).max(1);
            let chunks: Vec<_> = logits
                .chunks_mut(per * width.max(1))
                .zip(log_p.chunks_mut(per))
                .collect();
            crate::parallel::for_each_item(chunks, parts, |c, (logits, log_p)| {
                let first = c * per;
                pulp::Arch::new().dispatch(Rows {
                    logits,
                    log_p,
                    width,
                    target: &target[first..],
                    weight: &weight[first..],
                });
            });
        }
        Ok(tvec!(
            Tensor::from_shape(&column, &log_p)?.into_tvalue(),
            dx.into_tvalue()
        ))
    }
}

/// Rows of logits with their targets and weights, compiled for each instruction set
/// `pulp` dispatches to.
struct Rows<'a> {
    logits: &'a mut [f32],
    log_p: &'a mut [f32],
    width: usize,
    target: &'a [i64],
    weight: &'a [f32],
}

impl pulp::WithSimd for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let rows = self
            .logits
            .chunks_mut(self.width)
            .zip(self.log_p.iter_mut());
        for (i, (row, lp)) in rows.enumerate() {
            *lp = row_loss_and_grad(row, self.target[i] as usize, self.weight[i]);
        }
    }
}

/// One row: overwrites the logits with `(softmax − onehot(t))·w`; returns
/// `log softmax(row)[t]`.
#[inline(always)]
fn row_loss_and_grad(row: &mut [f32], t: usize, w: f32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let at = row[t] - max;
    for v in row.iter_mut() {
        *v = super::vexp::exp(*v - max);
    }
    // Eight running sums, so the additions vectorize too.
    let mut sums = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            sums[k] += c[k];
        }
    }
    let sum = sums.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let scale = w / sum;
    for v in row.iter_mut() {
        *v *= scale;
    }
    row[t] -= w;
    at - sum.ln()
}

impl TypedOp for SoftmaxCrossEntropyGrad {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [x, _, w] = inputs else {
            bail!("{CROSS_ENTROPY_GRAD_OP} expects 3 inputs");
        };
        ensure!(
            x.datum_type == f32::datum_type() && w.datum_type == f32::datum_type(),
            "{CROSS_ENTROPY_GRAD_OP} computes in float32"
        );
        ensure!(x.rank() >= 1, "{CROSS_ENTROPY_GRAD_OP}: scalar logits");
        let mut column = x.shape.to_tvec();
        *column.last_mut().expect("rank >= 1") = 1.to_dim();
        Ok(tvec!(f32::fact(column), f32::fact(x.shape.clone())))
    }

    as_op!();
}
