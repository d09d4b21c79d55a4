//! Exporting a trained adapter for ONNX runtimes: the tensors that a model grafted with
//! `--adapter-inputs` takes as inputs (`<module>.lora_A [d_in, k]`,
//! `<module>.lora_B [k, d_out]`, scale folded in, the model's activation dtype), as an
//! `.onnx_adapter` file that ONNX Runtime and onnxruntime-genai load.

use crate::adapter::onnx_adapter::OnnxAdapter;
use crate::adapter::LoadedAdapter;
use crate::error::{Error, Result};
use crate::model::Model;
use tract_core::ndarray::{s, ArrayD, IxDyn};

use crate::passes::graft::inputs::{
    input_names, onnx_factors, served_modules, InputBase, ServedModule,
};
use crate::passes::graft::{complete_start, effective_weight};
use crate::passes::target::linear_at;
use crate::passes::variants::lora::Lora;
use crate::passes::variants::{Alpha, LowRank, Params};
use crate::tensor::Array;
use tract_core::ndarray::Array2;

/// `params` of `module` with the frozen start a file lacks recomputed
/// ([`complete_start`]) from the weight `weight` gives.
fn start_of(
    params: Params,
    module: &str,
    adapter: &LoadedAdapter,
    weight: impl FnOnce() -> Result<Array2<f32>>,
) -> Result<Params> {
    let cfg = &*adapter.req.cfg.for_module(module);
    let dtype = adapter.req.adapter_dtype.onnx();
    complete_start(params, module, adapter.req.variant, cfg, dtype, weight)
}

/// `adapter` as one low-rank update per module of `model` (grafted with adapter
/// inputs or slots on the base the adapter was made for), scale folded in.
pub fn served_factors(
    model: &Model,
    adapter: &LoadedAdapter,
) -> Result<Vec<(ServedModule, LowRank)>> {
    let variant = adapter.req.variant;
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
        let cfg = &*adapter.req.cfg.for_module(module);
        let params = adapter.module_params(module, s.dims)?;
        let lr = if variant.frozen_start() && s.base == InputBase::Trained {
            // Served on W_res = W − s·B₀A₀, the inputs' defaults being the start.
            Lora::low_rank_of(&params, cfg)
        } else {
            let params = start_of(params, module, adapter, || {
                let target = s
                    .node
                    .and_then(|n| linear_at(graph, n, &adapter.req.filters))
                    .ok_or_else(|| {
                        cannot(format!(
                            "the linear layer of '{module}' is not found in {}",
                            model.path.display()
                        ))
                    })?;
                effective_weight(graph, &target)
            })?;
            variant.low_rank(&params, cfg).map_err(cannot)?
        };
        out.push((s.clone(), lr));
    }
    Ok(out)
}

/// The adapter-input tensors of `adapter` for `model` (grafted with `--adapter-inputs`):
/// `<module>.lora_A [d_in, k]`, `<module>.lora_B [k, d_out]`. Modules of the model the
/// adapter does not name keep their defaults when it is active.
pub fn served_tensors(model: &Model, adapter: &LoadedAdapter) -> Result<Vec<(String, Array)>> {
    let mut out = Vec::new();
    for (s, lr) in served_factors(model, adapter)? {
        if s.slots.is_some() {
            return Err(Error::Usage(format!(
                "{} serves adapters in slots; stack adapters for it with `lora-graft pack`",
                model.path.display()
            )));
        }
        let (name_a, name_b) = input_names(&s.module);
        let (a, b) = onnx_factors(&lr);
        out.push((name_a, float_array(a, s.dtype, model)?));
        out.push((name_b, float_array(b, s.dtype, model)?));
    }
    Ok(out)
}

/// The stacked slot tensors of `adapters` (slot i = adapters[i], the other slots zero)
/// for `model` (grafted with `--adapter-slots`), ranks padded with zeros to the largest.
pub fn pack(model: &Model, adapters: &[LoadedAdapter]) -> Result<Vec<(String, Array)>> {
    let served = served_modules(&model.graph);
    let slots = served.first().and_then(|s| s.slots).ok_or_else(|| {
        Error::Usage(format!(
            "{} has no adapter slots; graft the base model with --adapter-slots K",
            model.path.display()
        ))
    })?;
    if adapters.len() > slots {
        return Err(Error::Usage(format!(
            "{} adapters do not fit the {slots} slots of {}; graft it with --adapter-slots {}",
            adapters.len(),
            model.path.display(),
            adapters.len()
        )));
    }
    let per_adapter: Vec<Vec<(ServedModule, LowRank)>> = adapters
        .iter()
        .map(|a| served_factors(model, a))
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for s in &served {
        let factors: Vec<Option<&LowRank>> = per_adapter
            .iter()
            .map(|f| {
                f.iter()
                    .find(|(m, _)| m.module == s.module)
                    .map(|(_, lr)| lr)
            })
            .collect();
        let k = factors
            .iter()
            .flatten()
            .map(|lr| lr.rank())
            .max()
            .unwrap_or(0);
        let mut a = ArrayD::<f32>::zeros(IxDyn(&[slots, s.dims.d_in, k]));
        let mut b = ArrayD::<f32>::zeros(IxDyn(&[slots, k, s.dims.d_out]));
        for (slot, lr) in factors.iter().enumerate() {
            let Some(lr) = lr else { continue };
            let (fa, fb) = onnx_factors(lr);
            let r = lr.rank();
            a.slice_mut(s![slot, .., ..r]).assign(&fa);
            b.slice_mut(s![slot, ..r, ..]).assign(&fb);
        }
        let (name_a, name_b) = input_names(&s.module);
        out.push((name_a, float_array(a, s.dtype, model)?));
        out.push((name_b, float_array(b, s.dtype, model)?));
    }
    Ok(out)
}

