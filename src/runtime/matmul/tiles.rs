//! How [`super::matmul::FaerMatMul`] cuts one matrix product `C = A·B` into faer calls:
//! blocks of columns, or, where an operand's rows are zero at the ends of the sum,
//! blocks that sum only where they are not.
//!
//! A causal attention's probabilities are exact zeros above the diagonal (the mask's
//! `exp(min)` underflows), and so is their gradient (`P ⊙ (dP − ·)`): the products
//! `P·V`, `Pᵀ·dO`, `dS·K` and `dSᵀ·Q` add half their terms as `0·x`. Cut into blocks of
//! [`EDGE_BLOCK`] rows (or columns), each block sums over the range of `k` in which its
//! rows are not all zero, found by reading the operand from its ends inwards; a dense
//! operand answers at its first element. Skipping a term `0·x` changes nothing unless
//! `x` is infinite or NaN (then the full sum is NaN): a NaN in the skipped operand
//! itself always counts as non-zero.

use std::ops::Range;

/// Columns of C per faer call in a dense product: faer runs wide products faster in
/// column blocks (at 512 columns: 150 GFLOP/s where a whole 512 × 512 × 1376 product
/// gets 120).
pub(super) const COLUMN_BLOCK: usize = 512;

/// Columns of row-major C that faer's f32 kernel computes at a time with AVX-512 (four
/// vectors of 16): a block's width is best a multiple of it.
const PANEL: usize = 64;

/// Rows (of A) or columns (of B) a block covers when the product skips zero ends.
pub(super) const EDGE_BLOCK: usize = 64;

/// Multiply-adds from which a product is shared among threads (about 30 µs of one
/// core's work: starting a thread costs some).
pub(super) const PARALLEL_WORK: usize = 1 << 22;

/// The fewest columns (or rows) a block gets when a product is split for threads.
const SPLIT_MIN: usize = 32;

/// One faer call: rows `m` and columns `n` of C, summed over `k` (empty: zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tile {
    pub m: Range<usize>,
    pub n: Range<usize>,
    pub k: Range<usize>,
}

/// An operand read in place: its first element and the element strides of its outer
/// axis (m for A, n for B) and of the summed axis k.
#[derive(Debug, Clone, Copy)]
pub(super) struct Operand {
    pub at: *const f32,
    pub outer: isize,
    pub k: isize,
}

/// The tiles of a product of `m` rows, `n` columns and `k` summed terms, column blocks
/// of the whole sum (at least `split` of them where the size allows, see [`dense`])
/// unless A (by rows) or else B (by columns) has zero ends.
///
/// # Safety
///
/// `a` must address `m × k` elements and `b` `k × n` through their strides, all
/// readable for the call.
pub(super) unsafe fn cut(
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    split: usize,
) -> Vec<Tile> {
    if k < 2 * EDGE_BLOCK {
        return dense(m, n, k, split);
    }
    let blocks = |len: usize| {
        (0..len)
            .step_by(EDGE_BLOCK)
            .map(move |i| i..len.min(i + EDGE_BLOCK))
    };
    if m >= 2 * EDGE_BLOCK {
        // SAFETY: the rows lie in A's m × k (the caller's contract).
        let ranges: Vec<_> = blocks(m)
            .map(|rows| (unsafe { nonzero_k(a, rows.clone(), k) }, rows))
            .collect();
        if ranges.iter().any(|(ks, _)| *ks != (0..k)) {
            return ranges
                .into_iter()
                .flat_map(|(ks, rows)| column_blocks(rows, n, n.div_ceil(COLUMN_BLOCK), ks, true))
                .collect();
        }
    }
    if n >= 2 * EDGE_BLOCK {
        // SAFETY: the columns lie in B's k × n (the caller's contract).
        let ranges: Vec<_> = blocks(n)
            .map(|cols| (unsafe { nonzero_k(b, cols.clone(), k) }, cols))
            .collect();
        if ranges.iter().any(|(ks, _)| *ks != (0..k)) {
            return ranges
                .into_iter()
                .map(|(ks, cols)| Tile {
                    m: 0..m,
                    n: cols,
                    k: ks,
                })
                .collect();
        }
    }
    dense(m, n, k, split)
}

