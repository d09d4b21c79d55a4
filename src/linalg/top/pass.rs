//! [`block_pass`]: a product of the weight, in its own precision, with a block of
//! [`TOP_SVD_BLOCK`] f64 columns, one pass over it.

use faer::Mat;
use tract_core::ndarray::{ArrayView2, Axis};

#[cfg(target_arch = "x86_64")]
use super::lanes::x86;
pub use super::lanes::Stored;
use super::lanes::{lane_sum, load_wide, F64x8, Portable, LANES};
use super::TOP_SVD_BLOCK as BLOCK;

/// A product of a row-major matrix `a` `[rows, cols]`, read as f64, with a block of
/// [`TOP_SVD_BLOCK`] columns.
#[derive(Clone, Copy, Debug)]
pub(super) enum BlockOp {
    /// `aᵀa·y`, `y` `[cols]`: one pass, each group of rows' `t = a_g·y` then
    /// `z += a_gᵀ t` while the group is in cache.
    Gram,
    /// `a·y`, `y` `[cols]`.
    Times,
    /// `y − aᵀ·c`, `y` `[cols]`, each group of [`PROJECT_GROUP`] rows' `c = a_g·y`
    /// taken against `y` with the groups before it already subtracted (block modified
    /// Gram–Schmidt in one pass, where classical takes two: `c = a·y`, then `y − aᵀc`);
    /// `c` `[rows]` is kept ([`block_project`]).
    Project,
}

/// Rows of `a` a [`BlockOp::Project`] group: fixed, whatever the instruction set, as
/// it decides which subtractions a coefficient sees (and so the bits); every kernel's
/// group divides it. AVX-512's group: its running sums fill half its 32 registers.
const PROJECT_GROUP: usize = if BLOCK >= 16 { 1 } else { 16 / BLOCK };

/// `op` on `a` and `y` (`[cols, TOP_SVD_BLOCK]`). A group of rows of `a` is widened to
/// f64 as read, its dot products with each block column vectorized along the rows,
/// then (for [`BlockOp::Gram`]) read again from cache for `z += a_gᵀ t`; `y` and the
/// output stay in cache, so `a` is streamed once in its own precision (half the bytes
/// of an f64 copy for a float32 weight). With a narrow block the pass is bound by that
/// stream, not by its arithmetic; the rows two groups on are fetched to L2 in both
/// phases, so the stream goes on while the update computes from cache (a sweep that
/// took one group's dot products and the previous group's update together measured
/// 5–10 % slower).
///
/// The arithmetic is plain in a fixed order (a fused multiply-add per lane, each
/// output element's sum over rows in row order), so its bits are the same on every
/// machine; it is compiled for AVX-512, for AVX2 and portably, picked at run time;
/// only the speed differs.
pub(super) fn block_pass<T: Stored>(a: ArrayView2<'_, T>, op: BlockOp, y: &Mat<f64>) -> Mat<f64> {
    assert!(
        !matches!(op, BlockOp::Project),
        "block_project keeps the coefficients"
    );
    pass_columns(a, op, y, &mut [])
}

/// [`BlockOp::Project`] of `y` on the rows of `a`: `y` projected, and its coefficients
/// `[rows, TOP_SVD_BLOCK]`.
pub(super) fn block_project<T: Stored>(a: ArrayView2<'_, T>, y: &Mat<f64>) -> (Mat<f64>, Mat<f64>) {
    let rows = a.nrows();
    let mut coefficients = vec![0.0; rows * BLOCK];
    let projected = pass_columns(a, BlockOp::Project, y, &mut coefficients);
    (
        projected,
        Mat::from_fn(rows, BLOCK, |i, k| coefficients[k * rows + i]),
    )
}

/// [`block_pass`] (and [`block_project`], `coefficients` its `[rows]` columns back to
/// back) dispatched to the widest instruction set the CPU has.
fn pass_columns<T: Stored>(
    a: ArrayView2<'_, T>,
    op: BlockOp,
    y: &Mat<f64>,
    coefficients: &mut [f64],
) -> Mat<f64> {
    assert_eq!((y.nrows(), y.ncols()), (a.ncols(), BLOCK));
    let out_len = match op {
        BlockOp::Gram | BlockOp::Project => a.ncols(),
        BlockOp::Times => a.nrows(),
    };
    let mut out = vec![0.0; out_len * BLOCK];
    if let BlockOp::Project = op {
        for (k, out) in out.chunks_exact_mut(out_len.max(1)).enumerate() {
            out.copy_from_slice(y.col_as_slice(k));
        }
    }
    let mut pass = BlockPass::new(a, op, y, &mut out, coefficients);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            unsafe { pass_avx512(&mut pass) };
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            unsafe { pass_avx2(&mut pass) };
        } else {
            pass_portable(&mut pass);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    pass_portable(&mut pass);
    Mat::from_fn(out_len, BLOCK, |i, k| out[k * out_len + i])
}

