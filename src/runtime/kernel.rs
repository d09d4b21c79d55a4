//! How tract's ONNX front end reads a node of one of lora-graft's elementwise-shaped
//! kernels (`cross_entropy`, `swiglu`): inference rules from a table, then the typed op.

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
