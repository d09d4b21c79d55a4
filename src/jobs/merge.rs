//! Merging: folds a trained adapter file into a model's base weights.

use crate::adapter::LoadedAdapter;
use crate::error::Result;
use crate::model::Model;
use crate::passes::merge::{Merge, PissaBase};
use crate::passes::{graft::default_opset, run_pass, PassContext};

/// Folds a trained adapter file into `model`'s weights; returns the modules merged.
pub fn merge(model: &mut Model, adapter: &LoadedAdapter, base: PissaBase) -> Result<usize> {
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
        merged: 0,
    };
    let cx = PassContext {
        opset: default_opset(&model.proto),
    };
    run_pass(&mut model.graph, &cx, &mut pass)
        .map_err(|e| e.context(model.path.display().to_string()))?;
    Ok(pass.merged)
}
