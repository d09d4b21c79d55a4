//! OLoRA (Büyükakyüz 2024; PEFT `init_lora_weights="olora"`): LoRA whose B and A start
//! as the leading `r` columns of Q and rows of R of `W = QR`, with the weight rewritten
//! to `W_res = W − s·B A` (no division by `s`, unlike PiSSA).

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD};

use super::{lora::Lora, Config, Dims, Init, ParamSpec, Params, Variant};
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
        Lora.param_specs(d, cfg)
            .into_iter()
            .map(|spec| ParamSpec {
                init: Init::Zeros,
                ..spec
            })
            .collect()
    }

    fn reads_weight(&self) -> bool {
        true
    }

    fn rewrites_weight(&self) -> bool {
        true
    }

    // The f32 weight, its f64 copy reduced in place, and W_res.
    fn working_set(&self, d: Dims, _cfg: &Config) -> usize {
        16 * d.d_in * d.d_out
    }

    // W = QR; B = Q_r, A = R_r (rounded to the adapter dtype); W_res = W − s·B A.
    fn init(
        &self,
        w: &Array2<f32>,
        p: &mut Params,
        cfg: &Config,
        _: &mut Rng,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<Option<Array2<f32>>> {
        let (q, r) = crate::linalg::qr_leading(w, cfg.r);
        let w_res = Lora::start_from(r, q, w, p, cfg, round);
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
