//! Sums of products: `X + A·B`, where the product is read by the `Add` only (LoRA's
//! branch added to the base layer's output, a residual connection, the gradients of a
//! tensor read by several layers), computed as one [`FaerMatMul`] that sums into X's
//! buffer: one pass over a large tensor fewer each. faer adds each finished block to X
//! (`X + alpha·Σ`, one rounding where the `Add` made two).

use tract_core::ops::math::Add;
use tract_onnx::prelude::*;

use super::{rewire_with_third_input, FaerMatMul};
use crate::runtime::pattern::{is_binary, single_reader};

/// Folds every float32 `Add` of a tensor and a [`FaerMatMul`]'s output of one shape (the
/// product read by the `Add` only) into the product. Returns how many.
pub fn accumulate_sums(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    for id in 0..model.nodes.len() {
        if !is_binary::<Add>(model, id) {
            continue;
        }
        let node = &model.nodes[id];
        let out = model.outlet_fact(OutletId::new(id, 0))?.clone();
        if out.datum_type != f32::datum_type() || out.shape.as_concrete().is_none() {
            continue;
        }
        let pick = (0..2).find(|&side| {
            let (product, x) = (node.inputs[side], node.inputs[1 - side]);
            let op = model.nodes[product.node].op_as::<FaerMatMul>();
            let plain = op.is_some_and(|op| op.live.is_none() && !op.add_to);
            let same = |o: OutletId| model.outlet_fact(o).is_ok_and(|f| f.shape == out.shape);
            plain && single_reader(model, product) && same(product) && same(x)
        });
        let Some(side) = pick else {
            continue;
        };
        let (product, x) = (node.inputs[side], node.inputs[1 - side]);
        let op = FaerMatMul {
            add_to: true,
            ..model.nodes[product.node]
                .op_as::<FaerMatMul>()
                .expect("a product")
                .clone()
        };
        rewire_with_third_input(model, product, op, x, OutletId::new(id, 0))?;
        folded += 1;
    }
    Ok(folded)
}
