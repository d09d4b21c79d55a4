//! LoRA-GA's statistic: the loss's gradient with respect to every target's weight, from
//! the gradient pass on a zero probe around each target.

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD};

use super::{read_batches, Calibration, CalibrationRequest, ModuleStats};
use crate::error::{Error, Result};
use crate::jobs::{GraftRequest, TrainingRequest};
use crate::passes::grad::loss::Loss;
use crate::passes::target::Target;
use crate::passes::variants::{Config, Dims, Init, ParamSpec, Params, Variant};
use crate::Model;

/// The loss calibration data in `path` is for: JSONL lines holding a `label` are
/// classification examples, a `target` regression ones; anything else is token data.
pub(super) fn loss_of_data(path: &std::path::Path) -> Result<Loss> {
    let text = crate::files::read_regular(path)?;
    let first = text
        .split(|&b| b == b'\n')
        .find(|l| l.iter().any(|b| !b.is_ascii_whitespace()));
    let line: Option<serde_json::Value> = first.and_then(|l| serde_json::from_slice(l).ok());
    Ok(match line {
        Some(v) if v.get("label").is_some() => Loss::Class,
        Some(v) if v.get("target").is_some() => Loss::Mse,
        _ => Loss::CausalLm,
    })
}

/// The probe that makes the gradient pass give a target's weight gradient:
/// `y' = y + x·P` with `P = 0` (`[d_out, d_in]` in torch layout), so `∂L/∂Pᵀ = ∂L/∂W`.
pub struct WeightProbe;

impl Variant for WeightProbe {
    fn name(&self) -> &'static str {
        "weight_probe"
    }

    fn uses_rank(&self) -> bool {
        false
    }

    fn param_specs(&self, d: Dims, _cfg: &Config) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: "lora_probe",
            shape: vec![d.d_out, d.d_in],
            init: Init::Zeros,
            trainable: true,
        }]
    }

    fn branch(
        &self,
        b: &mut crate::ir::build::Builder,
        x: crate::ir::ValueId,
        _y: crate::ir::ValueId,
        p: &BTreeMap<&'static str, crate::ir::ValueId>,
        _cfg: &Config,
    ) -> Result<crate::ir::ValueId> {
        b.op("MatMul", &[x, p["lora_probe"]], vec![])
    }

    fn merged_weight(&self, w: Array2<f32>, _p: &Params, _cfg: &Config) -> Array2<f32> {
        w
    }
}

pub(super) fn weight_gradients(
    model: &Model,
    targets: &[Target],
    req: &CalibrationRequest,
) -> Result<Calibration> {
    static PROBE: WeightProbe = WeightProbe;
    let mut graft = GraftRequest::new(&PROBE);
    graft.filters.modules = Some(targets.iter().map(|t| t.module.clone()).collect());
    let loss = match req.loss {
        Some(loss) => loss,
        None => loss_of_data(&req.data)?,
    };
    let training = TrainingRequest::new(graft, loss, req.batch, req.seq);
    let engine = crate::train::Engine::new(model.clone(), &training, req.threads)?;
    let batches = read_batches(
        model,
        req,
        (loss != Loss::CausalLm).then(|| engine.fields()),
    )?;
    let params = engine.initial_params();
    let mut sums: BTreeMap<String, ArrayD<f64>> = BTreeMap::new();
    for batch in &batches {
        let res = engine.step(&batch.rows, &params)?;
        if !res.loss.is_finite() {
            return Err(Error::Usage(format!(
                "calibration: the loss is {} on the base model",
                res.loss
            )));
        }
        for (name, g) in res.grads {
            let g = g.mapv(|v| v as f64);
            sums.entry(name).and_modify(|s| *s += &g).or_insert(g);
        }
    }
    let n = batches.len().max(1) as f64;
    let mut modules = BTreeMap::new();
    for (name, sum) in sums {
        let (module, _) = crate::adapter::split_key(&name).expect("adapter key");
        // ONNX layout [d_in, d_out] -> torch [d_out, d_in].
        let g: Array2<f64> = (sum / n)
            .into_dimensionality()
            .map_err(|e| Error::Runtime(e.to_string()))?;
        modules.insert(
            module.to_string(),
            ModuleStats {
                grad: Some(g.reversed_axes().as_standard_layout().to_owned()),
                ..Default::default()
            },
        );
    }
    Ok(Calibration {
        modules,
        batches: batches.len(),
        report: format!(
            "calibration: the weight gradients over {} batches",
            batches.len()
        ),
    })
}