/// The tiles of a product of `m` rows, `n` columns and `k` summed terms whose output is
/// read only where `reference` (C's m × n, through its strides: `outer` along m, `k`
/// along n) is `live`: for each block of [`EDGE_BLOCK`] rows, the columns between its
/// first and last live ones, in column blocks of the whole sum, and zeros (an empty
/// sum) on either side.
///
/// # Safety
///
/// `reference` must address `m × n` readable elements through its strides.
pub(super) unsafe fn cut_live(
    m: usize,
    n: usize,
    k: usize,
    reference: Operand,
    live: Live,
) -> Vec<Tile> {
    let mut tiles = Vec::new();
    // SAFETY: the caller's contract.
    for (rows, cols) in unsafe { live_blocks(m, n, reference, live) } {
        let zeros = |n: Range<usize>| Tile {
            m: rows.clone(),
            n,
            k: 0..0,
        };
        if cols.is_empty() {
            tiles.push(zeros(0..n));
            continue;
        }
        if cols.start > 0 {
            tiles.push(zeros(0..cols.start));
        }
        let blocks = cols.len().div_ceil(COLUMN_BLOCK);
        let width = cols.len().div_ceil(blocks);
        tiles.extend(cols.clone().step_by(width).map(|j| Tile {
            m: rows.clone(),
            n: j..cols.end.min(j + width),
            k: 0..k,
        }));
        if cols.end < n {
            tiles.push(zeros(cols.end..n));
        }
    }
    tiles
}

/// For each block of [`EDGE_BLOCK`] rows of an `m × n` output read only where
/// `reference` is `live`: the rows and the columns between their first and last live
/// ones (empty: none), rounded out to [`CHUNK`]s where the reference's rows are
/// contiguous.
///
/// # Safety
///
/// `reference` must address `m × n` readable elements through its strides.
pub(super) unsafe fn live_blocks(
    m: usize,
    n: usize,
    reference: Operand,
    live: Live,
) -> Vec<(Range<usize>, Range<usize>)> {
    (0..m)
        .step_by(EDGE_BLOCK)
        .map(|i| {
            let rows = i..m.min(i + EDGE_BLOCK);
            // SAFETY: the rows lie in the reference's m × n (the caller's contract).
            let cols = if live == Live::UnmaskedRows
                && unsafe { any_row_masked(reference, rows.clone(), n) }
            {
                0..n
            } else {
                unsafe { live_k(reference, rows.clone(), n, live) }
            };
            (rows, cols)
        })
        .collect()
}

/// Whether any of the `lines` of `op` (of `k` elements each) is masked whole; true
/// unless the lines are contiguous (then unknown: read as masked).
///
/// # Safety
///
/// As [`nonzero_k`].
unsafe fn any_row_masked(op: Operand, lines: Range<usize>, k: usize) -> bool {
    if op.k != 1 {
        return true;
    }
    lines.into_iter().any(|line| {
        // SAFETY: a line of k contiguous elements, in bounds by the contract.
        let row = unsafe { std::slice::from_raw_parts(op.at.offset(line as isize * op.outer), k) };
        // Read until its first live chunk (a causal row's first).
        !row.chunks(CHUNK)
            .any(|chunk| any_live(chunk, Live::Unmasked))
    })
}

/// Column blocks of the whole product, of at most [`COLUMN_BLOCK`] columns (of whole
/// panels for one thread); to be shared by `split` threads, a multiple of `split`
/// near-equal ones (3 blocks for 2 threads would keep one idle for a third of the
/// time), or, when the columns are too few, row blocks too.
pub(super) fn dense(m: usize, n: usize, k: usize, split: usize) -> Vec<Tile> {
    let mut blocks = n.div_ceil(COLUMN_BLOCK);
    if split > 1 {
        blocks = blocks
            .next_multiple_of(split)
            .min(n.div_ceil(SPLIT_MIN))
            .max(1);
    }
    let tiles = column_blocks(0..m, n, blocks, 0..k, split == 1);
    let rows = split
        .div_ceil(tiles.len())
        .min(m.div_ceil(SPLIT_MIN))
        .max(1);
    if rows == 1 {
        return tiles;
    }
    let height = m.div_ceil(rows);
    tiles
        .into_iter()
        .flat_map(|t| {
            (0..m).step_by(height).map(move |i| Tile {
                m: i..m.min(i + height),
                ..t.clone()
            })
        })
        .collect()
}

