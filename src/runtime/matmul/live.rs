//! Products whose output is read only in part: attention's scores `Q·Kᵀ`, read by a
//! masked softmax ([`MaskedSoftmax`]) only where the mask is above
//! [`super::tiles::MASKED`], and the softmax's incoming gradient `dO·Vᵀ`, read by
//! [`SoftmaxGrad`] only where the softmax is non-zero: where its mask is not, except on
//! rows masked whole. With a causal mask, half of each. The product takes the mask as
//! a third input and computes, for each block of rows, only the columns between the
//! first and last live ones ([`super::tiles::cut_live`]); the rest is 0. The mask is
//! read once for all the heads that share it.
//!
//! Both are exact: a masked score `0 + mask` is `mask`, as `x + mask` is for any score
//! below about 1e22; a gradient entry `0` multiplies a softmax entry `0` (`exp` of a
//! masked score less the row's largest, which is not masked).

use tract_onnx::prelude::*;

use super::tiles::Live;
use super::{rewire_with_third_input, FaerMatMul};
use crate::runtime::masked_softmax::MaskedSoftmax;
use crate::runtime::pattern::{broadcasts_to, single_reader};
use crate::runtime::softmax_grad::SoftmaxGrad;

/// Gives each [`FaerMatMul`] whose only reader is a [`MaskedSoftmax`] (as its scores)
/// or a [`SoftmaxGrad`] (as its gradient) that reader's mask or softmax as a live-output
/// reference. Returns how many.
pub fn restrict_to_live_outputs(model: &mut TypedModel) -> TractResult<usize> {
    let mut restricted = 0;
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        // The scores, read where the mask is not; the gradient, read where the softmax
        // is not 0: where its own mask is not, or on rows masked whole (uniform).
        let (live, product, reference) = if node.op_is::<MaskedSoftmax>() {
            (Live::Unmasked, node.inputs[0], node.inputs[1])
        } else if node.op_is::<SoftmaxGrad>() {
            let softmax = &model.nodes[node.inputs[1].node];
            if !softmax.op_is::<MaskedSoftmax>() {
                continue; // (reading the softmax itself costs what it saves)
            }
            (Live::UnmaskedRows, node.inputs[0], softmax.inputs[1])
        } else {
            continue;
        };
        let Some(op) = model.nodes[product.node].op_as::<FaerMatMul>() else {
            continue;
        };
        let only_reader = single_reader(model, product);
        let c = model.outlet_fact(product)?;
        let r = model.outlet_fact(reference)?;
        let fits = match (c.shape.as_concrete(), r.shape.as_concrete()) {
            (Some(c), Some(r)) => broadcasts_to(r, c),
            _ => false,
        };
        if op.live.is_some()
            || op.add_to
            || !only_reader
            || !fits
            || r.datum_type != f32::datum_type()
        {
            continue;
        }
        let op = FaerMatMul {
            live: Some(live),
            ..op.clone()
        };
        rewire_with_third_input(model, product, op, reference, product)?;
        restricted += 1;
    }
    Ok(restricted)
}
