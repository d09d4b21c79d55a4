//! LoRA (Hu et al. 2021), with PEFT's rsLoRA option: `y' = y + s·(x A^T) B^T`.

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD};

use super::{mat, Config, Dims, Init, LowRank, ParamSpec, Params, Variant};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::ValueId;

/// LoRA: kaiming-uniform A, zero B, scale `alpha/r` (rsLoRA: `alpha/sqrt(r)`).
pub struct Lora;

impl Variant for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }

    fn uses_alpha(&self) -> bool {
        true
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "lora_A",
                shape: vec![cfg.r, d.d_in],
                init: Init::Kaiming,
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

    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        _y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<ValueId> {
        let h = b.op("MatMul", &[x, p["lora_A"]], vec![])?; // [..., r]
        let d = b.op("MatMul", &[h, p["lora_B"]], vec![])?; // [..., d_out]
        let s = b.scalar("scale", cfg.scale());
        b.op("Mul", &[d, s], vec![])
    }

    fn merged_weight(&self, w: &Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        w + &Lora::delta_w(p, cfg)
    }

    fn low_rank(&self, p: &Params, cfg: &Config) -> std::result::Result<LowRank, String> {
        Ok(Lora::low_rank_of(p, cfg))
    }
}

impl Lora {
    /// Starts a layer from the factors `a` `[r, d_in]` and `b` `[d_out, r]` (rounded to
    /// the adapter dtype) and returns the residual weight `W − s·B A` they leave
    /// (PiSSA's and OLoRA's inits).
    pub fn start_from(
        a: Array2<f64>,
        b: Array2<f64>,
        w: &Array2<f32>,
        p: &mut Params,
        cfg: &Config,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Array2<f32> {
        let (mut a, mut b) = (
            a.mapv(|v| v as f32).into_dyn(),
            b.mapv(|v| v as f32).into_dyn(),
        );
        round(&mut a);
        round(&mut b);
        p.insert("lora_A", a);
        p.insert("lora_B", b);
        // In place on a copy of `w`, which keeps its memory layout (the stored one).
        let mut w_res = w.clone();
        w_res -= &Lora::delta_w(p, cfg);
        w_res
    }

    /// `ΔW = (s·B) · A`.
    pub fn low_rank_of(p: &Params, cfg: &Config) -> LowRank {
        LowRank {
            up: mat(p, "lora_B") * cfg.scale() as f32,
            down: mat(p, "lora_A"),
        }
    }

    /// `ΔW = s·B A`, torch layout.
    pub fn delta_w(p: &Params, cfg: &Config) -> Array2<f32> {
        mat(p, "lora_B").dot(&mat(p, "lora_A")) * cfg.scale() as f32
    }
}
