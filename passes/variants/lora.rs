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

    fn merged_weight(&self, w: Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        let product = LowRank {
            up: mat(p, "lora_B"),
            down: mat(p, "lora_A"),
        };
        product.scaled_added_to(w, cfg.scale() as f32)
    }

    fn low_rank(&self, p: &Params, cfg: &Config) -> std::result::Result<LowRank, String> {
        Ok(Lora::low_rank_of(p, cfg))
    }
}

/// The tensors of a variant that starts LoRA from the weight (PiSSA, OLoRA): `lora_A`,
/// `lora_B` trained, `lora_A0`, `lora_B0` their frozen start, all set by the init.
pub fn frozen_start_specs(d: Dims, cfg: &Config) -> Vec<ParamSpec> {
    let spec = |name, shape: [usize; 2], trainable| ParamSpec {
        name,
        shape: shape.to_vec(),
        init: if trainable { Init::Zeros } else { Init::Start },
        trainable,
    };
    vec![
        spec("lora_A", [cfg.r, d.d_in], true),
        spec("lora_B", [d.d_out, cfg.r], true),
        spec("lora_A0", [cfg.r, d.d_in], false),
        spec("lora_B0", [d.d_out, cfg.r], false),
    ]
}

impl Lora {
    /// Starts a layer from the factors `a` `[r, d_in]` and `b` `[d_out, r]`, rounded to
    /// the adapter dtype: `lora_A`, `lora_B` and their frozen copies `lora_A0`, `lora_B0`
    /// (PiSSA's and OLoRA's inits; the weight is left as it is).
    pub fn start_from(
        a: Array2<f64>,
        b: Array2<f64>,
        p: &mut Params,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) {
        let (mut a, mut b) = (
            a.mapv(|v| v as f32).into_dyn(),
            b.mapv(|v| v as f32).into_dyn(),
        );
        round(&mut a);
        round(&mut b);
        p.insert("lora_A0", a.clone());
        p.insert("lora_B0", b.clone());
        p.insert("lora_A", a);
        p.insert("lora_B", b);
    }

    /// The frozen start `(s·B₀)·A₀` of a [`frozen_start_specs`] variant.
    pub fn start_low_rank(p: &Params, cfg: &Config) -> LowRank {
        LowRank {
            up: mat(p, "lora_B0") * cfg.scale() as f32,
            down: mat(p, "lora_A0"),
        }
    }

    /// A [`frozen_start_specs`] variant's update: `s·B A − s·B₀ A₀` (rank 2r).
    pub fn from_start_low_rank(p: &Params, cfg: &Config) -> LowRank {
        Lora::low_rank_of(p, cfg).minus(&Lora::start_low_rank(p, cfg))
    }

    /// A [`frozen_start_specs`] variant's branch: `s·((x A) B − (x A₀) B₀)`, exactly 0
    /// at init.
    pub fn branch_from_start(
        b: &mut Builder,
        x: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<ValueId> {
        let h = b.op("MatMul", &[x, p["lora_A"]], vec![])?;
        let d = b.op("MatMul", &[h, p["lora_B"]], vec![])?;
        let h0 = b.op("MatMul", &[x, p["lora_A0"]], vec![])?;
        let d0 = b.op("MatMul", &[h0, p["lora_B0"]], vec![])?;
        let diff = b.op("Sub", &[d, d0], vec![])?;
        let s = b.scalar("scale", cfg.scale());
        b.op("Mul", &[diff, s], vec![])
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
