//! Data parallelism: one tract plan, run by every worker thread on an equal slice of a
//! batch (the plan is shared: its weights are held once); the inputs a row does not
//! give take their defaults. Training and calibration both run on it.

use std::collections::{BTreeMap, HashMap};

use tract_core::ndarray::ArrayD;

use crate::data::{Fields, Row};
use crate::error::{Error, Result};
use crate::runtime::{Kernels, Runner};
use crate::tensor::Array;
use crate::Model;

/// One plan, run by `threads` workers, each on `slice` rows of a batch.
pub struct Workers {
    runner: Runner,
    threads: usize,
    /// Threads each worker's products may use.
    product_threads: usize,
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

/// How a training batch of `batch` rows runs on `threads`: the number of workers and
/// the rows of one forward and backward pass. Without `micro_batch`, the batch splits
/// evenly over the workers ([`split`]); with it, the batch runs as passes of
/// `micro_batch` rows (which must divide it), `threads` passes at a time, and their
/// gradients add up (gradient accumulation: each worker's activations are those of
/// `micro_batch` rows; the gradient is the batch's).
pub fn split_passes(
    batch: usize,
    threads: usize,
    micro_batch: Option<usize>,
) -> Result<(usize, usize)> {
    match micro_batch {
        None => Ok(split(batch, threads)),
        Some(rows) if rows == 0 || batch == 0 || !batch.is_multiple_of(rows) => {
            Err(Error::Usage(format!(
                "--micro-batch {rows} does not divide --batch {batch}: pick a divisor of the batch"
            )))
        }
        Some(rows) => Ok((threads.clamp(1, batch / rows), rows)),
    }
}

impl Workers {
    /// The plan of `model` for inputs of `shapes` (a slice of the batch), for `threads`
    /// workers.
    pub fn new(
        model: &Model,
        shapes: HashMap<String, Vec<usize>>,
        fields: Fields,
        threads: usize,
        slice: usize,
    ) -> Result<Workers> {
        Ok(Workers {
            runner: Runner::with_kernels(model, &shapes, Kernels::Training)?,
            threads: threads.max(1),
            product_threads: 1,
            slice,
            shapes,
            fields,
        })
    }

    /// Lets each worker's matrix products use its share of `cores` (the threads asked
    /// for): a batch that splits among fewer workers than cores (batch 1) still uses
    /// every core.
    pub fn sharing(mut self, cores: usize) -> Workers {
        self.product_threads = (cores / self.threads).max(1);
        self
    }

    /// The names of the outputs each worker returns, in order.
    pub fn outputs(&self) -> &[String] {
        &self.runner.outputs
    }

    /// The number of workers.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Input `name` for the rows of one worker: stacked from the rows, or its default
    /// (all-ones attention mask...).
    pub fn batch_input(&self, name: &str, part: &[Row]) -> Result<Array> {
        batch_input(&self.fields, &self.shapes, name, part)
    }

    /// Runs one worker on each slice of `rows` (at most `threads` slices of `slice` rows:
    /// `rows.len()` must be a multiple of `slice`), with the inputs named in `given`
    /// (adapter tensors) fed as they are; each worker's outputs, in order.
    pub fn run(
        &self,
        rows: &[Row],
        given: &BTreeMap<String, ArrayD<f32>>,
    ) -> Result<Vec<Vec<Array>>> {
        let count = rows.len().div_ceil(self.slice).min(self.threads);
        self.run_with(count, &|w, name| match given.get(name) {
            Some(p) => Ok(Array::F32(p.clone())),
            None => self.batch_input(name, &rows[w * self.slice..(w + 1) * self.slice]),
        })
    }

    /// Runs `count` workers (at most `threads`), each on the inputs `input(worker, name)`
    /// gives; each worker's outputs, in order.
    pub fn run_with(
        &self,
        count: usize,
        input: &(dyn Fn(usize, &str) -> Result<Array> + Sync),
    ) -> Result<Vec<Vec<Array>>> {
        let runner = &self.runner;
        let product_threads = self.product_threads;
        let results: Vec<Result<Vec<Array>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..count.min(self.threads))
                .map(|w| {
                    scope.spawn(move || -> Result<Vec<Array>> {
                        crate::parallel::set_product_threads(product_threads);
                        let inputs = runner
                            .inputs
                            .iter()
                            .map(|n| input(w, n))
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

/// Input `name` for `part`, the rows of one worker (`shapes`: one worker's input
/// shapes): stacked from the rows, or its default (all-ones attention mask...).
pub fn batch_input(
    fields: &Fields,
    shapes: &HashMap<String, Vec<usize>>,
    name: &str,
    part: &[Row],
) -> Result<Array> {
    let given: Option<Vec<&Array>> = part.iter().map(|r| r.fields.get(name)).collect();
    if let Some(given) = given {
        return Array::stack(&given).ok_or_else(|| {
            Error::Usage(format!(
                "the rows disagree in the type or shape of '{name}'"
            ))
        });
    }
    let shape = shapes.get(name).cloned().unwrap_or_default();
    let elem_type = fields
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