/// [`block_pass`]'s operands: the block's columns and the output's, each contiguous
/// (and [`BlockOp::Project`]'s coefficients, `[rows]` columns back to back).
pub(super) struct BlockPass<'a, T> {
    a: ArrayView2<'a, T>,
    op: BlockOp,
    y: [&'a [f64]; BLOCK],
    out: [&'a mut [f64]; BLOCK],
    coefficients: &'a mut [f64],
}

impl<'a, T> BlockPass<'a, T> {
    /// The pass of `op` on `a` and `y`, into `out` (the output's columns back to back)
    /// and, for [`BlockOp::Project`], `coefficients` (`[rows]` columns back to back).
    fn new(
        a: ArrayView2<'a, T>,
        op: BlockOp,
        y: &'a Mat<f64>,
        out: &'a mut [f64],
        coefficients: &'a mut [f64],
    ) -> Self {
        if let BlockOp::Project = op {
            assert_eq!(coefficients.len(), a.nrows() * BLOCK);
        }
        let len = out.len() / BLOCK;
        let mut columns = out.chunks_exact_mut(len.max(1));
        BlockPass {
            a,
            op,
            y: std::array::from_fn(|k| y.col_as_slice(k)),
            out: std::array::from_fn(|_| columns.next().unwrap_or_default()),
            coefficients,
        }
    }
}

/// Rows of `a` a group with AVX-512: [`PROJECT_GROUP`]. The group size sets only which
/// rows share a sweep, never the order of any sum, so the bits do not depend on it.
const AVX512_GROUP: usize = PROJECT_GROUP;

/// Rows of `a` a group with AVX2: their running sums fill half its 16 registers.
const AVX2_GROUP: usize = group_for(4);

/// Rows of `a` a group in plain Rust: eight running sums.
const PORTABLE_GROUP: usize = group_for(8);

/// The most rows, a divisor of [`PROJECT_GROUP`], whose running sums are at most `sums`
/// (at least one row).
const fn group_for(sums: usize) -> usize {
    let mut rows = if BLOCK >= sums { 1 } else { sums / BLOCK };
    while !PROJECT_GROUP.is_multiple_of(rows) {
        rows -= 1;
    }
    rows
}

/// [`run`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn pass_avx512<T: Stored>(pass: &mut BlockPass<'_, T>) {
    // SAFETY: the caller's CPU has AVX-512F.
    unsafe { run::<x86::Avx512, AVX512_GROUP, T>(pass) }
}

/// [`run`] compiled for AVX2 ([`AVX2_GROUP`] rows a group).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pass_avx2<T: Stored>(pass: &mut BlockPass<'_, T>) {
    // SAFETY: the caller's CPU has AVX2 and FMA.
    unsafe { run::<x86::Avx2, AVX2_GROUP, T>(pass) }
}

/// [`run`] in plain Rust, [`PORTABLE_GROUP`] rows a group: the reference the vectorized passes
/// match bit for bit.
fn pass_portable<T: Stored>(pass: &mut BlockPass<'_, T>) {
    // SAFETY: `Portable`'s operations need no CPU feature.
    unsafe { run::<Portable, PORTABLE_GROUP, T>(pass) }
}

/// [`block_pass`] over groups of `GROUP` rows (the last rows one at a time).
///
/// # Safety
/// The CPU has the features `V`'s operations use.
#[inline(always)]
unsafe fn run<V: F64x8, const GROUP: usize, T: Stored>(pass: &mut BlockPass<'_, T>) {
    if let BlockOp::Project = pass.op {
        // SAFETY: the caller's.
        return unsafe { run_project::<V, GROUP, T>(pass) };
    }
    let rows = pass.a.nrows();
    for i0 in (0..rows).step_by(GROUP) {
        if rows - i0 >= GROUP {
            // SAFETY: the caller's.
            unsafe { group_step::<V, GROUP, T>(pass, i0) };
        } else {
            for i in i0..rows {
                // SAFETY: the caller's.
                unsafe { group_step::<V, 1, T>(pass, i) };
            }
        }
    }
}

