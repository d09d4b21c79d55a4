//! The `q` largest singular triplets to f64 precision without a full SVD: block
//! Lanczos on `AᵀA` with a residual certificate ([`svd_top`]), each step one vectorized
//! pass over the weight (as stored, or transposed once when that is wide) in its own
//! precision ([`block_pass`]).

use faer::Mat;
use tract_core::ndarray::{Array1, Array2, ArrayView2};

mod lanes;
mod pass;
mod ritz;
mod rows;

pub use pass::Stored;
use pass::{block_pass, block_project, BlockOp};
use rows::PassRows;

use super::{from_faer, signed, svd_exact, thin_q, Svd};
use crate::error::Result;
use crate::rng::Rng;

/// How [`svd_top`] found the triplets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopSvdPath {
    /// Certified from a Krylov basis of this many blocks.
    Iterated(usize),
    /// The full SVD after this many Krylov blocks: a matrix too small to gain from
    /// them (none), a gap in the top `q` or at its boundary too small to certify, or a
    /// basis that grew to half the matrix's smaller side without a certificate.
    Full(usize),
}

/// Columns [`svd_top`] adds to its Krylov basis a step. At least two, the fewest that
/// show a repeated singular value as a repeated Ritz value (one vector's Krylov space
/// holds one direction of each eigenspace, so a single-vector Lanczos would certify a
/// top `q` that misses a repeat). A wider block needs more columns in all on a flat
/// spectrum (a Gaussian 2048² weight's top 16: 282 columns with 2, 321 with 3, 360
/// with 4; `benches/krylov_columns.py`), but streams the weight fewer times for them:
/// a pass costs 2·block f64 multiply-adds an element, and with two it leaves a fifth of
/// the core's multiply-add rate idle, and the memory stream too when both cores run
/// passes. Three fills both (the exact PiSSA graft of a flat 24 × 2048 model: 0.92×
/// two's time); four only adds columns.
pub const TOP_SVD_BLOCK: usize = 3;

/// The `q` largest singular triplets of `w` to f64 precision, each signed so that the
/// left vector's entry of largest magnitude is positive, without a full SVD where the
/// spectrum allows it.
///
/// Block Lanczos on `AᵀA` (`A` = `w` or `wᵀ`, whichever is tall) with full
/// reorthogonalization: the basis `V` of `span{Ω, AᵀAΩ, (AᵀA)²Ω, …}` grows by
/// [`TOP_SVD_BLOCK`] columns a step, each step one pass over `A` ([`block_pass`]),
/// and `Z = AᵀAV` is kept. Rayleigh–Ritz on `T = VᵀZ` gives `v = Vw`, `σ² = wᵀTw`,
/// `u = Av/σ`; then `Av = σu` by construction and `‖Aᵀu − σv‖ = ‖Zw − σ²v‖/σ` with no
/// further product. It stops when every such residual is at most `1e-11·σ_1` and at
/// most `1e-9` of the triplet's own gap (to `σ_{k−1}` and `σ_{k+1}`; for the last, to
/// `σ_{q+1}`), which bounds each vector's angle to the exact one (Wedin). A Krylov
/// space converges where subspace iteration crawls: its polynomial filter separates
/// `σ_q` from the rest in about the square root of the steps, so even a Gaussian
/// matrix's flat top is certified well before the basis costs what a full SVD does.
/// Rayleigh–Ritz runs where the certificate's rate of convergence says it may hold
/// ([`Checks`]), on `T`'s band (block Lanczos makes it block tridiagonal: `O(dim²)`
/// rotations make it tridiagonal, where a dense reduction costs `O(dim³)`), and reads
/// the residuals first from the Lanczos relation (`O(dim)` a pair); the certificate's
/// products with `V` and `Z` run only once those say it may hold. A gap too small to certify (a singular value repeated, or nearly so,
/// in the top `q` or at its boundary: the residuals reach round-off first), a basis
/// reaching half the smaller side, or a small matrix, take the full SVD instead.
pub fn svd_top<T: Stored>(w: &Array2<T>, q: usize) -> Result<(Svd, TopSvdPath)> {
    let small = w.nrows().min(w.ncols());
    if q == 0 || 2 * (q + 2 * TOP_SVD_BLOCK) > small {
        return Ok((signed(svd_exact(w, q.min(small))?), TopSvdPath::Full(0)));
    }
    // A tall matrix in row-major order, in w's own precision (a float32 weight is
    // read as it is stored): w or wᵀ, whichever is row-major as stored (an ONNX
    // weight reaches here as a column-major view), whose SVD is w's with U and V
    // swapped; that transposed once more (in cache-sized tiles) when it is wide (half
    // of a Llama MLP's weights): each Krylov step is then one pass over it, not two.
    // Copied either way, into memory on huge pages (`PassRows`).
    let (stored, mut transposed) = if !w.is_standard_layout() && w.t().is_standard_layout() {
        (w.t(), true)
    } else {
        (w.view(), false)
    };
    let x = if stored.nrows() < stored.ncols() {
        transposed = !transposed;
        PassRows::new((stored.ncols(), stored.nrows()), |out| {
            match stored.as_slice() {
                Some(elements) => transpose_rows(elements, stored.dim(), out),
                None => copy_rows(stored.t(), out),
            }
        })
    } else {
        PassRows::new(stored.dim(), |out| copy_rows(stored, out))
    };
    let (top, path) = krylov_top(x.view(), q)?;
    let svd = match top {
        Some(svd) if transposed => Svd {
            u: svd.v,
            s: svd.s,
            v: svd.u,
        },
        Some(svd) => svd,
        None => svd_exact(w, q)?,
    };
    Ok((signed(svd), path))
}

