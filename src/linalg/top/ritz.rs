//! [`top_eigen`]: the largest eigenpairs of a Rayleigh–Ritz matrix, at about half the
//! cost of its whole eigendecomposition.

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::{evd, householder};
use faer::{Col, Mat, MatRef, Par};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// The `k + 1` largest eigenvalues of the symmetric `t` (its lower triangle) in
/// descending order, and unit eigenvectors of the largest `k`.
///
/// faer's tridiagonalization, then the tridiagonal matrix's eigenvalues alone (QR,
/// `O(n²)`), then the `k` vectors by inverse iteration on it (`O(n)` a solve), turned
/// back by the Householder reflections: the tridiagonalization is all of the `O(n³)`
/// work, where a whole decomposition also finds every tridiagonal vector and turns all
/// `n` back (`2n³`). The caller certifies the pairs (their residuals on the original
/// operator), so a vector inverse iteration got wrong costs a step, not an answer.
pub(super) fn top_eigen(t: MatRef<'_, f64>, k: usize) -> Result<(Vec<f64>, Mat<f64>)> {
    let n = t.nrows();
    assert!(k < n && t.ncols() == n);
    let par = Par::Seq;
    let block = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<f64>(n, n);
    let mut mem = MemBuffer::new(StackReq::any_of(&[
        evd::tridiag::tridiag_in_place_scratch::<f64>(n, par, Default::default()),
        evd::self_adjoint_evd_scratch::<f64>(
            n,
            evd::ComputeEigenvectors::No,
            par,
            Default::default(),
        ),
        householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(
            n - 1,
            block,
            k,
        ),
    ]));
    let stack = MemStack::new(&mut mem);
    let mut trid = Mat::<f64>::zeros(n, n);
    trid.copy_from_triangular_lower(t);
    let mut reflections = Mat::<f64>::zeros(block, n - 1);
    evd::tridiag::tridiag_in_place(
        trid.as_mut(),
        reflections.as_mut(),
        par,
        stack,
        Default::default(),
    );
    let diag: Vec<f64> = (0..n).map(|i| trid[(i, i)]).collect();
    let sub: Vec<f64> = (0..n - 1).map(|i| trid[(i + 1, i)]).collect();
    let mut values = Col::<f64>::zeros(n);
    let sub_padded = Col::<f64>::from_fn(n, |i| sub.get(i).copied().unwrap_or(0.0));
    evd::tridiagonal_self_adjoint_evd(
        Col::from_fn(n, |i| diag[i]).as_diagonal(),
        sub_padded.as_diagonal(),
        values.as_diagonal_mut(),
        None,
        par,
        stack,
        Default::default(),
    )
    .map_err(|e| Error::Usage(format!("the eigendecomposition did not converge ({e:?})")))?;
    // Ascending: the largest are the last.
    let top: Vec<f64> = (0..=k).map(|j| values[n - 1 - j]).collect();
    let mut vectors = inverse_iteration(&diag, &sub, &top[..k]);
    householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
        trid.as_ref().submatrix(1, 0, n - 1, n - 1),
        reflections.as_ref(),
        faer::Conj::No,
        vectors.as_mut().subrows_mut(1, n - 1),
        par,
        stack,
    );
    Ok((top, vectors))
}

/// Unit eigenvectors of the symmetric tridiagonal matrix (`diag`, `sub`) for its
/// eigenvalues `values` (as LAPACK's `dstein`): each from a random start, three solves
/// with `T − λI` (factored with partial pivoting, a zero pivot nudged), each followed by
/// Gram–Schmidt against the vectors already found for values within `1e-3·‖T‖` (inverse
/// iteration alone would return one vector of a close cluster many times).
fn inverse_iteration(diag: &[f64], sub: &[f64], values: &[f64]) -> Mat<f64> {
    let n = diag.len();
    let scale = diag
        .iter()
        .chain(sub)
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    let mut rng = Rng::new(0x1A7E_5EED);
    let mut vectors = Mat::<f64>::zeros(n, values.len());
    for (j, &value) in values.iter().enumerate() {
        let lu = ShiftedLu::new(diag, sub, value, scale);
        let mut x: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let close: Vec<usize> = (0..j)
            .filter(|&i| (values[i] - value).abs() <= 1e-3 * scale)
            .collect();
        for _ in 0..3 {
            lu.solve(&mut x);
            for &i in &close {
                let dot: f64 = (0..n).map(|r| vectors[(r, i)] * x[r]).sum();
                for (r, x) in x.iter_mut().enumerate() {
                    *x -= dot * vectors[(r, i)];
                }
            }
            let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
            x.iter_mut().for_each(|v| *v /= norm);
        }
        for (r, &v) in x.iter().enumerate() {
            vectors[(r, j)] = v;
        }
    }
    vectors
}

