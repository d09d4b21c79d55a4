//! Checkpoints: the adapter file of the trained values, saved with the optimizer
//! state and the metrics, resumed from, and the adapted model emitted with them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tract_core::ndarray::ArrayD;

use super::{AdamW, Engine, TrainOptions};
use crate::adapter::split_key;
use crate::adapter::AdapterFile;
use crate::error::{Error, Result};
use crate::jobs::{self, Outcome, TrainingRequest};
use crate::tensor::Array;
use crate::Model;

/// The optimizer state's file beside the adapter file `adapter`.
pub(super) fn optim_path(adapter: &Path) -> PathBuf {
    adapter.with_extension("optim.safetensors")
}

/// The adapter file of `params` (torch layout, lora-lite's format).
pub(super) fn adapter_file(
    engine: &Engine,
    params: &BTreeMap<String, ArrayD<f32>>,
    req: &TrainingRequest,
) -> AdapterFile {
    let mut outcome_file = engine.training().outcome.adapter_file(&req.graft);
    for (key, values) in params {
        let torch = crate::passes::graft::onnx_layout(values); // transposing back and forth
        let dtype = outcome_file.tensors[key].elem_type();
        outcome_file
            .tensors
            .insert(key.clone(), Array::from_f32(torch, dtype).expect("float"));
    }
    outcome_file
}

/// The optimizer state's key holding the FNV-1a hash of its adapter file's bytes.
const ADAPTER_HASH_KEY: &str = "adapter_fnv1a64";

/// FNV-1a (64 bits) of `bytes`, in hex.
fn fnv1a64(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

/// Writes the adapter, the optimizer state and the metrics as one set.
pub(super) fn save(
    opts: &TrainOptions,
    engine: &Engine,
    params: &BTreeMap<String, ArrayD<f32>>,
    opt: &AdamW,
    metrics: &str,
    metrics_path: &Path,
) -> Result<()> {
    let mut file = adapter_file(engine, params, &opts.training);
    file.metadata
        .insert("lora_graft_step".into(), opt.step.to_string());
    let mut state = AdapterFile {
        metadata: BTreeMap::new(),
        tensors: BTreeMap::new(),
    };
    state.metadata.insert("step".into(), opt.step.to_string());
    state
        .metadata
        .insert("variant".into(), opts.training.graft.variant.name().into());
    for (k, m) in &opt.m {
        state
            .tensors
            .insert(format!("m.{k}"), Array::F32(m.clone()));
    }
    for (k, v) in &opt.v {
        state
            .tensors
            .insert(format!("v.{k}"), Array::F32(v.clone()));
    }
    // The state names the adapter bytes it belongs to, so `--resume` refuses a pair
    // from two saves (one not written by a whole commit).
    let adapter_bytes = file.to_bytes()?;
    state
        .metadata
        .insert(ADAPTER_HASH_KEY.into(), fnv1a64(&adapter_bytes));
    let mut commit = crate::commit::Commit::new();
    commit.write(&optim_path(&opts.output), &state.to_bytes()?)?;
    commit.write(metrics_path, metrics.as_bytes())?;
    commit.write(&opts.output, &adapter_bytes)?;
    commit.commit()
}

/// Sets the frozen tensors a checkpoint holds (a calibrated init's start, which its data
/// alone gives) in the grafted `model`.
pub(super) fn restore_frozen(path: &Path, model: &mut Model, outcome: &mut Outcome) -> Result<()> {
    let file = AdapterFile::read(path)?;
    let frozen: Vec<(String, &'static str)> = outcome
        .grafted
        .modules
        .iter()
        .flat_map(|m| {
            m.params
                .keys()
                .filter(|n| !m.trainable.contains(n))
                .map(|&n| (m.module.clone(), n))
                .collect::<Vec<_>>()
        })
        .collect();
    for (module, name) in frozen {
        if let Some(a) = file.tensors.get(&format!("{module}.{name}")) {
            crate::jobs::set_param(model, outcome, &module, name, a.to_f32())?;
        }
    }
    Ok(())
}

/// Refuses, before any work, a `--resume` file without the optimizer state train saves
/// beside its checkpoints.
pub(super) fn check_resumable(path: &Path) -> Result<()> {
    let state = optim_path(path);
    if state.exists() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "{}: cannot resume: no optimizer state beside it ({}); --resume takes a checkpoint that train wrote (train saves both files)",
        path.display(),
        state.display()
    )))
}