/// Column blocks of `rows` of C, each summed over `k`: `blocks` near-equal ones, or,
/// with `whole_panels`, blocks as wide as the first of those rounded up to whole panels
/// of faer's kernel ([`PANEL`] columns of row-major C), so that only the last one has a
/// partial panel (1376 columns: 512 + 512 + 352, where 459 + 459 + 458 ran 3% slower).
/// Blocks shared among threads stay near-equal: whole panels would load one thread more
/// (1376 on 2 threads: 768 + 608 columns, not 688 + 688).
fn column_blocks(
    rows: Range<usize>,
    n: usize,
    blocks: usize,
    k: Range<usize>,
    whole_panels: bool,
) -> Vec<Tile> {
    let width = n.div_ceil(blocks.max(1));
    let width = if whole_panels && width > PANEL {
        width.next_multiple_of(PANEL)
    } else {
        width
    };
    (0..n)
        .step_by(width.max(1))
        .map(|j| Tile {
            m: rows.clone(),
            n: j..n.min(j + width),
            k: k.clone(),
        })
        .collect()
}

/// Elements read at a time when looking for a block's non-zero range; the range found is
/// rounded out to multiples of it.
const CHUNK: usize = 16;

/// A mask value at or below which a score is masked: `x + mask` is `mask` itself for
/// any score below about 1e22, and its softmax is exactly 0 (or uniform, if the whole
/// row is masked, as with the score 0).
pub(super) const MASKED: f32 = -1e30;

/// Which elements of a tensor count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Live {
    /// The non-zero ones (a NaN is; `-0.0` is not): a product's operand, or a softmax's
    /// output that multiplies an incoming gradient.
    NonZero,
    /// The ones above [`MASKED`] (or NaN): an additive attention mask.
    Unmasked,
    /// As `Unmasked`, and every element of a row that is masked whole: a mask read for
    /// the softmax's output, which is uniform (not 0) on such a row.
    UnmaskedRows,
}

/// Whether any of `xs` is live, with no early exit, so that it compiles to a few vector
/// instructions.
#[inline(always)]
fn any_live(xs: &[f32], live: Live) -> bool {
    match live {
        Live::NonZero => xs.iter().fold(0u32, |acc, x| acc | (x.to_bits() << 1)) != 0,
        // (`!(x <= MASKED)`: a NaN counts as live.)
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        Live::Unmasked | Live::UnmaskedRows => {
            xs.iter().fold(false, |acc, &x| acc | !(x <= MASKED))
        }
    }
}

/// A range of k outside which the `lines` (rows of A, or columns of B) of `op` are all
/// zero, read from both ends inwards (empty: all zero). Its ends are rounded out to
/// [`CHUNK`]s where the lines or k are contiguous.
///
/// # Safety
///
/// Every element of `lines` × `0..k` must be readable through `op`'s strides.
unsafe fn nonzero_k(op: Operand, lines: Range<usize>, k: usize) -> Range<usize> {
    // SAFETY: the caller's contract.
    unsafe { live_k(op, lines, k, Live::NonZero) }
}

