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

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// The op's name in the training graph (domain [`super::nbits::DOMAIN`]):
/// `SwiGluGrad(g, x, u)` → `(dx, du)`, all float32 of one shape.
pub const SWIGLU_GRAD_OP: &str = "SwiGluGrad";

/// [`SWIGLU_GRAD_OP`] in tract.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SwiGluGrad;

impl Op for SwiGluGrad {
    fn name(&self) -> StaticName {
        SWIGLU_GRAD_OP.into()
    }

    op_as_typed_op!();
}

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
        let mut dx = vec![0f32; x.len()];
        let mut du = vec![0f32; x.len()];
        pulp::Arch::new().dispatch(Gate {
            g,
            x,
            u,
            dx: &mut dx,
            du: &mut du,
        });
        Ok(tvec!(
            Tensor::from_shape(&shape, &dx)?.into_tvalue(),
            Tensor::from_shape(&shape, &du)?.into_tvalue()
        ))
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

/// [`SWIGLU_GRAD_OP`], for tract's ONNX op register.
pub fn parse(
    _ctx: &ParsingContext,
    _node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let node = super::kernel::KernelNode {
        op: SwiGluGrad,
        inputs: 3,
        shape_of: &[1, 1],
    };
    Ok((expand(node), vec![]))
}