fn float_array(values: ArrayD<f32>, dtype: i32, model: &Model) -> Result<Array> {
    Array::from_f32(values, dtype).ok_or_else(|| {
        Error::Usage(format!(
            "{}: adapter inputs of type {} are not a float type",
            model.path.display(),
            crate::dtype::name(dtype)
        ))
    })
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

/// `adapter` as an HF PEFT LoRA folder: `(adapter_config.json text, tensors by PEFT
/// key)`. LoRA keeps its rank, alpha and rsLoRA; every other low-rank variant is written
/// as the plain LoRA of its update (rank k, `lora_alpha = k`: scale 1). A variant that
/// starts from the weight (PiSSA, OLoRA) needs `base`, the original model, when the file
/// lacks its start `A₀`, `B₀` (PEFT's): its update from
/// the original weights is `[s·B, −s·B₀]·[A; A₀]`, rank 2r, as PEFT's own conversion of
/// mutated inits writes it.
pub fn peft_folder(
    adapter: &LoadedAdapter,
    base: Option<&Model>,
) -> Result<(String, Vec<(String, Array)>)> {
    let variant = adapter.req.variant;
    let cannot = |why: String| {
        Error::Usage(format!(
            "{}: {} cannot be written as a PEFT LoRA adapter: {why}",
            adapter.path.display(),
            variant.name()
        ))
    };
    let targets = match base {
        Some(model) => {
            let targeting = adapter.targets(model)?;
            adapter.check(model, &targeting)?;
            Some((model, targeting))
        }
        None => None,
    };
    let plain_lora = variant.name() == "lora";
    let mut factors = Vec::new();
    for (module, tensors) in &adapter.tensors {
        let cfg = &*adapter.req.cfg.for_module(module);
        let (d_in, d_out) = match (&targets, tensors.get("lora_A"), tensors.get("lora_B")) {
            (Some((_, t)), _, _) => {
                let t = t
                    .targets
                    .iter()
                    .find(|t| &t.module == module)
                    .expect("checked");
                (t.d_in, t.d_out)
            }
            (None, Some(a), Some(b)) if a.ndim() == 2 && b.ndim() == 2 => {
                (a.shape()[1], b.shape()[0])
            }
            _ => {
                return Err(cannot(format!(
                    "the widths of '{module}' come from the model: give the base model with --model"
                )))
            }
        };
        let dims = crate::passes::variants::Dims { d_in, d_out };
        let params = start_of(
            adapter.module_params(module, dims)?,
            module,
            adapter,
            || {
                let (model, targeting) = targets.as_ref().ok_or_else(|| {
                cannot(
                    "its start A₀, B₀ is not in the file and comes from the original weights: give the base model with --model".into(),
                )
            })?;
                let t = targeting
                    .targets
                    .iter()
                    .find(|t| &t.module == module)
                    .expect("checked");
                effective_weight(&model.graph, t)
            },
        )?;
        let lr = variant.low_rank(&params, cfg).map_err(cannot)?;
        factors.push((module.clone(), cfg.clone(), params, lr));
    }
    let modules: Vec<String> = factors.iter().map(|(m, ..)| m.clone()).collect();
    let mut tensors = Vec::new();
    let mut ranks = Vec::new();
    for (module, cfg, params, lr) in &factors {
        let key = |leaf: &str| format!("base_model.model.{module}.{leaf}.weight");
        let (a, b, r, alpha) = if plain_lora {
            (
                params["lora_A"].clone(),
                params["lora_B"].clone(),
                cfg.r,
                cfg.alpha.clone(),
            )
        } else {
            let k = lr.rank();
            (
                lr.down.clone().into_dyn(),
                lr.up.clone().into_dyn(),
                k,
                Alpha::from(k as f64),
            )
        };
        tensors.push((key("lora_A"), Array::F32(a)));
        tensors.push((key("lora_B"), Array::F32(b)));
        ranks.push((module.clone(), r, alpha));
    }
    let (r, alpha) = match ranks.first() {
        Some((_, r, a)) => (*r, a.clone()),
        None => return Err(cannot("it holds no module".into())),
    };
    let own: Vec<(String, usize, Alpha)> = ranks
        .into_iter()
        .filter(|(_, rm, am)| *rm != r || *am != alpha)
        .collect();
    let rslora = plain_lora && adapter.req.cfg.rslora;
    let config = crate::adapter::peft::lora_config(r, &alpha, rslora, &modules, &own);
    Ok((config, tensors))
}
