//! Constant factors folded into the products next to them: a `Mul` by a one-element
//! constant of a product's output (LoRA's scale `s·(x Aᵀ)Bᵀ`), or of an input read only
//! by products (the gradient of attention's `scores·scale`), becomes
//! [`FaerMatMul`]'s `alpha`, one pass over a large tensor fewer.
//!
//! Folding an output's factor is exact: faer scales the finished sum once, as the `Mul`
//! did. Folding an input's factor scales the sum instead of each term, which differs in
//! the last bit unless the factor is a power of two (as attention's `1/√64` and LoRA's
//! `alpha/r` usually are).

use tract_onnx::prelude::*;

use super::FaerMatMul;
use crate::runtime::pattern::{scalar_mul, single_reader};

/// Folds every foldable `Mul` by a constant into the [`FaerMatMul`]s beside it (see the
/// module) and returns how many.
pub fn fold_scalar_factors(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    for id in 0..model.nodes.len() {
        let Some((x, factor)) = scalar_mul(model, id) else {
            continue;
        };
        if !factor.is_finite() {
            continue;
        }
        let mul_out = OutletId::new(id, 0);
        let is_product = |node: usize| model.nodes[node].op_is::<FaerMatMul>();
        // Which products take the factor: the one that makes x, when the Mul is x's
        // only reader; else the ones that read the Mul, when nothing else does.
        let x_alone = single_reader(model, x);
        let readers: Vec<usize> = model
            .outlet_successors(mul_out)
            .iter()
            .map(|inlet| inlet.node)
            .collect();
        // (A product reading the Mul twice would take the factor squared.)
        let distinct = readers
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
            == readers.len();
        let takers = if x_alone && x.slot == 0 && is_product(x.node) {
            vec![x.node]
        } else if !readers.is_empty()
            && distinct
            && !model.outputs.contains(&mul_out)
            && readers.iter().all(|&r| is_product(r))
        {
            readers
        } else {
            continue;
        };
        for node in takers {
            let mut op = model.nodes[node]
                .op_as::<FaerMatMul>()
                .expect("a product")
                .clone();
            op.alpha *= factor;
            model.nodes[node].op = Box::new(op);
        }
        let mut patch = TypedModelPatch::default();
        let tapped = patch.tap_model(model, x)?;
        patch.shunt_outside(model, mul_out, tapped)?;
        patch.apply(model)?;
        folded += 1;
    }
    Ok(folded)
}
