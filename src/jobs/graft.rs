//! The main job and applying a trained adapter: target, graft, and the adapter file
//! that goes with the grafted model.

use std::collections::BTreeMap;

use tract_core::ndarray::ArrayD;

use crate::adapter::meta::{GraftMeta, LiteCfg, SiteMeta, TargetMeta};
use crate::adapter::{AdapterFile, LoadedAdapter, CFG_KEY, GRAFT_KEY};
use crate::error::{Error, Result};
use crate::jobs::request::GraftRequest;
use crate::model::Model;
use crate::passes::graft::{self, Graft, GraftOptions, Grafted};
use crate::passes::target::{self, Targeting};
use crate::passes::variants::Variant;
use crate::passes::{run_pass, PassContext};
use crate::proto::tensor_proto::DataType;
use crate::tensor::Array;

/// What grafting did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The variant used.
    pub variant: &'static dyn Variant,
    /// The targets.
    pub targeting: Targeting,
    /// The adapters.
    pub grafted: Grafted,
    /// The settings grafted with: the request's, with the per-module ranks a calibrated
    /// init chose (PEFT's EVA).
    pub cfg: crate::passes::variants::Config,
    /// What the calibration run did, for the user (empty without one).
    pub calibration_report: String,
}

/// Rewrites the `Attention` nodes whose fused query, key and value projections `filters`
/// would adapt into separate `MatMul`s feeding `MultiHeadAttention`
/// ([`crate::passes::expose`]); leaves the model as it is when no target would land on
/// one. Returns the modules exposed.
pub fn expose_fused_projections(
    model: &mut Model,
    filters: &target::Filters,
) -> Result<Vec<String>> {
    let fused = |g: &crate::ir::Graph| {
        g.node_ids()
            .any(|id| g.node(id).op() == "Attention" && g.node(id).domain() == "com.microsoft")
    };
    if !fused(&model.graph) {
        return Ok(Vec::new());
    }
    let mut exposed = model.graph.clone();
    let mut pass = crate::passes::expose::ExposeProjections::default();
    let cx = PassContext {
        opset: graft::default_opset(&model.proto),
    };
    run_pass(&mut exposed, &cx, &mut pass).map_err(|e| e.context("exposing fused projections"))?;
    let Ok(targeting) = target::run(&exposed, filters) else {
        return Ok(Vec::new());
    };
    if !targeting
        .targets
        .iter()
        .any(|t| pass.modules.contains(&t.module))
    {
        return Ok(Vec::new());
    }
    model.graph = exposed;
    Ok(pass.modules)
}

/// Targets and grafts `model` in memory.
pub fn graft(model: &mut Model, req: &GraftRequest) -> Result<Outcome> {
    graft_writing_to(model, req, None)
}

/// [`graft`], writing the weights it rewrites (PiSSA's `W_res`) to `sink`, the
/// output's data file, as they are made ([`Model::data_sink`]).
pub fn graft_writing_to(
    model: &mut Model,
    req: &GraftRequest,
    sink: Option<&crate::ir::DataSink>,
) -> Result<Outcome> {
    let variant = req.variant;
    req.cfg.check()?;
    expose_fused_projections(model, &req.filters)?;
    let mut targeting = target::run(&model.graph, &req.filters)
        .map_err(|e| e.context(format!("{}: targeting", model.path.display())))?;
    let calibration = match (variant.calibration(&req.cfg), &req.calibration) {
        (None, _) => None,
        (Some(what), Some(data)) => Some(
            crate::calibrate::calibrate(model, &targeting.targets, what, data)
                .map_err(|e| e.context(format!("{}: calibration", model.path.display())))?,
        ),
        (Some(_), None) if req.values_from_file => None,
        (Some(_), None) => {
            return Err(Error::Usage(format!(
                "{} initialises from data: give --calibration data.jsonl (token data, as train's --data)",
                variant.name()
            )))
        }
    };
    let mut cfg = req.cfg.clone();
    if let Some(cal) = &calibration {
        let modules: Vec<String> = graft::by_module(&targeting.targets)
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        let ranks = variant.calibrated_ranks(cal, &modules, &cfg)?;
        targeting
            .targets
            .retain(|t| ranks.get(&t.module).is_none_or(|m| m.r > 0));
        if targeting.targets.is_empty() {
            return Err(Error::Usage(format!(
                "{}: {} left every layer at rank 0",
                model.path.display(),
                variant.name()
            )));
        }
        for (module, own) in ranks {
            if own.r > 0 && (own.r != cfg.r || own.alpha.value() != cfg.alpha.value()) {
                cfg.modules.insert(module, own);
            }
        }
    }
    let opts = GraftOptions {
        variant,
        cfg: cfg.clone(),
        adapter_dtype: req.adapter_dtype.onnx(),
        // Slots mix adapters of any variant in one batch: all against the original weights.
        adapter_inputs: match req.adapter_slots {
            Some(_) => Some(crate::passes::graft::inputs::InputBase::Original),
            None => req.adapter_inputs,
        },
        adapter_slots: req.adapter_slots,
        calibration: calibration.as_ref(),
        sink,
    };
    let cx = PassContext {
        opset: graft::default_opset(&model.proto),
    };
    let mut pass = Graft::new(&targeting.targets, opts);
    let remap = run_pass(&mut model.graph, &cx, &mut pass)
        .map_err(|e| e.context(model.path.display().to_string()))?;
    let grafted = pass.grafted;
    targeting.remap(&remap, &model.graph);
    Ok(Outcome {
        variant,
        targeting,
        grafted,
        cfg,
        calibration_report: calibration.map(|c| c.report).unwrap_or_default(),
    })
}