/// `wᵀ` `[n, m]` of the row-major `w` `[m, n]` into `out`, `stored` its elements, in
/// tiles that stay in cache (a transposed view read in order reads a column at a time).
fn transpose_rows<T: Copy>(stored: &[T], (m, n): (usize, usize), out: &mut [T]) {
    const TILE: usize = 32;
    assert_eq!((stored.len(), out.len()), (m * n, m * n));
    for i0 in (0..m).step_by(TILE) {
        for j0 in (0..n).step_by(TILE) {
            for j in j0..(j0 + TILE).min(n) {
                for i in i0..(i0 + TILE).min(m) {
                    out[j * m + i] = stored[i * n + j];
                }
            }
        }
    }
}

/// `w`'s elements in row-major order into `out`.
fn copy_rows<T: Copy>(w: ArrayView2<'_, T>, out: &mut [T]) {
    match w.as_slice() {
        Some(elements) => out.copy_from_slice(elements),
        None => out.iter_mut().zip(w.iter()).for_each(|(o, &x)| *o = x),
    }
}

/// [`svd_top`]'s Krylov iteration on the tall, row-major `w` (`A`): the triplets
/// (unsigned) when certified.
fn krylov_top<T: Stored>(w: ArrayView2<'_, T>, q: usize) -> Result<(Option<Svd>, TopSvdPath)> {
    let (rows, cols) = w.dim();
    debug_assert!(rows >= cols);
    let block = TOP_SVD_BLOCK;
    let max_dim = cols / 2;
    // Reserved, not zeroed: they grow a block at a time, and a flat spectrum's basis
    // stops at a third of its room (zeroing it all cost a tenth of a 2048² weight's
    // time, most of it in page faults).
    let mut basis = Mat::<f64>::with_capacity(cols, max_dim); // V
    let mut gram_basis = Mat::<f64>::with_capacity(cols, max_dim); // Z = AᵀA V
    let mut ritz = Mat::<f64>::with_capacity(max_dim, max_dim); // T = VᵀZ, lower triangle
    basis.resize_with(cols, 0, |_, _| 0.0);
    let mut band = Band::default();
    let mut rng = Rng::new(0x5EED_7095);
    let start = Mat::from_fn(cols, block, |_, _| rng.normal());
    let mut y = orthonormalize(&start, basis.as_ref().subcols(0, 0), 0).q;
    let (mut dim, mut steps) = (0, 0);
    let mut checks = Checks::default();
    while dim + block <= max_dim {
        let z = block_pass(w, BlockOp::Gram, &y);
        basis.resize_with(cols, dim + block, |i, k| y[(i, k - dim)]);
        gram_basis.resize_with(cols, dim + block, |i, k| z[(i, k - dim)]);
        dim += block;
        ritz.resize_with(dim, dim, |_, _| 0.0);
        steps += 1;
        // The next block, z made orthonormal to the basis (y included). Its
        // projections' coefficients, Vᵀz = VᵀAᵀAy, are y's row block of T; and z's
        // part new to the basis, P = y_next·R, makes (the Lanczos relation AᵀAV = VT +
        // P·(the last block's rows)) ‖AᵀAv − θv‖ = ‖R·(w's last rows)‖ for every Ritz
        // pair (θ, v = Vw).
        let last = dim + block > max_dim;
        let next = orthonormalize(&z, basis.as_ref().subcols(0, dim), 2 * block);
        ritz.as_mut()
            .submatrix_mut(dim - block, 0, block, dim)
            .copy_from(next.on_basis.transpose());
        band.record(
            ritz.as_ref().submatrix(dim - block, 0, block, dim),
            dim - block,
            block,
        );
        let step_flops = (4 * rows * cols * block + 4 * cols * (dim + 2 * block) * block) as f64;
        // The tridiagonal form (banded: rotations; else Householder's 4/3·dim³ flops at a
        // third of the pass's rate, so weighed as 5·dim³ of the pass's) and its values.
        let check_flops = match band.width(block) {
            Some(_) => 500.0 * (dim * dim) as f64,
            None => 5.0 * (dim as f64).powi(3),
        };
        if dim > q && checks.due(dim, step_flops, check_flops, last) {
            let eigen = ritz::top_eigen(
                ritz.as_ref().submatrix(0, 0, dim, dim),
                band.width(block),
                q,
            );
            let s: Vec<f64> = eigen.values.iter().map(|v| v.max(0.0).sqrt()).collect();
            let min_gap = (0..q)
                .map(|k| s[k] - s[k + 1])
                .fold(f64::INFINITY, f64::min);
            if min_gap <= 1e-9 * s[0] {
                break; // a repeated value in the top q or at its boundary (or a zero matrix)
            }
            // The Lanczos residuals first (O(dim) a pair): the certificate's own, on
            // the weight, only once they say it may hold or have reached round-off.
            let estimate = next.r.as_ref().filter(|_| !last).map(|r| {
                let on_last = r * eigen.last_rows(block);
                certificate(&s, q, |k| on_last.col(k).norm_l2())
            });
            match estimate {
                Some((residual, worst)) if worst > 1.0 && residual > 1e-13 * s[0] => {
                    checks.record(dim, worst.ln(), block);
                }
                _ => {
                    let top = eigen.vectors();
                    let v = basis.as_ref().subcols(0, dim) * &top;
                    let zw = gram_basis.as_ref().subcols(0, dim) * &top;
                    // ‖Aᵀu − σv‖ = ‖Zw − σ²v‖/σ for each triplet.
                    let (residual, worst) = certificate(&s, q, |k| {
                        let s2 = s[k] * s[k];
                        (0..cols)
                            .map(|i| (zw[(i, k)] - s2 * v[(i, k)]).powi(2))
                            .sum::<f64>()
                            .sqrt()
                    });
                    if !worst.is_finite() {
                        break; // a zero or non-finite matrix: the full SVD decides
                    }
                    if worst <= 1.0 {
                        let u = left_vectors(w, &v, &s[..q]);
                        let svd = Svd {
                            u: from_faer(u.as_ref()),
                            s: Array1::from(s[..q].to_vec()),
                            v: from_faer(v.as_ref()),
                        };
                        return Ok((Some(svd), TopSvdPath::Iterated(steps)));
                    }
                    if residual <= 1e-13 * s[0] {
                        // The residuals are at round-off and still too large for some
                        // gap: a value nearly repeated in the top q or at its boundary.
                        break;
                    }
                    checks.record(dim, worst.ln(), block);
                }
            }
        }
        y = next.q;
    }
    Ok((None, TopSvdPath::Full(steps)))
}

