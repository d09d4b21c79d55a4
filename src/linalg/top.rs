//! The `q` largest singular triplets to f64 precision without a full SVD: block
//! Lanczos on `AᵀA` with a residual certificate ([`svd_top`]), each step one vectorized
//! pass over the weight (as stored, or transposed once when that is wide) in its own
//! precision ([`block_pass`]).

use faer::Mat;
use tract_core::ndarray::{Array1, Array2, ArrayView2, CowArray};

use super::{from_faer, signed, svd_exact, thin_q, Svd};
use crate::error::{Error, Result};
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

/// Columns [`svd_top`] adds to its Krylov basis a step: one 512-bit vector of f64.
pub const TOP_SVD_BLOCK: usize = 8;

/// A row of a Krylov block.
type BlockRow = [f64; TOP_SVD_BLOCK];

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
/// ([`Checks`]). A gap too small to certify (a singular value repeated, or nearly so,
/// in the top `q` or at its boundary: the residuals reach round-off first), a basis
/// reaching half the smaller side, or a small matrix, take the full SVD instead.
pub fn svd_top<T: Copy + Into<f64>>(w: &Array2<T>, q: usize) -> Result<(Svd, TopSvdPath)> {
    let small = w.nrows().min(w.ncols());
    if q == 0 || 2 * (q + 2 * TOP_SVD_BLOCK) > small {
        return Ok((signed(svd_exact(w, q.min(small))?), TopSvdPath::Full(0)));
    }
    // A tall matrix in row-major order, in w's own precision (a float32 weight is
    // read as it is stored): w or wᵀ, whichever is row-major as stored (an ONNX
    // weight reaches here as a column-major view), whose SVD is w's with U and V
    // swapped; that transposed once more (in cache-sized tiles) when it is wide (half
    // of a Llama MLP's weights): each Krylov step is then one pass over it, not two.
    let (stored, mut transposed) = if !w.is_standard_layout() && w.t().is_standard_layout() {
        (w.t(), true)
    } else {
        (w.view(), false)
    };
    let x = match stored.as_slice() {
        Some(elements) if stored.nrows() < stored.ncols() => {
            transposed = !transposed;
            CowArray::from(transpose_rows(elements, stored.dim()))
        }
        _ if stored.nrows() < stored.ncols() => {
            transposed = !transposed;
            CowArray::from(stored.t().as_standard_layout().into_owned())
        }
        _ => stored.as_standard_layout(),
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

/// `wᵀ` `[n, m]` of the row-major `w` `[m, n]`, `stored` its elements, in tiles that
/// stay in cache (ndarray's copy of a transposed view reads a column at a time).
fn transpose_rows<T: Copy>(stored: &[T], (m, n): (usize, usize)) -> Array2<T> {
    const TILE: usize = 32;
    let mut out = stored.to_vec();
    for i0 in (0..m).step_by(TILE) {
        for j0 in (0..n).step_by(TILE) {
            for j in j0..(j0 + TILE).min(n) {
                for i in i0..(i0 + TILE).min(m) {
                    out[j * m + i] = stored[i * n + j];
                }
            }
        }
    }
    Array2::from_shape_vec((n, m), out).expect("n·m elements")
}

/// [`svd_top`]'s Krylov iteration on the tall, row-major `w` (`A`): the triplets
/// (unsigned) when certified.
fn krylov_top<T: Copy + Into<f64>>(
    w: ArrayView2<'_, T>,
    q: usize,
) -> Result<(Option<Svd>, TopSvdPath)> {
    let (rows, cols) = w.dim();
    debug_assert!(rows >= cols);
    let block = TOP_SVD_BLOCK;
    let max_dim = cols / 2;
    let mut basis = Mat::<f64>::zeros(cols, max_dim); // V
    let mut gram_basis = Mat::<f64>::zeros(cols, max_dim); // Z = AᵀA V
    let mut ritz = Mat::<f64>::zeros(max_dim, max_dim); // T = VᵀZ, lower triangle
    let mut rng = Rng::new(0x5EED_7095);
    let mut next = Mat::from_fn(cols, block, |_, _| rng.normal());
    // next = AᵀA y's coefficients on the basis, Vᵀ(AᵀA y) = (AᵀA V)ᵀ y: y's row block
    // of T, known before next is orthogonalized.
    let mut next_on_basis: Option<Mat<f64>> = None;
    let (mut dim, mut steps) = (0, 0);
    let mut checks = Checks::default();
    while dim + block <= max_dim {
        let y = orthonormalize(
            &next,
            next_on_basis.as_ref(),
            basis.as_ref().subcols(0, dim),
        );
        let y_rows: Vec<BlockRow> = (0..cols)
            .map(|i| std::array::from_fn(|k| y[(i, k)]))
            .collect();
        let z_rows = block_pass(w, BlockOp::Gram, &y_rows, cols);
        let z = Mat::from_fn(cols, block, |i, k| z_rows[i][k]);
        basis.as_mut().subcols_mut(dim, block).copy_from(&y);
        gram_basis.as_mut().subcols_mut(dim, block).copy_from(&z);
        let t_rows = y.transpose() * gram_basis.as_ref().subcols(0, dim + block);
        ritz.as_mut()
            .submatrix_mut(dim, 0, block, dim + block)
            .copy_from(&t_rows);
        next_on_basis = Some(t_rows.transpose().to_owned());
        next = z;
        dim += block;
        steps += 1;
        let step_flops = (4 * rows * cols * block + 8 * cols * dim * block) as f64;
        if dim <= q || !checks.due(dim, step_flops, dim + block > max_dim) {
            continue;
        }
        let ritz_pairs = ritz
            .as_ref()
            .submatrix(0, 0, dim, dim)
            .self_adjoint_eigen(faer::Side::Lower)
            .map_err(|e| {
                Error::Usage(format!("the eigendecomposition did not converge ({e:?})"))
            })?;
        // Ascending: the largest q + 1 are the last.
        let s: Vec<f64> = (0..=q)
            .map(|i| ritz_pairs.S()[dim - 1 - i].max(0.0).sqrt())
            .collect();
        let top = Mat::from_fn(dim, q, |i, k| ritz_pairs.U()[(i, dim - 1 - k)]);
        let v = basis.as_ref().subcols(0, dim) * &top;
        let zw = gram_basis.as_ref().subcols(0, dim) * &top;
        // ‖Aᵀu − σv‖ = ‖Zw − σ²v‖/σ for each triplet; the vector's own gap is to its
        // neighbours (Wedin bounds its angle by residual / gap).
        let worst = (0..q)
            .map(|k| {
                let s2 = s[k] * s[k];
                let r = (0..cols)
                    .map(|i| (zw[(i, k)] - s2 * v[(i, k)]).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let below = s[k] - s[k + 1];
                let gap = if k == 0 {
                    below
                } else {
                    below.min(s[k - 1] - s[k])
                };
                let residual = r / s[k];
                (residual, residual / (1e-11 * s[0]).min(1e-9 * gap))
            })
            .fold((0.0f64, 0.0f64), |(r0, w0), (r, w)| {
                // A NaN stays (f64::max would drop it).
                let worst = if w.is_nan() || w0.is_nan() {
                    f64::NAN
                } else {
                    w0.max(w)
                };
                (r0.max(r), worst)
            });
        let (residual, worst) = worst;
        let min_gap = (0..q)
            .map(|k| s[k] - s[k + 1])
            .fold(f64::INFINITY, f64::min);
        if min_gap <= 1e-9 * s[0] || !worst.is_finite() {
            break; // a repeated value in the top q or at its boundary (or a zero matrix)
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
            // The residuals are at round-off and still too large for some gap: a
            // value nearly repeated in the top q or at its boundary.
            break;
        }
        checks.record(dim, worst.ln(), block);
    }
    Ok((None, TopSvdPath::Full(steps)))
}

/// When [`krylov_top`] runs Rayleigh–Ritz (about `10·dim³` flops with the vectors).
/// Once the certificate's log-ratio falls from one check to the next, the next check is
/// where that rate of fall reaches the certificate: 60 % of the way there while it is
/// more than four steps off (Krylov convergence speeds up, so the rate under-promises),
/// half a step past it once it is closer (there a check costs more than a step), and
/// at the latest once the steps since the last check cost three checks. Before that,
/// once they cost one.
#[derive(Default)]
struct Checks {
    /// Flops spent on steps since the last check.
    unchecked: f64,
    /// The last check: basis size and ln(worst residual / its bound).
    last: Option<(usize, f64)>,
    /// The basis size the falling rate points to, if any.
    planned: Option<usize>,
}

impl Checks {
    /// Whether to check at basis size `dim`, after a step of `step_flops`; `last`: the
    /// basis cannot grow further.
    fn due(&mut self, dim: usize, step_flops: f64, last: bool) -> bool {
        self.unchecked += step_flops;
        let check_flops = 10.0 * (dim as f64).powi(3);
        last || match self.planned {
            Some(planned) => dim >= planned || self.unchecked >= 3.0 * check_flops,
            None => self.unchecked >= check_flops,
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

/// `u = Av/σ` (`A` = `w`), a block of columns at a time.
fn left_vectors<T: Copy + Into<f64>>(w: ArrayView2<'_, T>, v: &Mat<f64>, s: &[f64]) -> Mat<f64> {
    let block = TOP_SVD_BLOCK;
    let (rows, cols) = w.dim();
    let mut u = Mat::<f64>::zeros(rows, s.len());
    for k0 in (0..s.len()).step_by(block) {
        let width = block.min(s.len() - k0);
        let v_rows: Vec<BlockRow> = (0..cols)
            .map(|i| std::array::from_fn(|k| if k < width { v[(i, k0 + k)] } else { 0.0 }))
            .collect();
        let av = block_pass(w, BlockOp::Times, &v_rows, rows);
        for (i, row) in av.iter().enumerate() {
            for k in 0..width {
                u[(i, k0 + k)] = row[k] / s[k0 + k];
            }
        }
    }
    u
}

/// The columns of `y` made orthonormal and orthogonal to the orthonormal `basis`
/// (classical Gram–Schmidt twice): projected out with `on_basis` (`basisᵀy`, when the
/// caller knows it) or computed coefficients, projected out again (one pass loses
/// orthogonality when `y` lies mostly in the basis), then a thin QR; a `y` whose
/// columns are (nearly) dependent, whose QR amplifies round-off or completes it
/// arbitrarily, is projected out once more.
fn orthonormalize(
    y: &Mat<f64>,
    on_basis: Option<&Mat<f64>>,
    basis: faer::MatRef<'_, f64>,
) -> Mat<f64> {
    let project = |y: &mut Mat<f64>| {
        if basis.ncols() > 0 {
            let coef = basis.transpose() * &*y;
            *y -= basis * &coef;
        }
    };
    let mut y = y.clone();
    let scale = (0..y.ncols())
        .map(|k| y.col(k).norm_l2())
        .fold(0.0, f64::max);
    match on_basis {
        Some(coef) if basis.ncols() > 0 => y -= basis * coef.as_ref().subrows(0, basis.ncols()),
        _ => project(&mut y),
    }
    project(&mut y);
    let q = thin_q(&y);
    // Each column's part new to the basis and to the columns before it, |r_kk|, beside
    // the block's size: where it is small the QR divided round-off by it, and the
    // column may lean on the basis.
    let r = q.transpose() * &y;
    let left = (0..y.ncols())
        .map(|k| y.col(k).norm_l2())
        .fold(0.0, f64::max);
    if (0..r.ncols()).all(|k| r[(k, k)].abs() > (1e-4 * left).max(1e-10 * scale)) {
        return q;
    }
    let mut q = q;
    project(&mut q);
    thin_q(&q)
}

/// A product of a row-major matrix `a` `[rows, cols]`, read as f64, with a block of
/// [`TOP_SVD_BLOCK`] columns.
#[derive(Clone, Copy)]
enum BlockOp {
    /// `aᵀa·y`, `y` `[cols]`: one pass, each group of rows' `t = a_g·y` then
    /// `z += a_gᵀ t` while the group is in cache.
    Gram,
    /// `a·y`, `y` `[cols]`.
    Times,
}

/// `op` on `a` and `y`, giving `out_len` rows. A group of [`GROUP`] rows of `a` is
/// widened to f64 a chunk of columns at a time and used while in cache; `y`, the output
/// and the per-row sums stay in cache too, so `a` is streamed once in its own precision
/// (half the bytes of an f64 copy for a float32 weight), where library products would
/// stream (and repack) an f64 copy twice.
///
/// The arithmetic is plain Rust in a fixed order (a fused multiply-add per lane), so
/// its bits are the same on every machine; it is compiled for AVX-512 and for AVX2 and
/// picked at run time, only the speed differs.
fn block_pass<T: Copy + Into<f64>>(
    a: ArrayView2<'_, T>,
    op: BlockOp,
    y: &[BlockRow],
    out_len: usize,
) -> Vec<BlockRow> {
    let mut out = vec![[0.0; TOP_SVD_BLOCK]; out_len];
    let mut pass = BlockPass {
        a,
        op,
        y,
        out: &mut out,
        avx512: false,
    };
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            pass.avx512 = true;
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { pass_avx512(pass) };
            return out;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            unsafe { pass_avx2(pass) };
            return out;
        }
    }
    pass_in_groups(pass);
    out
}

/// [`pass_in_groups`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn pass_avx512<T: Copy + Into<f64>>(pass: BlockPass<'_, T>) {
    pass_in_groups(pass)
}

/// [`pass_in_groups`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pass_avx2<T: Copy + Into<f64>>(pass: BlockPass<'_, T>) {
    pass_in_groups(pass)
}

/// [`block_pass`]'s operands.
struct BlockPass<'a, T> {
    a: ArrayView2<'a, T>,
    op: BlockOp,
    y: &'a [BlockRow],
    out: &'a mut [BlockRow],
    /// Running in [`pass_avx512`]: [`rows_axpy_avx512`] may be called.
    avx512: bool,
}

/// Rows of `a` a group: `y`'s and the output's rows are read once per group (from L2),
/// and the group's sums fill half of AVX-512's registers (all of AVX2's).
const GROUP: usize = 8;

/// Columns of a group of rows widened at a time: `GROUP · CHUNK` f64 stay in L1.
const CHUNK: usize = 256;

/// [`block_pass`] over groups of [`GROUP`] rows (the last rows one at a time), widened
/// to f64 a chunk of columns at a time into L1 (twice for [`BlockOp::Gram`]: once for
/// `t = a·y`, once for `z += aᵀt`; the group's stored rows are in L2 by then).
#[inline(always)]
fn pass_in_groups<T: Copy + Into<f64>>(mut pass: BlockPass<'_, T>) {
    let rows = pass.a.nrows();
    let mut wide = vec![0.0f64; GROUP * CHUNK];
    for i0 in (0..rows).step_by(GROUP) {
        if rows - i0 >= GROUP {
            group_step::<GROUP, T>(&mut pass, i0, &mut wide);
        } else {
            for i in i0..rows {
                group_step::<1, T>(&mut pass, i, &mut wide);
            }
        }
    }
}

/// [`BlockOp`] on the `R` rows of `pass.a` from `i0`, `wide` a scratch of `R · CHUNK`.
#[inline(always)]
fn group_step<const R: usize, T: Copy + Into<f64>>(
    pass: &mut BlockPass<'_, T>,
    i0: usize,
    wide: &mut [f64],
) {
    let cols = pass.a.ncols();
    let src: [&[T]; R] = std::array::from_fn(|r| {
        pass.a
            .row(i0 + r)
            .to_slice()
            .expect("a standard-layout matrix")
    });
    let chunks = (0..cols)
        .step_by(CHUNK)
        .map(|c0| (c0, (c0 + CHUNK).min(cols)));
    let mut t = [[0.0; TOP_SVD_BLOCK]; R];
    for (c0, c1) in chunks.clone() {
        widen(&src, wide, c0, c1);
        let a: [&[f64]; R] = std::array::from_fn(|r| &wide[r * (c1 - c0)..][..c1 - c0]);
        rows_dot(a, &pass.y[c0..c1], &mut t);
    }
    if let BlockOp::Times = pass.op {
        pass.out[i0..i0 + R].copy_from_slice(&t);
        return;
    }
    for (c0, c1) in chunks {
        widen(&src, wide, c0, c1);
        let a: [&[f64]; R] = std::array::from_fn(|r| &wide[r * (c1 - c0)..][..c1 - c0]);
        #[cfg(target_arch = "x86_64")]
        if pass.avx512 {
            // SAFETY: `avx512` is set only where the CPU has AVX-512F.
            unsafe { rows_axpy_avx512(a, &t, &mut pass.out[c0..c1]) };
            continue;
        }
        rows_axpy(a, &t, &mut pass.out[c0..c1]);
    }
}

/// The rows' columns `c0..c1` as f64, row after row in `wide`.
#[inline(always)]
fn widen<const R: usize, T: Copy + Into<f64>>(
    src: &[&[T]; R],
    wide: &mut [f64],
    c0: usize,
    c1: usize,
) {
    for (row, src) in wide.chunks_exact_mut(c1 - c0).zip(src) {
        for (d, &x) in row.iter_mut().zip(&src[c0..c1]) {
            *d = x.into();
        }
    }
}

/// `t_r += a_r·y` for each of the `R` rows, in column order.
#[inline(always)]
fn rows_dot<const R: usize>(a: [&[f64]; R], y: &[BlockRow], t: &mut [BlockRow; R]) {
    assert!(a.iter().all(|row| row.len() >= y.len()));
    for (j, yj) in y.iter().enumerate() {
        for (r, t) in t.iter_mut().enumerate() {
            // SAFETY: j < y.len() ≤ a[r].len(), asserted above (indexing would check
            // each of the R rows at every j, as many compares as multiply-adds).
            let x = unsafe { *a[r].get_unchecked(j) };
            for (t, &y) in t.iter_mut().zip(yj) {
                *t = x.mul_add(y, *t);
            }
        }
    }
}

/// `z += Σ_r a_rᵀ t_r`, the rows summed in four interleaved chains (one chain of `R`
/// dependent multiply-adds a column would stall on their latency), then in pairs.
#[inline(always)]
fn rows_axpy<const R: usize>(a: [&[f64]; R], t: &[BlockRow; R], z: &mut [BlockRow]) {
    const CHAINS: usize = 4;
    assert!(a.iter().all(|row| row.len() >= z.len()));
    for (j, zj) in z.iter_mut().enumerate() {
        // SAFETY: j < z.len() ≤ a[r].len(), asserted above.
        let x: [f64; R] = std::array::from_fn(|r| unsafe { *a[r].get_unchecked(j) });
        for (k, z) in zj.iter_mut().enumerate() {
            let mut acc = [*z, 0.0, 0.0, 0.0];
            for r in 0..R {
                acc[r % CHAINS] = x[r].mul_add(t[r][k], acc[r % CHAINS]);
            }
            *z = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
    }
}

/// [`rows_axpy`] written for AVX-512 (the compiler's own vectorization of it gathers
/// across rows): the same operations in the same order, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_axpy_avx512<const R: usize>(a: [&[f64]; R], t: &[BlockRow; R], z: &mut [BlockRow]) {
    use std::arch::x86_64::*;
    const CHAINS: usize = 4;
    assert!(a.iter().all(|row| row.len() >= z.len()));
    let t: [__m512d; R] = std::array::from_fn(|r| unsafe { _mm512_loadu_pd(t[r].as_ptr()) });
    for (j, zj) in z.iter_mut().enumerate() {
        let zero = _mm512_setzero_pd();
        // SAFETY: a BlockRow is 8 f64, one 512-bit vector.
        let mut acc = [unsafe { _mm512_loadu_pd(zj.as_ptr()) }, zero, zero, zero];
        for r in 0..R {
            // SAFETY: j < z.len() ≤ a[r].len(), asserted above.
            let x = _mm512_set1_pd(unsafe { *a[r].get_unchecked(j) });
            acc[r % CHAINS] = _mm512_fmadd_pd(x, t[r], acc[r % CHAINS]);
        }
        let sum = _mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3]));
        // SAFETY: as the load.
        unsafe { _mm512_storeu_pd(zj.as_mut_ptr(), sum) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::orthonormal_gaussian;

    /// `U diag(s) Vᵀ` `[m, n]` with random orthonormal `U`, `V`.
    fn planted(m: usize, n: usize, s: &[f64], seed: u64) -> Array2<f64> {
        let mut rng = Rng::new(seed);
        let u = orthonormal_gaussian(m, s.len(), &mut rng);
        let v = orthonormal_gaussian(n, s.len(), &mut rng);
        (&u * &Array1::from(s.to_vec())
            .view()
            .insert_axis(tract_core::ndarray::Axis(0)))
            .dot(&v.t())
    }

    fn max_diff(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
        (a - b).iter().fold(0.0, |m, v| m.max(v.abs()))
    }

    /// The same triplets as the full SVD (both signed the same way): vectors to `tol`,
    /// values to `1e-12·σ_1`.
    fn assert_top_matches_full(w: &Array2<f64>, q: usize, tol: f64) -> TopSvdPath {
        let (top, path) = svd_top(w, q).unwrap();
        let full = signed(svd_exact(w, q).unwrap());
        assert!(max_diff(&top.u, &full.u) <= tol, "U ({path:?})");
        assert!(max_diff(&top.v, &full.v) <= tol, "V ({path:?})");
        let ds = (&top.s - &full.s)
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(ds <= 1e-12 * full.s[0], "S off by {ds:e} ({path:?})");
        path
    }

    /// A decaying spectrum, tall, wide, and stored column-major (a transposed weight):
    /// certified in a few blocks, and the full SVD's triplets to 1e-9.
    #[test]
    fn svd_top_iterates_to_the_full_svds_triplets() {
        use tract_core::ndarray::ShapeBuilder;
        let s: Vec<f64> = (0..150).map(|i| 10.0 * 0.85f64.powi(i)).collect();
        for (m, n) in [(300, 200), (200, 300)] {
            let w = planted(m, n, &s, 1);
            let mut column_major = Array2::zeros((m, n).f());
            column_major.assign(&w);
            for w in [w, column_major] {
                let path = assert_top_matches_full(&w, 8, 1e-9);
                assert!(
                    matches!(path, TopSvdPath::Iterated(k) if k <= 8),
                    "{m}x{n}: {path:?}"
                );
            }
        }
    }

    /// A flat spectrum (a Gaussian matrix, relative gaps of about 1 %), where subspace
    /// iteration would need hundreds of steps: the Krylov basis certifies it with far
    /// fewer columns than the matrix has, tall or wide.
    #[test]
    fn svd_top_certifies_a_flat_spectrum() {
        let mut rng = Rng::new(4);
        for (m, n) in [(1000, 800), (800, 1000)] {
            let w = Array2::from_shape_fn((m, n), |_| rng.normal());
            let path = assert_top_matches_full(&w, 8, 1e-9);
            assert!(
                matches!(path, TopSvdPath::Iterated(k) if k * TOP_SVD_BLOCK <= 400),
                "{m}x{n}: {path:?}"
            );
        }
    }

    /// A singular value repeated across the rank boundary (σ_8 = σ_9): the top 8 are
    /// not unique, no certificate can hold, and the full SVD decides.
    #[test]
    fn svd_top_falls_back_on_a_repeated_value_at_the_rank_boundary() {
        let mut s: Vec<f64> = (0..150).map(|i| 10.0 * 0.85f64.powi(i)).collect();
        s[8] = s[7];
        let w = planted(300, 200, &s, 2);
        let (top, path) = svd_top(&w, 8).unwrap();
        assert!(matches!(path, TopSvdPath::Full(n) if n < 10), "{path:?}");
        let full = signed(svd_exact(&w, 8).unwrap());
        assert_eq!(top.s, full.s);
        assert!(max_diff(&top.u, &full.u) == 0.0);
    }

    /// A singular value repeated inside the top q (σ_3 = σ_4): those two vectors are
    /// not unique, so no certificate holds for them and the full SVD decides.
    #[test]
    fn svd_top_falls_back_on_a_repeated_value_inside_the_top() {
        let mut s: Vec<f64> = (0..150).map(|i| 10.0 * 0.85f64.powi(i)).collect();
        s[4] = s[3];
        let w = planted(300, 200, &s, 6);
        let (top, path) = svd_top(&w, 8).unwrap();
        assert!(matches!(path, TopSvdPath::Full(n) if n < 10), "{path:?}");
        assert_eq!(top.s, signed(svd_exact(&w, 8).unwrap()).s);
    }

    /// A matrix of rank 20 < the basis it would grow: the Krylov space becomes
    /// invariant after three blocks, the next block is (numerically) in the basis, and
    /// its orthonormalization still gives new orthonormal directions; certified.
    #[test]
    fn svd_top_certifies_a_low_rank_matrix() {
        let s: Vec<f64> = (0..20).map(|i| 10.0 * 0.8f64.powi(i)).collect();
        let w = planted(300, 200, &s, 7);
        let path = assert_top_matches_full(&w, 8, 1e-9);
        assert!(matches!(path, TopSvdPath::Iterated(_)), "{path:?}");
    }

    /// Rayleigh–Ritz is planned where the certificate's rate of fall reaches it: 60 %
    /// of the way while far, just past it when near, never beyond three checks' cost.
    #[test]
    fn checks_follow_the_rate_of_convergence() {
        let mut checks = Checks::default();
        checks.record(100, 10.0, 8); // no rate yet: the cost rule
        assert!(!checks.due(108, 1.0, false));
        assert!(checks.due(108, 2e7, false)); // 10·108³ ≈ 1.26e7 flops
        checks.record(116, 8.0, 8); // falls 0.125 a column: 64 to go, plan 116 + 38
        assert!(!checks.due(150, 0.0, false));
        assert!(checks.due(154, 0.0, false));
        assert!(checks.due(120, 1e8, false)); // three checks' cost
        assert!(checks.due(120, 0.0, true)); // the basis is full
        checks.record(154, 2.0, 8); // 0.16 a column: 12.7 to go, plan 154 + 16
        assert!(!checks.due(169, 0.0, false));
        assert!(checks.due(170, 0.0, false));
    }

    /// A value nearly repeated inside the top q (σ_4 = σ_3·(1 − 1e-7)): its residuals
    /// reach round-off before they reach 1e-9 of that gap, and the full SVD decides
    /// soon after, not at the basis bound.
    #[test]
    fn svd_top_falls_back_soon_on_a_nearly_repeated_value() {
        let mut s: Vec<f64> = (0..150).map(|i| 10.0 * 0.85f64.powi(i)).collect();
        s[4] = s[3] * (1.0 - 1e-7);
        let w = planted(300, 200, &s, 8);
        let (top, path) = svd_top(&w, 8).unwrap();
        assert!(matches!(path, TopSvdPath::Full(n) if n <= 8), "{path:?}");
        assert_eq!(top.s, signed(svd_exact(&w, 8).unwrap()).s);
    }

    /// The block pass against a plain f64 product, with rows that are not a whole
    /// number of groups and columns that are not a whole number of chunks; and the
    /// instruction set the machine picks gives the portable code's bits.
    #[test]
    fn block_pass_is_the_product_with_the_same_bits_everywhere() {
        let mut rng = Rng::new(9);
        let (rows, cols) = (2 * GROUP + 3, CHUNK + 37);
        let a = Array2::from_shape_fn((rows, cols), |_| rng.normal() as f32);
        let y: Vec<BlockRow> = (0..cols)
            .map(|_| std::array::from_fn(|_| rng.normal()))
            .collect();
        let a64 = a.mapv(f64::from);
        let y64 = Array2::from_shape_fn((cols, TOP_SVD_BLOCK), |(i, k)| y[i][k]);
        let times = a64.dot(&y64);
        let gram = a64.t().dot(&times);
        for (op, expected) in [(BlockOp::Times, &times), (BlockOp::Gram, &gram)] {
            let got = block_pass(a.view(), op, &y, expected.nrows());
            let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (i, row) in got.iter().enumerate() {
                for k in 0..TOP_SVD_BLOCK {
                    let d = (row[k] - expected[[i, k]]).abs();
                    assert!(d <= 1e-12 * scale, "{i},{k}: {d:e}");
                }
            }
            let mut portable = vec![[0.0; TOP_SVD_BLOCK]; expected.nrows()];
            pass_in_groups(BlockPass {
                a: a.view(),
                op,
                y: &y,
                out: &mut portable,
                avx512: false,
            });
            assert!(got == portable, "the dispatched pass's bits differ");
        }
    }

    /// A flat spectrum on a small matrix: no certificate before the basis spans half
    /// of it, so the full SVD, after a bounded number of blocks.
    #[test]
    fn svd_top_bounds_its_work_before_the_full_svd() {
        let mut rng = Rng::new(3);
        let w = Array2::from_shape_fn((300, 200), |_| rng.normal());
        let (top, path) = svd_top(&w, 8).unwrap();
        assert!(
            matches!(path, TopSvdPath::Full(k) if k > 0 && k * TOP_SVD_BLOCK <= 100),
            "{path:?}"
        );
        assert_eq!(top.s, signed(svd_exact(&w, 8).unwrap()).s);
    }

    /// A weight with a NaN or an infinity (untrusted model data): an error or some
    /// result, never a panic or an endless loop.
    #[test]
    fn svd_top_on_non_finite_weights_returns() {
        for bad in [f32::NAN, f32::INFINITY] {
            let mut rng = Rng::new(5);
            let mut w = Array2::from_shape_fn((200, 120), |_| rng.normal() as f32);
            w[[3, 7]] = bad;
            let _ = svd_top(&w, 8);
        }
        let zero = Array2::<f32>::zeros((200, 120));
        let (svd, path) = svd_top(&zero, 8).unwrap();
        assert!(matches!(path, TopSvdPath::Full(_)), "{path:?}");
        assert!(svd.s.iter().all(|&s| s == 0.0));
    }
}
