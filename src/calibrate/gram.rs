//! A target's input statistics: the exact Gram matrix, or its one-pass sketch.

use tract_core::ndarray::{Array1, Array2, ArrayView2, Axis};

use crate::error::Result;

/// `Σ xᵀx` and `Σ x` over a target's input tokens, in f64: exact, or, for an input
/// whose `d × d` matrix would not fit the memory budget, the one-pass sketch
/// `XᵀX Ω` (`Ω` `[d, k]`, orthonormal) from which [`InputGram::top_eigen`] recovers the
/// leading eigenpairs (Nyström). Once complete, a large exact matrix is moved to the
/// scratch file (page cache, not resident memory) until an init reads it.
#[derive(Debug, Clone)]
pub struct InputGram {
    /// `XᵀX` `[d, d]`, or `XᵀX Ω` `[d, k]` when sketched (empty once spilled: read
    /// [`InputGram::matrix`]).
    pub(super) xtx: Array2<f64>,
    /// The exact matrix's bytes in the scratch file, once spilled.
    spilled: Option<crate::ir::ExternalBytes>,
    /// The sketch's `Ω` (`None`: exact).
    pub omega: Option<Array2<f64>>,
    /// `Σ x`, `[d]`.
    pub sum: Array1<f64>,
    /// `Σ x²` per feature (the diagonal of `XᵀX`), `[d]`.
    pub squares: Array1<f64>,
    /// Tokens counted.
    pub tokens: u64,
}

impl InputGram {
    pub(super) fn new(d: usize, sketch: Option<usize>, seed: u64) -> InputGram {
        let omega = sketch.map(|k| {
            let mut rng = crate::rng::Rng::new(seed);
            crate::linalg::orthonormal_gaussian(d, k, &mut rng)
        });
        InputGram {
            xtx: Array2::zeros((d, omega.as_ref().map_or(d, |o| o.ncols()))),
            omega,
            spilled: None,
            sum: Array1::zeros(d),
            squares: Array1::zeros(d),
            tokens: 0,
        }
    }

    /// Bytes its matrices take (in memory or spilled).
    pub fn bytes(&self) -> usize {
        let spilled = self.spilled.as_ref().map_or(0, |s| s.length);
        8 * (self.xtx.len() + self.omega.as_ref().map_or(0, |o| o.len())) + spilled
    }

