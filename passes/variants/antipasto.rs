//! AntiPaSTO (wassname 2026; lora-lite `variants/antipasto.py`, variants.md §10): the top
//! `r` singular triplets of W as frozen buffers `U`, `S`, `Vh`, trained through a shift
//! of the singular values `δ` and a block-Cayley rotation of one basis:
//!
//! `y' = y − ((x Vhᵀ) ⊙ S) Uᵀ + ((x Vh_effᵀ) ⊙ (S + δ)) U_effᵀ`
//!
//! with `V` mode `Vh_eff = blockdiag(R)·Vh`, `U` mode `U_eff = U·blockdiag(R)ᵀ`, and per
//! block `R = (I − X)⁻¹(I + X)`, `X = K̃/2`, `K̃ = a·tanh(K/a)`, `a = 2 tan(θmax/2)`,
//! `K = ½(T − Tᵀ)` from `rot_T`. lora-lite writes `W_res = W − U diag(S) Vh` into the
//! model; lora-graft keeps W and subtracts the same part in the branch (the same
//! function, any weight format), so a reloaded adapter always has the base it was
//! trained with: its own `U`, `S`, `Vh` (lora-lite's `load()` re-runs the plain top-r
//! init and so loses a calibrated selection).
//!
//! In the graph the Cayley map is a polynomial (block size 2 or 4, whose skew blocks
//! satisfy `X⁴ + aX² + bI = 0`, `a = Σ_{i<j} x_ij²`, `b = Pf(X)²`):
//! `R = (I + X)² (αI + βX²)`, `α = (1 + a)/(1 + a + b)`, `β = 1/(1 + a + b)`, plain ops
//! the gradient pass differentiates. Merging computes `R` by Gaussian elimination.
//!
//! With calibration data the `r` components are chosen Wanda-style (lora-lite's
//! `group_init`): the largest `S_k · mean_n |x_n · v_k|` over every singular pair of W,
//! in ascending index order, from the model's own activations.

use std::collections::BTreeMap;

use tract_core::ndarray::{concatenate, s, Array1, Array2, ArrayD, Axis};

use super::{Config, Dims, Init, LowRank, ParamSpec, Params, Variant};
use crate::calibrate::{ModuleStats, Statistic};
use crate::error::Result;
use crate::ir::build::{int_attr, Builder};
use crate::ir::ValueId;
use crate::rng::Rng;

/// The basis the rotation turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RotateBasis {
    /// The input basis: `Vh_eff = blockdiag(R)·Vh`.
    #[default]
    #[value(name = "V")]
    V,
    /// The output basis: `U_eff = U·blockdiag(R)ᵀ`.
    #[value(name = "U")]
    U,
    /// No rotation (only `δ` is trained).
    #[value(name = "none")]
    None,
}

impl RotateBasis {
    /// lora-lite's name.
    pub fn name(self) -> &'static str {
        match self {
            RotateBasis::V => "V",
            RotateBasis::U => "U",
            RotateBasis::None => "none",
        }
    }

    /// The basis called `name`.
    pub fn from_name(name: &str) -> Option<RotateBasis> {
        [RotateBasis::V, RotateBasis::U, RotateBasis::None]
            .into_iter()
            .find(|b| b.name() == name)
    }
}

/// AntiPaSTO's settings (lora-lite's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AntipastoOptions {
    /// Rows of the basis each rotation block turns (2 or 4).
    pub block_size: usize,
    /// θmax, the bound of the rotation's tanh, in radians.
    pub max_angle: f64,
    /// The rotated basis.
    pub basis: RotateBasis,
    /// Choose the components from calibration data (Wanda-style), not the top `r`.
    pub select: bool,
}

impl Default for AntipastoOptions {
    fn default() -> Self {
        AntipastoOptions {
            block_size: 4,
            max_angle: 0.5,
            basis: RotateBasis::V,
            select: false,
        }
    }
}

/// The `(i, j)`, `i < j`, of a `bs × bs` block in row-major order (torch's
/// `triu_indices(bs, bs, 1)`): the columns of `rot_T`.
fn pairs(bs: usize) -> Vec<(usize, usize)> {
    (0..bs)
        .flat_map(|i| (i + 1..bs).map(move |j| (i, j)))
        .collect()
}

/// AntiPaSTO.
pub struct Antipasto;

