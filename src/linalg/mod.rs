//! SVDs for PiSSA, on faer: exact (thin) SVD, the certified top triplets without a
//! full SVD ([`top`]), and torch's `svd_lowrank` (Halko et al. Alg. 4.4 + 5.1, `q = r`,
//! no oversampling) with an injectable sketch; QR, eigendecompositions and Nyström.

mod top;

pub use top::{svd_top, Stored, TopSvdPath, TOP_SVD_BLOCK};

use faer::Mat;
use tract_core::ndarray::{Array1, Array2};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// `W ≈ U diag(S) Vᵀ` truncated to `q` singular triplets, largest first:
/// `U [m, q]`, `S [q]`, `V [n, q]`.
#[derive(Debug, Clone)]
pub struct Svd {
    /// Left singular vectors.
    pub u: Array2<f64>,
    /// Singular values, non-increasing.
    pub s: Array1<f64>,
    /// Right singular vectors.
    pub v: Array2<f64>,
}

fn to_faer<T: Copy + Into<f64>>(a: &Array2<T>) -> Mat<f64> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[[i, j]].into())
}

fn from_faer(m: faer::MatRef<'_, f64>) -> Array2<f64> {
    Array2::from_shape_fn((m.nrows(), m.ncols()), |(i, j)| m[(i, j)])
}

fn thin_svd(a: &Mat<f64>) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
    let svd = a
        .thin_svd()
        .map_err(|e| Error::Usage(format!("the SVD did not converge ({e:?})")))?;
    let s: Vec<f64> = (0..svd.S().dim()).map(|i| svd.S()[i]).collect();
    Ok((svd.U().to_owned(), s, svd.V().to_owned()))
}

/// The exact SVD of `w` (in f64), truncated to `q`.
pub fn svd_exact<T: Copy + Into<f64>>(w: &Array2<T>, q: usize) -> Result<Svd> {
    // f64, not f32 as torch would for an f32 weight: W_res then agrees with PEFT's to
    // 1e-6 where an f32 SVD is off by 2e-5. Only the f64 copy, the factors and faer's
    // workspace are alive at once (about 4·m·n·8 bytes, see `Variant::working_set`).
    let (u, s, v) = thin_svd(&to_faer(w))?;
    Ok(Svd {
        u: from_faer(u.as_ref().subcols(0, q)),
        s: Array1::from(s[..q].to_vec()),
        v: from_faer(v.as_ref().subcols(0, q)),
    })
}

fn thin_q(a: &Mat<f64>) -> Mat<f64> {
    a.qr().compute_thin_Q()
}

/// `svd` with each left singular vector signed so that its entry of largest magnitude
/// is positive (and the right one with it).
fn signed(mut svd: Svd) -> Svd {
    for k in 0..svd.s.len() {
        if largest_entry(svd.u.column(k)) < 0.0 {
            svd.u.column_mut(k).mapv_inplace(|v| -v);
            svd.v.column_mut(k).mapv_inplace(|v| -v);
        }
    }
    svd
}

/// The large matrix of a randomized SVD in its own precision (float32 weights stay
/// float32, as torch keeps them: half the memory traffic of each product), multiplied by
/// thin f64 matrices; `transposed` reads it as its transpose.
enum Large {
    F32(Mat<f32>),
    F64(Mat<f64>),
}

impl Large {
    fn of<T: Copy + Into<f64> + 'static>(w: &Array2<T>) -> Large {
        match (w as &dyn std::any::Any).downcast_ref::<Array2<f32>>() {
            Some(w) => Large::F32(Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[[i, j]])),
            None => Large::F64(to_faer(w)),
        }
    }

    /// `A·x`, or `Aᵀ·x` when `transposed`.
    fn times(&self, x: &Mat<f64>, transposed: bool) -> Mat<f64> {
        match self {
            Large::F64(a) if transposed => a.transpose() * x,
            Large::F64(a) => a * x,
            Large::F32(a) => {
                let x = Mat::<f32>::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)] as f32);
                let y = if transposed {
                    a.transpose() * &x
                } else {
                    a * &x
                };
                Mat::from_fn(y.nrows(), y.ncols(), |i, j| y[(i, j)] as f64)
            }
        }
    }
}