/// The largest of the top `q` triplets' residuals `‖Aᵀu − σv‖` (`norm(k)` is
/// `σ_k` times triplet `k`'s) and the worst ratio of one to its bound: `1e-11·σ_1`, and
/// `1e-9` of the triplet's own gap, to its neighbours (Wedin bounds its vector's
/// angle by residual / gap). A NaN stays NaN.
fn certificate(s: &[f64], q: usize, norm: impl Fn(usize) -> f64) -> (f64, f64) {
    (0..q)
        .map(|k| {
            let below = s[k] - s[k + 1];
            let gap = if k == 0 {
                below
            } else {
                below.min(s[k - 1] - s[k])
            };
            let residual = norm(k) / s[k];
            (residual, residual / (1e-11 * s[0]).min(1e-9 * gap))
        })
        .fold((0.0f64, 0.0f64), |(r0, w0), (r, w)| {
            // f64::max would drop a NaN.
            let worst = if w.is_nan() || w0.is_nan() {
                f64::NAN
            } else {
                w0.max(w)
            };
            (r0.max(r), worst)
        })
}

/// How far from banded `T` is: block Lanczos with full reorthogonalization makes it
/// block tridiagonal, its `block` rows' subdiagonal blocks upper triangular (the R of
/// the next block's QR), so every entry more than `block` below the diagonal is
/// round-off (about 1e-16 of the largest on a Gaussian weight).
#[derive(Default)]
struct Band {
    /// The largest entry's magnitude.
    largest: f64,
    /// The largest magnitude more than a block below the diagonal.
    outside: f64,
}

