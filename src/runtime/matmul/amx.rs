//! f32 matrix products on AMX tiles (Intel's bf16 tile multiply-add), to f32 accuracy.
//!
//! Each f32 is split into three bf16 parts, `x = x0 + x1 + x2` (8 significant bits each,
//! f32's 24; every rest is exact in f32), and `A·B` sums the six part products down to
//! 2⁻¹⁶ of the leading one, `a0·b0 + a0·b1 + a0·b2 + a1·b0 + a1·b1 + a2·b0`, in the
//! tiles' f32 accumulators (each bf16 product is exact in f32). What is left out,
//! `a1·b2 + a2·b1 + a2·b2`, is below 3·2⁻²⁴ of `|a||b|`: f32's own rounding of each
//! term. A tile multiply-add does 512 bf16 multiply-adds a cycle, so the six products
//! still cost 0.375 of one f32 product on AVX-512's 32 a cycle.
//!
//! Operands are packed once per call into tiles of 16 rows of 64 bytes (A: 16 rows × 32
//! k; B: 16 k pairs × 16 columns, pairs interleaved as the instruction reads them), zero
//! padded to whole tiles; C is computed in blocks of 32 × 32 (four accumulator tiles)
//! over chunks of k that keep B's chunk in L2, into a scratch buffer, then scaled and
//! written (or added) through C's strides. Linux grants the tiles' register state per
//! process ([`cpu_has_tiles`] asks); elsewhere products stay on faer. Off unless asked
//! for ([`available`]).

use faer::{Accum, MatMut, MatRef};
use std::arch::asm;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Rows of every tile (and f32 columns of an accumulator tile).
const ROWS: usize = 16;
/// Summed terms one tile row holds (32 bf16: 64 bytes).
const K_STEP: usize = 32;
/// bf16 parts per f32.
const PARTS: usize = 3;
/// The part products summed, (A's part, B's part), grouped by A's part so that its
/// tiles load once per group.
const PRODUCTS: [(usize, usize); 6] = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)];
/// Bytes of B's packed chunk of k (all its columns in a column group) kept in L2.
const B_CHUNK_BYTES: usize = 768 << 10;
/// Columns of C per group (B's columns whose chunk of k stays in L2 while A streams).
const COLUMN_GROUP: usize = 512;

/// The smallest product worth the tiles: below it packing costs more than it saves.
pub(super) fn worth(m: usize, n: usize, k: usize) -> bool {
    m >= 32 && n >= 32 && k >= 64 && m * n * k >= 1 << 20 && available()
}

/// Whether products go to the tiles: asked for with `LORA_GRAFT_MATMUL=amx` and
/// [`cpu_has_tiles`] (read once). Opt-in: the kernel passes its accuracy tests on
/// Sapphire Rapids, but the whole suite and the training benchmark have not yet run on
/// it there.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var_os("LORA_GRAFT_MATMUL").is_some_and(|v| v == "amx") && cpu_has_tiles()
    })
}

/// Whether this CPU has AMX tiles with bf16 and the OS lets this process use them.
pub fn cpu_has_tiles() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    #[allow(unused_unsafe)]
    let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a request for a permission; it touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

/// One 64-byte tile row.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u16; K_STEP]);