impl Variant for Antipasto {
    fn name(&self) -> &'static str {
        "antipasto"
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        let o = cfg.antipasto;
        let frozen = |name, shape: Vec<usize>| ParamSpec {
            name,
            shape,
            init: Init::Zeros,
            trainable: false,
        };
        let mut specs = vec![
            frozen("lora_U", vec![d.d_out, cfg.r]),
            frozen("lora_S", vec![cfg.r]),
            frozen("lora_Vh", vec![cfg.r, d.d_in]),
            ParamSpec {
                name: "lora_delta_s",
                shape: vec![cfg.r],
                // lora-lite's symmetry-breaking start: N(4e-4, 4e-4²).
                init: Init::Normal {
                    mean: 4e-4,
                    std: 4e-4,
                },
                trainable: true,
            },
        ];
        if o.basis != RotateBasis::None {
            specs.push(ParamSpec {
                name: "lora_rot_T",
                shape: vec![cfg.r / o.block_size.max(1), pairs(o.block_size).len()],
                init: Init::Zeros,
                trainable: true,
            });
        }
        specs
    }

    fn check_layer(&self, _d: Dims, cfg: &Config) -> std::result::Result<(), String> {
        let bs = cfg.antipasto.block_size;
        if bs != 2 && bs != 4 {
            return Err(format!(
                "block size {bs}: lora-graft builds the Cayley rotation for blocks of 2 or 4"
            ));
        }
        if !cfg.r.is_multiple_of(bs) {
            return Err(format!(
                "r = {} is not a multiple of the block size {bs}",
                cfg.r
            ));
        }
        Ok(())
    }

    fn reads_weight(&self) -> bool {
        true
    }

    // The f32 weight, its f64 copy and the full SVD's factors and workspace.
    fn working_set(&self, d: Dims, _cfg: &Config) -> usize {
        4 * d.d_in * d.d_out + 40 * d.d_in * d.d_out
    }

    fn init(
        &self,
        w: &Array2<f32>,
        p: &mut Params,
        cfg: &Config,
        _: &mut Rng,
        _round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<Option<Array2<f32>>> {
        let k = w.nrows().min(w.ncols());
        let svd = crate::linalg::svd_exact(w, k)?;
        set_buffers(p, &svd, &(0..cfg.r).collect::<Vec<_>>());
        Ok(None)
    }

    fn calibration(&self, cfg: &Config) -> Option<Statistic> {
        cfg.antipasto.select.then_some(Statistic::InputBasisL1)
    }

    // score_k = S_k · mean_n |x_n · v_k|; the top r, in ascending index order.
    fn init_calibrated(
        &self,
        w: Option<&Array2<f32>>,
        stats: &ModuleStats,
        p: &mut Params,
        cfg: &Config,
        _round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<()> {
        let w = w.expect("antipasto reads the weight");
        let (sums, tokens) = stats.basis_l1.as_ref().expect("the basis statistic");
        let k = w.nrows().min(w.ncols());
        let svd = crate::linalg::svd_exact(w, k)?;
        let n = (*tokens).max(1) as f64;
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&a, &b| (svd.s[b] * sums[b] / n).total_cmp(&(svd.s[a] * sums[a] / n)));
        let mut chosen = order[..cfg.r].to_vec();
        chosen.sort_unstable();
        set_buffers(p, &svd, &chosen);
        Ok(())
    }

    fn cfg_fields(&self, cfg: &Config) -> Vec<(&'static str, serde_json::Value)> {
        let o = cfg.antipasto;
        vec![
            ("block_size", o.block_size.into()),
            ("max_rotation_angle", o.max_angle.into()),
            ("rotate_basis", o.basis.name().into()),
        ]
    }

    fn module_values(
        &self,
        b: &mut Builder,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<Vec<(&'static str, ValueId)>> {
        let o = cfg.antipasto;
        let (vh, u) = (p["lora_Vh"], p["lora_U"]); // [d_in, r], [r, d_out]
        let sd = b.op("Add", &[p["lora_S"], p["lora_delta_s"]], vec![])?;
        let mut values = vec![("antipasto_s_delta", sd)];
        if o.basis == RotateBasis::None {
            return Ok(values);
        }
        let r = cayley(b, p["lora_rot_T"], cfg)?; // [n, bs, bs]
        let (d_in, rank) = {
            let s = b.shape(vh)?;
            (s[0], s[1])
        };
        let n = rank / o.block_size;
        match o.basis {
            RotateBasis::V => {
                // Vh_eff = blockdiag(R)·Vh, in ONNX layout Vh_effᵀ.
                let vt = b.transpose(vh, &[1, 0])?;
                let blocks = b.reshape(vt, &[n, o.block_size, d_in])?;
                let turned =
                    b.op_shaped("MatMul", &[r, blocks], vec![], vec![n, o.block_size, d_in])?;
                let flat = b.reshape(turned, &[rank, d_in])?;
                values.push(("antipasto_vh_eff", b.transpose(flat, &[1, 0])?));
            }
            RotateBasis::U => {
                // U_eff = U·blockdiag(R)ᵀ, in ONNX layout blockdiag(R)·Uᵀ.
                let d_out = b.shape(u)?[1];
                let blocks = b.reshape(u, &[n, o.block_size, d_out])?;
                let turned =
                    b.op_shaped("MatMul", &[r, blocks], vec![], vec![n, o.block_size, d_out])?;
                values.push(("antipasto_u_eff", b.reshape(turned, &[rank, d_out])?));
            }
            RotateBasis::None => {}
        }
        Ok(values)
    }

    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        _y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        _cfg: &Config,
    ) -> Result<ValueId> {
        let vh_eff = p.get("antipasto_vh_eff").copied().unwrap_or(p["lora_Vh"]);
        let u_eff = p.get("antipasto_u_eff").copied().unwrap_or(p["lora_U"]);
        let h = b.op("MatMul", &[x, vh_eff], vec![])?;
        let h = b.op("Mul", &[h, p["antipasto_s_delta"]], vec![])?;
        let d = b.op("MatMul", &[h, u_eff], vec![])?;
        // The top-r part of W that lora-lite's W_res leaves out.
        let h0 = b.op("MatMul", &[x, p["lora_Vh"]], vec![])?;
        let h0 = b.op("Mul", &[h0, p["lora_S"]], vec![])?;
        let d0 = b.op("MatMul", &[h0, p["lora_U"]], vec![])?;
        b.op("Sub", &[d, d0], vec![])
    }

    fn merged_weight(&self, w: Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        self.update(p, cfg).added_to(w)
    }

    fn low_rank(&self, p: &Params, cfg: &Config) -> std::result::Result<LowRank, String> {
        Ok(self.update(p, cfg))
    }
}

