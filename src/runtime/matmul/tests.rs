//! FaerMatMul against tract's own kernels.

use super::*;
use tract_core::ops::einsum::EinSum;

/// Runs `expr` on `a` and `b`, through tract's kernels and through faer's; and
/// whether faer's kernel took the product.
fn both(expr: &str, a: &Tensor, b: &Tensor) -> (Tensor, Tensor, bool) {
    let mut model = TypedModel::default();
    let sa = model.add_source("a", f32::fact(a.shape())).unwrap();
    let sb = model.add_source("b", f32::fact(b.shape())).unwrap();
    let op = EinSum::new(expr.parse().unwrap(), f32::datum_type());
    let c = model.wire_node("c", op, &[sa, sb]).unwrap();
    model.select_output_outlets(&c).unwrap();
    let model = model.into_decluttered().unwrap();
    let inputs = tvec!(a.clone().into_tvalue(), b.clone().into_tvalue());
    let run = |m: TypedModel| optimized(m, &inputs).remove(0).into_tensor();
    let mut faer = model.clone();
    let used = use_faer_matmuls(&mut faer).unwrap()
        && faer.nodes.iter().any(|n| n.op_is::<FaerMatMul>())
        && !faer.nodes.iter().any(|n| n.op_is::<EinSum>());
    // faer first: its output is uninitialised memory, which must not be a buffer
    // that already held the answer.
    let got = run(faer);
    (run(model), got, used)
}

pub(super) fn tensor(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    tract_ndarray::ArrayD::from_shape_vec(shape, v)
        .unwrap()
        .into_tensor()
}

#[test]
fn faer_products_equal_tracts() {
    // Plain, transposed operands and output, batch prefixes (broadcast too), and a
    // product wide enough to take several column blocks.
    let cases: &[(&str, &[usize], &[usize])] = &[
        ("mk,kn->mn", &[5, 7], &[7, 3]),
        ("km,kn->mn", &[7, 5], &[7, 3]),
        ("mk,nk->mn", &[5, 7], &[3, 7]),
        ("mk,kn->nm", &[5, 7], &[7, 3]),
        ("bmk,kn->bmn", &[2, 5, 7], &[7, 3]),
        ("bmk,bkn->bmn", &[2, 5, 7], &[2, 7, 3]),
        ("bmk,bnk->bnm", &[2, 5, 7], &[2, 3, 7]),
        ("abmk,abkn->abmn", &[1, 2, 5, 7], &[3, 1, 7, 4]),
        ("mk,kn->mn", &[9, 33], &[33, 1100]),
        ("mk,kn->nm", &[9, 33], &[33, 1100]),
        // Operands read in place: attention's heads in the middle, rows of a linear
        // layer over two axes (merged), a weight gradient summed over two axes
        // (merged, then not mergeable: summed in a loop), no summed axis, no n.
        ("bshk,bthk->bhst", &[2, 5, 3, 4], &[2, 6, 3, 4]),
        ("bhst,bthk->bshk", &[2, 3, 5, 6], &[2, 6, 3, 4]),
        ("bsk,kn->bsn", &[2, 5, 7], &[7, 3]),
        ("bsk,bsn->kn", &[2, 5, 7], &[2, 5, 3]),
        ("sbk,bsn->nk", &[5, 2, 7], &[2, 5, 3]),
        ("m,n->mn", &[5], &[3]),
        ("mk,k->m", &[5, 7], &[7]),
        ("bsk,nk->bsn", &[2, 3, 40], &[1100, 40]),
        // Empty: a sum of no terms, and no rows.
        ("mk,kn->mn", &[5, 0], &[0, 3]),
        ("mk,kn->nm", &[0, 7], &[7, 3]),
    ];
    for (i, (expr, sa, sb)) in cases.iter().enumerate() {
        let (a, b) = (tensor(sa, i), tensor(sb, i + 100));
        let (want, got, used) = both(expr, &a, &b);
        assert!(used, "{expr}: faer was not used");
        assert_eq!(want.shape(), got.shape(), "{expr}");
        // f32 sums of at most 40 terms of size <= 1: the two kernels' orders of
        // summation differ by far less than 1e-4.
        let (w, g) = (
            want.to_plain_array_view::<f32>().unwrap(),
            got.to_plain_array_view::<f32>().unwrap(),
        );
        let bad = w
            .iter()
            .zip(g.iter())
            .position(|(x, y)| (x - y).abs().is_nan() || (x - y).abs() >= 1e-4);
        assert!(bad.is_none(), "{expr}: element {bad:?} differs");
    }
}

