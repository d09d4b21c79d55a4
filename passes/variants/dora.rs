//! DoRA (Liu et al. 2024): LoRA's direction, renormalised per output channel and
//! scaled by a learned magnitude, `y' = m / ‖W + s·BA‖_row ⊙ (x W^T + s·(x A^T) B^T) + b`,
//! with the norm detached (held constant by the gradient pass, as lora-lite and PEFT
//! do) and the bias added unscaled.

use std::collections::BTreeMap;

use tract_core::ndarray::{Array1, Array2, ArrayD, Axis};

use super::{lora::Lora, norms, vec1, Config, Dims, Init, ParamSpec, Params, Splice, Variant};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::ValueId;
use crate::rng::Rng;

/// lora-lite's clamp of the norm: `max(‖V[o,:]‖, 1e-12)`.
const NORM_EPS: f64 = 1e-12;

/// DoRA: kaiming A, zero B, `lora_m = ‖W[o,:]‖` (one per output channel).
pub struct Dora;

impl Variant for Dora {
    fn name(&self) -> &'static str {
        "dora"
    }

    fn uses_alpha(&self) -> bool {
        true
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        let mut specs = Lora.param_specs(d, cfg);
        specs.push(ParamSpec {
            name: "lora_m",
            shape: vec![d.d_out],
            init: Init::Zeros,
            trainable: true,
        });
        specs
    }

    fn splice(&self) -> Splice {
        Splice::PreBias
    }

    fn reads_weight(&self) -> bool {
        true
    }

    fn weight_in_graph(&self) -> bool {
        true
    }

    // m_o = ‖W[o,:]‖₂, one per output channel (torch W.norm(dim=1)), in f32.
    fn init(
        &self,
        w: &Array2<f32>,
        p: &mut Params,
        _: &Config,
        _: &mut Rng,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<Option<Array2<f32>>> {
        let mut m = norms(w, 1).mapv(|n| n as f32).into_dyn();
        round(&mut m);
        p.insert("lora_m", m);
        Ok(None)
    }

    // Once per module: c = m / stopgrad(max(‖Wm + s·A_m B_m‖ over inputs, ε)), [d_out];
    // the norm as sqrt(max(Σ², ε²)), NaN-safe.
    fn module_values(
        &self,
        b: &mut Builder,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<Vec<(&'static str, ValueId)>> {
        let ba = b.op("MatMul", &[p["lora_A"], p["lora_B"]], vec![])?; // [d_in, d_out]
        let s = b.scalar("scale", cfg.scale());
        let sba = b.op("Mul", &[ba, s], vec![])?;
        let v = b.op("Add", &[p["weight"], sba], vec![])?;
        let ss = b.reduce_sum_square(v, &[0])?; // per output channel
        let eps2 = b.scalar("eps2", NORM_EPS * NORM_EPS);
        let clamped = b.op("Max", &[ss, eps2], vec![])?;
        let norm = b.op("Sqrt", &[clamped], vec![])?;
        let norm = b.stop_gradient(norm)?;
        let c = b.op("Div", &[p["lora_m"], norm], vec![])?;
        Ok(vec![("magnitude", c)])
    }

    // y' = c ⊙ (y + s·(x A_m) B_m), y before the bias.
    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<ValueId> {
        let delta = Lora.branch(b, x, y, p, cfg)?;
        let z = b.op("Add", &[y, delta], vec![])?;
        b.op("Mul", &[z, p["magnitude"]], vec![])
    }

    // W' = diag(m / ‖V‖_row) V, V = W + s·B A; the bias is unchanged.
    fn low_rank(&self, _p: &Params, _cfg: &Config) -> std::result::Result<super::LowRank, String> {
        Err("it rescales every output by m / ‖W + s·BA‖, which the adapter changes: serving it needs a per-output scale input beside A and B; serve the merged model instead".into())
    }

    fn merged_weight(&self, w: Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        let v = Lora.merged_weight(w, p, cfg);
        let m = vec1(p, "lora_m");
        let c: Array1<f32> = norms(&v, 1)
            .iter()
            .zip(&m)
            .map(|(&n, &m)| (m as f64 / n.max(NORM_EPS)) as f32)
            .collect();
        v * &c.insert_axis(Axis(1))
    }
}
