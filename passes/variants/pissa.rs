//! PiSSA (Meng et al. 2024): LoRA whose A and B start as the principal singular
//! components of W (PEFT's convention: `S_r` pre-divided by the scale). PEFT rewrites W
//! to the residual `W_res = W − s·BA`; lora-graft keeps W and subtracts a frozen copy
//! of the starting branch, the same function without writing a new weight.

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD, Axis};

use super::lora::{frozen_start_specs, Lora};
use super::{Config, Dims, ParamSpec, Params, Variant};
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
        frozen_start_specs(d, cfg)
    }

    fn reads_weight(&self) -> bool {
        true
    }

    fn frozen_start(&self) -> bool {
        true
    }

    // The f32 weight, plus the exact path's row-major copy of it (on huge pages) and
    // its Krylov basis (at most 10·min(m, n)² bytes, see `linalg::svd_top`), or the
    // sketches of the randomized one (small).
    // The rare matrix whose spectrum sends the exact path to the full SVD holds about
    // 4 matrices of f64 more while it runs; budgeting every matrix for that would
    // serialize the common case.
    fn working_set(&self, d: Dims, cfg: &Config) -> usize {
        let n = d.d_in * d.d_out;
        match cfg.pissa_niter {
            None => 8 * n + 10 * d.d_in.min(d.d_out).pow(2),
            Some(_) => 4 * n + 8 * n,
        }
    }

    // S' = S_r / s;  B = B₀ = U_r diag(√S');  A = A₀ = diag(√S') V_rᵀ (rounded to the
    // adapter dtype). PEFT writes W_res = W − s·B A instead of keeping B₀, A₀.
    fn init(
        &self,
        w: &Array2<f32>,
        p: &mut Params,
        cfg: &Config,
        rng: &mut Rng,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<Option<Array2<f32>>> {
        let svd = match cfg.pissa_niter {
            None => linalg::svd_top(w, cfg.r)?.0,
            Some(niter) => linalg::svd_lowrank(w, cfg.r, niter, None, rng)?,
        };
        let (a, b) = factors(&svd, cfg.scale());
        Lora::start_from(a, b, p, round);
        Ok(None)
    }

    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        _y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<ValueId> {
        Lora::branch_from_start(b, x, p, cfg)
    }

    // W + s·B A − s·B₀ A₀ (= W_res + s·B A)
    fn merged_weight(&self, w: Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        Lora::from_start_low_rank(p, cfg).added_to(w)
    }

    fn low_rank(&self, p: &Params, cfg: &Config) -> std::result::Result<super::LowRank, String> {
        Ok(Lora::from_start_low_rank(p, cfg))
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