/// The tile configuration `ldtilecfg` reads (palette 1): eight tiles of 16 × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// `x` rounded to the nearest bf16 (ties to even); NaN stays NaN.
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return (bits >> 16) as u16 | 0x40;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 a bf16 stands for.
#[inline(always)]
fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x`'s three bf16 parts, largest first; an infinite or NaN `x` is its first part.
#[inline(always)]
fn split(x: f32) -> [u16; PARTS] {
    let x0 = to_bf16(x);
    if !x.is_finite() {
        return [x0, 0, 0];
    }
    let rest = x - from_bf16(x0);
    let x1 = to_bf16(rest);
    [x0, x1, to_bf16(rest - from_bf16(x1))]
}

/// An operand packed into tiles: `(part, block, step)` is 16 lines at
/// `((part · blocks + block) · steps + step) · 16`.
struct Packed<'a> {
    lines: &'a mut [Line],
    blocks: usize,
    steps: usize,
}

impl Packed<'_> {
    fn tile(&self, part: usize, block: usize, step: usize) -> *const Line {
        &self.lines[((part * self.blocks + block) * self.steps + step) * ROWS]
    }
}

/// Reusable buffers of one thread: packed A, packed B, C's scratch.
#[derive(Default)]
struct Scratch {
    a: Vec<Line>,
    b: Vec<Line>,
    c: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// A `len`-long slice of `buf`, grown (never shrunk) to fit.
fn grown<T: Copy>(buf: &mut Vec<T>, len: usize, zero: T) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, zero);
    }
    &mut buf[..len]
}

/// Packs A (`m × k`) as `blocks` row blocks of 16 by `steps` steps of 32 k, zero padded.
fn pack_a<'a>(
    a: MatRef<'_, f32>,
    lines: &'a mut [Line],
    blocks: usize,
    steps: usize,
) -> Packed<'a> {
    let (m, k) = (a.nrows(), a.ncols());
    let packed = Packed {
        lines,
        blocks,
        steps,
    };
    for i in 0..blocks * ROWS {
        let (block, row) = (i / ROWS, i % ROWS);
        for step in 0..steps {
            let mut parts = [[0u16; K_STEP]; PARTS];
            if i < m {
                for (c, l) in (step * K_STEP..k.min((step + 1) * K_STEP)).enumerate() {
                    // SAFETY: i < m and l < k.
                    let x = unsafe { *a.get_unchecked(i, l) };
                    let [x0, x1, x2] = split(x);
                    (parts[0][c], parts[1][c], parts[2][c]) = (x0, x1, x2);
                }
            }
            for (p, line) in parts.into_iter().enumerate() {
                packed.lines[((p * blocks + block) * steps + step) * ROWS + row] = Line(line);
            }
        }
    }
    packed
}

/// Packs B (`k × n`) as `blocks` column blocks of 16 by `steps` steps of 32 k: a tile's
/// line `r` holds, for each of its columns `j`, the pair `B[2r][j], B[2r + 1][j]`.
fn pack_b<'a>(
    b: MatRef<'_, f32>,
    lines: &'a mut [Line],
    blocks: usize,
    steps: usize,
) -> Packed<'a> {
    let (k, n) = (b.nrows(), b.ncols());
    let packed = Packed {
        lines,
        blocks,
        steps,
    };
    for block in 0..blocks {
        for step in 0..steps {
            for pair in 0..ROWS {
                let mut parts = [[0u16; K_STEP]; PARTS];
                for half in 0..2 {
                    let l = step * K_STEP + 2 * pair + half;
                    if l >= k {
                        continue;
                    }
                    for c in 0..ROWS.min(n.saturating_sub(block * ROWS)) {
                        // SAFETY: l < k and block · 16 + c < n.
                        let x = unsafe { *b.get_unchecked(l, block * ROWS + c) };
                        let [x0, x1, x2] = split(x);
                        let at = 2 * c + half;
                        (parts[0][at], parts[1][at], parts[2][at]) = (x0, x1, x2);
                    }
                }
                for (p, line) in parts.into_iter().enumerate() {
                    packed.lines[((p * blocks + block) * steps + step) * ROWS + pair] = Line(line);
                }
            }
        }
    }
    packed
}

/// Loads tile register `$t` from 16 rows `$stride` bytes apart at `$at`.
macro_rules! tile_load {
    ($t:literal, $at:expr, $stride:expr) => {
        asm!(
            concat!("tileloadd tmm", $t, ", [{0} + {1}*1]"),
            in(reg) $at,
            in(reg) $stride,
            options(nostack, readonly, preserves_flags)
        )
    };
}

/// Stores tile register `$t` as 16 rows `$stride` bytes apart at `$at`.
macro_rules! tile_store {
    ($t:literal, $at:expr, $stride:expr) => {
        asm!(
            concat!("tilestored [{0} + {1}*1], tmm", $t),
            in(reg) $at,
            in(reg) $stride,
            options(nostack, preserves_flags)
        )
    };
}

/// `C = alpha·A·B`, or `C += alpha·A·B` with [`Accum::Add`], on AMX tiles.
///
/// # Safety
///
/// [`available`] must have returned true; `c`, `a` and `b` must not alias.
pub(super) unsafe fn matmul(
    c: MatMut<'_, f32>,
    accum: Accum,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    alpha: f32,
) {
    // SAFETY: the caller's contract.
    unsafe { packed_product(c, accum, a, b, alpha, multiply) }
}

/// The tiles' kernel: `c = a·b` on packed operands, `c` row-major `width` floats a row.
type Kernel = unsafe fn(&Packed, &Packed, &mut [f32], usize);

/// [`matmul`] with the kernel given: A and B packed, `kernel` run on them, C written.
///
/// # Safety
///
/// `kernel`'s own contract.
unsafe fn packed_product(
    c: MatMut<'_, f32>,
    accum: Accum,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    alpha: f32,
    kernel: Kernel,
) {
    let (m, n, k) = (a.nrows(), b.ncols(), a.ncols());
    debug_assert!(b.nrows() == k && c.nrows() == m && c.ncols() == n);
    // Whole pairs of tiles: the kernel computes 32 × 32 blocks of C.
    let row_blocks = m.div_ceil(2 * ROWS) * 2;
    let col_blocks = n.div_ceil(2 * ROWS) * 2;
    let steps = k.div_ceil(K_STEP);
    let width = col_blocks * ROWS;
    SCRATCH.with_borrow_mut(|scratch| {
        let line = Line([0; K_STEP]);
        let pa = pack_a(
            a,
            grown(&mut scratch.a, PARTS * row_blocks * steps * ROWS, line),
            row_blocks,
            steps,
        );
        let pb = pack_b(
            b,
            grown(&mut scratch.b, PARTS * col_blocks * steps * ROWS, line),
            col_blocks,
            steps,
        );
        let sc = grown(&mut scratch.c, row_blocks * ROWS * width, 0.0);
        // SAFETY: the caller's contract (tiles available); the packs and the scratch
        // hold every tile addressed.
        unsafe { kernel(&pa, &pb, sc, width) };
        let mut c = c;
        for j in 0..n {
            for i in 0..m {
                let v = alpha * sc[i * width + j];
                // SAFETY: i < m, j < n.
                let dst = unsafe { c.as_mut().get_mut_unchecked(i, j) };
                *dst = match accum {
                    Accum::Replace => v,
                    Accum::Add => *dst + v,
                };
            }
        }
    });
}

/// `c = a·b` on tiles, `c` row-major `width` floats a row (whole tiles).
///
/// # Safety
///
/// The tiles must be available to this process.
unsafe fn multiply(a: &Packed, b: &Packed, c: &mut [f32], width: usize) {
    let config = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };
    let line = std::mem::size_of::<Line>();
    let c_stride = width * std::mem::size_of::<f32>();
    let group_blocks = COLUMN_GROUP / ROWS;
    debug_assert!(c.len() >= a.blocks * ROWS * width && width >= b.blocks * ROWS);
    let base = c.as_mut_ptr();
    let chunk = (B_CHUNK_BYTES / (PARTS * group_blocks * ROWS * line)).clamp(1, a.steps);
    // SAFETY (every asm! below): the configuration is valid for palette 1; each load
    // reads a whole packed tile (16 lines) or 16 rows of C's scratch inside `c`, each
    // store writes 16 rows inside `c`.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &config, options(nostack, readonly));
        for group in (0..b.blocks).step_by(group_blocks) {
            let group_end = b.blocks.min(group + group_blocks);
            for first in (0..a.steps).step_by(chunk) {
                let last = a.steps.min(first + chunk);
                for rb in (0..a.blocks).step_by(2) {
                    for cb in (group..group_end).step_by(2) {
                        let at = |r: usize, col: usize| {
                            base.add((rb + r) * ROWS * width + (cb + col) * ROWS)
                        };
                        let (c00, c01, c10, c11) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
                        if first == 0 {
                            asm!(
                                "tilezero tmm0",
                                "tilezero tmm1",
                                "tilezero tmm2",
                                "tilezero tmm3",
                                options(nomem, nostack, preserves_flags)
                            );
                        } else {
                            tile_load!("0", c00, c_stride);
                            tile_load!("1", c01, c_stride);
                            tile_load!("2", c10, c_stride);
                            tile_load!("3", c11, c_stride);
                        }
                        for step in first..last {
                            let mut loaded_a = usize::MAX;
                            for &(part_a, part_b) in &PRODUCTS {
                                if part_a != loaded_a {
                                    tile_load!("4", a.tile(part_a, rb, step), line);
                                    tile_load!("5", a.tile(part_a, rb + 1, step), line);
                                    loaded_a = part_a;
                                }
                                tile_load!("6", b.tile(part_b, cb, step), line);
                                tile_load!("7", b.tile(part_b, cb + 1, step), line);
                                asm!(
                                    "tdpbf16ps tmm0, tmm4, tmm6",
                                    "tdpbf16ps tmm1, tmm4, tmm7",
                                    "tdpbf16ps tmm2, tmm5, tmm6",
                                    "tdpbf16ps tmm3, tmm5, tmm7",
                                    options(nomem, nostack, preserves_flags)
                                );
                            }
                        }
                        tile_store!("0", c00, c_stride);
                        tile_store!("1", c01, c_stride);
                        tile_store!("2", c10, c_stride);
                        tile_store!("3", c11, c_stride);
                    }
                }
            }
        }
        asm!("tilerelease", options(nomem, nostack, preserves_flags));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;

    /// `|C − A·B|` at its largest, against the f64 product, over `|A|·|B|` there.
    fn relative_error(c: MatRef<f32>, a: MatRef<f32>, b: MatRef<f32>) -> f64 {
        let mut worst = 0f64;
        for i in 0..a.nrows() {
            for j in 0..b.ncols() {
                let (mut exact, mut size) = (0f64, 0f64);
                for l in 0..a.ncols() {
                    let t = a[(i, l)] as f64 * b[(l, j)] as f64;
                    exact += t;
                    size += t.abs();
                }
                worst = worst.max((c[(i, j)] as f64 - exact).abs() / size.max(f64::MIN_POSITIVE));
            }
        }
        worst
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Mat<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        Mat::from_fn(rows, cols, |_, _| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Values over several binades, both signs.
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            unit * (1 << (state % 7)) as f32
        })
    }

    /// `ours` (= A·B) is as accurate as faer's f32 product, both against f64: within
    /// twice faer's error and f32's unit (the six part products drop terms below 2⁻²⁴).
    fn assert_as_accurate_as_faer(what: &str, ours: MatRef<f32>, a: MatRef<f32>, b: MatRef<f32>) {
        let mut faer = Mat::<f32>::zeros(a.nrows(), b.ncols());
        faer::linalg::matmul::matmul(faer.as_mut(), Accum::Replace, a, b, 1.0, faer::Par::Seq);
        let (e_ours, e_faer) = (
            relative_error(ours, a, b),
            relative_error(faer.as_ref(), a, b),
        );
        let (m, k, n) = (a.nrows(), a.ncols(), b.ncols());
        assert!(
            e_ours <= 2.0 * e_faer + 6e-8,
            "{m}x{n}x{k}: {what} {e_ours:e}, faer {e_faer:e}"
        );
    }

    /// The tiles' product is as accurate as faer's f32 product (both against f64, within
    /// twice faer's error and f32's unit: the six part products drop terms below 2⁻²⁴),
    /// on shapes that are not whole tiles, operands read through strides (B transposed),
    /// and with `alpha` and [`Accum::Add`].
    #[test]
    #[ignore = "needs an AMX CPU (Sapphire Rapids or later): cargo test --release -- --ignored tiles_give"]
    fn tiles_give_f32_accuracy_on_ragged_strided_shapes() {
        assert!(
            cpu_has_tiles(),
            "no AMX tiles here (CPUID or arch_prctl said no)"
        );
        for (m, n, k) in [(32, 32, 64), (100, 70, 333), (257, 129, 512), (64, 600, 96)] {
            let a = random(m, k, 1 + m as u64);
            let bt = random(n, k, 2 + n as u64);
            let b = bt.transpose();
            let mut ours = Mat::<f32>::zeros(m, n);
            unsafe { matmul(ours.as_mut(), Accum::Replace, a.as_ref(), b, 1.0) };
            assert_as_accurate_as_faer("tiles", ours.as_ref(), a.as_ref(), b);
            // alpha and Add: C = C + 0.5·A·B, twice: A·B again.
            let mut twice = ours.clone();
            unsafe { matmul(twice.as_mut(), Accum::Add, a.as_ref(), b, 0.5) };
            unsafe { matmul(twice.as_mut(), Accum::Add, a.as_ref(), b, -0.5) };
            let drift = (0..m)
                .flat_map(|i| (0..n).map(move |j| (i, j)))
                .map(|(i, j)| (twice[(i, j)] - ours[(i, j)]).abs())
                .fold(0f32, f32::max);
            let scale = ours.norm_max();
            assert!(
                drift <= 4.0 * f32::EPSILON * scale,
                "{m}x{n}x{k}: Add drifts {drift}"
            );
        }
    }

    /// `tdpbf16ps` in plain Rust over the same packed tiles and the same order of
    /// products: `C[i][j] += Σ_p A[i][2p]·B[p][2j] + A[i][2p+1]·B[p][2j+1]` per tile.
    unsafe fn multiply_emulated(a: &Packed, b: &Packed, c: &mut [f32], width: usize) {
        c[..a.blocks * ROWS * width].fill(0.0);
        for step in 0..a.steps {
            for &(part_a, part_b) in &PRODUCTS {
                for rb in 0..a.blocks {
                    for cb in 0..b.blocks {
                        let (ta, tb) = (a.tile(part_a, rb, step), b.tile(part_b, cb, step));
                        for i in 0..ROWS {
                            // SAFETY: a tile is 16 lines inside its pack.
                            let row = unsafe { &(*ta.add(i)).0 };
                            for j in 0..ROWS {
                                let mut sum = c[(rb * ROWS + i) * width + cb * ROWS + j];
                                for p in 0..ROWS {
                                    // SAFETY: as above.
                                    let pair = unsafe { &(*tb.add(p)).0 };
                                    sum += from_bf16(row[2 * p]) * from_bf16(pair[2 * j]);
                                    sum += from_bf16(row[2 * p + 1]) * from_bf16(pair[2 * j + 1]);
                                }
                                c[(rb * ROWS + i) * width + cb * ROWS + j] = sum;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The packing, the padding to whole tiles and the write of C through its strides,
    /// on every machine: the tiles' instruction emulated, the product is as accurate as
    /// faer's on ragged shapes and transposed operands.
    #[test]
    fn packed_tiles_hold_the_product_on_every_machine() {
        for (m, n, k) in [(32, 32, 64), (37, 21, 70), (5, 50, 3)] {
            let a = random(m, k, 3 + m as u64);
            let bt = random(n, k, 4 + n as u64);
            let b = bt.transpose();
            let mut ours = Mat::<f32>::full(m, n, 9.0);
            unsafe {
                packed_product(
                    ours.as_mut(),
                    Accum::Replace,
                    a.as_ref(),
                    b,
                    1.0,
                    multiply_emulated,
                )
            };
            assert_as_accurate_as_faer("packed", ours.as_ref(), a.as_ref(), b);
        }
    }

    /// Every f32 is the exact sum of its three parts, down to f32's last bit, and
    /// non-finite values keep their class.
    #[test]
    fn three_bf16_parts_add_up_to_the_f32() {
        let mut state = 7u32;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let x = f32::from_bits(state);
            if !x.is_finite() || x.abs() > 1e38 || x.abs() < 1e-30 {
                continue;
            }
            let [x0, x1, x2] = split(x);
            let sum = from_bf16(x0) as f64 + from_bf16(x1) as f64 + from_bf16(x2) as f64;
            assert_eq!(sum, x as f64, "{x:e}");
        }
        assert!(from_bf16(split(f32::NAN)[0]).is_nan());
        assert_eq!(split(f32::INFINITY), [0x7f80, 0, 0]);
    }
}