impl Outcome {
    /// The adapter file: lora-lite keys and layout, `cfg`, and lora-graft's metadata.
    pub fn adapter_file(&self, req: &GraftRequest) -> AdapterFile {
        let mut tensors = BTreeMap::new();
        let shared = self.variant.shared_params();
        for (name, values) in &self.grafted.shared {
            let a = Array::from_f32(values.clone(), req.adapter_dtype.onnx()).expect("float dtype");
            tensors.insert(name.to_string(), a);
        }
        for m in &self.grafted.modules {
            for (name, values) in m.params.iter().filter(|(n, _)| !shared.contains(n)) {
                let a =
                    Array::from_f32(values.clone(), req.adapter_dtype.onnx()).expect("float dtype");
                tensors.insert(format!("{}.{name}", m.module), a);
            }
        }
        let graft = GraftMeta {
            delora_init: (req.variant.name() == "delora")
                .then(|| req.cfg.delora_init.name().to_string()),
            layout: "torch".into(),
            pissa_niter: req.cfg.pissa_niter,
            rslora: req.cfg.rslora,
            seed: req.cfg.seed,
            targets: self
                .grafted
                .modules
                .iter()
                .map(|m| TargetMeta {
                    d_in: m.dims.d_in,
                    d_out: m.dims.d_out,
                    module: m.module.clone(),
                    sites: m.sites.iter().map(SiteMeta::from).collect(),
                })
                .collect(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let mut extra: Vec<(String, serde_json::Value)> = (self.variant.cfg_fields(&self.cfg))
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        // Per-module ranks and alphas under PEFT's names, so the file loads elsewhere.
        if !self.cfg.modules.is_empty() {
            let (ranks, alphas): (serde_json::Map<_, _>, serde_json::Map<_, _>) = self
                .cfg
                .modules
                .iter()
                .map(|(m, own)| {
                    (
                        (m.clone(), own.r.into()),
                        (m.clone(), own.alpha.0.clone().into()),
                    )
                })
                .unzip();
            extra.push(("rank_pattern".into(), ranks.into()));
            extra.push(("alpha_pattern".into(), alphas.into()));
        }
        let cfg = LiteCfg {
            variant: self.variant.name().into(),
            r: req.cfg.r,
            alpha: req.cfg.alpha.0.clone(),
            dtype: req.adapter_dtype.torch_name().into(),
            filters: req.filter_text.clone(),
            extra,
        };
        let metadata = BTreeMap::from([
            (CFG_KEY.to_string(), cfg.to_json()),
            (GRAFT_KEY.to_string(), graft.to_json()),
        ]);
        AdapterFile { metadata, tensors }
    }
}

/// Lowers onnxruntime's fused ops of a grafted `model` into default-domain ops
/// ([`crate::passes::lower`]); returns how many of each op.
pub fn lower(
    model: &mut Model,
    outcome: &mut Outcome,
) -> Result<std::collections::BTreeMap<String, usize>> {
    let cx = PassContext {
        opset: graft::default_opset(&model.proto),
    };
    let mut pass = crate::passes::lower::Lower::default();
    let remap = run_pass(&mut model.graph, &cx, &mut pass)
        .map_err(|e| e.context(model.path.display().to_string()))?;
    outcome.targeting.remap(&remap, &model.graph);
    Ok(pass.lowered)
}

/// Sets adapter tensor `name` of `module` to `values` (torch layout), in the graph
/// (ONNX layout, its dtype) and in `outcome`.
pub fn set_param(
    model: &mut Model,
    outcome: &mut Outcome,
    module: &str,
    name: &'static str,
    values: ArrayD<f32>,
) -> Result<()> {
    let key = format!("{module}.{name}");
    let v = model
        .graph
        .value_by_name(&key)
        .ok_or_else(|| Error::Usage(format!("the model has no adapter tensor '{key}'")))?;
    let dtype = model
        .graph
        .initializer(v)
        .map(|i| i.elem_type())
        .unwrap_or(DataType::Float as i32);
    let a = Array::from_f32(graft::onnx_layout(&values), dtype).expect("float dtype");
    model
        .graph
        .replace_initializer(v, crate::ir::Initializer::from_array(&a)?);
    if let Some(m) = outcome
        .grafted
        .modules
        .iter_mut()
        .find(|m| m.module == module)
    {
        m.params.insert(name, values);
    }
    Ok(())
}

/// Grafts a trained adapter file onto `model` (its values instead of fresh inits).
pub fn apply(model: &mut Model, adapter: &LoadedAdapter) -> Result<Outcome> {
    expose_fused_projections(model, &adapter.req.filters)?;
    let targeting = adapter.targets(model)?;
    adapter.check(model, &targeting)?;
    let mut outcome = graft(model, &adapter.req)?;
    let modules: Vec<String> = outcome
        .grafted
        .modules
        .iter()
        .map(|m| m.module.clone())
        .collect();
    for (module, params) in adapter.params(&modules, &targeting) {
        for (name, values) in params {
            set_param(model, &mut outcome, &module, name, values)?;
        }
    }
    for name in outcome.variant.shared_params() {
        if let Some(a) = adapter.shared.get(*name) {
            outcome.grafted.shared.insert(name, a.clone());
        }
    }
    Ok(outcome)
}
