//! `lora-graft train`: fine-tunes the adapter tensors in Rust with tract, on the
//! training graph of the gradient pass, with AdamW (PyTorch's defaults and bias
//! correction), data-parallel over threads (one plan per thread, gradients summed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tract_core::ndarray::ArrayD;

use crate::adapter::split_key;
use crate::adapter::AdapterFile;
use crate::data::Fields;
use crate::error::{Error, Result};
use crate::jobs::{self, Training, TrainingRequest};
use crate::passes::grad::loss::Loss;
use crate::rng::Rng;
use crate::runtime::Runner;
use crate::tensor::Array;
use crate::Model;

/// Learning-rate schedules (Hugging Face's, after a linear warmup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Constant after warmup.
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

impl Schedule {
    /// Parses `constant`, `linear` or `cosine`.
    pub fn parse(s: &str) -> Result<Schedule> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            o => Err(Error::Usage(format!(
                "unknown schedule '{o}'; use constant, linear or cosine"
            ))),
        }
    }

    /// The learning rate of (0-based) step `step` of `total`, `warmup` of them warming up.
    pub fn lr(self, base: f64, step: usize, total: usize, warmup: usize) -> f64 {
        if step < warmup {
            return base * (step + 1) as f64 / warmup as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Constant => base,
            Schedule::Linear => base * (1.0 - progress).max(0.0),
            Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// Everything `train` is asked for.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Graft, loss, batch and sequence sizes.
    pub training: TrainingRequest,
    /// Training data: JSONL (token ids, or named inputs and a label for class/mse
    /// losses), or plain text with `tokenizer`.
    pub data: PathBuf,
    /// A Hugging Face `tokenizer.json` for text data.
    pub tokenizer: Option<PathBuf>,
    /// Evaluation data.
    pub eval: Option<PathBuf>,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay (PyTorch's default 0.01).
    pub weight_decay: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// Schedule after warmup.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (none if 0).
    pub grad_clip: f64,
    /// Data order seed (the graft seed is in `training`).
    pub seed: u64,
    /// Write a checkpoint (and evaluate) every this many steps (0: only at the end).
    pub save_every: usize,
    /// Resume from this adapter checkpoint (its `.optim.safetensors` beside it).
    pub resume: Option<PathBuf>,
    /// The adapter file to write.
    pub output: PathBuf,
    /// Also write the adapted model with the trained values.
    pub emit_model: Option<PathBuf>,
    /// Worker threads (each runs a slice of the batch).
    pub threads: usize,
    /// No progress bar.
    pub quiet: bool,
}

impl TrainOptions {
    /// The CLI's defaults: 100 steps at lr 1e-4, AdamW weight decay 0.01, constant
    /// schedule, no warmup, gradient norm clipped to 1, every core, checkpoints only at
    /// the end.
    pub fn new(training: TrainingRequest, data: PathBuf, output: PathBuf) -> TrainOptions {
        TrainOptions {
            training,
            data,
            tokenizer: None,
            eval: None,
            steps: 100,
            lr: 1e-4,
            weight_decay: 0.01,
            warmup: 0,
            schedule: Schedule::Constant,
            grad_clip: 1.0,
            seed: 0,
            save_every: 0,
            resume: None,
            output,
            emit_model: None,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            quiet: false,
        }
    }
}

pub use crate::data::Row;

/// The vocabulary size: rows of the token-embedding initializer, when there is one.
pub fn vocab_size(model: &Model) -> Option<usize> {
    let g = &model.graph;
    g.node_ids().find_map(|id| {
        let n = g.node(id);
        if n.op() != "Gather" {
            return None;
        }
        let data = n.inputs.first().copied().flatten()?;
        let idx = n.inputs.get(1).copied().flatten()?;
        let init = g.initializer(data)?;
        (init.dims().len() == 2 && g.initializer(idx).is_none()).then(|| init.dims()[0] as usize)
    })
}

/// AdamW over named tensors, as `torch.optim.AdamW` computes it.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Learning rate of the next step (set by the schedule).
    pub lr: f64,
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Steps taken.
    pub step: u64,
    /// First moments.
    pub m: BTreeMap<String, ArrayD<f32>>,
    /// Second moments.
    pub v: BTreeMap<String, ArrayD<f32>>,
}

impl AdamW {
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8.
    pub fn new(lr: f64, weight_decay: f64) -> AdamW {
        AdamW {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// One step: p ← p·(1 − lr·wd); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
    /// p ← p − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε).
    pub fn update(
        &mut self,
        params: &mut BTreeMap<String, ArrayD<f32>>,
        grads: &BTreeMap<String, ArrayD<f32>>,
    ) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = self.betas;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (name, p) in params.iter_mut() {
            let g = &grads[name];
            let m = self
                .m
                .entry(name.clone())
                .or_insert_with(|| ArrayD::zeros(p.raw_dim()));
            let v = self
                .v
                .entry(name.clone())
                .or_insert_with(|| ArrayD::zeros(p.raw_dim()));
            for (((p, &g), m), v) in p
                .iter_mut()
                .zip(g.iter())
                .zip(m.iter_mut())
                .zip(v.iter_mut())
            {
                let (g, mut pf) = (g as f64, *p as f64);
                pf *= 1.0 - self.lr * self.weight_decay;
                let mf = b1 * *m as f64 + (1.0 - b1) * g;
                let vf = b2 * *v as f64 + (1.0 - b2) * g * g;
                *m = mf as f32;
                *v = vf as f32;
                let denom = (vf / c2).sqrt() + self.eps;
                pf -= self.lr * (mf / c1) / denom;
                *p = pf as f32;
            }
        }
    }
}

/// Scales `grads` so their global L2 norm is at most `max` (torch's clip_grad_norm_);
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, ArrayD<f32>>, max: f64) -> f64 {
    let norm = grads
        .values()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let coef = max / (norm + 1e-6);
    if max > 0.0 && coef < 1.0 {
        for g in grads.values_mut() {
            g.mapv_inplace(|x| (x as f64 * coef) as f32);
        }
    }
    norm
}

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
    pub fn new(model: Model, req: &TrainingRequest, threads: usize) -> Result<Engine> {
        let mut threads = threads.clamp(1, req.batch.max(1));
        while !req.batch.is_multiple_of(threads) {
            threads -= 1;
        }
        let slice = req.batch / threads;
        let slice_req = TrainingRequest {
            batch: slice,
            ..req.clone()
        };
        let training = jobs::training_graph(model, &slice_req)?;
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

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Loss of every step run.
    pub losses: Vec<f64>,
    /// Steps done in total (including resumed ones).
    pub steps: usize,
    /// Whether Ctrl-C stopped it.
    pub interrupted: bool,
}

fn optim_path(adapter: &Path) -> PathBuf {
    adapter.with_extension("optim.safetensors")
}

/// The batch of step `step` (0-based): rows shuffled per epoch by `seed`.
pub fn batch_rows(rows: &[Row], batch: usize, step: usize, seed: u64) -> Vec<Row> {
    let per_epoch = (rows.len() / batch).max(1);
    let (epoch, k) = (step / per_epoch, step % per_epoch);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let mut rng = Rng::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    (0..batch)
        .map(|b| rows[order[(k * batch + b) % rows.len()]].clone())
        .collect()
}

/// Keeps freed memory in the process instead of returning it to the kernel: every
/// step allocates the same large activations again, and fresh pages from the kernel
/// cost a page fault each (11 % of a step's time on the training benchmark).
fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called before the workers start.
    unsafe {
        // 32 MiB: glibc's largest mmap threshold on 64-bit (it refuses more).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Trains; `stop` ends the run early (Ctrl-C) with a last checkpoint.
pub fn run(model_path: &Path, opts: &TrainOptions, stop: Arc<AtomicBool>) -> Result<TrainReport> {
    reuse_freed_memory();
    let model = Model::load(model_path)?;
    let tokenizer = opts
        .tokenizer
        .as_deref()
        .map(crate::data::Tokenizer::load)
        .transpose()?;
    let vocab = vocab_size(&model);
    let read = |path: &Path, fields: Option<&Fields>| {
        let src = crate::data::Source {
            path,
            seq: opts.training.seq,
            vocab,
            tokenizer: tokenizer.as_ref(),
        };
        match fields {
            None => crate::data::read_tokens(&src),
            Some(f) => crate::data::read_examples(&src, f),
        }
    };
    // Token data is checked before the (slower) training graph is built.
    let token_data = opts.training.loss == Loss::CausalLm;
    let mut rows = if token_data {
        read(&opts.data, None)?
    } else {
        Vec::new()
    };
    let engine = Engine::new(model.clone(), &opts.training, opts.threads)?;
    let fields = (!token_data).then(|| engine.fields());
    if !token_data {
        rows = read(&opts.data, fields)?;
    }
    let eval_rows = opts.eval.as_deref().map(|p| read(p, fields)).transpose()?;
    // Parameters: the graft's initial values, or the checkpoint's.
    let mut params = engine.initial_params();
    let mut opt = AdamW::new(opts.lr, opts.weight_decay);
    if let Some(resume) = &opts.resume {
        resume_from(resume, &mut params, &mut opt, &opts.training)?;
    }
    let start = opt.step as usize;
    if start >= opts.steps {
        return Err(Error::Usage(format!(
            "the checkpoint is at step {start}; ask for more --steps than that"
        )));
    }
    let metrics_path = opts.output.with_extension("metrics.jsonl");
    let mut metrics = String::new();
    if start > 0 {
        metrics = std::fs::read_to_string(&metrics_path).unwrap_or_default();
    }
    let bar = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(opts.steps as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
            .expect("template"),
    );
    bar.set_position(start as u64);
    let mut report = TrainReport {
        losses: Vec::new(),
        steps: start,
        interrupted: false,
    };
    let began = Instant::now();
    let mut tokens_seen = 0usize;
    for step in start..opts.steps {
        if stop.load(Ordering::SeqCst) {
            report.interrupted = true;
            break;
        }
        let batch = batch_rows(&rows, opts.training.batch, step, opts.seed);
        let mut res = engine.step(&batch, &params)?;
        if !res.loss.is_finite() {
            bar.abandon();
            return Err(Error::Usage(format!(
                "the loss became {} at step {}; stopping. The last good checkpoint is {} (lower --lr or set --grad-clip)",
                res.loss,
                step + 1,
                if report.steps > 0 || start > 0 { opts.output.display().to_string() } else { "none (no step completed)".into() }
            )));
        }
        clip_grad_norm(&mut res.grads, opts.grad_clip);
        opt.lr = opts.schedule.lr(opts.lr, step, opts.steps, opts.warmup);
        opt.update(&mut params, &res.grads);
        tokens_seen += res.tokens;
        report.losses.push(res.loss);
        report.steps = step + 1;
        let tps = tokens_seen as f64 / began.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            res.loss, opt.lr, tps
        ));
        bar.inc(1);
        let mut line = serde_json::json!({"step": step + 1, "loss": res.loss, "lr": opt.lr, "tokens_per_s": tps});
        let checkpoint = opts.save_every > 0 && (step + 1) % opts.save_every == 0;
        if checkpoint {
            if let Some(eval) = &eval_rows {
                let l = evaluate(&engine, eval, &params, opts.training.batch)?;
                line["eval_loss"] = serde_json::json!(l);
                bar.println(format!("step {}: eval loss {l:.4}", step + 1));
            }
        }
        metrics.push_str(&line.to_string());
        metrics.push('\n');
        if checkpoint {
            save(opts, &engine, &params, &opt, &metrics, &metrics_path)?;
        }
    }
    bar.finish_and_clear();
    save(opts, &engine, &params, &opt, &metrics, &metrics_path)?;
    if let Some(path) = &opts.emit_model {
        emit(&model, &engine, &params, path)?;
    }
    crate::runtime::profile::write();
    Ok(report)
}