/// Causal attention's products, whose probabilities (or their gradient) are zero
/// above the diagonal and are summed only below it (`tiles::cut`), as A (`P·V`,
/// `dS·K`), transposed (`dSᵀ·Q`), and as B (`dOᵀ·P`): tract's results, zeros
/// included where a block is all zero.
#[test]
fn causal_products_skip_zero_ends_and_equal_tracts() {
    let (h, s, d) = (3, 200, 16);
    let p = causal(h, s, 1, false);
    let v = tensor(&[h, s, d], 2);
    let cases = [
        ("hqk,hkd->hqd", &p, &v),
        ("hkq,hkd->hqd", &p, &v),
        ("hkd,hkq->hdq", &v, &p),
    ];
    for (expr, a, b) in cases {
        let (want, got, used) = both(expr, a, b);
        assert!(used, "{expr}: faer was not used");
        // f32 sums of at most 200 terms of size <= 1 in different orders.
        let worst = worst_diff(&want, &got);
        assert!(worst < 1e-4, "{expr}: off by {worst}");
    }
    // A head all zero: zeros (the output buffer is not initialised).
    let (want, got, _) = both("hqk,hkd->hqd", &causal(h, s, 1, true), &v);
    assert_eq!(want, got);
}

/// Products large enough to share among 2 threads (column blocks, row blocks, heads,
/// and a causal triangle's blocks dealt out in turn): tract's results.
#[test]
fn products_shared_among_threads_equal_tracts() {
    crate::parallel::set_product_threads(2);
    let (s, d) = (256, 64);
    let cases = [
        ("mk,kn->mn", tensor(&[128, 512], 1), tensor(&[512, 1376], 2)),
        ("mk,kn->mn", tensor(&[512, 512], 1), tensor(&[512, 16], 2)),
        (
            "hqk,hkd->hqd",
            causal(2, s, 3, false),
            tensor(&[2, s, d], 4),
        ),
    ];
    for (expr, a, b) in &cases {
        let (want, got, used) = both(expr, a, b);
        assert!(used, "{expr}: faer was not used");
        // f32 sums of 512 terms of size <= 1 (results up to about 20) in different
        // orders and blocks: far within 1e-3.
        let worst = worst_diff(&want, &got);
        assert!(worst < 1e-3, "{expr}: off by {worst}");
    }
    crate::parallel::set_product_threads(1);
}

#[test]
fn a_summed_axis_broadcast_from_one_side_is_not_taken() {
    // (tract's own optimiser refuses this product too.)
    let op = EinSum::new("bsk,bsn->kn".parse().unwrap(), f32::datum_type());
    let shape = |d: &[usize]| f32::fact(d).shape;
    assert!(FaerMatMul::of(&op, &shape(&[1, 5, 7]), &shape(&[2, 5, 3])).is_none());
    assert!(FaerMatMul::of(&op, &shape(&[2, 5, 7]), &shape(&[2, 5, 3])).is_some());
}

#[test]
fn models_with_other_products_keep_tracts_kernels() {
    let mut model = TypedModel::default();
    let sa = model.add_source("a", f64::fact([2, 3])).unwrap();
    let sb = model.add_source("b", f64::fact([3, 4])).unwrap();
    let op = EinSum::new("mk,kn->mn".parse().unwrap(), f64::datum_type());
    let c = model.wire_node("c", op, &[sa, sb]).unwrap();
    model.select_output_outlets(&c).unwrap();
    let mut model = model.into_decluttered().unwrap();
    assert!(!use_faer_matmuls(&mut model).unwrap());
    assert!(model.nodes.iter().any(|n| n.op_is::<EinSum>()));
}

