//! Merging: folds a trained adapter file into a model's base weights.

use crate::adapter::LoadedAdapter;
use crate::error::Result;
use crate::model::Model;
use crate::passes::merge::{Merge, PissaBase, QuantizedWeights};
use crate::passes::{graft::default_opset, run_pass, PassContext};

/// Folds a trained adapter file into `model`'s weights. A quantized weight is refused,
/// replaced by its merged float values (`DequantizeLinear`, `Mul(Cast(int8), scale)`), or
/// quantized again in its format (`MatMulNBits`), as `quantized` says.
pub fn merge(
    model: &mut Model,
    adapter: &LoadedAdapter,
    base: PissaBase,
    quantized: QuantizedWeights,
) -> Result<Merged> {
    merge_writing_to(model, adapter, base, quantized, None)
}

/// [`merge`], writing the merged weights to `sink`, the output's data file, as they
/// are made ([`Model::data_sink`]).
pub fn merge_writing_to(
    model: &mut Model,
    adapter: &LoadedAdapter,
    base: PissaBase,
    quantized: QuantizedWeights,
    sink: Option<&crate::ir::DataSink>,
) -> Result<Merged> {
    crate::jobs::graft::expose_fused_projections(model, &adapter.req.filters)?;
    let targeting = adapter.targets(model)?;
    adapter.check(model, &targeting)?;
    let modules: Vec<String> = adapter.tensors.keys().cloned().collect();
    let params = adapter.params(&modules, &targeting);
    let mut pass = Merge {
        targets: &targeting.targets,
        variant: adapter.req.variant,
        cfg: &adapter.req.cfg,
        adapters: &params,
        adapter_dtype: adapter.req.adapter_dtype.onnx(),
        base,
        quantized,
        sink,
        merged: 0,
        requantized: Vec::new(),
    };
    let cx = PassContext {
        opset: default_opset(&model.proto),
    };
    run_pass(&mut model.graph, &cx, &mut pass)
        .map_err(|e| e.context(model.path.display().to_string()))?;
    Ok(Merged {
        modules: pass.merged,
        requantized: pass.requantized,
    })
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct Merged {
    /// Modules folded into their weights.
    pub modules: usize,
    /// Per module written back into its quantized format, `‖W_q − W‖ / ‖W‖` against the
    /// float merged weight.
    pub requantized: Vec<(String, f64)>,
}
