//! The data-parallel tract engine: the training graph, one plan per worker thread,
//! each on a slice of the batch, gradients summed.

use std::collections::BTreeMap;

use tract_core::ndarray::ArrayD;

use crate::adapter::split_key;
use crate::data::{Fields, Row};
use crate::error::{Error, Result};
use crate::jobs::{self, Outcome, Training, TrainingRequest};
use crate::passes::grad::loss::Loss;
use crate::runtime::Runner;
use crate::tensor::Array;
use crate::Model;

/// The training graph, one plan per worker, each on a slice of the batch.
pub struct Engine {
    training: Training,
    fields: Fields,
    workers: Vec<Runner>,
    slice: usize,
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
    /// evenly; otherwise fewer workers are used).
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
        let mut threads = threads.clamp(1, req.batch.max(1));
        while !req.batch.is_multiple_of(threads) {
            threads -= 1;
        }
        let slice = req.batch / threads;
        let slice_req = TrainingRequest {
            batch: slice,
            ..req.clone()
        };
        let training = jobs::training_graph_of(model, outcome, &slice_req)?;
        let workers = (0..threads)
            .map(|_| Runner::new(&training.model, &training.input_shapes))
            .collect::<Result<Vec<_>>>()?;
        Ok(Engine {
            fields: fields_of(&training, req.loss),
            training,
            workers,
            slice,
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
        &self.fields
    }

    /// Input `name` for the rows of one worker: stacked from the rows, or its default
    /// (all-ones attention mask...).
    fn batch_input(&self, name: &str, part: &[Row]) -> Result<Array> {
        let given: Option<Vec<&Array>> = part.iter().map(|r| r.fields.get(name)).collect();
        if let Some(given) = given {
            return Array::stack(&given).ok_or_else(|| {
                Error::Usage(format!(
                    "the rows disagree in the type or shape of '{name}'"
                ))
            });
        }
        let shape = self
            .training
            .input_shapes
            .get(name)
            .cloned()
            .unwrap_or_default();
        let elem_type = self
            .fields
            .inputs
            .iter()
            .find(|f| f.0 == name)
            .map(|f| f.1)
            .unwrap_or(crate::proto::tensor_proto::DataType::Int64 as i32);
        crate::data::default_field(name, elem_type, &shape).ok_or_else(|| {
            Error::Usage(format!(
                "the training graph wants input '{name}', which the data does not give"
            ))
        })
    }

    /// Loss and gradients on `rows` (a whole batch) at parameter values `params`.
    pub fn step(&self, rows: &[Row], params: &BTreeMap<String, ArrayD<f32>>) -> Result<StepResult> {
        let t = &self.training;
        let results: Vec<Result<(f64, usize, Vec<Array>)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .workers
                .iter()
                .enumerate()
                .map(|(w, runner)| {
                    let part = &rows[w * self.slice..(w + 1) * self.slice];
                    scope.spawn(move || -> Result<(f64, usize, Vec<Array>)> {
                        let counted = part.iter().map(|r| r.counted(self.loss)).sum();
                        let inputs = runner
                            .inputs
                            .iter()
                            .map(|n| match params.get(n) {
                                Some(p) => Ok(Array::F32(p.clone())),
                                None => self.batch_input(n, part),
                            })
                            .collect::<Result<Vec<_>>>()?;
                        let out = runner.run(inputs)?;
                        let loss = out[0].to_f64().iter().next().copied().unwrap_or(f64::NAN);
                        Ok((loss, counted, out))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Runtime("a worker panicked".into())))
                })
                .collect()
        });
        let results = results.into_iter().collect::<Result<Vec<_>>>()?;
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

/// What one example must hold: the training graph's inputs other than the
/// trainable tensors, without the batch axis.
fn fields_of(t: &Training, loss: Loss) -> Fields {
    let trainable: Vec<&String> = t.graph.gradients.iter().map(|(k, _)| k).collect();
    let label = loss.label_name();
    let mut inputs = Vec::new();
    let mut label_field = None;
    for io in t.model.graph.inputs() {
        let name = io.info.name().to_string();
        if trainable.contains(&&name) {
            continue;
        }
        let elem_type = match io.info.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(crate::proto::type_proto::Value::TensorType(tt)) => tt.elem_type(),
            _ => crate::proto::tensor_proto::DataType::Float as i32,
        };
        let shape = t.input_shapes.get(&name).cloned().unwrap_or_default();
        let field = (
            name.clone(),
            elem_type,
            shape.get(1..).unwrap_or(&[]).to_vec(),
        );
        if name == label {
            label_field = Some(field);
        } else {
            inputs.push(field);
        }
    }
    Fields {
        inputs,
        label: label_field.unwrap_or((label.into(), 1, vec![])),
        classes: t.classes,
    }
}