/// [`BlockOp::Project`] a [`PROJECT_GROUP`] of rows at a time: their coefficients
/// against the output as it stands, in kernel groups of `GROUP` rows (the output does
/// not change between them, so they give the same bits whatever `GROUP` is), then
/// their part subtracted, in the same groups, each element's sum in row order.
///
/// # Safety
/// The CPU has the features `V`'s operations use.
#[inline(always)]
unsafe fn run_project<V: F64x8, const GROUP: usize, T: Stored>(pass: &mut BlockPass<'_, T>) {
    const { assert!(PROJECT_GROUP.is_multiple_of(GROUP)) };
    let rows = pass.a.nrows();
    for g0 in (0..rows).step_by(PROJECT_GROUP) {
        let end = (g0 + PROJECT_GROUP).min(rows);
        let mut minus_t = [[0.0; BLOCK]; PROJECT_GROUP];
        for (i0, width) in kernel_groups::<GROUP>(g0, end) {
            let y: [&[f64]; BLOCK] = std::array::from_fn(|k| &*pass.out[k]);
            // SAFETY (here and below): the caller's.
            let mut t = |r: usize, sums: &[V; BLOCK]| {
                for k in 0..BLOCK {
                    let c = lane_sum(unsafe { sums[k].lanes() });
                    pass.coefficients[k * rows + i0 + r] = c;
                    minus_t[i0 - g0 + r][k] = -c;
                }
            };
            if width == GROUP {
                let ahead = ahead_rows::<T, GROUP>(pass.a, i0);
                let sums = unsafe { rows_dot::<V, GROUP, T>(group_rows(pass.a, i0), y, ahead) };
                sums.iter().enumerate().for_each(|(r, sums)| t(r, sums));
            } else {
                let sums = unsafe { rows_dot::<V, 1, T>(group_rows(pass.a, i0), y, None) };
                t(0, &sums[0]);
            }
        }
        for (i0, width) in kernel_groups::<GROUP>(g0, end) {
            let at = i0 - g0;
            if width == GROUP {
                let t = std::array::from_fn(|r| minus_t[at + r]);
                let ahead = ahead_rows::<T, GROUP>(pass.a, i0);
                unsafe {
                    rows_axpy::<V, GROUP, T>(group_rows(pass.a, i0), t, &mut pass.out, ahead)
                };
            } else {
                unsafe {
                    rows_axpy::<V, 1, T>(group_rows(pass.a, i0), [minus_t[at]], &mut pass.out, None)
                };
            }
        }
    }
}

/// `[g0, end)` in kernel groups: `(first row, GROUP)`, then the rest one row at a time.
fn kernel_groups<const GROUP: usize>(
    g0: usize,
    end: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let whole = g0 + (end - g0) / GROUP * GROUP;
    (g0..whole)
        .step_by(GROUP)
        .map(|i| (i, GROUP))
        .chain((whole..end).map(|i| (i, 1)))
}

/// The `R` rows of `a` from `i0`.
#[inline(always)]
fn group_rows<'a, T, const R: usize>(a: ArrayView2<'a, T>, i0: usize) -> [&'a [T]; R] {
    std::array::from_fn(|r| {
        a.index_axis_move(Axis(0), i0 + r)
            .to_slice()
            .expect("a standard-layout matrix")
    })
}

/// The `R` rows of `a` two groups after `i0`, if there are so many.
#[inline(always)]
fn ahead_rows<'a, T, const R: usize>(a: ArrayView2<'a, T>, i0: usize) -> Option<[&'a [T]; R]> {
    let ahead = i0 + 2 * R;
    (ahead + R <= a.nrows()).then(|| group_rows(a, ahead))
}

/// [`BlockOp`] on the `R` rows of `pass.a` from `i0`: their dot products with the
/// block's columns (or the given ones), then (but for [`BlockOp::Times`]) their sum
/// weighted by those, the rows read again from cache.
///
/// # Safety
/// The CPU has the features `V`'s operations use.
#[inline(always)]
unsafe fn group_step<V: F64x8, const R: usize, T: Stored>(pass: &mut BlockPass<'_, T>, i0: usize) {
    let a = group_rows::<T, R>(pass.a, i0);
    // The rows two groups on, fetched into L2 as this group's are read from memory
    // and again from cache: the update reads no memory of its own, so without this
    // the stream would stall while it runs (in two passes at once on weights in
    // memory, as the graft runs them: 1.35× the throughput).
    let ahead = ahead_rows::<T, R>(pass.a, i0);
    debug_assert!(!matches!(pass.op, BlockOp::Project), "run_project's");
    // SAFETY (here and below): the caller's.
    let sums = unsafe { rows_dot::<V, R, T>(a, pass.y, ahead) };
    let t: [[f64; BLOCK]; R] =
        std::array::from_fn(|r| std::array::from_fn(|k| lane_sum(unsafe { sums[r][k].lanes() })));
    if let BlockOp::Times = pass.op {
        for (k, out) in pass.out.iter_mut().enumerate() {
            for (r, t) in t.iter().enumerate() {
                out[i0 + r] = t[k];
            }
        }
        return;
    }
    unsafe { rows_axpy::<V, R, T>(a, t, &mut pass.out, ahead) };
}