impl Antipasto {
    /// `U_eff diag(S + δ) Vh_eff − U diag(S) Vh` as an update of rank 2r.
    fn update(&self, p: &Params, cfg: &Config) -> LowRank {
        let o = cfg.antipasto;
        let mat = |n| super::mat(p, n).mapv(f64::from);
        let (u, vh) = (mat("lora_U"), mat("lora_Vh"));
        let s = super::vec1(p, "lora_S").mapv(f64::from);
        let sd = &s + &super::vec1(p, "lora_delta_s").mapv(f64::from);
        let (mut u_eff, mut vh_eff) = (u.clone(), vh.clone());
        if o.basis != RotateBasis::None {
            let rot = mat("lora_rot_T");
            let bs = o.block_size;
            for (k, t) in rot.outer_iter().enumerate() {
                let r = rotation(&t.to_owned(), cfg);
                let rows = s![k * bs..(k + 1) * bs, ..];
                let cols = s![.., k * bs..(k + 1) * bs];
                match o.basis {
                    RotateBasis::V => vh_eff.slice_mut(rows).assign(&r.dot(&vh.slice(rows))),
                    _ => u_eff.slice_mut(cols).assign(&u.slice(cols).dot(&r.t())),
                }
            }
        }
        let scaled = |m: &Array2<f64>, v: &Array1<f64>| m * &v.view().insert_axis(Axis(0));
        let up = concatenate(
            Axis(1),
            &[scaled(&u_eff, &sd).view(), (-scaled(&u, &s)).view()],
        )
        .expect("same d_out");
        let down = concatenate(Axis(0), &[vh_eff.view(), vh.view()]).expect("same d_in");
        LowRank {
            up: up.mapv(|v| v as f32),
            down: down.mapv(|v| v as f32),
        }
    }
}