    /// The accumulated matrix: `XᵀX` (read back when spilled) or the sketch `XᵀX Ω`.
    pub fn matrix(&self) -> std::borrow::Cow<'_, Array2<f64>> {
        let Some(spilled) = &self.spilled else {
            return std::borrow::Cow::Borrowed(&self.xtx);
        };
        let d = self.sum.len();
        let values: Vec<f64> = spilled
            .bytes()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        spilled.release_pages();
        std::borrow::Cow::Owned(Array2::from_shape_vec((d, d), values).expect("d × d"))
    }

    /// Adds the tokens `x` (`[n, d]`): the products in f32 on faer's kernels, summed in f64.
    pub(super) fn add(&mut self, x: ArrayView2<f32>) {
        let (n, d) = x.dim();
        if n == 0 {
            return;
        }
        use faer::linalg::matmul::triangular::{matmul, BlockStructure};
        let x = x.as_standard_layout();
        let rows = x.as_slice().expect("standard");
        match &self.omega {
            None => {
                // Xᵀ stored row-major (X column-major): faer's kernels run it twice as fast.
                let xt = x.t().as_standard_layout().into_owned();
                let a = faer::MatRef::from_row_major_slice(xt.as_slice().expect("standard"), d, n);
                // XᵀX's lower triangle only (it is symmetric).
                let mut g = faer::Mat::<f32>::zeros(d, d);
                let full = BlockStructure::Rectangular;
                matmul(
                    g.as_mut(),
                    BlockStructure::TriangularLower,
                    faer::Accum::Replace,
                    a,
                    full,
                    a.transpose(),
                    full,
                    1.0f32,
                    faer::Par::Seq,
                );
                // Column j of g's lower triangle into row j of xtx's upper one, both
                // contiguous; [`InputGram::finish`] mirrors it once.
                for j in 0..d {
                    let col = g
                        .col(j)
                        .try_as_col_major()
                        .expect("column-major")
                        .as_slice();
                    let mut row = self.xtx.row_mut(j);
                    let row = row.as_slice_mut().expect("row-major");
                    for (r, &c) in row[j..].iter_mut().zip(&col[j..]) {
                        *r += c as f64;
                    }
                }
            }
            Some(o) => {
                // Xᵀ(XΩ): thin products, on X as it is.
                let m = faer::MatRef::from_row_major_slice(rows, n, d);
                let o = faer::Mat::<f32>::from_fn(d, o.ncols(), |i, j| o[[i, j]] as f32);
                let g = m.transpose() * (m * &o);
                for ((i, j), v) in self.xtx.indexed_iter_mut() {
                    *v += g[(i, j)] as f64;
                }
            }
        }
        let (sum, squares) = (
            self.sum.as_slice_mut().expect("contiguous"),
            self.squares.as_slice_mut().expect("contiguous"),
        );
        for token in rows.chunks_exact(d) {
            for ((s, q), &v) in sum.iter_mut().zip(squares.iter_mut()).zip(token) {
                let v = v as f64;
                *s += v;
                *q += v * v;
            }
        }
        self.tokens += n as u64;
    }

    /// Completes the exact matrix's lower triangle from the upper one [`InputGram::add`]
    /// accumulates, and moves it to the scratch file from [`crate::ir::SPILL_BYTES`] on
    /// (it stays in memory if the file cannot be written).
    pub(super) fn finish(&mut self) {
        if self.omega.is_some() || self.spilled.is_some() {
            return;
        }
        let d = self.xtx.nrows();
        for i in 0..d {
            for j in 0..i {
                self.xtx[[i, j]] = self.xtx[[j, i]];
            }
        }
        if 8 * self.xtx.len() >= crate::ir::SPILL_BYTES {
            if let Ok(spilled) = crate::ir::spill_f64(self.xtx.as_slice().expect("standard")) {
                self.spilled = Some(spilled);
                self.xtx = Array2::zeros((0, 0));
            }
        }
    }

    /// Whether it is the sketch.
    pub fn is_sketch(&self) -> bool {
        self.omega.is_some()
    }

    /// `n·μμᵀ M` for `M` = the identity (`None`) or `Ω`: what centering subtracts.
    fn mean_part(&self, m: Option<&Array2<f64>>) -> Array2<f64> {
        let n = self.tokens.max(1) as f64;
        let mu = &self.sum / n;
        let right = match m {
            None => mu.clone(),
            Some(o) => o.t().dot(&mu),
        };
        mu.view()
            .insert_axis(Axis(1))
            .dot(&right.view().insert_axis(Axis(0)))
            * n
    }

    /// The trace of the Gram matrix (`centered`: of `XᵀX − nμμᵀ`).
    pub fn trace(&self, centered: bool) -> f64 {
        let n = self.tokens.max(1) as f64;
        let t = self.squares.sum();
        if centered {
            t - self.sum.dot(&self.sum) / n
        } else {
            t
        }
    }

    /// The `q` largest eigenpairs of `XᵀX` (`centered`: of `XᵀX − nμμᵀ`, PEFT's PCA),
    /// largest first, each eigenvector's largest entry positive; from the sketch by
    /// Nyström's approximation (exact when the inputs span at most `k` dimensions).
    pub fn top_eigen(&self, q: usize, centered: bool) -> Result<(Array1<f64>, Array2<f64>)> {
        match &self.omega {
            None if centered => {
                crate::linalg::sym_eigen_top(&(&*self.matrix() - &self.mean_part(None)), q)
            }
            None => crate::linalg::sym_eigen_top(&self.matrix(), q),
            Some(o) if centered => {
                crate::linalg::nystrom_top(&(&self.xtx - &self.mean_part(Some(o))), o, q)
            }
            Some(o) => crate::linalg::nystrom_top(&self.xtx, o, q),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_gram_is_spilled_and_read_back_exactly() {
        let d = 400; // 1.28 MB: over the spill threshold
        let mut rng = crate::rng::Rng::new(7);
        let x = Array2::from_shape_fn((64, d), |_| rng.normal() as f32);
        let mut g = InputGram::new(d, None, 0);
        g.add(x.view());
        let x = x.mapv(f64::from);
        let want = x.t().dot(&x);
        g.finish();
        assert!(g.spilled.is_some() && g.xtx.is_empty(), "not spilled");
        assert_eq!(g.bytes(), 8 * d * d);
        // f32 products summed in f64: within float32 rounding of the f64 product.
        let err = (&*g.matrix() - &want)
            .iter()
            .fold(0f64, |m, v| m.max(v.abs()));
        assert!(err <= 1e-4, "read back off by {err:e}");
        assert_eq!(*g.matrix(), g.matrix().t(), "not symmetric");
    }
}
