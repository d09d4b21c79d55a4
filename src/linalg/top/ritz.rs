//! [`top_eigen`]: the largest eigenpairs of a Rayleigh–Ritz matrix, without its whole
//! eigendecomposition, and in `O(n²)` when the matrix is banded.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::{evd, householder};
use faer::{Mat, MatRef, Par};

use crate::rng::Rng;

/// The largest eigenpairs of a symmetric matrix ([`top_eigen`]): the eigenvectors are
/// kept as those of its tridiagonal form, turned back on demand, in whole
/// ([`TopEigen::vectors`]) or only their last rows ([`TopEigen::last_rows`], which is
/// all a Lanczos residual needs).
pub(super) struct TopEigen {
    /// The `k + 1` largest eigenvalues, descending.
    pub values: Vec<f64>,
    /// Unit eigenvectors of the tridiagonal form for the largest `k`.
    tridiagonal: Mat<f64>,
    /// The similarity from the matrix to its tridiagonal form.
    back: Reduction,
}

/// How a symmetric matrix was made tridiagonal.
enum Reduction {
    /// Dense: faer's Householder reflections (the reduced matrix holds their
    /// essential parts below its subdiagonal).
    Reflections {
        reduced: Mat<f64>,
        factors: Mat<f64>,
    },
    /// Banded: plane rotations, in the order applied (`T ← G T Gᵀ` each).
    Rotations(Vec<Rotation>),
}

/// `G` on coordinates `p`, `p + 1`: `(x_p, x_{p+1}) ← (c·x_p + s·x_{p+1}, c·x_{p+1} − s·x_p)`.
#[derive(Clone, Copy)]
struct Rotation {
    p: usize,
    c: f64,
    s: f64,
}

impl Rotation {
    /// `G x` on `x`'s rows `p`, `p + 1` (for each column of `x`).
    fn apply(self, x: &mut Mat<f64>) {
        for j in 0..x.ncols() {
            let (a, b) = (x[(self.p, j)], x[(self.p + 1, j)]);
            x[(self.p, j)] = self.c * a + self.s * b;
            x[(self.p + 1, j)] = self.c * b - self.s * a;
        }
    }

    /// `Gᵀ x` on `x`'s rows `p`, `p + 1`.
    fn apply_transposed(self, x: &mut Mat<f64>) {
        Rotation { s: -self.s, ..self }.apply(x)
    }
}

/// The `k + 1` largest eigenvalues of the symmetric `t` (its lower triangle) in
/// descending order, and unit eigenvectors of the largest `k`; `band`: `t`'s entries
/// more than this many below the diagonal are taken as zero.
///
/// `t` made tridiagonal (faer's Householder reduction, `4/3·n³` flops; or, banded,
/// plane rotations chasing each bulge down the band, `O(n²·band)`), then the
/// top `k + 1` eigenvalues of the tridiagonal matrix (bisection, `O(n·k)` a bit of precision), then the `k` vectors by
/// inverse iteration on it (`O(n)` a solve). A whole decomposition would also find
/// every tridiagonal vector and turn all `n` back (`2n³`). The caller certifies the
/// pairs (their residuals on the original operator), so a vector inverse iteration
/// got wrong, or a band's dropped round-off, costs a step, not an answer.
pub(super) fn top_eigen(t: MatRef<'_, f64>, band: Option<usize>, k: usize) -> TopEigen {
    let n = t.nrows();
    assert!(k < n && t.ncols() == n);
    let (diag, sub, back) = match band {
        Some(band) => band_to_tridiagonal(t, band),
        None => householder_to_tridiagonal(t),
    };
    let values = top_tridiagonal_values(&diag, &sub, k + 1);
    let tridiagonal = inverse_iteration(&diag, &sub, &values[..k]);
    TopEigen {
        values,
        tridiagonal,
        back,
    }
}

