//! How tract's ONNX front end reads a node of one of lora-graft's elementwise-shaped
//! kernels (`cross_entropy`, `swiglu`, `softmax_grad`, `rms_norm_grad`): inference rules
//! from a table, then the typed op ([`kernel_op!`] writes each one's `Op` and `parse`).

use tract_onnx::tract_hir::internal::*;

/// A kernel node as parsed: output `i` takes input 0's element type and the shape of
/// input `shape_of[i]`; it wires `op`.
#[derive(Debug, Clone, Hash)]
pub(crate) struct KernelNode<O> {
    /// The typed op the node becomes.
    pub op: O,
    /// The node's input count.
    pub inputs: usize,
    /// For each output, the input whose shape it has.
    pub shape_of: &'static [usize],
}

impl<O: TypedOp + Clone + std::hash::Hash> Expansion for KernelNode<O> {
    fn name(&self) -> StaticName {
        self.op.name()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.shape_of.len())
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, self.inputs)?;
        check_output_arity(outputs, self.shape_of.len())?;
        for (output, &like) in outputs.iter().zip(self.shape_of) {
            s.equals(&output.datum_type, &inputs[0].datum_type)?;
            s.equals(&output.shape, &inputs[like].shape)?;
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.op.clone(), inputs)
    }
}

/// The parts every kernel op of lora-graft's own shares: `Op` (its name, typed) and
/// `parse` for tract's ONNX op register, a [`KernelNode`] of `inputs` inputs whose
/// output `i` has the shape of input `shapes[i]`.
macro_rules! kernel_op {
    ($op:ident, $name:ident, inputs: $inputs:literal, shapes: [$($like:literal),+]) => {
        impl Op for $op {
            fn name(&self) -> StaticName {
                $name.into()
            }

            op_as_typed_op!();
        }

        #[doc = concat!("[`", stringify!($name), "`], for tract's ONNX op register.")]
        pub fn parse(
            _ctx: &tract_onnx::model::ParsingContext,
            _node: &tract_onnx::pb::NodeProto,
        ) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
            let node = super::kernel::KernelNode {
                op: $op,
                inputs: $inputs,
                shape_of: &[$($like),+],
            };
            Ok((expand(node), vec![]))
        }
    };
}
pub(crate) use kernel_op;