impl Band {
    /// T's row block `rows` (`[block, start + block]`, from row `start`).
    fn record(&mut self, rows: faer::MatRef<'_, f64>, start: usize, block: usize) {
        for i in 0..rows.nrows() {
            for j in 0..rows.ncols() {
                let a = rows[(i, j)].abs();
                self.largest = self.largest.max(a);
                if start + i > j + block {
                    self.outside = self.outside.max(a);
                }
            }
        }
    }

    /// `Some(block)` when the entries outside that band are at most `1e-13` of the
    /// largest (dropping them moves the Ritz values by less than the certificate
    /// notices; a NaN anywhere reads as not banded).
    fn width(&self, block: usize) -> Option<usize> {
        (self.outside <= 1e-13 * self.largest).then_some(block)
    }
}

/// When [`krylov_top`] runs Rayleigh–Ritz. Once the certificate's log-ratio falls
/// from one check to the next, the next check is where that rate of fall reaches the
/// certificate: 60 % of the way there while it is more than four steps off (Krylov
/// convergence speeds up, so the rate under-promises), half a step past it once it is
/// closer (there a check costs more than a step). Whatever the plan, a check comes once
/// the steps since the last cost three checks and a quarter of all the work so far (so
/// a plan that promised too little wastes at most a quarter; early on, when checks are
/// cheap beside a step and their ratios noisy, they come at growing intervals, not at
/// every step). Before a rate, once they cost one check and that quarter.
#[derive(Default)]
struct Checks {
    /// Flops spent on steps since the last check.
    unchecked: f64,
    /// Flops spent on steps in all.
    spent: f64,
    /// The last check: basis size and ln(worst residual / its bound).
    last: Option<(usize, f64)>,
    /// The basis size the falling rate points to, if any.
    planned: Option<usize>,
}

impl Checks {
    /// Whether to check at basis size `dim`, after a step of `step_flops`, a check
    /// costing `check_flops`; `last`: the basis cannot grow further.
    fn due(&mut self, dim: usize, step_flops: f64, check_flops: f64, last: bool) -> bool {
        self.unchecked += step_flops;
        self.spent += step_flops;
        let quarter = 0.25 * self.spent;
        last || match self.planned {
            Some(planned) => dim >= planned || self.unchecked >= quarter.max(3.0 * check_flops),
            None => self.unchecked >= quarter.max(check_flops),
        }
    }

    /// A check at `dim` found ln(worst residual / bound) = `log_ratio` (> 0).
    fn record(&mut self, dim: usize, log_ratio: f64, block: usize) {
        self.unchecked = 0.0;
        self.planned = self.last.and_then(|(last_dim, last_ratio)| {
            let rate = (last_ratio - log_ratio) / (dim - last_dim) as f64;
            let remaining = log_ratio / rate;
            // Near the end a step costs less than a check: aim just past the estimate.
            let ahead = if remaining <= 4.0 * block as f64 {
                remaining + 0.5 * block as f64
            } else {
                0.6 * remaining
            };
            (rate > 0.0).then(|| dim.saturating_add((ahead as usize).max(block)))
        });
        self.last = Some((dim, log_ratio));
    }
}

