//! Merging: folds a trained adapter file into a model's base weights.

use crate::adapter::LoadedAdapter;
use crate::error::Result;
use crate::model::Model;
use crate::passes::merge::{Merge, PissaBase};
use crate::passes::{graft::default_opset, run_pass, PassContext};

/// Folds a trained adapter file into `model`'s weights; returns the modules merged.
/// With `dequantize`, a quantized weight (`DequantizeLinear`, `Mul(Cast(int8), scale)`)
/// is replaced by its merged float values; without, it is refused.
pub fn merge(
    model: &mut Model,
    adapter: &LoadedAdapter,
    base: PissaBase,
    dequantize: bool,
) -> Result<usize> {
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
        dequantize,
        merged: 0,
    };
    let cx = PassContext {
        opset: default_opset(&model.proto),
    };
    run_pass(&mut model.graph, &cx, &mut pass)
        .map_err(|e| e.context(model.path.display().to_string()))?;
    Ok(pass.merged)
}
