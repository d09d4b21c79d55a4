//! EVA (Paischer et al. 2024): LoRA whose `A` starts as the principal directions of the
//! layer's inputs on calibration data, `B = 0`. Two forms:
//!
//! - lora-lite's (`variants/eva.py`, the default): `A = Vh[:r]` of the uncentered SVD of
//!   every token, padding included, the same rank everywhere;
//! - PEFT's (`--eva-peft`, `tuners/lora/eva.py`): the centered PCA of the counted tokens,
//!   `round(r·rho)` components per layer, the `r × n_layers` budget spent on the largest
//!   explained-variance ratios across layers (layers reading the same input share their
//!   components, the first in graph order keeping the higher rank), `alpha` scaled with
//!   each layer's rank; a layer left with rank 0 is not adapted.
//!
//! The right singular vectors of `X` are the eigenvectors of `XᵀX` (centered: of
//! `XᵀX − nμμᵀ`), which the calibration run accumulates without keeping `X`. PEFT's
//! incremental PCA stops early and is seeded; this is the exact PCA it approximates.

use std::collections::BTreeMap;
use std::sync::Arc;

use tract_core::ndarray::{Array2, ArrayD};

use super::lora::Lora;
use super::{Alpha, Config, Dims, LowRank, ModuleRank, ParamSpec, Params, Variant};
use crate::calibrate::{Calibration, InputGram, ModuleStats, Statistic};
use crate::error::{Error, Result};
use crate::ir::build::Builder;
use crate::ir::ValueId;

/// EVA: `lora_A` = the top principal directions of the layer's calibration inputs,
/// `lora_B = 0`.
pub struct Eva;

/// PEFT's components per layer: `round(r·rho)`, Python's rounding (half to even).
fn components(r: usize, rho: f64) -> usize {
    ((r as f64 * rho).round_ties_even() as usize).max(1)
}

/// The module's input statistics.
fn gram(stats: &ModuleStats) -> &InputGram {
    stats.gram.as_deref().expect("the input Gram matrix")
}

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

    fn calibration(&self, cfg: &Config) -> Option<Statistic> {
        Some(Statistic::InputGram {
            masked: cfg.eva_peft.is_some(),
            components: match cfg.eva_peft {
                Some(rho) => components(cfg.r, rho),
                None => cfg.r,
            },
        })
    }

    fn calibrated_ranks(
        &self,
        cal: &Calibration,
        modules: &[String],
        cfg: &Config,
    ) -> Result<BTreeMap<String, ModuleRank>> {
        let Some(rho) = cfg.eva_peft else {
            return Ok(BTreeMap::new());
        };
        let components = components(cfg.r, rho);
        let stats = |m: &String| &cal.modules[m];
        // The first module reading each input does the PCA; the others share it.
        let first: Vec<usize> = (0..modules.len())
            .map(|i| {
                let g = stats(&modules[i]).gram.as_ref().expect("gram");
                (0..=i)
                    .find(|&j| Arc::ptr_eq(g, stats(&modules[j]).gram.as_ref().expect("gram")))
                    .expect("itself")
            })
            .collect();
        let mut ratios: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for i in (0..modules.len()).filter(|&i| first[i] == i) {
            let g = gram(stats(&modules[i]));
            let total = g.trace(true);
            let (values, _) = g.top_eigen(components, true)?;
            ratios.insert(
                i,
                values
                    .iter()
                    .map(|&v| v.max(0.0) / total.max(f64::MIN_POSITIVE))
                    .collect(),
            );
        }
        // The pool: PCA layers first, then the layers sharing them, each in graph order;
        // a stable sort keeps that order among equal ratios.
        let order = (0..modules.len())
            .filter(|&i| first[i] == i)
            .chain((0..modules.len()).filter(|&i| first[i] != i));
        let mut pool: Vec<(usize, f64)> = order
            .flat_map(|i| ratios[&first[i]].iter().map(move |&r| (i, r)))
            .collect();
        pool.sort_by(|a, b| b.1.total_cmp(&a.1));
        let budget = cfg.r * modules.len();
        let mut ranks = vec![0usize; modules.len()];
        for &(i, _) in pool.iter().take(budget) {
            ranks[i] += 1;
        }
        // A layer sharing its input never ranks above the layer whose PCA it shares.
        for i in 0..modules.len() {
            let f = first[i];
            if f != i && ranks[i] > ranks[f] {
                ranks.swap(i, f);
            }
        }
        Ok(modules
            .iter()
            .zip(ranks)
            .map(|(m, r)| {
                let alpha = Alpha::from(cfg.alpha.value() * r as f64 / cfg.r as f64);
                (m.clone(), ModuleRank { r, alpha })
            })
            .collect())
    }

    fn init_calibrated(
        &self,
        _w: Option<&Array2<f32>>,
        stats: &ModuleStats,
        p: &mut Params,
        cfg: &Config,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<()> {
        let g = gram(stats);
        let tokens = g.tokens;
        if tokens < cfg.r as u64 {
            return Err(Error::Usage(format!(
                "only {tokens} calibration tokens reach this layer; EVA needs at least r = {} (give more --calibration data or --calibration-batches)",
                cfg.r
            )));
        }
        let (_, v) = g.top_eigen(cfg.r, cfg.eva_peft.is_some())?;
        let mut a: ArrayD<f32> = v.t().mapv(|x| x as f32).into_dyn();
        round(&mut a);
        p.insert("lora_A", a);
        Ok(())
    }

    fn cfg_fields(&self, cfg: &Config) -> Vec<(&'static str, serde_json::Value)> {
        match cfg.eva_peft {
            Some(rho) => vec![("eva_peft_rho", rho.into())],
            None => Vec::new(),
        }
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

    fn merged_weight(&self, w: Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        Lora.merged_weight(w, p, cfg)
    }

    fn low_rank(&self, p: &Params, cfg: &Config) -> std::result::Result<LowRank, String> {
        Lora.low_rank(p, cfg)
    }
}
