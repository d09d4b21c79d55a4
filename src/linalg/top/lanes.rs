//! Eight f64 lanes, in plain Rust, AVX-512 and AVX2, that the pass over the weight
//! ([`super::pass`]) computes in, and the element types it widens into them.

/// f64 lanes of a row's running dot products (one 512-bit vector, two 256-bit ones):
/// column `j` adds to lane `j % LANES`, and the lanes are summed in one fixed tree.
pub(super) const LANES: usize = 8;

/// The lanes of a running dot product summed in one fixed tree.
#[inline(always)]
pub(super) fn lane_sum(l: [f64; LANES]) -> f64 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// A weight's element type [`super::pass::block_pass`] reads (f32 or f64), widened to f64 as read.
pub trait Stored: Copy + Default + Into<f64> + sealed::Sealed {}

impl Stored for f32 {}
impl Stored for f64 {}

mod sealed {
    /// Only the element types [`super::Stored`] is written for.
    pub trait Sealed {
        /// f32 (else f64).
        const IS_F32: bool;
    }
    impl Sealed for f32 {
        const IS_F32: bool = true;
    }
    impl Sealed for f64 {
        const IS_F32: bool = false;
    }
}

/// The eight elements of `T` from `p`, as f64.
///
/// # Safety
/// `p` points at eight elements; the CPU has the features `V`'s operations use.
#[inline(always)]
pub(super) unsafe fn load_wide<V: F64x8, T: Stored>(p: *const T) -> V {
    // SAFETY: the caller's; `T` is f32 or f64 as `IS_F32` says (the trait is sealed).
    unsafe {
        if T::IS_F32 {
            V::load_f32(p.cast())
        } else {
            V::load(p.cast())
        }
    }
}

/// Eight f64 lanes, each operation lane by lane (a multiply-add fused), in some
/// instruction set.
pub(super) trait F64x8: Copy {
    /// All zeros.
    unsafe fn zero() -> Self;
    /// `x` in every lane.
    unsafe fn splat(x: f64) -> Self;
    /// The eight f64 from `p`.
    unsafe fn load(p: *const f64) -> Self;
    /// The eight f32 from `p`, widened.
    unsafe fn load_f32(p: *const f32) -> Self;
    /// The lanes to `p`.
    unsafe fn store(self, p: *mut f64);
    /// `a·b + c`, rounded once.
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    /// The lanes, in order.
    unsafe fn lanes(self) -> [f64; LANES];
    /// The vector of these lanes.
    unsafe fn from_lanes(lanes: [f64; LANES]) -> Self;
}

/// [`F64x8`] in plain Rust.
#[derive(Clone, Copy)]
pub(super) struct Portable([f64; LANES]);

impl F64x8 for Portable {
    unsafe fn zero() -> Self {
        Portable([0.0; LANES])
    }
    unsafe fn splat(x: f64) -> Self {
        Portable([x; LANES])
    }
    unsafe fn load(p: *const f64) -> Self {
        // SAFETY: the caller's: p points at LANES f64.
        Portable(unsafe { p.cast::<[f64; LANES]>().read_unaligned() })
    }
    unsafe fn load_f32(p: *const f32) -> Self {
        // SAFETY: the caller's: p points at LANES f32.
        let narrow = unsafe { p.cast::<[f32; LANES]>().read_unaligned() };
        Portable(narrow.map(f64::from))
    }
    unsafe fn store(self, p: *mut f64) {
        // SAFETY: as load.
        unsafe { p.cast::<[f64; LANES]>().write_unaligned(self.0) }
    }
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Portable(std::array::from_fn(|l| a.0[l].mul_add(b.0[l], c.0[l])))
    }
    unsafe fn lanes(self) -> [f64; LANES] {
        self.0
    }
    unsafe fn from_lanes(lanes: [f64; LANES]) -> Self {
        Portable(lanes)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    //! [`super::F64x8`] in AVX-512 (one vector) and AVX2 (two).
    use std::arch::x86_64::*;

    use super::{F64x8, LANES};

    /// One 512-bit vector.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Avx512(__m512d);

    impl F64x8 for Avx512 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn zero() -> Self {
            Avx512(_mm512_setzero_pd())
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn splat(x: f64) -> Self {
            Avx512(_mm512_set1_pd(x))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load(p: *const f64) -> Self {
            // SAFETY: the caller's: p points at LANES f64.
            Avx512(unsafe { _mm512_loadu_pd(p) })
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load_f32(p: *const f32) -> Self {
            // SAFETY: the caller's: p points at LANES f32.
            Avx512(_mm512_cvtps_pd(unsafe { _mm256_loadu_ps(p) }))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn store(self, p: *mut f64) {
            // SAFETY: as load.
            unsafe { _mm512_storeu_pd(p, self.0) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            Avx512(_mm512_fmadd_pd(a.0, b.0, c.0))
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn lanes(self) -> [f64; LANES] {
            let mut lanes = [0.0; LANES];
            // SAFETY: lanes holds LANES f64.
            unsafe { _mm512_storeu_pd(lanes.as_mut_ptr(), self.0) };
            lanes
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn from_lanes(lanes: [f64; LANES]) -> Self {
            // SAFETY: as lanes.
            Avx512(unsafe { _mm512_loadu_pd(lanes.as_ptr()) })
        }
    }

    /// Two 256-bit vectors, lanes 0–3 and 4–7.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Avx2(__m256d, __m256d);

    impl F64x8 for Avx2 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_pd(), _mm256_setzero_pd())
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn splat(x: f64) -> Self {
            Avx2(_mm256_set1_pd(x), _mm256_set1_pd(x))
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load(p: *const f64) -> Self {
            // SAFETY: the caller's: p points at LANES f64.
            unsafe { Avx2(_mm256_loadu_pd(p), _mm256_loadu_pd(p.add(4))) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load_f32(p: *const f32) -> Self {
            // SAFETY: the caller's: p points at LANES f32.
            let narrow = unsafe { _mm256_loadu_ps(p) };
            Avx2(
                _mm256_cvtps_pd(_mm256_castps256_ps128(narrow)),
                _mm256_cvtps_pd(_mm256_extractf128_ps(narrow, 1)),
            )
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn store(self, p: *mut f64) {
            // SAFETY: as load.
            unsafe {
                _mm256_storeu_pd(p, self.0);
                _mm256_storeu_pd(p.add(4), self.1);
            }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            Avx2(
                _mm256_fmadd_pd(a.0, b.0, c.0),
                _mm256_fmadd_pd(a.1, b.1, c.1),
            )
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn lanes(self) -> [f64; LANES] {
            let mut lanes = [0.0; LANES];
            // SAFETY: lanes holds LANES f64.
            unsafe { self.store(lanes.as_mut_ptr()) };
            lanes
        }
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn from_lanes(lanes: [f64; LANES]) -> Self {
            // SAFETY: as lanes.
            unsafe { Self::load(lanes.as_ptr()) }
        }
    }
}
