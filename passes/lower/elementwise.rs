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
    // Mean and variance over the last axis, in the input's type (as onnxruntime's CPU
    // kernel, which accumulates in float for float16 inputs and rounds the results).
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
    if let Some(beta) = optional(n, 3) {
        y = b.op("Add", &[y, beta], vec![])?;
    }
    Ok(vec![Some(y), Some(mean), Some(inv), Some(s)])
}