/// Mean loss over `rows`, a batch at a time. A short last batch is filled with copies
/// of its first row: not counted (causal LM), or counted and then taken out again with
/// that row's own loss (class, mse: the loss is a mean over rows).
pub fn evaluate(
    engine: &Engine,
    rows: &[Row],
    params: &BTreeMap<String, ArrayD<f32>>,
    batch: usize,
) -> Result<f64> {
    let mut total = 0.0;
    let mut count = 0usize;
    for chunk in rows.chunks(batch) {
        let fill = batch - chunk.len();
        let mut padded = chunk.to_vec();
        if engine.loss == Loss::CausalLm {
            padded.extend(std::iter::repeat_n(chunk[0].clone().uncounted(), fill));
            let res = engine.step(&padded, params)?;
            total += res.loss * res.tokens as f64;
            count += res.tokens;
            continue;
        }
        padded.extend(std::iter::repeat_n(chunk[0].clone(), fill));
        let mut sum = engine.step(&padded, params)?.loss * batch as f64;
        if fill > 0 {
            let first = engine.step(&vec![chunk[0].clone(); batch], params)?.loss;
            sum -= first * fill as f64;
        }
        total += sum;
        count += chunk.len();
    }
    Ok(total / count.max(1) as f64)
}

/// The adapter file of `params` (torch layout, lora-lite's format).
fn adapter_file(
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

/// Writes the adapter, the optimizer state and the metrics, each atomically.
fn save(
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
    let mut created = Vec::new();
    crate::model::write_atomic(&optim_path(&opts.output), &state.to_bytes()?, &mut created)?;
    crate::model::write_atomic(&opts.output, &file.to_bytes()?, &mut created)?;
    crate::model::write_atomic(metrics_path, metrics.as_bytes(), &mut created)?;
    Ok(())
}

/// Loads a checkpoint: values and optimizer state; refuses one from another model or variant.
fn resume_from(
    path: &Path,
    params: &mut BTreeMap<String, ArrayD<f32>>,
    opt: &mut AdamW,
    req: &TrainingRequest,
) -> Result<()> {
    let file = AdapterFile::read(path)?;
    let state = AdapterFile::read(&optim_path(path))?;
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
    if file
        .tensors
        .keys()
        .any(|k| !params.contains_key(k) && !k.ends_with("lora_wnorm"))
    {
        return Err(mismatch("it has tensors the model's targets do not".into()));
    }
    opt.step = state
        .metadata
        .get("step")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(())
}

/// Writes the adapted model holding the trained values.
fn emit(
    model: &Model,
    engine: &Engine,
    params: &BTreeMap<String, ArrayD<f32>>,
    path: &Path,
) -> Result<()> {
    let mut adapted = model.clone();
    let mut outcome = jobs::graft(&mut adapted, &engine.training().request)?;
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
            &mut adapted,
            &mut outcome,
            &module,
            name,
            crate::passes::graft::onnx_layout(values),
        )?;
    }
    adapted.save(path, &crate::model::SaveOptions::default())?;
    Ok(())
}