/// [`nonzero_k`] for any [`Live`] test.
///
/// # Safety
///
/// As [`nonzero_k`].
unsafe fn live_k(op: Operand, lines: Range<usize>, k: usize, live: Live) -> Range<usize> {
    let (mut lo, mut hi) = (k, 0);
    if op.k == 1 {
        for line in lines {
            // SAFETY: a line of k contiguous elements, in bounds by the contract.
            let row =
                unsafe { std::slice::from_raw_parts(op.at.offset(line as isize * op.outer), k) };
            let mut end = k;
            while end > hi {
                let start = end.saturating_sub(CHUNK).max(hi);
                if any_live(&row[start..end], live) {
                    hi = end;
                    break;
                }
                end = start;
            }
            let mut start = 0;
            while start < lo.min(hi) {
                let end = (start + CHUNK).min(lo).min(hi);
                if any_live(&row[start..end], live) {
                    lo = start;
                    break;
                }
                start = end;
            }
        }
    } else {
        let any = |i: usize| {
            let at = op.at.wrapping_offset(i as isize * op.k);
            if op.outer == 1 {
                // SAFETY: the lines are contiguous at this k, in bounds by the contract.
                let xs = unsafe { std::slice::from_raw_parts(at.add(lines.start), lines.len()) };
                any_live(xs, live)
            } else {
                // SAFETY: in bounds by the contract.
                lines
                    .clone()
                    .any(|line| any_live(&[unsafe { *at.offset(line as isize * op.outer) }], live))
            }
        };
        hi = (0..k).rev().find(|&i| any(i)).map_or(0, |i| i + 1);
        lo = (0..hi).find(|&i| any(i)).unwrap_or(hi);
    }
    if lo < hi {
        lo..hi
    } else {
        0..0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A causal `[s, s]` matrix (row i non-zero at columns 0..=i), row-major.
    fn causal(s: usize) -> Vec<f32> {
        (0..s * s)
            .map(|x| {
                if x % s <= x / s {
                    1.0 + (x % 7) as f32
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// The causal probabilities as A (`P·V`): a block of 64 rows sums over the keys up
    /// to its last row; read transposed (`Pᵀ·dO`, rows are keys): from its first row.
    #[test]
    fn a_causal_operand_cuts_each_block_to_its_triangle() {
        let (s, n) = (256, 64);
        let p = causal(s);
        let dense = vec![1.0f32; s * n];
        let b = Operand {
            at: dense.as_ptr(),
            outer: 1,
            k: n as isize,
        };
        let a = Operand {
            at: p.as_ptr(),
            outer: s as isize,
            k: 1,
        };
        let tiles = unsafe { cut(s, n, s, a, b, 1) };
        let want: Vec<Tile> = (0..4)
            .map(|i| Tile {
                m: 64 * i..64 * (i + 1),
                n: 0..n,
                k: 0..64 * (i + 1),
            })
            .collect();
        assert_eq!(tiles, want);
        // Aᵀ: row j of the product reads column j of P, non-zero from row j on.
        let a_t = Operand {
            at: p.as_ptr(),
            outer: 1,
            k: s as isize,
        };
        let tiles = unsafe { cut(s, n, s, a_t, b, 1) };
        let want: Vec<Tile> = (0..4)
            .map(|i| Tile {
                m: 64 * i..64 * (i + 1),
                n: 0..n,
                k: 64 * i..s,
            })
            .collect();
        assert_eq!(tiles, want);
    }

    /// The probabilities as B (`dOᵀ·P`, columns are keys): cut by columns.
    #[test]
    fn b_causal_operand_cuts_by_columns() {
        let (s, m) = (128, 64);
        let p = causal(s);
        let dense = vec![1.0f32; m * s];
        let a = Operand {
            at: dense.as_ptr(),
            outer: s as isize,
            k: 1,
        };
        let b = Operand {
            at: p.as_ptr(),
            outer: 1,
            k: s as isize,
        };
        let tiles = unsafe { cut(m, s, s, a, b, 1) };
        assert_eq!(
            tiles,
            vec![
                Tile {
                    m: 0..m,
                    n: 0..64,
                    k: 0..s
                },
                Tile {
                    m: 0..m,
                    n: 64..128,
                    k: 64..s
                },
            ]
        );
    }

    /// Dense operands (whatever their ends' neighbours), a short sum, and a NaN at an
    /// end: column blocks of the whole sum; an all-zero block: an empty sum.
    #[test]
    fn dense_operands_keep_the_whole_sum() {
        let (m, n, k) = (130, 1100, 200);
        let mut a = vec![0.0f32; m * k];
        for r in 0..m {
            a[r * k] = 1.0;
            a[r * k + k - 1] = 1.0;
        }
        let b = vec![1.0f32; k * n];
        let (ao, bo) = (
            Operand {
                at: a.as_ptr(),
                outer: k as isize,
                k: 1,
            },
            Operand {
                at: b.as_ptr(),
                outer: 1,
                k: n as isize,
            },
        );
        let tiles = unsafe { cut(m, n, k, ao, bo, 1) };
        assert_eq!(tiles.len(), 3);
        assert!(tiles.iter().all(|t| t.m == (0..m) && t.k == (0..k)));
        assert_eq!(tiles[2].n, 768..1100); // blocks of whole panels, the last one short
        let mut nan = vec![0.0f32; m * k];
        nan[5 * k + k - 1] = f32::NAN;
        let tiles = unsafe {
            cut(
                m,
                n,
                k,
                Operand {
                    at: nan.as_ptr(),
                    ..ao
                },
                bo,
                1,
            )
        };
        let blocks: Vec<_> = tiles
            .iter()
            .filter(|t| t.n.start == 0)
            .map(|t| t.k.clone())
            .collect();
        // (rounded out to whole chunks of 16 from k = 0)
        assert_eq!(blocks, vec![192..k, 0..0, 0..0]);
    }

    /// Split for 2 threads: an even number of near-equal column blocks, or rows where the
    /// columns are too few; for 1 thread, blocks of at most 512 columns, of whole panels.
    #[test]
    fn dense_products_split_evenly_for_threads() {
        let widths = |t: &[Tile]| t.iter().map(|t| t.n.len()).collect::<Vec<_>>();
        assert_eq!(widths(&dense(128, 512, 512, 2)), vec![256, 256]);
        assert_eq!(widths(&dense(128, 1376, 512, 2)), vec![344; 4]);
        assert_eq!(widths(&dense(128, 1376, 512, 1)), vec![512, 512, 352]);
        assert_eq!(widths(&dense(128, 96, 512, 2)), vec![48, 48]);
        let rows: Vec<_> = dense(512, 16, 512, 2)
            .into_iter()
            .map(|t| (t.m, t.n))
            .collect();
        assert_eq!(rows, vec![(0..256, 0..16), (256..512, 0..16)]);
        assert_eq!(dense(16, 16, 512, 2).len(), 1);
    }

    /// A causal mask of the float minimum, read for the scores (by rows of 64: up to
    /// each block's last row, zeros after) and for the softmax's gradient with a row
    /// masked whole (its block computed whole).
    #[test]
    fn live_outputs_follow_the_mask() {
        let (s, k) = (192, 8);
        let mut mask: Vec<f32> = (0..s * s)
            .map(|x| if x % s > x / s { f32::MIN } else { 0.0 })
            .collect();
        let r = Operand {
            at: mask.as_ptr(),
            outer: s as isize,
            k: 1,
        };
        let tiles = unsafe { cut_live(s, s, k, r, Live::Unmasked) };
        let want = vec![
            Tile {
                m: 0..64,
                n: 0..64,
                k: 0..k,
            },
            Tile {
                m: 0..64,
                n: 64..192,
                k: 0..0,
            },
            Tile {
                m: 64..128,
                n: 0..128,
                k: 0..k,
            },
            Tile {
                m: 64..128,
                n: 128..192,
                k: 0..0,
            },
            Tile {
                m: 128..192,
                n: 0..192,
                k: 0..k,
            },
        ];
        assert_eq!(tiles, want);
        mask[70 * s..71 * s].fill(f32::MIN); // row 70 masked whole
        let r = Operand {
            at: mask.as_ptr(),
            ..r
        };
        let tiles = unsafe { cut_live(s, s, k, r, Live::UnmaskedRows) };
        assert_eq!(
            tiles[2],
            Tile {
                m: 64..128,
                n: 0..192,
                k: 0..k
            }
        );
        let tiles = unsafe { cut_live(s, s, k, r, Live::Unmasked) };
        assert_eq!(tiles[2], want[2]);
    }
}
