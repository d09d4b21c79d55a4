//! HRA (Yuan et al. 2024): the layer input goes through `r` Householder reflections,
//! `x' = x H_{r-1} ⋯ H_0` with `H_i = I − 2 u_i u_iᵀ / ‖u_i‖²`, so `W` becomes `W R`
//! with `R = H_0 ⋯ H_{r-1}` orthogonal (lora-lite `hra`, PEFT's identity-preserving
//! input-side form). The reflections act on the activations, rank-1 each; no `d × d`
//! matrix is built.

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, Axis};

use super::{mat, Config, Dims, Init, ParamSpec, Params, Splice, Variant};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::ValueId;

/// lora-lite's clamp of `‖u_i‖²`.
const NORM2_EPS: f64 = 1e-12;

/// HRA: `lora_U [r, d_in]` (rows `u_i`), paired at init so that `R = I`.
pub struct Hra;

impl Variant for Hra {
    fn name(&self) -> &'static str {
        "hra"
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: "lora_U",
            shape: vec![cfg.r, d.d_in],
            init: Init::KaimingPairs,
            trainable: true,
        }]
    }

    fn check_layer(&self, _d: Dims, cfg: &Config) -> std::result::Result<(), String> {
        if !cfg.r.is_multiple_of(2) {
            return Err(format!(
                "r = {} is odd; HRA pairs its reflections to start as the identity: use an even r",
                cfg.r
            ));
        }
        Ok(())
    }

    fn splice(&self) -> Splice {
        Splice::Input
    }

    // Once per module: c = 2 / max(‖u_i‖², ε) as a row [1, r].
    fn module_values(
        &self,
        b: &mut Builder,
        p: &BTreeMap<&'static str, ValueId>,
        _cfg: &Config,
    ) -> Result<Vec<(&'static str, ValueId)>> {
        let n2 = b.reduce_sum_square(p["lora_U"], &[0])?; // U_m [d_in, r] -> [r]
        let eps = b.scalar("eps", NORM2_EPS);
        let n2 = b.op("Max", &[n2, eps], vec![])?;
        let two = b.scalar("two", 2.0);
        let c = b.op("Div", &[two, n2], vec![])?;
        Ok(vec![("reflection_scales", b.unsqueeze(c, &[0])?)])
    }

    // x ← x − c_i (x·u_i) u_iᵀ for i = r−1 … 0; u_i = U_m e_i (a one-hot column).
    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        _y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<ValueId> {
        let mut x = x;
        for i in (0..cfg.r).rev() {
            let mut one_hot = vec![0.0; cfg.r];
            one_hot[i] = 1.0;
            let e = b.floats("one_hot", &[cfg.r, 1], &one_hot);
            let col = b.op("MatMul", &[p["lora_U"], e], vec![])?; // [d_in, 1]
            let row = b.op(
                "Transpose",
                &[col],
                vec![crate::ir::build::ints_attr("perm", &[1, 0])],
            )?;
            let c = b.op("MatMul", &[p["reflection_scales"], e], vec![])?; // [1, 1]
            let proj = b.op("MatMul", &[x, col], vec![])?; // [..., 1]
            let scaled = b.op("Mul", &[proj, c], vec![])?;
            let step = b.op("MatMul", &[scaled, row], vec![])?; // [..., d_in]
            x = b.op("Sub", &[x, step], vec![])?;
        }
        Ok(x)
    }

    // W' = W R = W H_0 H_1 ⋯ H_{r−1}; W H = W − c (W u) uᵀ.
    fn low_rank(&self, _p: &Params, _cfg: &Config) -> std::result::Result<super::LowRank, String> {
        Err("its update W·(H − I) has rank r but one factor is a product with the base weight, which lora-graft does not fold into A/B inputs yet; serve the merged model instead".into())
    }

    fn merged_weight(&self, w: Array2<f32>, p: &Params, _cfg: &Config) -> Array2<f32> {
        let u = mat(p, "lora_U").mapv(f64::from);
        let mut out = w.mapv(f64::from); // f64 accumulation: a new buffer either way
        drop(w);
        for row in u.rows() {
            let c = 2.0 / row.dot(&row).max(NORM2_EPS);
            let wu = out.dot(&row); // [d_out]
            let update = wu.insert_axis(Axis(1)).dot(&row.insert_axis(Axis(0))) * c;
            out -= &update;
        }
        out.mapv(|v| v as f32)
    }
}
