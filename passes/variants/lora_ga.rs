//! LoRA-GA (Wang et al. 2024; PEFT `init_lora_weights="lora_ga"`): LoRA whose A and B
//! start from the SVD of the loss's gradient with respect to the weight, averaged over
//! calibration batches, so that the first steps follow full fine-tuning's. PEFT rewrites
//! W to `W − s·B A`; lora-graft keeps W and subtracts a frozen copy of the starting
//! branch (`lora_A0`, `lora_B0`), as for PiSSA: the same function, the weights untouched.

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD, Axis};

use super::lora::{frozen_start_specs, Lora};
use super::{Config, Dims, LowRank, ParamSpec, Params, Variant};
use crate::calibrate::{ModuleStats, Statistic};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::ValueId;

/// Which of the gradient's top `2r` singular pairs A and B take (PEFT's `direction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Direction {
    /// A: `Vᵀ[:r]`, B: `U[:, r:2r]` (the paper's recommendation).
    #[default]
    #[value(name = "ArB2r")]
    ArB2r,
    /// A: `Vᵀ[r:2r]`, B: `U[:, :r]`.
    #[value(name = "A2rBr")]
    A2rBr,
    /// A: the odd pairs, B: the even ones.
    #[value(name = "ArBr")]
    ArBr,
}

/// How B (and A) are scaled (PEFT's `scale`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Scale {
    /// `B · d_out^¼ / √γ`.
    #[default]
    Stable,
    /// A and B divided by the LoRA scale `s`.
    #[value(name = "gd_scale")]
    GdScale,
    /// No scaling.
    Unit,
}

/// LoRA-GA's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraGaOptions {
    /// Which singular pairs go where.
    pub direction: Direction,
    /// The scaling.
    pub scale: Scale,
    /// γ of the stable scaling (PEFT's `stable_gamma`, 16).
    pub gamma: f64,
}

impl Default for LoraGaOptions {
    fn default() -> Self {
        LoraGaOptions {
            direction: Direction::ArB2r,
            scale: Scale::Stable,
            gamma: 16.0,
        }
    }
}

/// LoRA-GA: gradient SVD init, frozen start subtracted.
pub struct LoraGa;

impl Variant for LoraGa {
    fn name(&self) -> &'static str {
        "lora_ga"
    }

    fn uses_alpha(&self) -> bool {
        true
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        frozen_start_specs(d, cfg)
    }

    fn check_layer(&self, d: Dims, cfg: &Config) -> std::result::Result<(), String> {
        if 2 * cfg.r > d.d_in.min(d.d_out) {
            return Err(format!(
                "it takes 2r = {} singular pairs of a {} x {} gradient; use r <= {}",
                2 * cfg.r,
                d.d_out,
                d.d_in,
                d.d_in.min(d.d_out) / 2
            ));
        }
        Ok(())
    }

    fn frozen_start(&self) -> bool {
        true
    }

    fn calibration(&self, _cfg: &Config) -> Option<Statistic> {
        Some(Statistic::WeightGradient)
    }

    // G = U S Vᵀ (top 2r); A, B by the direction, B scaled; A₀ = A, B₀ = B.
    fn init_calibrated(
        &self,
        _w: Option<&Array2<f32>>,
        stats: &ModuleStats,
        p: &mut Params,
        cfg: &Config,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<()> {
        let g = stats.grad.as_ref().expect("the weight gradient");
        let r = cfg.r;
        let svd = crate::linalg::svd_flipped(g, 2 * r)?;
        let vt = svd.v.t(); // [2r, d_in]
        let (a_idx, b_idx): (Vec<usize>, Vec<usize>) = match cfg.lora_ga.direction {
            Direction::ArB2r => ((0..r).collect(), (r..2 * r).collect()),
            Direction::A2rBr => ((r..2 * r).collect(), (0..r).collect()),
            Direction::ArBr => (
                (0..r).map(|k| 2 * k + 1).collect(),
                (0..r).map(|k| 2 * k).collect(),
            ),
        };
        let mut a = vt.select(Axis(0), &a_idx);
        let mut b = svd.u.select(Axis(1), &b_idx);
        for (mut col, &k) in b.columns_mut().into_iter().zip(&b_idx) {
            col *= svd.s[k];
        }
        match cfg.lora_ga.scale {
            Scale::Stable => b *= (g.nrows() as f64).powf(0.25) / cfg.lora_ga.gamma.sqrt(),
            Scale::GdScale => {
                a /= cfg.scale();
                b /= cfg.scale();
            }
            Scale::Unit => {}
        }
        Lora::start_from(a, b, p, round);
        Ok(())
    }

    fn cfg_fields(&self, cfg: &Config) -> Vec<(&'static str, serde_json::Value)> {
        let o = cfg.lora_ga;
        vec![
            (
                "lora_ga_direction",
                clap::ValueEnum::to_possible_value(&o.direction)
                    .map(|v| v.get_name().to_string())
                    .into(),
            ),
            (
                "lora_ga_scale",
                clap::ValueEnum::to_possible_value(&o.scale)
                    .map(|v| v.get_name().to_string())
                    .into(),
            ),
            ("lora_ga_gamma", o.gamma.into()),
        ]
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

    // W + s·B A − s·B₀ A₀ (= PEFT's W − s·B₀A₀ + s·B A)
    fn merged_weight(&self, w: Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        Lora::from_start_low_rank(p, cfg).added_to(w)
    }

    fn low_rank(&self, p: &Params, cfg: &Config) -> std::result::Result<LowRank, String> {
        Ok(Lora::from_start_low_rank(p, cfg))
    }
}
