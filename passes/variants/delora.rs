//! DeLoRA (Bini et al. 2025): per-rank normalised LoRA scaled by a trainable lambda,
//! with the base weight's per-input-channel norms applied on the input side.

use std::collections::BTreeMap;

use tract_core::ndarray::{Array1, Array2, ArrayD, Axis};

use super::{mat, Config, Dims, Init, ParamSpec, Params, Variant};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::ValueId;
use crate::rng::Rng;

/// The norm clamp: `max(‖v‖, 1e-4)`, computed NaN-safe as `sqrt(max(Σv², 1e-8))`.
const NORM_EPS: f64 = 1e-4;

/// How DeLoRA starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeloraInit {
    /// The paper's: kaiming A and B, and the weight rewritten to `W_res = W − ΔW₀` so
    /// the model is unchanged at init. Every rank starts with a unit-scale B, so the
    /// first updates are small, as LoRA's (lora-lite's `B = 0` meets the `max(‖b_i‖,
    /// 1e-4)` clamp: a 1e4 gain that puts every rank at full strength after one step).
    #[default]
    Paper,
    /// lora-lite's and PEFT's: kaiming A, `B = 0`; files load in lora-lite unchanged.
    #[value(name = "lora-lite")]
    LoraLite,
}

impl DeloraInit {
    /// The name written in lora-graft's metadata.
    pub fn name(self) -> &'static str {
        match self {
            DeloraInit::Paper => "paper",
            DeloraInit::LoraLite => "lora-lite",
        }
    }

    /// The init called `name`.
    pub fn from_name(name: &str) -> Option<DeloraInit> {
        [DeloraInit::Paper, DeloraInit::LoraLite]
            .into_iter()
            .find(|i| i.name() == name)
    }
}

/// DeLoRA: kaiming A, B kaiming (the paper's init, with `W_res`) or zero (lora-lite's),
/// `lambda = lambda0`, frozen `wnorm = ‖W[:, j]‖`.
pub struct Delora;

impl Variant for Delora {
    fn name(&self) -> &'static str {
        "delora"
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
                init: match cfg.delora_init {
                    DeloraInit::Paper => Init::Kaiming,
                    DeloraInit::LoraLite => Init::Zeros,
                },
                trainable: true,
            },
            ParamSpec {
                name: "lora_lambda",
                shape: vec![],
                init: Init::Constant(cfg.lambda0),
                trainable: true,
            },
            ParamSpec {
                name: "lora_wnorm",
                shape: vec![d.d_in],
                init: Init::Zeros,
                trainable: false,
            },
        ]
    }

    fn reads_weight(&self) -> bool {
        true
    }

    fn rewrites_weight(&self, cfg: &Config) -> bool {
        cfg.delora_init == DeloraInit::Paper
    }

    // wnorm_j = ‖W[:, j]‖₂, one per input channel (torch W.norm(dim=0)), in f32; the
    // paper's init also W_res = W − ΔW(A₀, B₀, λ₀) from the tensors as rounded.
    fn init(
        &self,
        w: &Array2<f32>,
        p: &mut Params,
        cfg: &Config,
        _: &mut Rng,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<Option<Array2<f32>>> {
        let mut wnorm = w
            .map_axis(Axis(0), |col| {
                col.iter()
                    .map(|&v| (v as f64) * (v as f64))
                    .sum::<f64>()
                    .sqrt() as f32
            })
            .into_dyn();
        round(&mut wnorm);
        p.insert("lora_wnorm", wnorm);
        if cfg.delora_init == DeloraInit::LoraLite {
            return Ok(None);
        }
        for t in p.values_mut() {
            round(t);
        }
        let mut w_res = w.clone();
        w_res -= &Delora::delta_w(p, cfg);
        Ok(Some(w_res))
    }

    fn cfg_fields(&self, cfg: &Config) -> Vec<(&'static str, serde_json::Value)> {
        vec![("lambda0", cfg.lambda0.into())]
    }

    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        _y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        _cfg: &Config,
    ) -> Result<ValueId> {
        let h = b.op("MatMul", &[x, p["a_scaled"]], vec![])?; // [..., r]
        let hs = b.op("Mul", &[h, p["sigma"]], vec![])?;
        b.op("MatMul", &[hs, p["lora_B"]], vec![])
    }

    // Once per module (shared by every site of a module called twice):
    // a_scaled = diag(wnorm) A_m, since (x ⊙ wnorm) A_m = x (diag(wnorm) A_m): x keeps
    // MatMul readers only (as in the base graph) and the cost is d_in·r, not tokens·d_in;
    // σ = (λ/r) / (an·bn) with an, bn = sqrt(max(Σ(.)², ε²)) (NaN-safe at B = 0).
    fn module_values(
        &self,
        b: &mut Builder,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<Vec<(&'static str, ValueId)>> {
        let (a, bm) = (p["lora_A"], p["lora_B"]);
        let wnorm_col = b.unsqueeze(p["lora_wnorm"], &[1])?; // [d_in, 1]
        let a_scaled = b.op("Mul", &[wnorm_col, a], vec![])?;
        let eps2 = b.scalar("eps2", NORM_EPS * NORM_EPS);
        let a_ss = b.reduce_sum_square(a, &[0])?; // A_m [d_in, r]: per-rank norm over axis 0
        let a_max = b.op("Max", &[a_ss, eps2], vec![])?;
        let an = b.op("Sqrt", &[a_max], vec![])?;
        let b_ss = b.reduce_sum_square(bm, &[1])?; // B_m [r, d_out]: per-rank norm over axis 1
        let b_max = b.op("Max", &[b_ss, eps2], vec![])?;
        let bn = b.op("Sqrt", &[b_max], vec![])?;
        let r = b.scalar("r", cfg.r as f64);
        let lambda_r = b.op("Div", &[p["lora_lambda"], r], vec![])?;
        let norms = b.op("Mul", &[an, bn], vec![])?;
        let sigma = b.op("Div", &[lambda_r, norms], vec![])?; // [r]
        Ok(vec![("a_scaled", a_scaled), ("sigma", sigma)])
    }

    fn merged_weight(&self, w: &Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        w + &Delora::delta_w(p, cfg)
    }
}

impl Delora {
    /// `ΔW = B diag(σ) A diag(wnorm)`, `σ_i = (λ/r) / (max(‖A[i,:]‖, ε)·max(‖B[:,i]‖, ε))`.
    pub fn delta_w(p: &Params, cfg: &Config) -> Array2<f32> {
        let (a, b) = (mat(p, "lora_A"), mat(p, "lora_B"));
        let lambda = p["lora_lambda"].iter().next().copied().unwrap_or(0.0) as f64;
        let wnorm: Array1<f32> = p["lora_wnorm"]
            .clone()
            .into_dimensionality()
            .expect("1-D wnorm");
        let norm = |v: tract_core::ndarray::ArrayView1<f32>| {
            v.iter()
                .map(|&x| (x as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(NORM_EPS)
        };
        let sigma: Vec<f64> = (0..cfg.r)
            .map(|i| (lambda / cfg.r as f64) / (norm(a.row(i)) * norm(b.column(i))))
            .collect();
        let mut b_sigma = b.clone();
        for (i, mut col) in b_sigma.columns_mut().into_iter().enumerate() {
            col.mapv_inplace(|v| (v as f64 * sigma[i]) as f32);
        }
        let mut a_w = a.clone();
        for mut row in a_w.rows_mut() {
            row.zip_mut_with(&wnorm, |v, &n| *v *= n);
        }
        b_sigma.dot(&a_w)
    }
}
