//! DeLoRA (Bini et al. 2025): per-rank normalised LoRA scaled by a trainable lambda,
//! with the base weight's per-input-channel norms applied on the input side.

use std::collections::BTreeMap;

use tract_core::ndarray::{Array1, Array2, ArrayD};

use super::{mat, Config, Dims, Init, LowRank, ParamSpec, Params, Variant};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::ValueId;
use crate::rng::Rng;

/// The norm clamp: `max(‖v‖, 1e-4)`, computed NaN-safe as `sqrt(max(Σv², 1e-8))`.
const NORM_EPS: f64 = 1e-4;

/// How DeLoRA starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeloraInit {
    /// The paper's: kaiming A and B, minus a frozen copy of the initial branch
    /// (`lora_A0`, `lora_B0`, `lambda0`), so the model is unchanged at init and the base
    /// weights are untouched. Every rank starts with a unit-scale B, so the first
    /// updates are small, as LoRA's (lora-lite's `B = 0` meets the `max(‖b_i‖, 1e-4)`
    /// clamp: a 1e4 gain that puts every rank at full strength after one step).
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

/// DeLoRA: kaiming A, B kaiming (the paper's init, with the frozen initial branch
/// subtracted) or zero (lora-lite's), `lambda = lambda0`, frozen `wnorm = ‖W[:, j]‖`.
pub struct Delora;

impl Variant for Delora {
    fn name(&self) -> &'static str {
        "delora"
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        let mut specs = vec![
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
        ];
        if cfg.delora_init == DeloraInit::Paper {
            for (name, shape) in [("lora_A0", [cfg.r, d.d_in]), ("lora_B0", [d.d_out, cfg.r])] {
                specs.push(ParamSpec {
                    name,
                    shape: shape.to_vec(),
                    init: Init::Zeros, // copied from A and B in `init`
                    trainable: false,
                });
            }
        }
        specs
    }

    fn reads_weight(&self) -> bool {
        true
    }

    // wnorm_j = ‖W[:, j]‖₂, one per input channel (torch W.norm(dim=0)), in f32; the
    // paper's init also keeps A₀ = A, B₀ = B.
    fn init(
        &self,
        w: &Array2<f32>,
        p: &mut Params,
        cfg: &Config,
        _: &mut Rng,
        round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<Option<Array2<f32>>> {
        let mut wnorm = super::norms(w, 0).mapv(|n| n as f32).into_dyn();
        round(&mut wnorm);
        p.insert("lora_wnorm", wnorm);
        if cfg.delora_init == DeloraInit::Paper {
            p.insert("lora_A0", p["lora_A"].clone());
            p.insert("lora_B0", p["lora_B"].clone());
        }
        Ok(None)
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
        cfg: &Config,
    ) -> Result<ValueId> {
        let mut term = |a: &str, sigma: &str, bm: &str| -> Result<ValueId> {
            let h = b.op("MatMul", &[x, p[a]], vec![])?; // [..., r]
            let hs = b.op("Mul", &[h, p[sigma]], vec![])?;
            b.op("MatMul", &[hs, p[bm]], vec![])
        };
        let delta = term("a_scaled", "sigma", "lora_B")?;
        if cfg.delora_init == DeloraInit::LoraLite {
            return Ok(delta);
        }
        // The same ops on the frozen copy: exactly the same values at init.
        let initial = term("a0_scaled", "sigma0", "lora_B0")?;
        b.op("Sub", &[delta, initial], vec![])
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
        let (a_scaled, sigma) = scaled(b, p["lora_A"], p["lora_B"], p["lora_lambda"], p, cfg)?;
        let mut values = vec![("a_scaled", a_scaled), ("sigma", sigma)];
        if cfg.delora_init == DeloraInit::Paper {
            let lambda0 = b.scalar("lambda0", cfg.lambda0);
            let (a0, s0) = scaled(b, p["lora_A0"], p["lora_B0"], lambda0, p, cfg)?;
            values.extend([("a0_scaled", a0), ("sigma0", s0)]);
        }
        Ok(values)
    }

    // W + ΔW(A, B, λ) (− ΔW(A₀, B₀, λ₀) with the paper's init).
    fn merged_weight(&self, w: Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        Delora::full_low_rank(p, cfg).added_to(w)
    }

    fn low_rank(&self, p: &Params, cfg: &Config) -> std::result::Result<LowRank, String> {
        Ok(Delora::full_low_rank(p, cfg))
    }
}

/// Per module: `a_scaled = diag(wnorm) A_m`, since `(x ⊙ wnorm) A_m = x (diag(wnorm) A_m)`
/// (x keeps MatMul readers only, as in the base graph, and the cost is d_in·r, not
/// tokens·d_in); `σ = (λ/r) / (an·bn)` with `an, bn = sqrt(max(Σ(.)², ε²))` (NaN-safe
/// at B = 0).
fn scaled(
    b: &mut Builder,
    a: ValueId,
    bm: ValueId,
    lambda: ValueId,
    p: &BTreeMap<&'static str, ValueId>,
    cfg: &Config,
) -> Result<(ValueId, ValueId)> {
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
    let lambda_r = b.op("Div", &[lambda, r], vec![])?;
    let norms = b.op("Mul", &[an, bn], vec![])?;
    let sigma = b.op("Div", &[lambda_r, norms], vec![])?; // [r]
    Ok((a_scaled, sigma))
}

impl Delora {
    /// `ΔW = B diag(σ) A diag(wnorm)`, `σ_i = (λ/r) / (max(‖A[i,:]‖, ε)·max(‖B[:,i]‖, ε))`,
    /// of the trained tensors.
    pub fn delta_w(p: &Params, cfg: &Config) -> Array2<f32> {
        let (a, b) = (mat(p, "lora_A"), mat(p, "lora_B"));
        let lambda = p["lora_lambda"].iter().next().copied().unwrap_or(0.0) as f64;
        Delora::low_rank_of(&a, &b, lambda, p, cfg).delta_w()
    }

    /// The whole update as one low-rank pair: the trained branch, minus the frozen
    /// initial one with the paper's init (rank 2r).
    fn full_low_rank(p: &Params, cfg: &Config) -> LowRank {
        let (a, b) = (mat(p, "lora_A"), mat(p, "lora_B"));
        let lambda = p["lora_lambda"].iter().next().copied().unwrap_or(0.0) as f64;
        let trained = Delora::low_rank_of(&a, &b, lambda, p, cfg);
        if cfg.delora_init == DeloraInit::LoraLite {
            return trained;
        }
        let (a0, b0) = (mat(p, "lora_A0"), mat(p, "lora_B0"));
        trained.minus(&Delora::low_rank_of(&a0, &b0, cfg.lambda0, p, cfg))
    }

    /// `up = B diag(σ)`, `down = A diag(wnorm)` of `a`, `b`, `lambda` with the layer's
    /// `wnorm`: in ONNX Runtime's adapter inputs `A′ = diag(wnorm)·Aᵀ·diag(σ)`, `B′ = Bᵀ`
    /// (σ put on the down side there, the same product).
    fn low_rank_of(
        a: &Array2<f32>,
        b: &Array2<f32>,
        lambda: f64,
        p: &Params,
        cfg: &Config,
    ) -> LowRank {
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
        LowRank {
            up: b_sigma,
            down: a_w,
        }
    }
}
