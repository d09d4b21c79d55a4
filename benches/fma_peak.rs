//! The arithmetic ceiling of one core, for `train_bench.sh`'s GFLOP/s figures: the f32
//! multiply-add rate with the widest vectors the core has (16 independent chains, no
//! memory), and faer's f32 product on hot 512 × 512 × 512 operands (the kernel's own
//! peak). Medians of 7 runs, one thread.
//!
//!     cargo bench --bench fma_peak

use std::time::Instant;

/// The median GFLOP/s of 7 runs of `f`, which does `flop` floating-point operations.
fn median_rate(flop: f64, mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let mut rates: Vec<f64> = (0..7)
        .map(|_| {
            let start = Instant::now();
            f();
            flop / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[3]
}

/// `iters` rounds of 16 independent 16-lane multiply-adds; a value so that the loop is
/// kept.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_avx512(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(0.0); 16];
    let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999));
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
}

/// As [`fma_avx512`] with 8-lane vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_avx2(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); 16];
    let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999));
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut lanes = [0f32; 8];
    acc.iter()
        .map(|&x| {
            // SAFETY: `lanes` holds the 8 floats an unaligned store writes.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), x) };
            lanes.iter().sum::<f32>()
        })
        .sum()
}

/// The multiply-add peak: the instruction set used and its GFLOP/s.
fn fma_peak() -> Option<(&'static str, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        let iters = 20_000_000;
        if std::arch::is_x86_feature_detected!("avx512f") {
            let flop = (iters * 16 * 16 * 2) as f64;
            // SAFETY: the CPU has AVX-512F (checked above).
            let rate = median_rate(flop, || {
                std::hint::black_box(unsafe { fma_avx512(std::hint::black_box(iters)) });
            });
            return Some(("AVX-512", rate));
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            let flop = (iters * 16 * 8 * 2) as f64;
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            let rate = median_rate(flop, || {
                std::hint::black_box(unsafe { fma_avx2(std::hint::black_box(iters)) });
            });
            return Some(("AVX2", rate));
        }
    }
    None
}

fn main() {
    match fma_peak() {
        Some((isa, rate)) => println!("fma peak: {rate:.0} GFLOP/s a core ({isa}, f32)"),
        None => println!("fma peak: not measured (no x86 FMA on this machine)"),
    }
    let n = 512;
    let a = faer::Mat::<f32>::from_fn(n, n, |i, j| ((i * 7 + j * 3) % 11) as f32 * 0.1);
    let b = faer::Mat::<f32>::from_fn(n, n, |i, j| ((i * 5 + j * 3) % 13) as f32 * 0.1);
    let mut c = faer::Mat::<f32>::zeros(n, n);
    let rate = median_rate(2.0 * (n * n * n) as f64, || {
        for _ in 0..10 {
            faer::linalg::matmul::matmul(
                c.as_mut(),
                faer::Accum::Replace,
                a.as_ref(),
                b.as_ref(),
                1.0,
                faer::Par::Seq,
            );
        }
    }) * 10.0;
    println!("faer f32 product 512 x 512 x 512, hot: {rate:.0} GFLOP/s a core");
    for (m, k, n) in [
        (512, 512, 512),
        (1024, 512, 512),
        (512, 512, 1376),
        (512, 1376, 512),
    ] {
        let a = faer::Mat::<f32>::from_fn(m, k, |i, j| ((i * 7 + j * 3) % 11) as f32 * 0.1);
        let b = faer::Mat::<f32>::from_fn(k, n, |i, j| ((i * 5 + j * 3) % 13) as f32 * 0.1);
        let mut c = faer::Mat::<f32>::zeros(m, n);
        let rate = median_rate(2.0 * (m * n * k) as f64, || {
            lora_graft::runtime::product_f32(c.as_mut(), a.as_ref(), b.as_ref())
        });
        println!("training kernel f32 product {m} x {k} x {n}, hot: {rate:.0} GFLOP/s a core");
    }
}