/// `a_r · y_k` for each row and block column, lane-wise (column `j` into lane
/// `j % LANES`), in column order; the `ahead` rows' cache lines fetched to L2 on the
/// way.
///
/// # Safety
/// The CPU has the features `V`'s operations use.
#[inline(always)]
unsafe fn rows_dot<V: F64x8, const R: usize, T: Stored>(
    a: [&[T]; R],
    y: [&[f64]; BLOCK],
    ahead: Option<[&[T]; R]>,
) -> [[V; BLOCK]; R] {
    let len = y[0].len();
    assert!(a.iter().all(|row| row.len() == len) && y.iter().all(|col| col.len() == len));
    // SAFETY (here and below): the caller's CPU.
    let mut sums = [[unsafe { V::zero() }; BLOCK]; R];
    let whole = len - len % LANES;
    for j in (0..whole).step_by(LANES) {
        // SAFETY: j + LANES ≤ len, every slice's length (asserted).
        unsafe {
            prefetch_lines(ahead, j);
            let yj: [V; BLOCK] = std::array::from_fn(|k| V::load(y[k].as_ptr().add(j)));
            for r in 0..R {
                let x = load_wide::<V, T>(a[r].as_ptr().add(j));
                for k in 0..BLOCK {
                    sums[r][k] = V::mul_add(x, yj[k], sums[r][k]);
                }
            }
        }
    }
    for j in whole..len {
        for r in 0..R {
            for k in 0..BLOCK {
                unsafe {
                    let mut lanes = sums[r][k].lanes();
                    lanes[j % LANES] = a[r][j].into().mul_add(y[k][j], lanes[j % LANES]);
                    sums[r][k] = V::from_lanes(lanes);
                }
            }
        }
    }
    sums
}

/// `z_k += Σ_r a_r t_rk` for each block column, each element's sum in row order; the
/// `ahead` rows' cache lines fetched to L2 on the way.
///
/// # Safety
/// The CPU has the features `V`'s operations use.
#[inline(always)]
unsafe fn rows_axpy<V: F64x8, const R: usize, T: Stored>(
    a: [&[T]; R],
    t: [[f64; BLOCK]; R],
    z: &mut [&mut [f64]; BLOCK],
    ahead: Option<[&[T]; R]>,
) {
    let len = z[0].len();
    assert!(a.iter().all(|row| row.len() == len) && z.iter().all(|col| col.len() == len));
    let whole = len - len % LANES;
    // SAFETY (the loop): the caller's CPU.
    let t_wide: [[V; BLOCK]; R] = t.map(|t| t.map(|t| unsafe { V::splat(t) }));
    for j in (0..whole).step_by(LANES) {
        // SAFETY: j + LANES ≤ len, every slice's length (asserted); the caller's CPU.
        unsafe {
            prefetch_lines(ahead, j);
            let mut s: [V; BLOCK] = std::array::from_fn(|k| V::load(z[k].as_ptr().add(j)));
            for r in 0..R {
                let x = load_wide::<V, T>(a[r].as_ptr().add(j));
                for k in 0..BLOCK {
                    s[k] = V::mul_add(x, t_wide[r][k], s[k]);
                }
            }
            for k in 0..BLOCK {
                s[k].store(z[k].as_mut_ptr().add(j));
            }
        }
    }
    for j in whole..len {
        for k in 0..BLOCK {
            let mut s = z[k][j];
            for r in 0..R {
                s = a[r][j].into().mul_add(t[r][k], s);
            }
            z[k][j] = s;
        }
    }
}

