//! Exact PiSSA's cost per matrix: `linalg::svd_top` (the certified top-`r` triplets)
//! beside `linalg::svd_lowrank` with `niter = 4` (the fast path) on float32 Gaussian
//! weights, whose top spectrum is flat (the hard case for a Krylov method), at the
//! shapes of a 2048-wide Llama layer, `[out, in]` (attention, MLP gate/up, MLP down).
//! Each weight is what the graft passes: a column-major view of ONNX's row-major
//! `[in, out]`. Medians of 3 runs, one thread each.
//!
//!     cargo bench --bench svd_top [-- OUT IN] [decaying]
//!
//! `decaying` adds 64 directions of geometrically decaying strength to the Gaussian
//! floor: the shape of trained weights' top spectra.

use std::time::Instant;

use lora_graft::linalg::{svd_lowrank, svd_top};
use lora_graft::rng::Rng;
use tract_core::ndarray::Array2;

/// The median seconds of 3 runs of `f`.
fn median_seconds(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..3)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[1]
}

/// `stored` plus 64 directions of geometrically decaying strength (0.93^i), the shape
/// of trained weights' top spectra (as `make_synthetic.py --spectrum decaying`).
fn add_decaying_top(stored: &mut Array2<f32>, rng: &mut Rng) {
    let (rows, cols) = stored.dim();
    let k = 64;
    let left = Array2::from_shape_fn((rows, k), |_| rng.normal() as f32 / (rows as f32).sqrt());
    let right = Array2::from_shape_fn((k, cols), |_| rng.normal() as f32 / (cols as f32).sqrt());
    let top = 8.0 * (rows.max(cols) as f32).sqrt();
    let strong = Array2::from_shape_fn((rows, k), |(i, j)| {
        left[[i, j]] * top * 0.93f32.powi(j as i32)
    });
    *stored += &strong.dot(&right);
}

fn main() {
    let decaying = std::env::args().any(|a| a == "decaying");
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let shapes = match args[..] {
        [m, n] => vec![(m, n)],
        _ => vec![(2048, 2048), (5504, 2048), (2048, 5504)],
    };
    let r = 16;
    for (m, n) in shapes {
        let mut rng = Rng::new(7);
        let mut stored = Array2::from_shape_fn((n, m), |_| rng.normal() as f32);
        if decaying {
            add_decaying_top(&mut stored, &mut rng);
        }
        let w = stored.reversed_axes();
        let mut path = None;
        let exact = median_seconds(|| path = Some(svd_top(&w, r).expect("svd_top").1));
        let fast = median_seconds(|| {
            svd_lowrank(&w, r, 4, None, &mut Rng::new(1)).expect("svd_lowrank");
        });
        println!(
            "{m} x {n}{}, r {r}: svd_top {exact:.3} s ({path:?}), svd_lowrank niter 4 {fast:.3} s, ratio {:.1}",
            if decaying { " decaying" } else { "" },
            exact / fast
        );
    }
}
