//! `lora-graft train`: the training loop, which fine-tunes the adapter tensors in Rust
//! with tract on the training graph of the gradient pass, with AdamW (PyTorch's
//! defaults and bias correction), data-parallel over threads (one plan per thread,
//! gradients summed).

mod checkpoint;
mod engine;
mod optim;
pub mod workers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tract_core::ndarray::ArrayD;

use crate::data::Fields;
use crate::error::{Error, Result};
use crate::jobs::{self, OutputPlan, TrainingRequest};
use crate::passes::grad::loss::Loss;
use crate::Model;

pub use crate::data::{batch_rows, vocab_size, Row};
pub use engine::{Engine, StepResult};
pub use optim::{clip_grad_norm, AdamW, Schedule};

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

/// What a training run reads and writes (`--resume` may name the output: a run goes on
/// from its own checkpoint).
fn output_plan(model: &Model, opts: &TrainOptions, metrics: &Path) -> Result<OutputPlan> {
    let mut plan = OutputPlan::default()
        .read_model(model)?
        .read("training data", &opts.data);
    for (what, path) in [
        ("evaluation data", &opts.eval),
        ("tokenizer", &opts.tokenizer),
    ] {
        if let Some(path) = path {
            plan = plan.read(what, path);
        }
    }
    plan = plan
        .write("adapter file", &opts.output)
        .write("optimizer state", &checkpoint::optim_path(&opts.output))
        .write("metrics log", metrics);
    if let Some(path) = &opts.emit_model {
        plan = plan.write_model("emitted model", model, path)?;
    }
    Ok(plan)
}

/// Refuses, before tract allocates, a batch whose logits (with their softmax and
/// gradient: three `batch × seq × vocab` float32 tensors) and one head's attention
/// scores (`batch × seq × seq`) alone exceed the machine's memory.
fn check_logits_fit(batch: usize, seq: usize, vocab: usize) -> Result<()> {
    let (b, s) = (batch as u128, seq as u128);
    let need = b * s * (vocab as u128) * 12 + b * s * s * 4;
    let total = jobs::machine_memory();
    if need > total {
        return Err(Error::Usage(format!(
            "--batch {batch} x --seq {seq} with a vocabulary of {vocab}: the logits and attention scores alone need {:.1} GiB, more than this machine's {:.1} GiB; lower --batch or --seq",
            need as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

/// Trains; `stop` ends the run early (Ctrl-C) with a last checkpoint.
pub fn run(model_path: &Path, opts: &TrainOptions, stop: Arc<AtomicBool>) -> Result<TrainReport> {
    let model = Model::load(model_path)?;
    let metrics_path = opts.output.with_extension("metrics.jsonl");
    output_plan(&model, opts, &metrics_path)?.check()?;
    if let Some(resume) = &opts.resume {
        checkpoint::check_resumable(resume)?;
    }
    let tokenizer = opts
        .tokenizer
        .as_deref()
        .map(crate::data::Tokenizer::load)
        .transpose()?;
    let vocab = vocab_size(&model);
    if let (Loss::CausalLm, Some(vocab)) = (opts.training.loss, vocab) {
        check_logits_fit(opts.training.batch, opts.training.seq, vocab)?;
    }
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
    let mut grafted = model;
    let mut outcome = jobs::graft(&mut grafted, &opts.training.graft)?;
    let widest = outcome.targeting.targets.iter().map(|t| t.d_in).max();
    jobs::check_batch_fits(
        &grafted,
        (opts.training.batch, opts.training.seq),
        widest.unwrap_or(1),
        "--batch and --seq",
    )?;
    if let Some(resume) = &opts.resume {
        checkpoint::restore_frozen(resume, &mut grafted, &mut outcome)?;
    }
    // The grafted model is kept for --emit-model only.
    let emit_base = opts.emit_model.as_ref().map(|_| grafted.clone());
    let engine = Engine::from_grafted(grafted, outcome, &opts.training, opts.threads)?;
    let fields = (!token_data).then(|| engine.fields());
    if !token_data {
        rows = read(&opts.data, fields)?;
    }
    let eval_rows = opts.eval.as_deref().map(|p| read(p, fields)).transpose()?;
    // Parameters: the graft's initial values, or the checkpoint's.
    let mut params = engine.initial_params();
    let mut opt = AdamW::new(opts.lr, opts.weight_decay);
    if let Some(resume) = &opts.resume {
        checkpoint::resume_from(
            resume,
            &mut params,
            &mut opt,
            &opts.training,
            &engine.training().outcome,
        )?;
    }
    let start = opt.step as usize;
    if start >= opts.steps {
        return Err(Error::Usage(format!(
            "the checkpoint is at step {start}; ask for more --steps than that"
        )));
    }
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
        // Counted tokens for the causal-LM loss, examples for the others.
        let (unit, key) = match opts.training.loss {
            Loss::CausalLm => ("tok/s", "tokens_per_s"),
            _ => ("ex/s", "examples_per_s"),
        };
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} {unit}",
            res.loss, opt.lr, tps
        ));
        bar.inc(1);
        let mut line = serde_json::json!({"step": step + 1, "loss": res.loss, "lr": opt.lr});
        line[key] = serde_json::json!(tps);
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
            checkpoint::save(opts, &engine, &params, &opt, &metrics, &metrics_path)?;
        }
    }
    bar.finish_and_clear();
    checkpoint::save(opts, &engine, &params, &opt, &metrics, &metrics_path)?;
    if let (Some(path), Some(base)) = (&opts.emit_model, emit_base) {
        checkpoint::emit(base, &engine, &params, path)?;
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
        if engine.loss() == Loss::CausalLm {
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
