//! `AddInto`: `x + Pad(a)` with zeros, as `a` added into its region of `x`'s buffer.
//!
//! The gradient of a `Slice` is a zero `Pad` of the slice's gradient, which the
//! backward pass then adds to the other gradients of the sliced tensor: RoPE's
//! `rotate_half` slices each head in two, so each of its halves' gradients was written
//! at full size (half zeros) and read back by an `Add`. Here only the region is read and
//! written. Exact: outside the region `x + 0` is `x`.

use tract_core::ops::array::{Pad, PadMode};
use tract_core::ops::math::Add;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::pattern::{is_binary, replace_with, single_reader};

/// `x` with `a` added at `start..start + a.shape[axis]` along `axis` (every other dim
/// equal). Float32.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AddInto {
    axis: usize,
    start: usize,
}

impl Op for AddInto {
    fn name(&self) -> StaticName {
        "AddInto".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("axis {} from {}", self.axis, self.start)])
    }

    op_as_typed_op!();
}

impl EvalOp for AddInto {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, a) = args_2!(inputs);
        let (xs, as_) = (x.shape(), a.shape());
        let fits = xs.len() == as_.len()
            && self.axis < xs.len()
            && self.start + as_[self.axis] <= xs[self.axis]
            && (0..xs.len()).all(|i| i == self.axis || xs[i] == as_[i]);
        ensure!(fits, "AddInto: {as_:?} does not fit {xs:?} at {self:?}");
        let outer: usize = xs[..self.axis].iter().product();
        let inner: usize = xs[self.axis + 1..].iter().product();
        let (len, span) = (xs[self.axis], as_[self.axis] * inner);
        let mut y = x.into_tensor(); // x's buffer, when this is its last reader
        {
            let a = a.try_as_plain_ram()?;
            let a = a.as_slice::<f32>()?;
            let mut plain = y.try_as_plain_ram_mut()?;
            let y = plain.as_slice_mut::<f32>()?;
            for o in 0..outer {
                let at = (o * len + self.start) * inner;
                let (dst, src) = (&mut y[at..at + span], &a[o * span..(o + 1) * span]);
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            }
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for AddInto {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 2 && inputs.iter().all(|f| f.datum_type == f32::datum_type()),
            "AddInto takes two float32 inputs"
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// A zero `Pad` at `id` along one axis only, read by one node: its input, the axis and
/// the padding before.
fn zero_pad(model: &TypedModel, id: usize) -> Option<(OutletId, usize, usize)> {
    let node = &model.nodes[id];
    let pad = node.op_as::<Pad>()?;
    let PadMode::Constant(value) = &pad.mode else {
        return None;
    };
    let zero = value.len() == 1 && value.cast_to_scalar::<f32>().ok()? == 0.0;
    let padded: Vec<usize> = (0..pad.pads.len())
        .filter(|&i| pad.pads[i] != (0, 0))
        .collect();
    let single = single_reader(model, OutletId::new(id, 0));
    (zero && single && padded.len() == 1)
        .then(|| (node.inputs[0], padded[0], pad.pads[padded[0]].0))
}

/// Runs every float32 `Add` of a tensor and a zero `Pad` along one axis (of the same
/// shape, the `Pad` read by the `Add` only) as [`AddInto`]. Returns how many.
pub fn use_add_into(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in 0..model.nodes.len() {
        if !is_binary::<Add>(model, id) {
            continue;
        }
        let node = &model.nodes[id];
        let out = model.outlet_fact(OutletId::new(id, 0))?;
        if out.datum_type != f32::datum_type() {
            continue;
        }
        let pick = (0..2).find_map(|side| {
            let (padded, x) = (node.inputs[side], node.inputs[1 - side]);
            let (a, axis, start) = zero_pad(model, padded.node)?;
            let same = |o: OutletId| model.outlet_fact(o).is_ok_and(|f| f.shape == out.shape);
            let a_f32 = model
                .outlet_fact(a)
                .is_ok_and(|f| f.datum_type == f32::datum_type());
            (same(padded) && same(x) && a_f32).then_some((x, a, axis, start))
        });
        let Some((x, a, axis, start)) = pick else {
            continue;
        };
        let (name, op) = (node.name.clone(), AddInto { axis, start });
        replace_with(model, name, op, &[x, a], OutletId::new(id, 0))?;
        fused += 1;
    }
    Ok(fused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::binary::TypedBinOp;

    /// `x + Pad(a)` along the last axis (at its start and at its end) and a middle one:
    /// fused, and tract's result exactly.
    #[test]
    fn add_into_equals_pad_then_add() {
        for (axis, pads) in [(2, (0, 3)), (2, (3, 0)), (1, (1, 2))] {
            let x_shape = [2, 4, 6];
            let mut a_shape = x_shape;
            a_shape[axis] -= pads.0 + pads.1;
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact(x_shape)).unwrap();
            let a = model.add_source("a", f32::fact(a_shape)).unwrap();
            let mut all = vec![(0, 0); 3];
            all[axis] = pads;
            let pad = Pad::new(all, PadMode::Constant(Arc::new(tensor0(0f32))));
            let p = model.wire_node("pad", pad, &[a]).unwrap()[0];
            let y = model
                .wire_node("y", TypedBinOp(Box::new(Add), None), &[p, x])
                .unwrap();
            model.select_output_outlets(&y).unwrap();
            let mut fused = model.clone();
            assert_eq!(use_add_into(&mut fused).unwrap(), 1, "{axis} {pads:?}");
            let value = |shape: &[usize], seed: usize| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|i| ((i * 31 + seed) % 17) as f32 - 8.0)
                    .collect();
                Tensor::from_shape(shape, &v).unwrap().into_tvalue()
            };
            let inputs = tvec!(value(&x_shape, 1), value(&a_shape, 2));
            let run = |m: TypedModel| m.into_runnable().unwrap().run(inputs.clone()).unwrap();
            assert_eq!(run(model)[0], run(fused)[0], "{axis} {pads:?}");
        }
    }
}
