//! PiSSA (Meng et al. 2024): LoRA whose A and B start as the principal singular
//! components of W, and W is rewritten to the residual `W_res` (PEFT's convention:
//! `S_r` pre-divided by the scale).

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD, Axis};

use super::{lora::Lora, Config, Dims, Init, ParamSpec, Params, Variant};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::ValueId;
use crate::linalg;
use crate::rng::Rng;

/// PiSSA: exact SVD, or torch's `svd_lowrank` with `--pissa-niter N`.
pub struct Pissa;

impl Variant for Pissa {
    fn name(&self) -> &'static str {
        "pissa"
    }

    fn uses_alpha(&self) -> bool {
        true
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "lora_A",
                shape: vec![cfg.r, d.d_in],
                init: Init::Zeros,
                trainable: true,
            },
            ParamSpec {
                name: "lora_B",
                shape: vec![d.d_out, cfg.r],
                init: Init::Zeros,
                trainable: true,
            },
        ]
    }

    fn reads_weight(&self) -> bool {
        true
    }

    fn rewrites_weight(&self) -> bool {
        true
    }

    // The f32 weight and W_res, plus the exact SVD's f64 copy, factors and workspace
    // (about 4 matrices of f64), or the sketches of the randomized one (small).
    fn working_set(&self, d: Dims, cfg: &Config) -> usize {
        let n = d.d_in * d.d_out;
        match cfg.pissa_niter {
            None => 8 * n + 32 * n,
            Some(_) => 8 * n + 8 * n,
        }
    }

    // S' = S_r / s;  B = U_r diag(√S');  A = diag(√S') V_rᵀ;  W_res = W − s·B A
    // (W_res from A and B as rounded to the adapter dtype, as lora-lite does).
    fn init(
        &self,
        w: &Array2<f32>,
        p: &mut Params,
        cfg: &Config,
        rng: &mut Rng,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<Option<Array2<f32>>> {
        let svd = match cfg.pissa_niter {
            None => linalg::svd_exact(w, cfg.r)?,
            Some(niter) => linalg::svd_lowrank(w, cfg.r, niter, None, rng)?,
        };
        let (a, b) = factors(&svd, cfg.scale());
        let w_res = Lora::start_from(a, b, w, p, cfg, round);
        Ok(Some(w_res))
    }

    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<ValueId> {
        Lora.branch(b, x, y, p, cfg)
    }

    // W_res + s·B A
    fn merged_weight(&self, w_res: &Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        Lora.merged_weight(w_res, p, cfg)
    }

    // Against W_res; the serving job adds −(s·B₀)·A₀ for the original base.
    fn low_rank(&self, p: &Params, cfg: &Config) -> std::result::Result<super::LowRank, String> {
        Ok(Lora::low_rank_of(p, cfg))
    }
}

/// `(lora_A [r, d_in], lora_B [d_out, r])` from an SVD of W, with `S_r / s` split
/// evenly between them.
pub fn factors(svd: &linalg::Svd, scale: f64) -> (Array2<f64>, Array2<f64>) {
    let root = svd.s.mapv(|s| (s / scale).sqrt());
    let b = &svd.u * &root.view().insert_axis(Axis(0)); // U_r diag(√S')
    let a = (&svd.v * &root.view().insert_axis(Axis(0))).reversed_axes(); // diag(√S') V_rᵀ
    (a, b)
}
