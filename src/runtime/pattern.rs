//! What the runner's graph rewrites share (`matmul::{scalars, live, accumulate}`,
//! `masked_softmax`, `add_into`): recognising tract's decluttered ops, and one way to
//! put a new node in place of an old output (tract's `ModelPatch`: built, then applied).

use tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_core::ops::math::Mul;
use tract_onnx::prelude::*;

/// Whether node `id` is the two-input binary op `O` (tract's `Add`, `Mul`, ...).
pub fn is_binary<O: BinMiniOp>(model: &TypedModel, id: usize) -> bool {
    let node = &model.nodes[id];
    node.inputs.len() == 2 && node.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<O>())
}

/// Whether `small` broadcasts to `big`: the same rank, each dim 1 or `big`'s.
pub fn broadcasts_to(small: &[usize], big: &[usize]) -> bool {
    small.len() == big.len() && small.iter().zip(big).all(|(&s, &b)| s == 1 || s == b)
}

/// Whether `outlet` is read by one node and is not a model output (so that a rewrite
/// that consumes it drops nothing).
pub fn single_reader(model: &TypedModel, outlet: OutletId) -> bool {
    model.outlet_successors(outlet).len() == 1 && !model.outputs.contains(&outlet)
}

/// A `Mul` at `id` of a float32 tensor by a one-element float32 constant (either side)
/// that keeps the tensor's shape: the tensor and the factor.
pub fn scalar_mul(model: &TypedModel, id: usize) -> Option<(OutletId, f32)> {
    if !is_binary::<Mul>(model, id) {
        return None;
    }
    let node = &model.nodes[id];
    let out = model.outlet_fact(OutletId::new(id, 0)).ok()?;
    (0..2).find_map(|c| {
        let k = model.outlet_fact(node.inputs[c]).ok()?.konst.clone()?;
        let x = node.inputs[1 - c];
        let x_fact = model.outlet_fact(x).ok()?;
        let keeps = k.len() == 1
            && k.datum_type() == f32::datum_type()
            && x_fact.datum_type == f32::datum_type()
            && x_fact.shape == out.shape;
        keeps.then(|| Some((x, k.cast_to_scalar::<f32>().ok()?)))?
    })
}

/// Wires `op` (named `name`) on `inputs` and makes its first output take the place of
/// `replaced` for every reader.
pub fn replace_with(
    model: &mut TypedModel,
    name: String,
    op: impl Into<Box<dyn TypedOp>>,
    inputs: &[OutletId],
    replaced: OutletId,
) -> TractResult<()> {
    replace_outputs_with(model, name, op, inputs, &[replaced])
}

/// Wires `op` (named `name`) on `inputs` and makes its output `i` take the place of
/// `replaced[i]` for every reader.
pub fn replace_outputs_with(
    model: &mut TypedModel,
    name: String,
    op: impl Into<Box<dyn TypedOp>>,
    inputs: &[OutletId],
    replaced: &[OutletId],
) -> TractResult<()> {
    let mut patch = TypedModelPatch::default();
    let taps = inputs
        .iter()
        .map(|&input| patch.tap_model(model, input))
        .collect::<TractResult<TVec<_>>>()?;
    let outs = patch.wire_node(name, op, &taps)?;
    for (&old, new) in replaced.iter().zip(outs) {
        patch.shunt_outside(model, old, new)?;
    }
    patch.apply(model)
}
