//! IA3, feed-forward form: a learned gate on the layer's input, `y' = (x ⊙ g) W^T + b`
//! (lora-lite `ia3_ff`, PEFT's feedforward IA3), on an edge only this layer reads.

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, Axis};

use super::{vec1, Config, Dims, Init, ParamSpec, Params, Splice, Variant};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::ValueId;

/// IA3_FF: `lora_g [d_in]`, ones at init, scales the input; the bias is unchanged.
pub struct Ia3Ff;

impl Variant for Ia3Ff {
    fn name(&self) -> &'static str {
        "ia3_ff"
    }

    fn param_specs(&self, d: Dims, _cfg: &Config) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: "lora_g",
            shape: vec![d.d_in],
            init: Init::Constant(1.0),
            trainable: true,
        }]
    }

    fn uses_rank(&self) -> bool {
        false
    }

    fn splice(&self) -> Splice {
        Splice::Input
    }

    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        _y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        _cfg: &Config,
    ) -> Result<ValueId> {
        b.op("Mul", &[x, p["lora_g"]], vec![])
    }

    // W' = W diag(g): column i (an input) scaled by g_i.
    fn low_rank(&self, _p: &Params, _cfg: &Config) -> std::result::Result<super::LowRank, String> {
        Err("it scales every input (x ⊙ g), a full-rank change: serving it needs a per-input gate input; serve the merged model instead".into())
    }

    fn merged_weight(&self, w: Array2<f32>, p: &Params, _cfg: &Config) -> Array2<f32> {
        w * &vec1(p, "lora_g").insert_axis(Axis(0)) // in w's buffer
    }
}