/// `m`'s transpose as a row-major view: its columns (each contiguous) as rows.
fn columns_as_rows(m: faer::MatRef<'_, f64>) -> ArrayView2<'_, f64> {
    use tract_core::ndarray::ShapeBuilder;
    let m = m
        .try_as_col_major()
        .expect("a faer matrix's columns are contiguous");
    let stride = m.col_stride().max(1) as usize;
    // SAFETY: column k's nrows elements start at as_ptr + k·col_stride, inside m, which
    // the view borrows.
    unsafe { ArrayView2::from_shape_ptr((m.ncols(), m.nrows()).strides((stride, 1)), m.as_ptr()) }
}

/// `u = Av/σ` (`A` = `w`), a block of columns at a time.
fn left_vectors<T: Stored>(w: ArrayView2<'_, T>, v: &Mat<f64>, s: &[f64]) -> Mat<f64> {
    let block = TOP_SVD_BLOCK;
    let (rows, cols) = w.dim();
    let mut u = Mat::<f64>::zeros(rows, s.len());
    for k0 in (0..s.len()).step_by(block) {
        let width = block.min(s.len() - k0);
        let v_block = Mat::from_fn(
            cols,
            block,
            |i, k| {
                if k < width {
                    v[(i, k0 + k)]
                } else {
                    0.0
                }
            },
        );
        let av = block_pass(w, BlockOp::Times, &v_block);
        for k in 0..width {
            for i in 0..rows {
                u[(i, k0 + k)] = av[(i, k)] / s[k0 + k];
            }
        }
    }
    u
}

/// [`orthonormalize`]'s result.
struct Orthonormalized {
    /// The columns made orthonormal and orthogonal to the basis.
    q: Mat<f64>,
    /// `y`'s part new to the basis, `Q·R`: `R`, unless a third projection was needed.
    r: Option<Mat<f64>>,
    /// `y`'s coefficients on the basis, `basisᵀy` (both projections').
    on_basis: Mat<f64>,
}

/// The columns of `y` made orthonormal and orthogonal to the orthonormal `basis`:
/// projected out twice, first on the basis's last `recent` columns (where the Krylov
/// recurrence puts all of `AᵀA` times its last block but round-off), then on all of it
/// (each a pass of block modified Gram–Schmidt; one pass on all of it would leave the
/// round-off of a `y` lying mostly in the basis, and that compounds step by step), and
/// once more if that second took more than round-off (a `y` leaning on older columns);
/// then a thin QR `Q·R`; a `y` whose columns are (nearly) dependent, whose QR amplifies
/// round-off or completes it arbitrarily, is projected out once more.
fn orthonormalize(y: &Mat<f64>, basis: faer::MatRef<'_, f64>, recent: usize) -> Orthonormalized {
    let project = |y: &Mat<f64>, basis: faer::MatRef<'_, f64>| {
        if basis.ncols() > 0 {
            block_project(columns_as_rows(basis), y)
        } else {
            (y.clone(), Mat::zeros(0, y.ncols()))
        }
    };
    let norms = |y: &Mat<f64>| {
        (0..y.ncols())
            .map(|k| y.col(k).norm_l2())
            .collect::<Vec<_>>()
    };
    let scale = norms(y).into_iter().fold(0.0, f64::max);
    let older = basis.ncols() - recent.min(basis.ncols());
    let (once, on_recent) = project(y, basis.subcols(older, basis.ncols() - older));
    let (mut y, mut on_basis) = project(&once, basis);
    // The whole basis's projection took more than round-off from a column (it leaned
    // on older columns, which a Krylov block does not): what is left is as far from
    // orthogonal as round-off is from it, so it is projected out once more.
    if norms(&y)
        .iter()
        .zip(norms(&once))
        .any(|(after, before)| *after < std::f64::consts::FRAC_1_SQRT_2 * before)
    {
        let (again, more) = project(&y, basis);
        y = again;
        on_basis += more;
    }
    for k in 0..on_basis.ncols() {
        for i in 0..on_recent.nrows() {
            on_basis[(older + i, k)] += on_recent[(i, k)];
        }
    }
    let q = thin_q(&y);
    // Each column's part new to the basis and to the columns before it, |r_kk|, beside
    // the block's size: where it is small the QR divided round-off by it, and the
    // column may lean on the basis.
    let r = q.transpose() * &y;
    let left = norms(&y).into_iter().fold(0.0, f64::max);
    if (0..r.ncols()).all(|k| r[(k, k)].abs() > (1e-4 * left).max(1e-10 * scale)) {
        return Orthonormalized {
            q,
            r: Some(r),
            on_basis,
        };
    }
    Orthonormalized {
        q: thin_q(&project(&q, basis).0),
        r: None,
        on_basis,
    }
}

#[cfg(test)]
mod tests;