impl TopEigen {
    /// The unit eigenvectors `[n, k]`.
    pub fn vectors(&self) -> Mat<f64> {
        let mut vectors = self.tridiagonal.clone();
        let n = vectors.nrows();
        match &self.back {
            Reduction::Reflections { reduced, factors } => {
                let mut mem = MemBuffer::new(
                    householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(
                        n - 1,
                        factors.nrows(),
                        vectors.ncols(),
                    ),
                );
                householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
                    reduced.as_ref().submatrix(1, 0, n - 1, n - 1),
                    factors.as_ref(),
                    faer::Conj::No,
                    vectors.as_mut().subrows_mut(1, n - 1),
                    Par::Seq,
                    MemStack::new(&mut mem),
                );
            }
            // T = Qᵀ·tri·Q… with Qᵀ = G_m⋯G_1: a vector of T is G_1ᵀ⋯G_mᵀ s.
            Reduction::Rotations(rotations) => {
                for g in rotations.iter().rev() {
                    g.apply_transposed(&mut vectors);
                }
            }
        }
        vectors
    }

    /// The eigenvectors' last `rows` rows `[rows, k]`: for rotations, `(G_m⋯G_1 e_i)ᵀ s`
    /// for those unit vectors `e_i`, `O(rotations)`, not `O(rotations·k)`.
    pub fn last_rows(&self, rows: usize) -> Mat<f64> {
        let n = self.tridiagonal.nrows();
        match &self.back {
            Reduction::Reflections { .. } => self.vectors().subrows(n - rows, rows).to_owned(),
            Reduction::Rotations(rotations) => {
                let mut units = Mat::<f64>::from_fn(n, rows, |i, j| f64::from(i == n - rows + j));
                for g in rotations {
                    g.apply(&mut units);
                }
                units.transpose() * &self.tridiagonal
            }
        }
    }
}

/// The tridiagonal form of the symmetric `t` (its lower triangle) by faer's Householder
/// reduction: its diagonal, subdiagonal and reflections.
fn householder_to_tridiagonal(t: MatRef<'_, f64>) -> (Vec<f64>, Vec<f64>, Reduction) {
    let n = t.nrows();
    let block = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<f64>(n, n);
    let mut mem = MemBuffer::new(evd::tridiag::tridiag_in_place_scratch::<f64>(
        n,
        Par::Seq,
        Default::default(),
    ));
    let mut reduced = Mat::<f64>::zeros(n, n);
    reduced.copy_from_triangular_lower(t);
    let mut factors = Mat::<f64>::zeros(block, n - 1);
    evd::tridiag::tridiag_in_place(
        reduced.as_mut(),
        factors.as_mut(),
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    );
    let diag = (0..n).map(|i| reduced[(i, i)]).collect();
    let sub = (0..n - 1).map(|i| reduced[(i + 1, i)]).collect();
    (diag, sub, Reduction::Reflections { reduced, factors })
}

/// The tridiagonal form of the symmetric `t` (its lower triangle), its entries more
/// than `band` below the diagonal taken as zero, by plane rotations (Rutishauser's
/// band reduction): column by column, each entry below the subdiagonal, outermost
/// first, is zeroed by a rotation of the two rows above it, and the bulge that
/// rotation makes `band + 1` below the diagonal, further down, is chased off the end
/// `band` rows at a time. The band and its bulge are kept as [`LowerBand`] (in L1 for
/// any Rayleigh–Ritz matrix here), and every rotation touches `O(band)` entries, so the
/// whole costs `O(n²·band)` flops.
fn band_to_tridiagonal(t: MatRef<'_, f64>, band: usize) -> (Vec<f64>, Vec<f64>, Reduction) {
    let n = t.nrows();
    let mut a = LowerBand::new(n, band + 1);
    for i in 0..n {
        for j in i.saturating_sub(band)..=i {
            *a.at(i, j) = t[(i, j)];
        }
    }
    let mut rotations = Vec::new();
    for col in 0..n.saturating_sub(2) {
        for r in (col + 2..=(col + band).min(n - 1)).rev() {
            rotations.extend(a.zero(r, col));
            // The rotation of rows r − 1, r brought row r's last entry, at r + band, into
            // row r − 1: a bulge at (r + band, r − 1), chased down.
            let mut bulge = (r + band, r - 1);
            while bulge.0 < n {
                rotations.extend(a.zero(bulge.0, bulge.1));
                bulge = (bulge.0 + band, bulge.0 - 1);
            }
        }
    }
    let diag = (0..n).map(|i| *a.at(i, i)).collect();
    let sub = (1..n).map(|i| *a.at(i, i - 1)).collect();
    (diag, sub, Reduction::Rotations(rotations))
}

