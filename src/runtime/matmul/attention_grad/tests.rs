//! [`AttentionGrad`] against tract's own ops.

use super::super::tests::{assert_all_close, attention_mask, optimized, tensor};
use super::super::{fold_scalar_factors, restrict_to_live_outputs, use_faer_matmuls};
use super::*;
use crate::runtime::masked_softmax::use_masked_softmax;
use tract_core::ops::binary::TypedBinOp;
use tract_core::ops::einsum::EinSum;
use tract_core::ops::math::{Add, Mul};
use tract_core::ops::nn::{Softmax, SoftmaxKind};

/// Attention's backward as the training graph has it: scores `q·kᵀ·scale + mask`,
/// their softmax `p`, the softmax's incoming gradient `dO·vᵀ`, its gradient `dS`,
/// then `dS·k·scale` and `dSᵀ·q·scale` (`dS` as the first operand of one and the
/// second of the other), in the layout of `exprs` (scores, dQ, dK), with the mask
/// `mask` `[s, s]`. The outputs `dQ`, `dK` of the fused model against tract's own
/// ops, on `threads` threads.
fn check(shape: &[usize], exprs: [&str; 3], mask: Vec<f32>, threads: usize) {
    let s = (mask.len() as f64).sqrt() as usize;
    let mut model = TypedModel::default();
    let [q, k, v, d_o] =
        ["q", "k", "v", "d_o"].map(|n| model.add_source(n, f32::fact(shape)).unwrap());
    let mut mask_shape = vec![1; exprs[0].split("->").nth(1).unwrap().len()];
    let rank = mask_shape.len();
    mask_shape[rank - 2..].copy_from_slice(&[s, s]);
    let mask = Tensor::from_shape(&mask_shape, &mask).unwrap();
    let mask = model.add_const("mask", mask).unwrap();
    // (typed binary ops take operands of one rank)
    let quarter = |rank: usize| Tensor::from_shape(&vec![1; rank], &[0.25f32]).unwrap();
    let scale = model.add_const("scale", quarter(rank)).unwrap();
    let scale_x = model.add_const("scale_x", quarter(shape.len())).unwrap();
    let einsum = |e: &str| EinSum::new(e.parse().unwrap(), f32::datum_type());
    let bin = |op: Box<dyn tract_core::ops::binary::BinMiniOp>| TypedBinOp(op, None);
    let mut wire = |name: &str, op: Box<dyn TypedOp>, inputs: &[OutletId]| {
        model.wire_node(name, op, inputs).unwrap()[0]
    };
    let scores = wire("qk", Box::new(einsum(exprs[0])), &[q, k]);
    let scaled = wire("scaled", Box::new(bin(Box::new(Mul))), &[scores, scale]);
    let z = wire("z", Box::new(bin(Box::new(Add))), &[scaled, mask]);
    let softmax = Softmax::new(tvec![rank - 1], None, SoftmaxKind::Softmax);
    let p = wire("p", Box::new(softmax), &[z]);
    let d_p = wire("dp", Box::new(einsum(exprs[0])), &[d_o, v]);
    let d_s = wire("ds", Box::new(SoftmaxGrad), &[d_p, p]);
    let d_q = wire("dq", Box::new(einsum(exprs[1])), &[d_s, k]);
    let d_q = wire("dq_scaled", Box::new(bin(Box::new(Mul))), &[d_q, scale_x]);
    let d_k = wire("dk", Box::new(einsum(exprs[2])), &[q, d_s]);
    let d_k = wire("dk_scaled", Box::new(bin(Box::new(Mul))), &[d_k, scale_x]);
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
    // Heads first (a worker of one row at seq 512), 150 rows: two full blocks of
    // 64 and a short one.
    let heads_first = ["hqd,hkd->hqk", "hqk,hkd->hqd", "hqd,hqk->hkd"];
    check(
        &[2, 150, 16],
        heads_first,
        attention_mask(150, true, 100, 0),
        1,
    );
    check(
        &[2, 150, 16],
        heads_first,
        attention_mask(150, true, 100, 0),
        2,
    );
    // Tokens first, heads in the middle (rows of several sequences), padding.
    let tokens_first = ["aqhd,akhd->ahqk", "ahqk,akhd->aqhd", "aqhd,ahqk->akhd"];
    check(
        &[2, 70, 3, 8],
        tokens_first,
        attention_mask(70, true, 69, 5),
        2,
    );
    // Not causal, padded past a chunk: blocks whose live columns start at 16.
    check(
        &[2, 70, 16],
        heads_first,
        attention_mask(70, false, 200, 20),
        1,
    );
}