/// `U`, `S`, `Vh` from the singular pairs `chosen` of `svd`.
fn set_buffers(p: &mut Params, svd: &crate::linalg::Svd, chosen: &[usize]) {
    let f = |a: Array2<f64>| a.mapv(|v| v as f32).into_dyn();
    p.insert("lora_U", f(svd.u.select(Axis(1), chosen)));
    p.insert(
        "lora_S",
        svd.s.select(Axis(0), chosen).mapv(|v| v as f32).into_dyn(),
    );
    p.insert("lora_Vh", f(svd.v.select(Axis(1), chosen).reversed_axes()));
}

/// One block's rotation in f64: `R = (I − X)⁻¹ (I + X)` by Gaussian elimination.
fn rotation(t: &Array1<f64>, cfg: &Config) -> Array2<f64> {
    let o = cfg.antipasto;
    let bs = o.block_size;
    let lim = 2.0 * (o.max_angle / 2.0).tan();
    let mut x = Array2::<f64>::zeros((bs, bs));
    for (k, &(i, j)) in pairs(bs).iter().enumerate() {
        let v = lim * (0.5 * t[k] / lim).tanh() / 2.0;
        x[[i, j]] = v;
        x[[j, i]] = -v;
    }
    let eye = Array2::<f64>::eye(bs);
    solve(&(&eye - &x), &(&eye + &x))
}

/// `A⁻¹ B` for a small non-singular `A` (partial pivoting).
fn solve(a: &Array2<f64>, b: &Array2<f64>) -> Array2<f64> {
    let n = a.nrows();
    let (mut a, mut b) = (a.clone(), b.clone());
    for c in 0..n {
        let pivot = (c..n)
            .max_by(|&i, &j| a[[i, c]].abs().total_cmp(&a[[j, c]].abs()))
            .expect("rows");
        for m in [&mut a, &mut b] {
            for k in 0..m.ncols() {
                m.swap([c, k], [pivot, k]);
            }
        }
        for i in 0..n {
            if i != c {
                let f = a[[i, c]] / a[[c, c]];
                for k in 0..n {
                    a[[i, k]] -= f * a[[c, k]];
                    b[[i, k]] -= f * b[[c, k]];
                }
            }
        }
    }
    for i in 0..n {
        let d = a[[i, i]];
        b.row_mut(i).mapv_inplace(|v| v / d);
    }
    b
}