/// Asks for the `ahead` rows' cache lines at column `j` in the L2 cache, once a line
/// (when `j` starts one): a hint, which never faults (no effect off x86-64).
#[inline(always)]
fn prefetch_lines<T, const R: usize>(ahead: Option<[&[T]; R]>, j: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(ahead) = ahead {
        if (j * std::mem::size_of::<T>()).is_multiple_of(64) {
            for row in ahead {
                // SAFETY: a prefetch never faults (the address is in the row, or
                // one past it), and SSE is in every x86-64 CPU.
                unsafe {
                    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                    _mm_prefetch::<_MM_HINT_T1>(row.as_ptr().wrapping_add(j).cast());
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ahead, j);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use tract_core::ndarray::Array2;

    /// The block pass against a plain f64 product (and the projection against block
    /// modified Gram–Schmidt, its coefficients too), with rows that are not a whole
    /// number of groups and columns that are not a whole number of chunks or lanes;
    /// and every instruction set this machine has gives the portable code's bits.
    #[test]
    fn block_pass_is_the_product_with_the_same_bits_everywhere() {
        let mut rng = Rng::new(9);
        let (rows, cols) = (PROJECT_GROUP + 3, 8 * LANES + 5);
        let a = Array2::from_shape_fn((rows, cols), |_| rng.normal() as f32);
        let y = Mat::from_fn(cols, BLOCK, |_, _| rng.normal());
        let a64 = a.mapv(f64::from);
        let y64 = Array2::from_shape_fn((cols, BLOCK), |(i, k)| y[(i, k)]);
        let times = a64.dot(&y64);
        let gram = a64.t().dot(&times);
        // Each group's coefficients against y less the groups before it.
        let mut projected = y64.clone();
        let mut coefficients = Array2::zeros((rows, BLOCK));
        for g0 in (0..rows).step_by(PROJECT_GROUP) {
            let group = a64.slice(tract_core::ndarray::s![
                g0..(g0 + PROJECT_GROUP).min(rows),
                ..
            ]);
            let c = group.dot(&projected);
            projected -= &group.t().dot(&c);
            coefficients
                .slice_mut(tract_core::ndarray::s![g0..g0 + c.nrows(), ..])
                .assign(&c);
        }
        let project = tract_core::ndarray::concatenate![
            tract_core::ndarray::Axis(0),
            projected,
            coefficients
        ];
        for (op, expected) in [
            (BlockOp::Times, &times),
            (BlockOp::Gram, &gram),
            (BlockOp::Project, &project),
        ] {
            let got = match op {
                BlockOp::Project => {
                    let (projected, coefficients) = block_project(a.view(), &y);
                    Mat::from_fn(cols + rows, BLOCK, |i, k| {
                        if i < cols {
                            projected[(i, k)]
                        } else {
                            coefficients[(i - cols, k)]
                        }
                    })
                }
                _ => block_pass(a.view(), op, &y),
            };
            let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for ((i, k), e) in expected.indexed_iter() {
                let d = (got[(i, k)] - e).abs();
                assert!(d <= 1e-12 * scale, "{op:?} {i},{k}: {d:e}");
            }
            // The output's columns, then (projecting) the coefficients', back to back.
            let run = |pass: fn(&mut BlockPass<'_, f32>)| {
                let out_len = if let BlockOp::Times = op { rows } else { cols };
                let mut out = vec![0.0; out_len * BLOCK];
                let mut coefficients = vec![
                    0.0;
                    if let BlockOp::Project = op {
                        rows * BLOCK
                    } else {
                        0
                    }
                ];
                if let BlockOp::Project = op {
                    for (k, out) in out.chunks_exact_mut(cols).enumerate() {
                        out.copy_from_slice(y.col_as_slice(k));
                    }
                }
                pass(&mut BlockPass::new(
                    a.view(),
                    op,
                    &y,
                    &mut out,
                    &mut coefficients,
                ));
                out.extend(coefficients);
                out
            };
            let portable = run(pass_portable);
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    let avx512 = run(|p| unsafe { pass_avx512(p) });
                    assert!(avx512 == portable, "{op:?}: AVX-512's bits differ");
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    let avx2 = run(|p| unsafe { pass_avx2(p) });
                    assert!(avx2 == portable, "{op:?}: AVX2's bits differ");
                }
            }
            let out_rows = match op {
                BlockOp::Times => rows,
                _ => cols,
            };
            let dispatched: Vec<f64> = (0..BLOCK)
                .flat_map(|k| (0..out_rows).map(move |i| (i, k)))
                .chain(
                    (0..BLOCK)
                        .flat_map(|k| (cols..expected.nrows()).map(move |i| (i, k)))
                        .filter(|_| matches!(op, BlockOp::Project)),
                )
                .map(|(i, k)| got[(i, k)])
                .collect();
            assert!(
                dispatched == portable,
                "{op:?}: the dispatched pass's bits differ"
            );
        }
    }
}