/// A product's output scaled by a constant (then read by another product and the
/// model's output), and an input scaled by one and read by two products: both factors
/// folded into the products, no `Mul` left, tract's results.
#[test]
fn constant_factors_fold_into_products() {
    use tract_core::ops::binary::TypedBinOp;
    use tract_core::ops::math::Mul;
    let mut model = TypedModel::default();
    let sa = model.add_source("a", f32::fact([6, 40])).unwrap();
    let sb = model.add_source("b", f32::fact([40, 5])).unwrap();
    let half = model.add_const("half", tensor2(&[[0.5f32]])).unwrap();
    let three = model.add_const("three", tensor2(&[[3.0f32]])).unwrap();
    let mul = || TypedBinOp(Box::new(Mul), None);
    let einsum = |e: &str| EinSum::new(e.parse().unwrap(), f32::datum_type());
    let c = model
        .wire_node("c", einsum("mk,kn->mn"), &[sa, sb])
        .unwrap()[0];
    let c_half = model.wire_node("c_half", mul(), &[c, half]).unwrap()[0];
    let a3 = model.wire_node("a3", mul(), &[three, sa]).unwrap()[0];
    let d = model
        .wire_node("d", einsum("mk,kn->mn"), &[a3, sb])
        .unwrap()[0];
    let e = model
        .wire_node("e", einsum("mk,mn->kn"), &[a3, c_half])
        .unwrap()[0];
    model.select_output_outlets(&[c_half, d, e]).unwrap();
    let model = model.into_decluttered().unwrap();
    let mut folded = model.clone();
    assert!(use_faer_matmuls(&mut folded).unwrap());
    assert_eq!(fold_scalar_factors(&mut folded).unwrap(), 2);
    let live = folded.eval_order().unwrap();
    assert!(
        !live.iter().any(|&n| folded.nodes[n].op_is::<TypedBinOp>()),
        "a Mul is left"
    );
    let inputs = tvec!(
        tensor(&[6, 40], 1).into_tvalue(),
        tensor(&[40, 5], 2).into_tvalue()
    );
    let (want, got) = (optimized(model, &inputs), optimized(folded, &inputs));
    // Sums of 40 (then 6) terms of size <= 3 (then <= 60): the factor applied to
    // the sum or to each term differs by far less than 1e-3.
    assert_all_close(&want, &got, 1e-3);
}

/// Attention's scores into a masked softmax, and a gradient into the softmax's gradient,
/// with a causal mask and one row masked whole: both products computed only where
/// read, and the outputs those of tract's own ops.
#[test]
fn products_read_in_part_equal_tracts() {
    use crate::runtime::masked_softmax::use_masked_softmax;
    use crate::runtime::softmax_grad::SoftmaxGrad;
    use tract_core::ops::binary::TypedBinOp;
    use tract_core::ops::math::Add;
    use tract_core::ops::nn::{Softmax, SoftmaxKind};
    let (h, s, d) = (2, 150, 16);
    let mut model = TypedModel::default();
    let q = model.add_source("q", f32::fact([h, s, d])).unwrap();
    let k = model.add_source("k", f32::fact([h, s, d])).unwrap();
    let mut mask: Vec<f32> = (0..s * s)
        .map(|x| if x % s > x / s { f32::MIN } else { 0.0 })
        .collect();
    mask[100 * s..101 * s].fill(f32::MIN);
    let mask = model
        .add_const("mask", Tensor::from_shape(&[1, s, s], &mask).unwrap())
        .unwrap();
    let einsum = |e: &str| EinSum::new(e.parse().unwrap(), f32::datum_type());
    let scores = model
        .wire_node("qk", einsum("hqd,hkd->hqk"), &[q, k])
        .unwrap()[0];
    let add = TypedBinOp(Box::new(Add), None);
    let z = model.wire_node("z", add, &[scores, mask]).unwrap()[0];
    let softmax = Softmax::new(tvec![2], None, SoftmaxKind::Softmax);
    let y = model.wire_node("y", softmax, &[z]).unwrap()[0];
    let g = model
        .wire_node("g", einsum("hqd,hkd->hqk"), &[k, q])
        .unwrap()[0];
    let dx = model.wire_node("dx", SoftmaxGrad, &[g, y]).unwrap()[0];
    model.select_output_outlets(&[y, dx]).unwrap();
    let model = model.into_decluttered().unwrap();
    let mut fused = model.clone();
    assert!(use_faer_matmuls(&mut fused).unwrap());
    assert_eq!(use_masked_softmax(&mut fused).unwrap(), 1);
    assert_eq!(restrict_to_live_outputs(&mut fused).unwrap(), 2);
    let inputs = tvec!(
        tensor(&[h, s, d], 1).into_tvalue(),
        tensor(&[h, s, d], 2).into_tvalue()
    );
    let (want, got) = (optimized(model, &inputs), optimized(fused, &inputs));
    // Probabilities and gradients of size <= 20, from two exp implementations and
    // sums in different orders: within 1e-5.
    assert_all_close(&want, &got, 1e-5);
}