/// A symmetric matrix's entries at most `width` below the diagonal, row by row.
struct LowerBand {
    width: usize,
    /// Row `i`'s entries from column `i − width` to `i` (those before column 0 unused).
    rows: Vec<f64>,
}

impl LowerBand {
    fn new(n: usize, width: usize) -> Self {
        LowerBand {
            width,
            rows: vec![0.0; n * (width + 1)],
        }
    }

    /// Entry `(i, j)`, `j ≤ i ≤ j + width`.
    fn at(&mut self, i: usize, j: usize) -> &mut f64 {
        debug_assert!(j <= i && i - j <= self.width);
        &mut self.rows[i * (self.width + 1) + self.width + j - i]
    }

    /// Zeroes entry `(r, col)` with `(r − 1, col)` by the similarity `G·A·Gᵀ` of the
    /// rotation of coordinates `r − 1`, `r`; that rotation, if one was needed. Every
    /// entry it can reach is in the band: (the caller's invariant) rows `r − 1`, `r`
    /// hold nothing left of `col`, and nothing lies more than `width` below the diagonal
    /// but `(r, col)`.
    fn zero(&mut self, r: usize, col: usize) -> Option<Rotation> {
        let (x, y) = (*self.at(r - 1, col), *self.at(r, col));
        if y == 0.0 {
            return None;
        }
        let h = x.hypot(y);
        let g = Rotation {
            p: r - 1,
            c: x / h,
            s: y / h,
        };
        let p = r - 1;
        let n = self.rows.len() / (self.width + 1);
        let turn = |u: f64, v: f64| (g.c * u + g.s * v, g.c * v - g.s * u);
        // Rows p, p + 1 left of the diagonal block.
        for j in col..p {
            let (u, v) = turn(*self.at(p, j), *self.at(p + 1, j));
            *self.at(p, j) = u;
            *self.at(p + 1, j) = v;
        }
        // Columns p, p + 1 below it (row p + 1 + width's entry in column p is the
        // new bulge, when there is such a row).
        for i in p + 2..(p + 2 + self.width).min(n) {
            let above = if i - p <= self.width {
                *self.at(i, p)
            } else {
                0.0
            };
            let (u, v) = turn(above, *self.at(i, p + 1));
            if i - p <= self.width {
                *self.at(i, p) = u;
            } else {
                debug_assert!(u.abs() <= 0.0, "a bulge outside the band");
            }
            *self.at(i, p + 1) = v;
        }
        // The diagonal block [[a, b], [b, d]] ← G·[[a, b], [b, d]]·Gᵀ.
        let (a, b, d) = (*self.at(p, p), *self.at(p + 1, p), *self.at(p + 1, p + 1));
        let (ga, gb) = turn(a, b); // G's first row times the block's columns
        let (gb2, gd) = turn(b, d);
        // (G·S) = [[ga, gb2], [gb, gd]]; then ·Gᵀ on its rows.
        let (new_a, _) = turn(ga, gb2);
        let (new_b, new_d) = turn(gb, gd);
        *self.at(p, p) = new_a;
        *self.at(p + 1, p) = new_b;
        *self.at(p + 1, p + 1) = new_d;
        *self.at(r, col) = 0.0;
        Some(g)
    }
}

