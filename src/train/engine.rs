//! The data-parallel tract engine: the training graph, one plan per worker thread,
//! each on a slice of the batch, gradients summed.

use std::collections::BTreeMap;

use tract_core::ndarray::ArrayD;

use super::workers::{fields_of, split_passes, Workers};
use crate::adapter::split_key;
use crate::data::{Fields, Row};
use crate::error::Result;
use crate::jobs::{self, Outcome, Training, TrainingRequest};
use crate::passes::grad::loss::Loss;
use crate::tensor::Array;
use crate::Model;

/// The training graph, one plan per worker, each on a slice of the batch.
pub struct Engine {
    training: Training,
    workers: Workers,
    loss: Loss,
}

/// Loss and gradients of one batch.
pub struct StepResult {
    /// The mean loss over the batch's counted tokens.
    pub loss: f64,
    /// Gradients by tensor name (ONNX layout).
    pub grads: BTreeMap<String, ArrayD<f32>>,
    /// Counted tokens.
    pub tokens: usize,
}

impl Engine {
    /// Builds the training graph for `req` and `threads` workers (the batch must split
    /// evenly; otherwise fewer workers are used), each pass on `req.micro_batch` rows
    /// when given.
    pub fn new(mut model: Model, req: &TrainingRequest, threads: usize) -> Result<Engine> {
        let outcome = jobs::graft(&mut model, &req.graft)?;
        Engine::from_grafted(model, outcome, req, threads)
    }

    /// [`Engine::new`] for a model grafted already with `req.graft` (`outcome`).
    pub fn from_grafted(
        model: Model,
        outcome: Outcome,
        req: &TrainingRequest,
        threads: usize,
    ) -> Result<Engine> {
        let cores = threads;
        let (threads, slice) = split_passes(req.batch, cores, req.micro_batch)?;
        let slice_req = TrainingRequest {
            batch: slice,
            ..req.clone()
        };
        let training = jobs::training_graph_of(model, outcome, &slice_req)?;
        let trainable: Vec<&String> = training.graph.gradients.iter().map(|(k, _)| k).collect();
        let fields = fields_of(
            &training.model,
            &training.input_shapes,
            &trainable,
            req.loss.label_name(),
            training.classes,
        );
        let workers = Workers::new(
            &training.model,
            training.input_shapes.clone(),
            fields,
            threads,
            slice,
        )?
        .sharing(cores);
        Ok(Engine {
            training,
            workers,
            loss: req.loss,
        })
    }

    /// The training graph.
    pub fn training(&self) -> &Training {
        &self.training
    }

    /// The loss it computes.
    pub fn loss(&self) -> Loss {
        self.loss
    }

    /// The trainable tensors' values from the graft (ONNX layout), by name.
    pub fn initial_params(&self) -> BTreeMap<String, ArrayD<f32>> {
        let t = &self.training;
        let mut params = BTreeMap::new();
        for (tensor, _) in &t.graph.gradients {
            let (module, name) = split_key(tensor).expect("adapter key");
            let m = t
                .outcome
                .grafted
                .modules
                .iter()
                .find(|m| m.module == module)
                .expect("module");
            let torch = m.params.iter().find(|(k, _)| **k == name).expect("param").1;
            params.insert(tensor.clone(), crate::passes::graft::onnx_layout(torch));
        }
        params
    }

    /// What one example must hold: the training graph's inputs other than the
    /// trainable tensors, without the batch axis.
    pub fn fields(&self) -> &Fields {
        &self.workers.fields
    }

    /// Loss and gradients on `rows` (a whole batch) at parameter values `params`.
    pub fn step(&self, rows: &[Row], params: &BTreeMap<String, ArrayD<f32>>) -> Result<StepResult> {
        let t = &self.training;
        // Passes of `slice` rows, as many at a time as there are workers.
        let mut outs = Vec::new();
        for group in rows.chunks(self.workers.threads() * self.workers.slice) {
            outs.extend(self.workers.run(group, params)?);
        }
        let results: Vec<(f64, usize, Vec<Array>)> = outs
            .into_iter()
            .zip(rows.chunks(self.workers.slice))
            .map(|(out, part)| {
                let counted = part.iter().map(|r| r.counted(self.loss)).sum();
                let loss = out[0].to_f64().iter().next().copied().unwrap_or(f64::NAN);
                (loss, counted, out)
            })
            .collect();
        let total: usize = results.iter().map(|r| r.1).sum();
        let weight = |c: usize| {
            if total == 0 {
                0.0
            } else {
                c as f64 / total as f64
            }
        };
        let loss = results.iter().map(|r| r.0 * weight(r.1)).sum();
        let mut grads: BTreeMap<String, ArrayD<f32>> = BTreeMap::new();
        for (_, count, out) in &results {
            let w = weight(*count) as f32;
            for (k, (tensor, _)) in t.graph.gradients.iter().enumerate() {
                let g = out[k + 1].to_f32() * w;
                grads
                    .entry(tensor.clone())
                    .and_modify(|a| *a += &g)
                    .or_insert(g);
            }
        }
        Ok(StepResult {
            loss,
            grads,
            tokens: total,
        })
    }
}