/// `x + A·B + A·C` (a chain of sums, as a tensor's gradients add up), and a sum with a
/// broadcast tensor (left alone): the products sum into the tensor's buffer, tract's
/// results.
#[test]
fn sums_of_products_accumulate_in_place() {
    use tract_core::ops::binary::TypedBinOp;
    use tract_core::ops::math::Add;
    let mut model = TypedModel::default();
    let x = model.add_source("x", f32::fact([6, 5])).unwrap();
    let row = model.add_source("row", f32::fact([1, 5])).unwrap();
    let sa = model.add_source("a", f32::fact([6, 40])).unwrap();
    let [sb, sc, sd] = ["b", "c", "d"].map(|n| model.add_source(n, f32::fact([40, 5])).unwrap());
    let einsum = |e: &str| EinSum::new(e.parse().unwrap(), f32::datum_type());
    let add = || TypedBinOp(Box::new(Add), None);
    let ab = model
        .wire_node("ab", einsum("mk,kn->mn"), &[sa, sb])
        .unwrap()[0];
    let ac = model
        .wire_node("ac", einsum("mk,kn->mn"), &[sa, sc])
        .unwrap()[0];
    let ad = model
        .wire_node("ad", einsum("mk,kn->mn"), &[sa, sd])
        .unwrap()[0];
    let s1 = model.wire_node("s1", add(), &[x, ab]).unwrap()[0];
    let s2 = model.wire_node("s2", add(), &[ac, s1]).unwrap()[0];
    let s3 = model.wire_node("s3", add(), &[row, ad]).unwrap()[0];
    model.select_output_outlets(&[s2, s3]).unwrap();
    let model = model.into_decluttered().unwrap();
    let mut fused = model.clone();
    assert!(use_faer_matmuls(&mut fused).unwrap());
    assert_eq!(
        accumulate_sums(&mut fused).unwrap(),
        2,
        "s1 and s2; s3 broadcasts"
    );
    let inputs: TVec<TValue> = [[6, 5], [1, 5], [6, 40], [40, 5], [40, 5], [40, 5]]
        .iter()
        .enumerate()
        .map(|(i, shape)| tensor(shape, i).into_tvalue())
        .collect();
    let (want, got) = (optimized(model, &inputs), optimized(fused, &inputs));
    // Sums of 40 terms of size <= 1, and of three such: within 1e-4.
    assert_all_close(&want, &got, 1e-4);
}

/// The largest absolute difference between two float32 tensors of one shape (NaN if
/// any difference is NaN).
fn worst_diff(want: &Tensor, got: &Tensor) -> f32 {
    assert_eq!(want.shape(), got.shape());
    let (w, g) = (
        want.to_plain_array_view::<f32>().unwrap(),
        got.to_plain_array_view::<f32>().unwrap(),
    );
    let diffs = w.iter().zip(g.iter()).map(|(x, y)| (x - y).abs());
    diffs.fold(0.0, |m, d| {
        if m.is_nan() || d.is_nan() {
            f32::NAN
        } else {
            m.max(d)
        }
    })
}