/// torch's `svd_lowrank(w, q, niter)` with sketch `omega [min(m, n), q]` (Gaussian from
/// `rng` when `None`): the products with `w` in its own precision (float32 for float32
/// weights, as torch), the thin QR and SVD steps in f64.
pub fn svd_lowrank<T: Copy + Into<f64> + 'static>(
    w: &Array2<T>,
    q: usize,
    niter: usize,
    omega: Option<&Array2<f64>>,
    rng: &mut Rng,
) -> Result<Svd> {
    let (m, n) = w.dim();
    // torch works on the tall orientation A ([p, k], p ≥ k): A = W, or Wᵀ for a wide W.
    let tall = m >= n;
    let large = Large::of(w);
    let a = |x: &Mat<f64>| large.times(x, !tall); // A·x
    let at = |x: &Mat<f64>| large.times(x, tall); // Aᵀ·x
    let k = m.min(n);
    let omega = match omega {
        Some(o) => to_faer(o),
        None => Mat::from_fn(k, q, |_, _| rng.normal()),
    };
    let mut qm = thin_q(&a(&omega));
    for _ in 0..niter {
        qm = thin_q(&at(&qm));
        qm = thin_q(&a(&qm));
    }
    let bk = at(&qm).transpose().to_owned(); // QᵀA [q, k]
    let (ub, s, vb) = thin_svd(&bk)?;
    let u = &qm * &ub; // [p, q]
    let (u, v) = if tall { (u, vb) } else { (vb, u) };
    Ok(Svd {
        u: from_faer(u.as_ref()),
        s: Array1::from(s),
        v: from_faer(v.as_ref()),
    })
}

/// The leading `r` columns of Q and rows of R of the Householder QR of `w` (`[m, n]`,
/// `r ≤ min(m, n)`), in f64, with LAPACK's signs (`geqrf` + `orgqr`, as numpy and
/// torch on CPU): `R[j, j] = −sign(w_jj)·‖column‖` after the earlier reflections.
/// `Q_r R_r` reproduces the first `r` columns of `w` exactly (OLoRA's init).
///
/// Only the first `r` columns are reduced (the later reflections leave `Q_r` alone):
/// `Q_r` from their `r` reflections, then `R_r = Q_rᵀ W` as one matrix product.
pub fn qr_leading<T: Copy + Into<f64>>(w: &Array2<T>, r: usize) -> (Array2<f64>, Array2<f64>) {
    let (m, n) = w.dim();
    assert!(r <= m.min(n), "r = {r} is more than min({m}, {n})");
    let mut lead = Array2::from_shape_fn((m, r), |(i, j)| w[[i, j]].into());
    let mut reflections: Vec<(Vec<f64>, f64)> = Vec::with_capacity(r);
    for j in 0..r {
        let alpha = lead[[j, j]];
        let tail: f64 = (j + 1..m)
            .map(|i| lead[[i, j]] * lead[[i, j]])
            .sum::<f64>()
            .sqrt();
        if tail == 0.0 {
            reflections.push((vec![1.0], 0.0)); // H = I (LAPACK's tau = 0)
            continue;
        }
        let beta = -alpha.hypot(tail).copysign(alpha);
        let tau = (beta - alpha) / beta;
        let mut v: Vec<f64> = (j..m).map(|i| lead[[i, j]] / (alpha - beta)).collect();
        v[0] = 1.0;
        apply_reflection(&mut lead, j, &v, tau, j..r);
        reflections.push((v, tau));
    }
    // Q_r = H_0 ⋯ H_{r−1} I[:, :r], applied right to left.
    let mut q = Array2::<f64>::zeros((m, r));
    for j in 0..r {
        q[[j, j]] = 1.0;
    }
    for (j, (v, tau)) in reflections.iter().enumerate().rev() {
        apply_reflection(&mut q, j, v, *tau, 0..r);
    }
    // R_r = Q_rᵀ W on faer's f64 kernel, W converted a panel of columns at a time (no
    // f64 copy of the whole weight).
    let qt = to_faer(&q.t().to_owned());
    let mut r_rows = Array2::<f64>::zeros((r, n));
    const PANEL: usize = 256;
    for c0 in (0..n).step_by(PANEL) {
        let c1 = (c0 + PANEL).min(n);
        let panel = Mat::from_fn(m, c1 - c0, |i, j| w[[i, c0 + j]].into());
        let mut out = Mat::<f64>::zeros(r, c1 - c0);
        faer::linalg::matmul::matmul(
            out.as_mut(),
            faer::Accum::Replace,
            qt.as_ref(),
            panel.as_ref(),
            1.0,
            faer::Par::Seq,
        );
        for i in 0..r {
            for j in 0..c1 - c0 {
                r_rows[[i, c0 + j]] = out[(i, j)];
            }
        }
    }
    for i in 0..r {
        for j in 0..i {
            r_rows[[i, j]] = 0.0; // exactly upper-trapezoidal, as LAPACK's R
        }
    }
    (q, r_rows)
}

