//! Exporting a trained adapter for ONNX runtimes: the tensors that a model grafted with
//! `--adapter-inputs` takes as inputs (`<module>.lora_A [d_in, k]`,
//! `<module>.lora_B [k, d_out]`, scale folded in, the model's activation dtype), as an
//! `.onnx_adapter` file that ONNX Runtime and onnxruntime-genai load.

use crate::adapter::onnx_adapter::OnnxAdapter;
use crate::adapter::LoadedAdapter;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::passes::graft::inputs::{input_names, onnx_factors, served_modules};
use crate::passes::graft::{effective_weight, initial_params};
use crate::passes::target::linear_at;
use crate::passes::variants::LowRank;
use crate::tensor::Array;

/// The adapter-input tensors of `adapter` for `model` (grafted with `--adapter-inputs`
/// on the base the adapter was made for). Modules of the model the adapter does not
/// name keep their defaults when it is active.
pub fn served_tensors(model: &Model, adapter: &LoadedAdapter) -> Result<Vec<(String, Array)>> {
    let variant = adapter.req.variant;
    let cfg = &adapter.req.cfg;
    let graph = &model.graph;
    let served = served_modules(graph);
    let cannot = |why: String| {
        Error::Usage(format!(
            "{}: {} cannot be served as adapter inputs: {why}",
            adapter.path.display(),
            variant.name()
        ))
    };
    let mut out = Vec::new();
    for module in adapter.tensors.keys() {
        let s = served.iter().find(|s| &s.module == module).ok_or_else(|| {
            let hint = if served.is_empty() {
                "graft the base model with --adapter-inputs to serve adapters".to_string()
            } else {
                format!(
                    "the adapter does not fit this model (its inputs are for modules like '{}')",
                    served[0].module
                )
            };
            Error::Usage(format!(
                "{}: no adapter input '{}' for the adapter's module; {hint}",
                model.path.display(),
                input_names(module).0
            ))
        })?;
        let params = adapter.module_params(module, s.dims)?;
        let mut lr = variant.low_rank(&params, cfg).map_err(cannot)?;
        let (default_a, default_b) = (
            graph.initializer(s.a).expect("a default"),
            graph.initializer(s.b).expect("a default"),
        );
        // A model that serves against the original weights of a weight-rewriting variant
        // (PiSSA, OLoRA) has empty defaults: the adapter is then the update from the
        // original weights, `s·BA − s·B₀A₀`, with the init recomputed from them.
        if variant.rewrites_weight() && default_a.dims()[1] == 0 {
            let target = s
                .node
                .and_then(|n| linear_at(graph, n, &adapter.req.filters))
                .ok_or_else(|| {
                    cannot(format!(
                        "the linear layer of '{module}' is not found in {}",
                        model.path.display()
                    ))
                })?;
            if target.quantized {
                return Err(cannot(format!(
                    "'{module}' is quantized; its init cannot be recomputed"
                )));
            }
            let w = effective_weight(graph, &target)?;
            let (init, _) =
                initial_params(&w, module, variant, cfg, adapter.req.adapter_dtype.onnx())?;
            lr = lr.minus(&variant.low_rank(&init, cfg).map_err(cannot)?);
        }
        let (name_a, name_b) = input_names(module);
        check_fits(
            &lr,
            default_a.dims(),
            default_b.dims(),
            &name_a,
            &name_b,
            model,
        )?;
        let (a, b) = onnx_factors(&lr);
        for (name, values, dtype) in [
            (name_a, a, default_a.elem_type()),
            (name_b, b, default_b.elem_type()),
        ] {
            let array = Array::from_f32(values, dtype).ok_or_else(|| {
                Error::Usage(format!(
                    "{}: input '{name}' is {}, not a float type",
                    model.path.display(),
                    crate::dtype::name(dtype)
                ))
            })?;
            out.push((name, array));
        }
    }
    Ok(out)
}

/// Checks the served factors against the inputs' fixed widths (`[d_in, k]`, `[k, d_out]`).
fn check_fits(
    lr: &LowRank,
    dims_a: &[i64],
    dims_b: &[i64],
    name_a: &str,
    name_b: &str,
    model: &Model,
) -> Result<()> {
    let (d_in, d_out) = (lr.down.ncols() as i64, lr.up.nrows() as i64);
    if dims_a.first() != Some(&d_in) || dims_b.get(1) != Some(&d_out) {
        return Err(Error::Usage(format!(
            "{}: adapter inputs '{name_a}' {dims_a:?} and '{name_b}' {dims_b:?} do not fit a {d_in} -> {d_out} layer; was the model grafted from another base?",
            model.path.display()
        )));
    }
    Ok(())
}

/// The `.onnx_adapter` file of `adapter` for `model`.
pub fn onnx_adapter(
    model: &Model,
    adapter: &LoadedAdapter,
    adapter_version: i32,
    model_version: i32,
) -> Result<OnnxAdapter> {
    Ok(OnnxAdapter {
        adapter_version,
        model_version,
        parameters: served_tensors(model, adapter)?,
    })
}