/// The `count` largest eigenvalues of the symmetric tridiagonal matrix (`diag`,
/// `sub`), descending, by bisection on Sturm counts (as LAPACK's `dstebz`; each
/// value to round-off of the matrix's norm), all `count` in lockstep, so that one
/// sweep down the matrix runs `count` independent division chains, not one.
fn top_tridiagonal_values(diag: &[f64], sub: &[f64], count: usize) -> Vec<f64> {
    let n = diag.len();
    let sub2: Vec<f64> = sub.iter().map(|e| e * e).collect();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for (i, &d) in diag.iter().enumerate() {
        let left = if i > 0 { sub[i - 1].abs() } else { 0.0 };
        let right = sub.get(i).map_or(0.0, |e| e.abs());
        lo = lo.min(d - left - right);
        hi = hi.max(d + left + right);
    }
    let norm = lo.abs().max(hi.abs());
    // Gershgorin's interval, widened past round-off.
    let slack = 4.0 * f64::EPSILON * norm * n as f64 + f64::MIN_POSITIVE;
    let (lo, hi) = (lo - slack, hi + slack);
    // A pivot closer to zero than this is moved to it (LAPACK's pivmin).
    let pivot_min = f64::MIN_POSITIVE * sub2.iter().fold(1.0f64, |m, &e| m.max(e));
    // Value j (the j-th largest) has n − 1 − j values below it.
    let mut below = vec![lo; count];
    let mut above = vec![hi; count];
    let mut mid = vec![0.0; count];
    let mut pivots = vec![0.0; count];
    let mut negatives = vec![0usize; count];
    for _ in 0..200 {
        let converged = below
            .iter()
            .zip(&above)
            .all(|(&b, &a)| a - b <= f64::EPSILON * (2.0 * b.abs().max(a.abs()) + norm));
        if converged {
            break;
        }
        for j in 0..count {
            mid[j] = 0.5 * (below[j] + above[j]);
            pivots[j] = 1.0;
            negatives[j] = 0;
        }
        // Sturm: the number of negative pivots of T − xI is the number of values below x.
        for i in 0..n {
            let (d, e2) = (diag[i], if i > 0 { sub2[i - 1] } else { 0.0 });
            for j in 0..count {
                let mut pivot = (d - mid[j]) - e2 / pivots[j];
                if pivot.abs() < pivot_min {
                    pivot = -pivot_min;
                }
                negatives[j] += usize::from(pivot < 0.0);
                pivots[j] = pivot;
            }
        }
        for j in 0..count {
            if negatives[j] > n - 1 - j {
                above[j] = mid[j];
            } else {
                below[j] = mid[j];
            }
        }
    }
    (0..count).map(|j| 0.5 * (below[j] + above[j])).collect()
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
    use faer::Col;

    /// The top pairs against faer's whole decomposition, on a random Gram matrix and on
    /// one with a cluster of close values at the top (where Gram–Schmidt keeps the
    /// vectors apart), and on the bands 1–3 wide of the random one, reduced by rotations:
    /// values to 1e-13 of the largest, residuals to 1e-12, vectors orthonormal to 1e-12
    /// (round-off of an n = 200 reduction is ~1e-14), and the last rows the vectors'.
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
        // Read as banded: the pairs are those of the band alone.
        let cases = [
            (random.clone(), None),
            (clustered, None),
            (random.clone(), Some(1)),
            (random.clone(), Some(2)),
            (random, Some(3)),
        ];
        for (t, band) in cases {
            let k = 16;
            let eigen = top_eigen(t.as_ref(), band, k);
            let t = match band {
                Some(band) => banded_copy(&t, band),
                None => t,
            };
            let vectors = eigen.vectors();
            let whole = t.self_adjoint_eigen(faer::Side::Lower).unwrap();
            let largest = eigen.values[0];
            for (j, value) in eigen.values.iter().enumerate() {
                let d = (value - whole.S()[n - 1 - j]).abs();
                assert!(d <= 1e-13 * largest, "{band:?}: value {j}: {d:e}");
            }
            for (j, value) in eigen.values[..k].iter().enumerate() {
                let r = &t * vectors.col(j) - vectors.col(j) * *value;
                assert!(
                    r.norm_l2() <= 1e-12 * largest,
                    "{band:?}: residual {j}: {:e}",
                    r.norm_l2()
                );
            }
            let gram = vectors.transpose() * &vectors;
            let off = (&gram - Mat::<f64>::identity(k, k)).norm_max();
            assert!(off <= 1e-12, "{band:?}: orthonormal: {off:e}");
            let last = eigen.last_rows(3);
            let d = (&last - vectors.subrows(n - 3, 3)).norm_max();
            assert!(d <= 1e-14, "{band:?}: last rows off by {d:e}");
        }
    }

    /// `t` without its entries more than `band` off the diagonal.
    fn banded_copy(t: &Mat<f64>, band: usize) -> Mat<f64> {
        Mat::from_fn(t.nrows(), t.ncols(), |i, j| {
            if i.abs_diff(j) <= band {
                t[(i, j)]
            } else {
                0.0
            }
        })
    }
}
