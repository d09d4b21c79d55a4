//! EVA (Paischer et al. 2024, lora-lite `variants/eva.py`): LoRA whose `A` starts as the
//! top `r` right singular vectors of the layer's inputs on calibration data, `B = 0`.
//! lora-lite's form (the default): the uncentered SVD of every token, padding included,
//! the same rank everywhere. The right singular vectors of `X` are the eigenvectors of
//! `XᵀX`, which the calibration run accumulates without keeping `X`.

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD};

use super::lora::Lora;
use super::{Config, Dims, LowRank, ParamSpec, Params, Variant};
use crate::calibrate::{ModuleStats, Statistic};
use crate::error::{Error, Result};
use crate::ir::build::Builder;
use crate::ir::ValueId;

/// EVA: `lora_A = Vh[:r]` of the layer's calibration inputs, `lora_B = 0`.
pub struct Eva;

impl Variant for Eva {
    fn name(&self) -> &'static str {
        "eva"
    }

    fn uses_alpha(&self) -> bool {
        true
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        let mut specs = Lora.param_specs(d, cfg);
        // Set by the calibrated init (lora-lite's spec says zeros until then).
        specs[0].init = super::Init::Zeros;
        specs
    }

    fn calibration(&self, _cfg: &Config) -> Option<Statistic> {
        Some(Statistic::InputGram { masked: false })
    }

    fn init_calibrated(
        &self,
        stats: &ModuleStats,
        p: &mut Params,
        cfg: &Config,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<()> {
        let gram = stats.gram.as_ref().expect("the input Gram matrix");
        if gram.tokens < cfg.r as u64 {
            return Err(Error::Usage(format!(
                "only {} calibration tokens reach this layer; EVA needs at least r = {} (give more --calibration data or --calibration-batches)",
                gram.tokens, cfg.r
            )));
        }
        let (_, v) = crate::linalg::sym_eigen_top(&gram.xtx, cfg.r)?;
        let mut a: ArrayD<f32> = v.t().mapv(|x| x as f32).into_dyn();
        round(&mut a);
        p.insert("lora_A", a);
        Ok(())
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

    fn merged_weight(&self, w: &Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        Lora.merged_weight(w, p, cfg)
    }

    fn low_rank(&self, p: &Params, cfg: &Config) -> std::result::Result<LowRank, String> {
        Lora.low_rank(p, cfg)
    }
}