/// The rotation blocks `[n, bs, bs]` from `rot_T` (ONNX layout `[pairs, n]`), as the
/// polynomial `(I + X)² (αI + βX²)` (see the module docs).
fn cayley(b: &mut Builder, rot_t: ValueId, cfg: &Config) -> Result<ValueId> {
    let o = cfg.antipasto;
    let bs = o.block_size;
    let pairs = pairs(bs);
    let n = b.shape(rot_t)?[1];
    // K = ½(T − Tᵀ) as rot_T · P, P [pairs, bs²] holding ±½.
    let mut pm = vec![0.0; pairs.len() * bs * bs];
    for (k, &(i, j)) in pairs.iter().enumerate() {
        pm[k * bs * bs + i * bs + j] = 0.5;
        pm[k * bs * bs + j * bs + i] = -0.5;
    }
    let pm = b.floats("skew", &[pairs.len(), bs * bs], &pm);
    let t = b.transpose(rot_t, &[1, 0])?; // [n, pairs]
    let k = b.op_shaped("MatMul", &[t, pm], vec![], vec![n, bs * bs])?;
    let k = b.reshape(k, &[n, bs, bs])?;
    // X = K̃/2 = (a/2)·tanh(K/a).
    let lim = 2.0 * (o.max_angle / 2.0).tan();
    let inv = b.scalar("inv_lim", 1.0 / lim);
    let scaled = b.op_shaped("Mul", &[k, inv], vec![], vec![n, bs, bs])?;
    let th = b.op_shaped("Tanh", &[scaled], vec![], vec![n, bs, bs])?;
    let half = b.scalar("half_lim", lim / 2.0);
    let x = b.op_shaped("Mul", &[th, half], vec![], vec![n, bs, bs])?;
    let x2 = b.op_shaped("MatMul", &[x, x], vec![], vec![n, bs, bs])?;
    // a = Σ_{i<j} x_ij² = ½‖X‖²; b = Pf(X)² (0 for 2 × 2 blocks).
    let sq = b.op_shaped("Mul", &[x, x], vec![], vec![n, bs, bs])?;
    let sum = b.reduce_sum(sq, &[1, 2], true)?; // [n, 1, 1]
    let half_s = b.scalar("half", 0.5);
    let a = b.op("Mul", &[sum, half_s], vec![])?;
    let one = b.scalar("one", 1.0);
    let one_a = b.op("Add", &[one, a], vec![])?;
    let den = if bs == 4 {
        let flat = b.reshape(x, &[n, 16])?;
        let entry = |b: &mut Builder, i: usize| -> Result<ValueId> {
            let idx = b.ints("entry", &[i as i64]);
            b.op_shaped(
                "Gather",
                &[flat, idx],
                vec![int_attr("axis", 1)],
                vec![n, 1],
            )
        };
        // Pf = x01·x23 − x02·x13 + x03·x12.
        let (x01, x23, x02, x13, x03, x12) = (
            entry(b, 1)?,
            entry(b, 11)?,
            entry(b, 2)?,
            entry(b, 7)?,
            entry(b, 3)?,
            entry(b, 6)?,
        );
        let p1 = b.op_shaped("Mul", &[x01, x23], vec![], vec![n, 1])?;
        let p2 = b.op_shaped("Mul", &[x02, x13], vec![], vec![n, 1])?;
        let p3 = b.op_shaped("Mul", &[x03, x12], vec![], vec![n, 1])?;
        let pf = b.op_shaped("Sub", &[p1, p2], vec![], vec![n, 1])?;
        let pf = b.op_shaped("Add", &[pf, p3], vec![], vec![n, 1])?;
        let pf2 = b.op_shaped("Mul", &[pf, pf], vec![], vec![n, 1])?;
        let pf2 = b.reshape(pf2, &[n, 1, 1])?;
        b.op("Add", &[one_a, pf2], vec![])?
    } else {
        one_a
    };
    let alpha = b.op("Div", &[one_a, den], vec![])?;
    let beta = b.op("Div", &[one, den], vec![])?;
    let mut eye = vec![0.0; bs * bs];
    for i in 0..bs {
        eye[i * bs + i] = 1.0;
    }
    let eye = b.floats("eye", &[bs, bs], &eye);
    let ipx = b.op_shaped("Add", &[eye, x], vec![], vec![n, bs, bs])?;
    let ipx2 = b.op_shaped("MatMul", &[ipx, ipx], vec![], vec![n, bs, bs])?;
    let ai = b.op_shaped("Mul", &[alpha, eye], vec![], vec![n, bs, bs])?;
    let bx2 = b.op_shaped("Mul", &[beta, x2], vec![], vec![n, bs, bs])?;
    let inner = b.op_shaped("Add", &[ai, bx2], vec![], vec![n, bs, bs])?;
    b.op_shaped("MatMul", &[ipx2, inner], vec![], vec![n, bs, bs])
}

#[cfg(test)]
mod tests {
    use super::*;

    // The polynomial the graph builds equals the Cayley map by elimination.
    #[test]
    fn the_polynomial_is_the_cayley_map() {
        for bs in [2usize, 4] {
            let mut cfg = Config::default();
            cfg.antipasto.block_size = bs;
            let t = Array1::from_iter((0..pairs(bs).len()).map(|k| 0.9 - 0.7 * k as f64));
            let r = rotation(&t, &cfg);
            let lim = 2.0 * (cfg.antipasto.max_angle / 2.0).tan();
            let mut x = Array2::<f64>::zeros((bs, bs));
            for (k, &(i, j)) in pairs(bs).iter().enumerate() {
                x[[i, j]] = lim * (0.5 * t[k] / lim).tanh() / 2.0;
                x[[j, i]] = -x[[i, j]];
            }
            let a: f64 = x.iter().map(|v| v * v).sum::<f64>() / 2.0;
            let pf = if bs == 4 {
                x[[0, 1]] * x[[2, 3]] - x[[0, 2]] * x[[1, 3]] + x[[0, 3]] * x[[1, 2]]
            } else {
                0.0
            };
            let den = 1.0 + a + pf * pf;
            let eye = Array2::<f64>::eye(bs);
            let ipx = &eye + &x;
            let poly = ipx
                .dot(&ipx)
                .dot(&(&eye * ((1.0 + a) / den) + &x.dot(&x) / den));
            let err = (&poly - &r).iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(err < 1e-12, "bs {bs}: {err:e}");
            // Orthogonal.
            let o = (&r.t().dot(&r) - &eye)
                .iter()
                .fold(0f64, |m, v| m.max(v.abs()));
            assert!(o < 1e-12, "bs {bs}: RᵀR − I = {o:e}");
        }
    }
}
