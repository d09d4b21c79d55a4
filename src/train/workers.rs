//! Data parallelism: one tract plan per worker thread, each on an equal slice of a
//! batch; the inputs a row does not give take their defaults. Training and calibration
//! both run on it.

use std::collections::{BTreeMap, HashMap};

use tract_core::ndarray::ArrayD;

use crate::data::{Fields, Row};
use crate::error::{Error, Result};
use crate::runtime::Runner;
use crate::tensor::Array;
use crate::Model;

/// One plan per worker, each on `slice` rows of a batch.
pub struct Workers {
    runners: Vec<Runner>,
    /// Rows per worker.
    pub slice: usize,
    /// Concrete shapes of the model's inputs for one worker's slice.
    pub shapes: HashMap<String, Vec<usize>>,
    /// What one row holds.
    pub fields: Fields,
}

/// The number of workers for a batch of `batch` rows on at most `threads` (the batch
/// must split evenly) and the rows each gets.
pub fn split(batch: usize, threads: usize) -> (usize, usize) {
    let mut threads = threads.clamp(1, batch.max(1));
    while !batch.is_multiple_of(threads) {
        threads -= 1;
    }
    (threads, batch / threads)
}

impl Workers {
    /// `threads` plans of `model` for inputs of `shapes` (a slice of the batch each).
    pub fn new(
        model: &Model,
        shapes: HashMap<String, Vec<usize>>,
        fields: Fields,
        threads: usize,
        slice: usize,
    ) -> Result<Workers> {
        let runners = (0..threads)
            .map(|_| Runner::new(model, &shapes))
            .collect::<Result<Vec<_>>>()?;
        Ok(Workers {
            runners,
            slice,
            shapes,
            fields,
        })
    }

    /// The names of the outputs each worker returns, in order.
    pub fn outputs(&self) -> &[String] {
        &self.runners[0].outputs
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
        let shape = self.shapes.get(name).cloned().unwrap_or_default();
        let elem_type = self
            .fields
            .inputs
            .iter()
            .find(|f| f.0 == name)
            .map(|f| f.1)
            .unwrap_or(crate::proto::tensor_proto::DataType::Int64 as i32);
        crate::data::default_field(name, elem_type, &shape).ok_or_else(|| {
            Error::Usage(format!(
                "the model wants input '{name}', which the data does not give"
            ))
        })
    }

    /// Runs every worker on its slice of `rows` (a whole batch), with the inputs named
    /// in `given` (adapter tensors) fed as they are; each worker's outputs, in order.
    pub fn run(
        &self,
        rows: &[Row],
        given: &BTreeMap<String, ArrayD<f32>>,
    ) -> Result<Vec<Vec<Array>>> {
        let results: Vec<Result<Vec<Array>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .runners
                .iter()
                .enumerate()
                .map(|(w, runner)| {
                    let part = &rows[w * self.slice..(w + 1) * self.slice];
                    scope.spawn(move || -> Result<Vec<Array>> {
                        let inputs = runner
                            .inputs
                            .iter()
                            .map(|n| match given.get(n) {
                                Some(p) => Ok(Array::F32(p.clone())),
                                None => self.batch_input(n, part),
                            })
                            .collect::<Result<Vec<_>>>()?;
                        runner.run(inputs)
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
        results.into_iter().collect()
    }
}

/// What one row of `model` holds: its inputs other than `skip` (trainable tensors),
/// without the batch axis, and the loss's `label` input when it has one.
pub fn fields_of(
    model: &Model,
    shapes: &HashMap<String, Vec<usize>>,
    skip: &[&String],
    label: &str,
    classes: Option<usize>,
) -> Fields {
    let mut inputs = Vec::new();
    let mut label_field = None;
    for io in model.graph.inputs() {
        let name = io.info.name().to_string();
        if skip.contains(&&name) {
            continue;
        }
        let elem_type = match io.info.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(crate::proto::type_proto::Value::TensorType(tt)) => tt.elem_type(),
            _ => crate::proto::tensor_proto::DataType::Float as i32,
        };
        let shape = shapes.get(&name).cloned().unwrap_or_default();
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
        classes,
    }
}
