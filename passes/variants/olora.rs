//! OLoRA (Büyükakyüz 2024; PEFT `init_lora_weights="olora"`): LoRA whose B and A start
//! as the leading `r` columns of Q and rows of R of `W = QR` (no division by `s`, unlike
//! PiSSA). PEFT rewrites W to `W_res = W − s·B A`; lora-graft keeps W and subtracts a
//! frozen copy of the starting branch (see PiSSA).

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD};

use super::lora::{frozen_start_specs, Lora};
use super::{Config, Dims, ParamSpec, Params, Variant};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::ValueId;
use crate::rng::Rng;

/// OLoRA: `lora_B = Q[:, :r]`, `lora_A = R[:r, :]` (LAPACK's Householder signs).
pub struct Olora;

impl Variant for Olora {
    fn name(&self) -> &'static str {
        "olora"
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

    // The f32 weight and its f64 copy reduced in place.
    fn working_set(&self, d: Dims, _cfg: &Config) -> usize {
        12 * d.d_in * d.d_out
    }

    // W = QR; B = B₀ = Q_r, A = A₀ = R_r (rounded to the adapter dtype).
    fn init(
        &self,
        w: &Array2<f32>,
        p: &mut Params,
        cfg: &Config,
        _: &mut Rng,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<Option<Array2<f32>>> {
        let (q, r) = crate::linalg::qr_leading(w, cfg.r);
        Lora::start_from(r, q, p, round);
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