/// Loads a checkpoint: values and optimizer state; refuses one from another model or variant.
pub(super) fn resume_from(
    path: &Path,
    params: &mut BTreeMap<String, ArrayD<f32>>,
    opt: &mut AdamW,
    req: &TrainingRequest,
    outcome: &Outcome,
) -> Result<()> {
    let file = AdapterFile::read(path)?; // completes a save a kill interrupted
    let adapter_bytes = crate::files::read_regular(path)?;
    let state = AdapterFile::read(&optim_path(path))?;
    let torn = match state.metadata.get(ADAPTER_HASH_KEY) {
        Some(hash) => *hash != fnv1a64(&adapter_bytes),
        None => state.metadata.get("step") != file.metadata.get("lora_graft_step"),
    };
    if torn {
        return Err(Error::Usage(format!(
            "{}: cannot resume: its optimizer state {} is from another save (step {} against the adapter's {}); a run was stopped while saving: resume from an earlier checkpoint",
            path.display(),
            optim_path(path).display(),
            state.metadata.get("step").map_or("?", String::as_str),
            file.metadata.get("lora_graft_step").map_or("?", String::as_str)
        )));
    }
    let mismatch = |reason: String| {
        Error::Usage(format!(
            "{}: cannot resume: {reason}; it is from another model or variant",
            path.display()
        ))
    };
    if state.metadata.get("variant").map(String::as_str) != Some(req.graft.variant.name()) {
        return Err(mismatch(format!(
            "it was trained with {:?}",
            state.metadata.get("variant")
        )));
    }
    for (key, p) in params.iter_mut() {
        let torch = file
            .tensors
            .get(key)
            .ok_or_else(|| mismatch(format!("it has no tensor '{key}'")))?
            .to_f32();
        let onnx = crate::passes::graft::onnx_layout(&torch);
        if onnx.shape() != p.shape() {
            return Err(mismatch(format!(
                "'{key}' is {:?}, the model needs {:?}",
                onnx.shape(),
                p.shape()
            )));
        }
        *p = onnx;
        for (prefix, store) in [("m", &mut opt.m), ("v", &mut opt.v)] {
            if let Some(a) = state.tensors.get(&format!("{prefix}.{key}")) {
                store.insert(key.clone(), a.to_f32());
            }
        }
    }
    // Every tensor of the file is one of the graft's (trained or frozen, as DeLoRA's
    // `lora_wnorm`).
    let known = |key: &str| {
        split_key(key).is_some_and(|(module, name)| {
            outcome
                .grafted
                .modules
                .iter()
                .any(|m| m.module == module && m.params.contains_key(name.as_str()))
        })
    };
    if file.tensors.keys().any(|k| !known(k)) {
        return Err(mismatch("it has tensors the model's targets do not".into()));
    }
    opt.step = state
        .metadata
        .get("step")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(())
}

/// Writes the adapted model holding the trained values: `grafted` is the model as the
/// training graph was built from (not computed again).
pub(super) fn emit(
    mut grafted: Model,
    engine: &Engine,
    params: &BTreeMap<String, ArrayD<f32>>,
    path: &Path,
) -> Result<()> {
    let mut outcome = engine.training().outcome.clone();
    for (key, values) in params {
        let (module, name) = split_key(key).expect("adapter key");
        let name = outcome
            .grafted
            .modules
            .iter()
            .find(|m| m.module == module)
            .and_then(|m| m.params.keys().find(|k| **k == name).copied())
            .expect("param");
        jobs::set_param(
            &mut grafted,
            &mut outcome,
            &module,
            name,
            crate::passes::graft::onnx_layout(values),
        )?;
    }
    grafted.save(path, &crate::model::SaveOptions::default())?;
    Ok(())
}
