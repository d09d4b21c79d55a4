//! [`AttentionGrad`] against tract's own ops.

use super::super::tests::{
    assert_all_close, attention_mask, optimized, tensor, wire_probabilities, wire_product,
};
use super::super::{fold_scalar_factors, restrict_to_live_outputs, use_faer_matmuls};
use super::*;
use crate::runtime::masked_softmax::use_masked_softmax;

/// Attention's backward as the training graph has it: scores `q·kᵀ·scale + mask`,
/// their softmax `p`, the softmax's incoming gradient `dO·vᵀ`, its gradient `dS`,
/// then `dS·k·scale` and `dSᵀ·q·scale` (`dS` as the first operand of one and the
/// second of the other), in the layout of `exprs` (scores, dQ, dK), with the mask
/// `mask` `[s, s]`. The outputs `dQ`, `dK` of the fused model against tract's own
/// ops, on `threads` threads.
fn check(shape: &[usize], exprs: [&str; 3], mask: Vec<f32>, threads: usize) {
    let mut model = TypedModel::default();
    let [q, k, v, d_o] =
        ["q", "k", "v", "d_o"].map(|n| model.add_source(n, f32::fact(shape)).unwrap());
    let p = wire_probabilities(&mut model, exprs[0], [q, k], mask);
    let d_p = wire_product(&mut model, "dp", exprs[0], [d_o, v], false);
    let d_s = model.wire_node("ds", SoftmaxGrad, &[d_p, p]).unwrap()[0];
    let d_q = wire_product(&mut model, "dq", exprs[1], [d_s, k], true);
    let d_k = wire_product(&mut model, "dk", exprs[2], [q, d_s], true);
    model.select_output_outlets(&[d_q, d_k]).unwrap();
    let model = model.into_decluttered().unwrap();
    let mut fused = model.clone();
    assert!(use_faer_matmuls(&mut fused).unwrap());
    fold_scalar_factors(&mut fused).unwrap();
    assert_eq!(use_masked_softmax(&mut fused).unwrap(), 1);
    assert_eq!(restrict_to_live_outputs(&mut fused).unwrap(), 2);
    assert_eq!(
        fuse_attention_gradients(&mut fused).unwrap(),
        1,
        "{exprs:?}"
    );
    let inputs: TVec<TValue> = (0..4).map(|i| tensor(shape, i).into_tvalue()).collect();
    let want = optimized(model, &inputs);
    crate::parallel::set_product_threads(threads);
    let got = optimized(fused, &inputs);
    crate::parallel::set_product_threads(1);
    // Gradients of size <= 2 from sums of a few hundred terms in other orders (and
    // two exp implementations): within 1e-5.
    assert_all_close(&want, &got, 1e-5);
}

#[test]
fn fused_attention_gradients_equal_tracts() {
    // Heads first (a worker of one row at seq 512), 150 rows: two full blocks of 64 and
    // a short one; tokens first, heads in the middle (rows of several sequences); not
    // causal, padded past a chunk: blocks whose live columns start at 16.
    let heads_first = ["hqd,hkd->hqk", "hqk,hkd->hqd", "hqd,hqk->hkd"];
    let tokens_first = ["aqhd,akhd->ahqk", "ahqk,akhd->aqhd", "aqhd,ahqk->akhd"];
    // (shape, layout, mask: s, causal, row masked whole, padding; threads)
    let cases: [(&[usize], _, _, _); 4] = [
        (&[2, 150, 16], heads_first, (150, true, 100, 0), 1),
        (&[2, 150, 16], heads_first, (150, true, 100, 0), 2),
        (&[2, 70, 3, 8], tokens_first, (70, true, 69, 5), 2),
        (&[2, 70, 16], heads_first, (70, false, 200, 20), 1),
    ];
    for (shape, exprs, (s, causal, whole, pad), threads) in cases {
        check(shape, exprs, attention_mask(s, causal, whole, pad), threads);
    }
}
