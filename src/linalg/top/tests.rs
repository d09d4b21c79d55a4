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

/// A decaying spectrum, tall, wide, stored column-major (a transposed weight) and
/// with a reversed axis (neither order: read element by element): certified in a
/// few blocks, and the full SVD's triplets to 1e-9.
#[test]
fn svd_top_iterates_to_the_full_svds_triplets() {
    use tract_core::ndarray::ShapeBuilder;
    let s: Vec<f64> = (0..150).map(|i| 10.0 * 0.85f64.powi(i)).collect();
    for (m, n) in [(300, 200), (200, 300)] {
        let w = planted(m, n, &s, 1);
        let mut column_major = Array2::zeros((m, n).f());
        column_major.assign(&w);
        let mut reversed = w.clone();
        reversed.invert_axis(tract_core::ndarray::Axis(1));
        assert!(reversed.as_slice().is_none() && reversed.t().as_slice().is_none());
        for w in [w, column_major, reversed] {
            let path = assert_top_matches_full(&w, 8, 1e-9);
            assert!(
                matches!(path, TopSvdPath::Iterated(k) if k * TOP_SVD_BLOCK <= 64),
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
    assert!(
        matches!(path, TopSvdPath::Full(n) if n * TOP_SVD_BLOCK < 80),
        "{path:?}"
    );
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
    assert!(
        matches!(path, TopSvdPath::Full(n) if n * TOP_SVD_BLOCK < 80),
        "{path:?}"
    );
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
/// of the way while far, just past it when near; at the latest once the steps since
/// the last check cost three checks and a quarter of all the work (before a rate: one
/// check and that quarter).
#[test]
fn checks_follow_the_rate_of_convergence() {
    let check = 1e7;
    let mut checks = Checks::default();
    assert!(checks.due(24, 4e8, check, false)); // no rate: 4e8 ≥ a quarter of 4e8
    checks.record(24, 10.0, 8);
    assert!(!checks.due(32, 5e7, check, false)); // 5e7 < a quarter of 4.5e8
    assert!(checks.due(40, 1e8, check, false)); // 1.5e8 ≥ a quarter of 5.5e8
    checks.record(40, 8.0, 8); // falls 0.125 a column: 64 to go, plan 40 + 38
    assert!(!checks.due(77, 0.0, check, false));
    assert!(checks.due(78, 0.0, check, false));
    assert!(checks.due(48, 0.0, check, true)); // the basis is full
    let mut capped = Checks::default();
    capped.due(24, 4e8, check, false);
    capped.record(24, 10.0, 8);
    capped.due(40, 4e8, check, false);
    capped.record(40, 8.0, 8); // plan 78
    assert!(!capped.due(48, 2e8, check, false)); // 2e8 < a quarter of 1e9
    assert!(capped.due(56, 1e8, check, false)); // 3e8 ≥ a quarter of 1.1e9
    let mut costly = Checks::default(); // checks dearer than a quarter of the work
    costly.due(24, 4e8, check, false);
    costly.record(24, 10.0, 8);
    costly.due(40, 4e8, check, false);
    costly.record(40, 8.0, 8); // plan 78
    assert!(!costly.due(48, 2e9, 1e9, false)); // past a quarter, short of three checks
    assert!(costly.due(56, 1e9, 1e9, false)); // three checks' cost
    checks.record(78, 2.0, 8); // 0.158 a column: 12.7 to go, plan 78 + 16
    assert!(!checks.due(93, 0.0, check, false));
    assert!(checks.due(94, 0.0, check, false));
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
    assert!(
        matches!(path, TopSvdPath::Full(n) if n * TOP_SVD_BLOCK <= 64),
        "{path:?}"
    );
    assert_eq!(top.s, signed(svd_exact(&w, 8).unwrap()).s);
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

/// A block lying almost wholly in the basis, on its older columns too (which a Krylov
/// block does not, so the first projection, on the recent columns, leaves them): made
/// orthonormal and orthogonal to the basis to round-off, with its coefficients on the
/// basis (f64 unit vectors of 300 entries: round-off is about 1e-16 an entry, so 1e-14
/// leaves room for sums of 300 but not for a missed projection, which leaves round-off
/// divided by the 1e-6 left).
#[test]
fn orthonormalize_handles_a_block_leaning_on_older_columns() {
    let mut rng = Rng::new(11);
    let (n, dim) = (300, 60);
    let basis = Mat::from_fn(n, dim, {
        let v = orthonormal_gaussian(n, dim, &mut rng);
        move |i, k| v[[i, k]]
    });
    let c = Mat::from_fn(dim, TOP_SVD_BLOCK, |_, _| rng.normal());
    let y = &basis * &c + Mat::from_fn(n, TOP_SVD_BLOCK, |_, _| 1e-6 * rng.normal());
    let done = orthonormalize(&y, basis.as_ref(), 2 * TOP_SVD_BLOCK);
    let off = basis.transpose() * &done.q;
    let gram = done.q.transpose() * &done.q;
    for k in 0..TOP_SVD_BLOCK {
        for i in 0..dim {
            assert!(
                off[(i, k)].abs() <= 1e-14,
                "basis {i}, column {k}: {:e}",
                off[(i, k)]
            );
            let expected: f64 = (0..n).map(|j| basis[(j, i)] * y[(j, k)]).sum();
            let d = (done.on_basis[(i, k)] - expected).abs();
            assert!(d <= 1e-12, "coefficient {i},{k} off by {d:e}");
        }
        for l in 0..TOP_SVD_BLOCK {
            let d = (gram[(k, l)] - if k == l { 1.0 } else { 0.0 }).abs();
            assert!(d <= 1e-14, "QᵀQ {k},{l}: {d:e}");
        }
    }
}