/// `heads` causal `[s, s]` matrices ([`tensor`]'s values on and below the diagonal,
/// zeros above), the first all zero if `zero_first_head`.
fn causal(heads: usize, s: usize, seed: usize, zero_first_head: bool) -> Tensor {
    let dense = tensor(&[heads, s, s], seed);
    let dense = dense.to_plain_array_view::<f32>().unwrap();
    let p: Vec<f32> = dense
        .iter()
        .enumerate()
        .map(|(ix, &x)| {
            let above = ix % s > (ix / s) % s;
            if above || zero_first_head && ix < s * s {
                0.0
            } else {
                x
            }
        })
        .collect();
    tract_ndarray::ArrayD::from_shape_vec(vec![heads, s, s], p)
        .unwrap()
        .into_tensor()
}

/// `m`'s outputs on `inputs`, through tract's optimiser.
pub(super) fn optimized(m: TypedModel, inputs: &TVec<TValue>) -> TVec<TValue> {
    let plan = m.into_optimized().unwrap().into_runnable().unwrap();
    plan.run(inputs.clone()).unwrap()
}

/// Every output of `got` within `tol` (absolute) of `want`'s.
pub(super) fn assert_all_close(want: &[TValue], got: &[TValue], tol: f32) {
    for (w, g) in want.iter().zip(got) {
        let worst = worst_diff(w, g);
        assert!(worst < tol, "off by {worst}");
    }
}

/// A mask `[s, s]` for attention, causal or not, with row `whole` masked whole and the
/// first `pad` columns masked in every row (left padding).
pub(super) fn attention_mask(s: usize, causal: bool, whole: usize, pad: usize) -> Vec<f32> {
    (0..s * s)
        .map(|x| {
            let (row, col) = (x / s, x % s);
            let masked = causal && col > row || row == whole || col < pad;
            if masked {
                f32::MIN
            } else {
                0.0
            }
        })
        .collect()
}

/// Wires into `model` an einsum `expr` of `a` and `b` (`mul`: times 0.25, a constant
/// of the product's rank, as a model's `1/√d` is).
pub(super) fn wire_product(
    model: &mut TypedModel,
    name: &str,
    expr: &str,
    [a, b]: [OutletId; 2],
    mul: bool,
) -> OutletId {
    use tract_core::ops::binary::TypedBinOp;
    use tract_core::ops::math::Mul;
    let op = EinSum::new(expr.parse().unwrap(), f32::datum_type());
    let c = model.wire_node(name, op, &[a, b]).unwrap()[0];
    if !mul {
        return c;
    }
    // (typed binary ops take operands of one rank)
    let rank = model.outlet_fact(c).unwrap().rank();
    let quarter = Tensor::from_shape(&vec![1; rank], &[0.25f32]).unwrap();
    let quarter = model.add_const(format!("{name}.scale"), quarter).unwrap();
    let mul = TypedBinOp(Box::new(Mul), None);
    model
        .wire_node(format!("{name}.scaled"), mul, &[c, quarter])
        .unwrap()[0]
}

/// Wires into `model` attention's probabilities `softmax(q·kᵀ·0.25 + mask)`, the
/// scores in the layout `expr`, the mask `[s, s]` broadcast to them.
pub(super) fn wire_probabilities(
    model: &mut TypedModel,
    expr: &str,
    [q, k]: [OutletId; 2],
    mask: Vec<f32>,
) -> OutletId {
    use tract_core::ops::binary::TypedBinOp;
    use tract_core::ops::math::Add;
    use tract_core::ops::nn::{Softmax, SoftmaxKind};
    let s = (mask.len() as f64).sqrt() as usize;
    let scores = wire_product(model, "qk", expr, [q, k], true);
    let rank = model.outlet_fact(scores).unwrap().rank();
    let mut mask_shape = vec![1; rank];
    mask_shape[rank - 2..].copy_from_slice(&[s, s]);
    let mask = Tensor::from_shape(&mask_shape, &mask).unwrap();
    let mask = model.add_const("mask", mask).unwrap();
    let add = TypedBinOp(Box::new(Add), None);
    let z = model.wire_node("z", add, &[scores, mask]).unwrap()[0];
    let softmax = Softmax::new(tvec![rank - 1], None, SoftmaxKind::Softmax);
    model.wire_node("p", softmax, &[z]).unwrap()[0]
}
