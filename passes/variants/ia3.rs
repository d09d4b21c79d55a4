//! IA3 (Liu et al. 2022), output form: a learned gate on the layer's output after the
//! bias, `y' = (x W^T + b) ⊙ g` (lora-lite `ia3`, PEFT's non-feedforward IA3).

use std::collections::BTreeMap;

use tract_core::ndarray::{Array1, Array2, Axis};

use super::{vec1, Config, Dims, Init, ParamSpec, Params, Splice, Variant};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::ValueId;

/// IA3: `lora_g [d_out]`, ones at init, scales the output and the bias.
pub struct Ia3;

impl Variant for Ia3 {
    fn name(&self) -> &'static str {
        "ia3"
    }

    fn param_specs(&self, d: Dims, _cfg: &Config) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: "lora_g",
            shape: vec![d.d_out],
            init: Init::Constant(1.0),
            trainable: true,
        }]
    }

    fn uses_rank(&self) -> bool {
        false
    }

    fn splice(&self) -> Splice {
        Splice::PostBias
    }

    fn branch(
        &self,
        b: &mut Builder,
        _x: ValueId,
        y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        _cfg: &Config,
    ) -> Result<ValueId> {
        b.op("Mul", &[y, p["lora_g"]], vec![])
    }

    // W' = diag(g) W: row o (an output) scaled by g_o.
    fn low_rank(&self, _p: &Params, _cfg: &Config) -> std::result::Result<super::LowRank, String> {
        Err("it scales every output (y ⊙ g), a full-rank change: serving it needs a per-output gate input; serve the merged model instead".into())
    }

    fn merged_weight(&self, w: Array2<f32>, p: &Params, _cfg: &Config) -> Array2<f32> {
        w * &vec1(p, "lora_g").insert_axis(Axis(1)) // in w's buffer
    }

    // b' = b ⊙ g
    fn merged_bias(&self, b: &Array1<f32>, p: &Params, _cfg: &Config) -> Option<Array1<f32>> {
        Some(b * &vec1(p, "lora_g"))
    }
}