/// `A[j.., cols] −= τ v (vᵀ A[j.., cols])`, row by row (row-major).
fn apply_reflection(
    a: &mut Array2<f64>,
    j: usize,
    v: &[f64],
    tau: f64,
    cols: std::ops::Range<usize>,
) {
    if tau == 0.0 {
        return;
    }
    let mut dots = vec![0.0; cols.len()];
    for (k, &vk) in v.iter().enumerate() {
        let row = a.row(j + k);
        for (d, c) in dots.iter_mut().zip(cols.clone()) {
            *d += vk * row[c];
        }
    }
    for (k, &vk) in v.iter().enumerate() {
        let mut row = a.row_mut(j + k);
        for (d, c) in dots.iter().zip(cols.clone()) {
            row[c] -= tau * vk * d;
        }
    }
}

/// The entry of largest magnitude of `v` (its sign decides a vector's orientation).
fn largest_entry(v: tract_core::ndarray::ArrayView1<f64>) -> f64 {
    v.iter()
        .copied()
        .fold(0.0, |best, x| if x.abs() > best.abs() { x } else { best })
}

/// The `q` largest eigenpairs of the symmetric `a` (`[n, n]`), largest first: values
/// `[q]` and unit eigenvectors as the columns of `[n, q]`, each signed so that its
/// entry of largest magnitude is positive (sklearn's `svd_flip`), for a deterministic
/// result.
pub fn sym_eigen_top(a: &Array2<f64>, q: usize) -> Result<(Array1<f64>, Array2<f64>)> {
    let n = a.nrows();
    let m = to_faer(a);
    let evd = m
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::Usage(format!("the eigendecomposition did not converge ({e:?})")))?;
    let (u, s) = (evd.U(), evd.S());
    // faer sorts the eigenvalues in nondecreasing order.
    let q = q.min(n);
    let values = Array1::from_shape_fn(q, |k| s[n - 1 - k]);
    let mut vectors = Array2::from_shape_fn((n, q), |(i, k)| u[(i, n - 1 - k)]);
    for mut col in vectors.columns_mut() {
        if largest_entry(col.view()) < 0.0 {
            col.mapv_inplace(|v| -v);
        }
    }
    Ok((values, vectors))
}

/// [`svd_exact`] with each left singular vector signed so that its entry of largest
/// magnitude is positive (and the right one with it).
pub fn svd_flipped<T: Copy + Into<f64>>(w: &Array2<T>, q: usize) -> Result<Svd> {
    Ok(signed(svd_exact(w, q)?))
}

/// `k` orthonormal columns `[d, k]` spanning a Gaussian random subspace.
pub fn orthonormal_gaussian(d: usize, k: usize, rng: &mut Rng) -> Array2<f64> {
    let g = Mat::from_fn(d, k, |_, _| rng.normal());
    from_faer(thin_q(&g).as_ref())
}

/// The `q` largest eigenpairs of a symmetric positive semi-definite `A` `[d, d]` from
/// its sketch `y = A·omega` (`omega` `[d, k]` orthonormal), by the stable Nyström
/// approximation `A ≈ Y (ΩᵀY)⁺ Yᵀ` (Tropp et al. 2017, with a small shift): exact when
/// `A` has rank at most `k`. Signed as [`sym_eigen_top`].
pub fn nystrom_top(
    y: &Array2<f64>,
    omega: &Array2<f64>,
    q: usize,
) -> Result<(Array1<f64>, Array2<f64>)> {
    let (d, k) = y.dim();
    let norm = y.iter().map(|v| v * v).sum::<f64>().sqrt();
    let nu = (d as f64).sqrt() * f64::EPSILON * norm;
    let y_nu = y + &(omega * nu);
    let b = omega.t().dot(&y_nu);
    let b = (&b + &b.t()) / 2.0;
    // B^{-1/2} on its positive eigenspace.
    let (vals, vecs) = sym_eigen_top(&b, k)?;
    let keep: Vec<usize> = (0..k).filter(|&i| vals[i] > vals[0] * 1e-12).collect();
    let inv_sqrt = Array2::from_shape_fn((k, keep.len()), |(i, j)| {
        vecs[[i, keep[j]]] / vals[keep[j]].sqrt()
    });
    let f = y_nu.dot(&inv_sqrt); // [d, k'], A_ν ≈ F Fᵀ
    let svd = svd_exact(&f, q.min(keep.len()))?;
    let values = svd.s.mapv(|s| (s * s - nu).max(0.0));
    let mut vectors = svd.u;
    for mut col in vectors.columns_mut() {
        if largest_entry(col.view()) < 0.0 {
            col.mapv_inplace(|v| -v);
        }
    }
    Ok((values, vectors))
}