/// `T − λI` = `P L U` for a tridiagonal `T` (LAPACK's `dgttrf`): `U` has two
/// superdiagonals once rows are swapped.
struct ShiftedLu {
    /// `L`'s multipliers.
    lower: Vec<f64>,
    /// `U`'s diagonal and its two superdiagonals.
    diag: Vec<f64>,
    upper: Vec<f64>,
    upper2: Vec<f64>,
    /// Rows `i` and `i + 1` swapped at step `i`.
    swapped: Vec<bool>,
}

impl ShiftedLu {
    fn new(diag: &[f64], sub: &[f64], shift: f64, scale: f64) -> ShiftedLu {
        let n = diag.len();
        let tiny = f64::EPSILON * scale;
        let mut lower = sub.to_vec();
        let mut d: Vec<f64> = diag.iter().map(|v| v - shift).collect();
        let mut upper = sub.to_vec();
        let mut upper2 = vec![0.0; n.saturating_sub(2)];
        let mut swapped = vec![false; n.saturating_sub(1)];
        for i in 0..n.saturating_sub(1) {
            if d[i].abs() >= lower[i].abs() {
                if d[i] == 0.0 {
                    d[i] = tiny;
                }
                let factor = lower[i] / d[i];
                lower[i] = factor;
                d[i + 1] -= factor * upper[i];
            } else {
                let factor = d[i] / lower[i];
                d[i] = lower[i];
                lower[i] = factor;
                let above = upper[i];
                upper[i] = d[i + 1];
                d[i + 1] = above - factor * d[i + 1];
                if i + 2 < n {
                    upper2[i] = upper[i + 1];
                    upper[i + 1] *= -factor;
                }
                swapped[i] = true;
            }
        }
        if let Some(last) = d.last_mut() {
            if *last == 0.0 {
                *last = tiny;
            }
        }
        ShiftedLu {
            lower,
            diag: d,
            upper,
            upper2,
            swapped,
        }
    }

    /// `x ← (T − λI)⁻¹ x`.
    fn solve(&self, x: &mut [f64]) {
        let n = x.len();
        for i in 0..n.saturating_sub(1) {
            if self.swapped[i] {
                x.swap(i, i + 1);
            }
            x[i + 1] -= self.lower[i] * x[i];
        }
        for i in (0..n).rev() {
            let mut v = x[i];
            if i + 1 < n {
                v -= self.upper[i] * x[i + 1];
            }
            if i + 2 < n {
                v -= self.upper2[i] * x[i + 2];
            }
            x[i] = v / self.diag[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The top pairs against faer's whole decomposition, on a random Gram matrix and on
    /// one with a cluster of close values at the top (where Gram–Schmidt keeps the
    /// vectors apart): values to 1e-13 of the largest, residuals to 1e-12, vectors
    /// orthonormal to 1e-12 (round-off of an n = 200 tridiagonalization is ~1e-14).
    #[test]
    fn top_eigen_matches_the_whole_decomposition() {
        let mut rng = Rng::new(3);
        let n = 200;
        let g = Mat::from_fn(n, n, |_, _| rng.normal());
        let random = &g * g.transpose();
        let q = g.qr().compute_Q();
        let spectrum = Col::from_fn(n, |i| match i {
            0..4 => 10.0 + 1e-6 * i as f64,
            _ => 1.0 / (1 + i) as f64,
        });
        let clustered = &q * spectrum.as_diagonal() * q.transpose();
        for t in [random, clustered] {
            let k = 16;
            let (values, vectors) = top_eigen(t.as_ref(), k).unwrap();
            let whole = t.self_adjoint_eigen(faer::Side::Lower).unwrap();
            let largest = values[0];
            for (j, value) in values.iter().enumerate() {
                let d = (value - whole.S()[n - 1 - j]).abs();
                assert!(d <= 1e-13 * largest, "value {j}: {d:e}");
            }
            for (j, value) in values[..k].iter().enumerate() {
                let r = &t * vectors.col(j) - vectors.col(j) * *value;
                assert!(
                    r.norm_l2() <= 1e-12 * largest,
                    "residual {j}: {:e}",
                    r.norm_l2()
                );
            }
            let gram = vectors.transpose() * &vectors;
            let off = (&gram - Mat::<f64>::identity(k, k)).norm_max();
            assert!(off <= 1e-12, "orthonormal: {off:e}");
        }
    }
}
