//! Lowerings of the elementwise and normalisation contrib ops.

use std::f64::consts::{FRAC_2_SQRT_PI, SQRT_2};

use super::{input, optional};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::{Node, ValueId};

/// `0.5·x·(1 + erf(x/√2))`.
pub(super) fn gelu(b: &mut Builder, x: ValueId) -> Result<ValueId> {
    let r = b.scalar("inv_sqrt2", 1.0 / SQRT_2);
    let xr = b.op("Mul", &[x, r], vec![])?;
    let e = b.op("Erf", &[xr], vec![])?;
    let one = b.scalar("one", 1.0);
    let e1 = b.op("Add", &[e, one], vec![])?;
    let half = b.scalar("half", 0.5);
    let hx = b.op("Mul", &[x, half], vec![])?;
    b.op("Mul", &[hx, e1], vec![])
}

pub(super) fn fast_gelu(b: &mut Builder, n: &Node) -> Result<Vec<Option<ValueId>>> {
    let mut y = input(n, 0)?;
    if let Some(bias) = optional(n, 1) {
        y = b.op("Add", &[y, bias], vec![])?;
    }
    let c = b.scalar("c", 0.044715);
    let y2 = b.op("Mul", &[y, y], vec![])?;
    let cy2 = b.op("Mul", &[y2, c], vec![])?;
    let one = b.scalar("one", 1.0);
    let inner = b.op("Add", &[cy2, one], vec![])?; // 1 + 0.044715·y²
    let k = b.scalar("sqrt_2_over_pi", FRAC_2_SQRT_PI / SQRT_2);
    let ky = b.op("Mul", &[y, k], vec![])?;
    let arg = b.op("Mul", &[ky, inner], vec![])?;
    let t = b.op("Tanh", &[arg], vec![])?;
    let t1 = b.op("Add", &[t, one], vec![])?;
    let half = b.scalar("half", 0.5);
    let hy = b.op("Mul", &[y, half], vec![])?;
    Ok(vec![Some(b.op("Mul", &[hy, t1], vec![])?)])
}

pub(super) fn skip_layer_norm(b: &mut Builder, n: &Node) -> Result<Vec<Option<ValueId>>> {
    let (x, skip, gamma) = (input(n, 0)?, input(n, 1)?, input(n, 2)?);
    let eps = n.attr_float("epsilon", 1e-12) as f64;
    let mut s = b.op("Add", &[x, skip], vec![])?;
    if let Some(bias) = optional(n, 4) {
        s = b.op("Add", &[s, bias], vec![])?;
    }
    let (y, mean, inv) = layer_norm(b, s, gamma, optional(n, 3), eps)?;
    Ok(vec![Some(y), Some(mean), Some(inv), Some(s)])
}

/// `(s − mean)/√(var + eps)·γ (+ β)` over the last axis, with the mean and `1/√(var + eps)`:
/// mean and variance in the input's type (as onnxruntime's CPU kernels, which accumulate
/// in float for float16 inputs and round the results).
fn layer_norm(
    b: &mut Builder,
    s: ValueId,
    gamma: ValueId,
    beta: Option<ValueId>,
    eps: f64,
) -> Result<(ValueId, ValueId, ValueId)> {
    let mean = b.reduce_op("ReduceMean", s, &[-1], true, "axes", None)?;
    let d = b.op("Sub", &[s, mean], vec![])?;
    let d2 = b.op("Mul", &[d, d], vec![])?;
    let var = b.reduce_op("ReduceMean", d2, &[-1], true, "axes", None)?;
    let e = b.scalar("epsilon", eps);
    let ve = b.op("Add", &[var, e], vec![])?;
    let std = b.op("Sqrt", &[ve], vec![])?;
    let one = b.scalar("one", 1.0);
    let inv = b.op("Div", &[one, std], vec![])?;
    let normed = b.op("Mul", &[d, inv], vec![])?;
    let mut y = b.op("Mul", &[normed, gamma], vec![])?;
    if let Some(beta) = beta {
        y = b.op("Add", &[y, beta], vec![])?;
    }
    Ok((y, mean, inv))
}

/// onnxruntime's `EmbedLayerNormalization`: inputs input_ids `[B, S]`, segment_ids,
/// word, position and segment embeddings, γ, β, mask `[B, S]`, position_ids; outputs
/// the normed sum, the mask index (per row, the mask's entries equal to 1; zeros
/// without a mask, int32) and the sum itself.
pub(super) fn embed_layer_norm(b: &mut Builder, n: &Node) -> Result<Vec<Option<ValueId>>> {
    use crate::ir::build::int_attr;
    let ids = input(n, 0)?;
    let (word, position) = (input(n, 2)?, input(n, 3)?);
    let (gamma, beta) = (input(n, 5)?, input(n, 6)?);
    let eps = n.attr_float("epsilon", 1e-12) as f64;
    let gather = |b: &mut Builder, table: ValueId, at: ValueId| {
        b.op("Gather", &[table, at], vec![int_attr("axis", 0)])
    };
    let mut s = gather(b, word, ids)?; // [B, S, H]
    let positions = match optional(n, 8) {
        Some(p) => gather(b, position, p)?, // [B or 1, S, H]
        None => {
            // Rows 0..S of the table, [S, H].
            let shape = b.op("Shape", &[ids], vec![])?;
            let len = super::dim(b, shape, 1)?;
            let (zero, axis) = (b.ints("zero", &[0]), b.ints("axis", &[0]));
            b.op("Slice", &[position, zero, len, axis], vec![])?
        }
    };
    s = b.op("Add", &[s, positions], vec![])?;
    if let (Some(segments), Some(table)) = (optional(n, 1), optional(n, 4)) {
        let seg = gather(b, table, segments)?;
        s = b.op("Add", &[s, seg], vec![])?;
    }
    let (y, _, _) = layer_norm(b, s, gamma, Some(beta), eps)?;
    let mask_index = match optional(n, 7) {
        Some(mask) => {
            let one = b.ints("one", &[1]);
            let m = b.op("Cast", &[mask], vec![int_attr("to", 7)])?;
            let ones = b.op("Equal", &[m, one], vec![])?;
            let ones = b.op("Cast", &[ones], vec![int_attr("to", 6)])?; // int32
            b.reduce_op("ReduceSum", ones, &[1], false, "axes", None)?
        }
        None => {
            let ids32 = b.op("Cast", &[ids], vec![int_attr("to", 6)])?;
            let zeros = b.op("Sub", &[ids32, ids32], vec![])?;
            b.reduce_op("ReduceSum", zeros, &[1], false, "axes", None)?
        }
    };
    Ok(vec![Some(y), Some(mask_index), Some(s)])
}
