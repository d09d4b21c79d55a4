//! [`block_pass`]: a product of the weight, in its own precision, with a block of
//! [`TOP_SVD_BLOCK`] f64 columns, one pass over it.

use tract_core::ndarray::ArrayView2;

use super::{BlockRow, TOP_SVD_BLOCK};

/// A product of a row-major matrix `a` `[rows, cols]`, read as f64, with a block of
/// [`TOP_SVD_BLOCK`] columns.
#[derive(Clone, Copy)]
pub(super) enum BlockOp {
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
pub(super) fn block_pass<T: Copy + Into<f64>>(
    a: ArrayView2<'_, T>,
    op: BlockOp,
    y: &[BlockRow],
    out_len: usize,
) -> Vec<BlockRow> {
    let mut out = vec![BlockRow([0.0; TOP_SVD_BLOCK]); out_len];
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
pub(super) struct BlockPass<'a, T> {
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
    // Block rows' storage: aligned to a cache line (each row's chunk starts on one
    // while the chunks are whole).
    let mut wide_rows = vec![BlockRow([0.0; TOP_SVD_BLOCK]); GROUP * CHUNK / TOP_SVD_BLOCK];
    let wide = as_f64s_mut(&mut wide_rows);
    for i0 in (0..rows).step_by(GROUP) {
        if rows - i0 >= GROUP {
            group_step::<GROUP, T>(&mut pass, i0, wide);
        } else {
            for i in i0..rows {
                group_step::<1, T>(&mut pass, i, wide);
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
    let mut t = [BlockRow([0.0; TOP_SVD_BLOCK]); R];
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

// `as_f64s_mut` and the scratch's size rely on a block row being exactly its f64s.
const _: () = assert!(std::mem::size_of::<BlockRow>() == TOP_SVD_BLOCK * 8);
const _: () = assert!((GROUP * CHUNK).is_multiple_of(TOP_SVD_BLOCK));

/// The f64s of `rows`, in order.
fn as_f64s_mut(rows: &mut [BlockRow]) -> &mut [f64] {
    // SAFETY: a BlockRow is `repr(C)` over `[f64; TOP_SVD_BLOCK]` and its size is that
    // array's (64 bytes, its alignment), so the rows are that many f64s back to back.
    unsafe { std::slice::from_raw_parts_mut(rows.as_mut_ptr().cast(), rows.len() * TOP_SVD_BLOCK) }
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
            for (t, &y) in t.iter_mut().zip(yj.iter()) {
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
    use crate::rng::Rng;
    use tract_core::ndarray::Array2;

    /// The block pass against a plain f64 product, with rows that are not a whole
    /// number of groups and columns that are not a whole number of chunks; and the
    /// instruction set the machine picks gives the portable code's bits.
    #[test]
    fn block_pass_is_the_product_with_the_same_bits_everywhere() {
        let mut rng = Rng::new(9);
        let (rows, cols) = (2 * GROUP + 3, CHUNK + 37);
        let a = Array2::from_shape_fn((rows, cols), |_| rng.normal() as f32);
        let y: Vec<BlockRow> = (0..cols)
            .map(|_| BlockRow(std::array::from_fn(|_| rng.normal())))
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
            let mut portable = vec![BlockRow([0.0; TOP_SVD_BLOCK]); expected.nrows()];
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
}
