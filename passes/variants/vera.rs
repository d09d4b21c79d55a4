//! VeRA (Kopiczko et al. 2024; PEFT `vera`): one pair of frozen random projections
//! shared by every layer (`vera_A [r, max d_in]`, `vera_B [max d_out, r]`, each layer
//! using their leading slices) and two trained scaling vectors per layer:
//! `y' = y + λ_b ⊙ ((λ_d ⊙ (x A_sᵀ)) B_sᵀ)`.

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD, Axis, IxDyn};

use super::{mat, vec1, Config, Dims, Init, ParamSpec, Params, Variant};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::ValueId;
use crate::rng::Rng;

/// PEFT's `d_initial`: λ_d's value at init.
pub const D_INITIAL: f64 = 0.1;

/// VeRA: `vera_lambda_b [d_out]` zeros, `vera_lambda_d [r]` = 0.1, trained; the
/// frozen shared `vera_A`, `vera_B` kaiming-uniform (PEFT's bounds).
pub struct Vera;

impl Variant for Vera {
    fn name(&self) -> &'static str {
        "vera"
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        let frozen = |name, shape: [usize; 2]| ParamSpec {
            name,
            shape: shape.to_vec(),
            init: Init::Zeros, // the slice of the shared tensor, set by the graft pass
            trainable: false,
        };
        vec![
            ParamSpec {
                name: "vera_lambda_b",
                shape: vec![d.d_out],
                init: Init::Zeros,
                trainable: true,
            },
            ParamSpec {
                name: "vera_lambda_d",
                shape: vec![cfg.r],
                init: Init::Constant(D_INITIAL),
                trainable: true,
            },
            frozen("vera_A", [cfg.r, d.d_in]),
            frozen("vera_B", [d.d_out, cfg.r]),
        ]
    }

    fn shared_params(&self) -> &'static [&'static str] {
        &["vera_A", "vera_B"]
    }

    // PEFT's `_kaiming_init`: U(±sqrt(6 / fan_in)), fan_in the second dim.
    fn shared_init(&self, max: Dims, cfg: &Config, rng: &mut Rng) -> Params {
        let mut uniform = |rows: usize, cols: usize| {
            let bound = (6.0 / cols as f64).sqrt();
            let values = (0..rows * cols)
                .map(|_| rng.uniform_in(-bound, bound) as f32)
                .collect();
            ArrayD::from_shape_vec(IxDyn(&[rows, cols]), values).expect("shape")
        };
        let a = uniform(cfg.r, max.d_in);
        let b = uniform(max.d_out, cfg.r);
        Params::from([("vera_A", a), ("vera_B", b)])
    }

    // λ_b ⊙ ((λ_d ⊙ (x A_m)) B_m)
    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        _y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        _cfg: &Config,
    ) -> Result<ValueId> {
        let h = b.op("MatMul", &[x, p["vera_A"]], vec![])?; // [..., r]
        let h = b.op("Mul", &[h, p["vera_lambda_d"]], vec![])?;
        let d = b.op("MatMul", &[h, p["vera_B"]], vec![])?; // [..., d_out]
        b.op("Mul", &[d, p["vera_lambda_b"]], vec![])
    }

    // W + diag(λ_b) B_s diag(λ_d) A_s
    fn merged_weight(&self, w: Array2<f32>, p: &Params, _cfg: &Config) -> Array2<f32> {
        Vera::update(p).added_to(w)
    }

    fn low_rank(&self, p: &Params, _cfg: &Config) -> std::result::Result<super::LowRank, String> {
        Ok(Vera::update(p))
    }
}

impl Vera {
    /// The update as a product: up = diag(λ_b) B_s diag(λ_d), down = A_s.
    fn update(p: &Params) -> super::LowRank {
        let (ld, lb) = (vec1(p, "vera_lambda_d"), vec1(p, "vera_lambda_b"));
        super::LowRank {
            up: &mat(p, "vera_B") * &ld.insert_axis(Axis(0)) * &lb.insert_axis(Axis(1)),
            down: mat(p, "vera_A"),
        }
    }
}
