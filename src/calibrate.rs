//! The calibration run: the base model over data, gathering per target what a
//! data-calibrated init reads, streamed batch by batch (no activations are kept):
//! the Gram matrix `XᵀX` of the target's inputs and their sum, in f64 (EVA), or the
//! gradient of the loss with respect to the target's weight (LoRA-GA), from the
//! gradient pass on a zero probe `y + x·P` around every target (`∂L/∂P = ∂L/∂Wᵀ`).
//! Both run on the data-parallel workers that training uses.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tract_core::ndarray::{Array1, Array2, ArrayD, ArrayView2, Axis};

use crate::data::Row;
use crate::error::{Error, Result};
use crate::ir::GraphIo;
use crate::jobs::{GraftRequest, TrainingRequest};
use crate::passes::grad::loss::Loss;
use crate::passes::target::Target;
use crate::passes::variants::{Config, Dims, Init, ParamSpec, Params, Variant};
use crate::passes::{run_pass, PassContext};
use crate::train::workers::{fields_of, split, Workers};
use crate::Model;

/// Where the calibration data comes from and how it is batched.
#[derive(Debug, Clone)]
pub struct CalibrationRequest {
    /// Token data, as `train --data` reads it (JSONL token ids or text, plain text).
    pub data: PathBuf,
    /// For text.
    pub tokenizer: Option<PathBuf>,
    /// At most this many batches (in file order).
    pub batches: usize,
    /// Rows per batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// The loss whose gradient LoRA-GA reads; `None`: as the data says (JSONL lines
    /// with a `label`: class, with a `target`: mse, else the causal-LM loss).
    pub loss: Option<Loss>,
    /// Worker threads.
    pub threads: usize,
    /// The bytes the exact Gram matrices may hold; inputs beyond it are sketched.
    pub memory: usize,
}

/// The default of [`CalibrationRequest::memory`]: 1 GiB.
pub const GRAM_MEMORY: usize = 1 << 30;

/// What an init reads from the calibration run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistic {
    /// The Gram matrix of each target's inputs over every token (`masked`: only the
    /// counted ones, padding left out).
    InputGram {
        /// Leave out padding (tokens whose label is -100).
        masked: bool,
        /// The eigenpairs the init reads (the size of a sketch, when one is needed).
        components: usize,
    },
    /// The mean over batches of the loss's gradient with respect to each target's weight.
    WeightGradient,
    /// `Σ_n |x_n · v_k|` over the tokens for every right singular vector `v_k` of each
    /// target's weight (AntiPaSTO's Wanda-style selection).
    InputBasisL1,
}

/// `Σ xᵀx` and `Σ x` over a target's input tokens, in f64: exact, or, for an input
/// whose `d × d` matrix would not fit the memory budget, the one-pass sketch
/// `XᵀX Ω` (`Ω` `[d, k]`, orthonormal) from which [`InputGram::top_eigen`] recovers the
/// leading eigenpairs (Nyström).
#[derive(Debug, Clone)]
pub struct InputGram {
    /// `XᵀX` `[d, d]`, or `XᵀX Ω` `[d, k]` when sketched.
    pub xtx: Array2<f64>,
    /// The sketch's `Ω` (`None`: exact).
    pub omega: Option<Array2<f64>>,
    /// `Σ x`, `[d]`.
    pub sum: Array1<f64>,
    /// `Σ x²` per feature (the diagonal of `XᵀX`), `[d]`.
    pub squares: Array1<f64>,
    /// Tokens counted.
    pub tokens: u64,
}

impl InputGram {
    fn new(d: usize, sketch: Option<usize>, seed: u64) -> InputGram {
        let omega = sketch.map(|k| {
            let mut rng = crate::rng::Rng::new(seed);
            crate::linalg::orthonormal_gaussian(d, k, &mut rng)
        });
        InputGram {
            xtx: Array2::zeros((d, omega.as_ref().map_or(d, |o| o.ncols()))),
            omega,
            sum: Array1::zeros(d),
            squares: Array1::zeros(d),
            tokens: 0,
        }
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        8 * (self.xtx.len() + self.omega.as_ref().map_or(0, |o| o.len()))
    }

    /// Adds the tokens `x` (`[n, d]`): the products in f32 on faer's kernels, summed in f64.
    fn add(&mut self, x: ArrayView2<f32>) {
        let (n, d) = x.dim();
        if n == 0 {
            return;
        }
        let x = x.as_standard_layout();
        let m = faer::MatRef::from_row_major_slice(x.as_slice().expect("standard"), n, d);
        let g = match &self.omega {
            None => m.transpose() * m,
            Some(o) => {
                let o = faer::Mat::<f32>::from_fn(d, o.ncols(), |i, j| o[[i, j]] as f32);
                m.transpose() * (m * &o)
            }
        };
        for ((i, j), v) in self.xtx.indexed_iter_mut() {
            *v += g[(i, j)] as f64;
        }
        for (k, c) in x.axis_iter(Axis(1)).enumerate() {
            self.sum[k] += c.iter().map(|&v| v as f64).sum::<f64>();
            self.squares[k] += c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
        }
        self.tokens += n as u64;
    }

    /// Whether it is the sketch.
    pub fn is_sketch(&self) -> bool {
        self.omega.is_some()
    }

    /// `n·μμᵀ M` for `M` = the identity (`None`) or `Ω`: what centering subtracts.
    fn mean_part(&self, m: Option<&Array2<f64>>) -> Array2<f64> {
        let n = self.tokens.max(1) as f64;
        let mu = &self.sum / n;
        let right = match m {
            None => mu.clone(),
            Some(o) => o.t().dot(&mu),
        };
        mu.view()
            .insert_axis(Axis(1))
            .dot(&right.view().insert_axis(Axis(0)))
            * n
    }

    /// The trace of the Gram matrix (`centered`: of `XᵀX − nμμᵀ`).
    pub fn trace(&self, centered: bool) -> f64 {
        let n = self.tokens.max(1) as f64;
        let t = self.squares.sum();
        if centered {
            t - self.sum.dot(&self.sum) / n
        } else {
            t
        }
    }

    /// The `q` largest eigenpairs of `XᵀX` (`centered`: of `XᵀX − nμμᵀ`, PEFT's PCA),
    /// largest first, each eigenvector's largest entry positive; from the sketch by
    /// Nyström's approximation (exact when the inputs span at most `k` dimensions).
    pub fn top_eigen(&self, q: usize, centered: bool) -> Result<(Array1<f64>, Array2<f64>)> {
        match &self.omega {
            None if centered => {
                crate::linalg::sym_eigen_top(&(&self.xtx - &self.mean_part(None)), q)
            }
            None => crate::linalg::sym_eigen_top(&self.xtx, q),
            Some(o) if centered => {
                crate::linalg::nystrom_top(&(&self.xtx - &self.mean_part(Some(o))), o, q)
            }
            Some(o) => crate::linalg::nystrom_top(&self.xtx, o, q),
        }
    }
}

/// One module's statistics.
#[derive(Debug, Clone, Default)]
pub struct ModuleStats {
    /// Its inputs' Gram matrix (shared by modules that read the same input).
    pub gram: Option<Arc<InputGram>>,
    /// Its weight's gradient, torch layout `[d_out, d_in]`.
    pub grad: Option<Array2<f64>>,
    /// `Σ_n |x_n · v_k|` per right singular vector of its weight (singular values in
    /// descending order), and the tokens summed over.
    pub basis_l1: Option<(Array1<f64>, u64)>,
}

/// The statistics of every target module.
#[derive(Debug, Clone, Default)]
pub struct Calibration {
    /// By module path.
    pub modules: BTreeMap<String, ModuleStats>,
    /// Batches run.
    pub batches: usize,
    /// What it held (the Gram matrices' memory, the inputs sketched), for the user.
    pub report: String,
}

/// Runs the calibration for `targets` of `model`.
pub fn calibrate(
    model: &Model,
    targets: &[Target],
    what: Statistic,
    req: &CalibrationRequest,
) -> Result<Calibration> {
    match what {
        Statistic::InputGram { masked, .. } => input_statistics(model, targets, what, masked, req),
        Statistic::InputBasisL1 => input_statistics(model, targets, what, false, req),
        Statistic::WeightGradient => weight_gradients(model, targets, req),
    }
}

/// A batch: its rows (a short last batch filled with uncounted copies) and how many
/// are real.
struct Batch {
    rows: Vec<Row>,
    real: usize,
}

/// The calibration batches: token data packed into rows (as `train` reads it for the
/// causal-LM loss) when `fields` is `None`, else examples holding these fields.
fn read_batches(
    model: &Model,
    req: &CalibrationRequest,
    fields: Option<&crate::data::Fields>,
) -> Result<Vec<Batch>> {
    let tokenizer = req
        .tokenizer
        .as_deref()
        .map(crate::data::Tokenizer::load)
        .transpose()?;
    let src = crate::data::Source {
        path: &req.data,
        seq: req.seq,
        vocab: crate::data::vocab_size(model),
        tokenizer: tokenizer.as_ref(),
    };
    let rows = match fields {
        None => crate::data::read_tokens(&src),
        Some(f) => crate::data::read_examples(&src, f),
    }
    .map_err(|e| e.context("calibration data".to_string()))?;
    if rows.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no calibration examples",
            req.data.display()
        )));
    }
    let take = rows.len().min(req.batches.max(1) * req.batch);
    Ok(rows[..take]
        .chunks(req.batch)
        .map(|chunk| {
            let mut rows = chunk.to_vec();
            while rows.len() < req.batch {
                rows.push(chunk[0].clone().uncounted());
            }
            Batch {
                rows,
                real: chunk.len(),
            }
        })
        .collect())
}

fn lowered(mut model: Model) -> Result<Model> {
    let cx = PassContext {
        opset: crate::passes::graft::default_opset(&model.proto),
    };
    let mut pass = crate::passes::lower::Lower::default();
    run_pass(&mut model.graph, &cx, &mut pass)
        .map_err(|e| e.context(model.path.display().to_string()))?;
    Ok(model)
}

/// The statistics of the targets' inputs (`what`: their Gram matrices or their
/// projections on the weights' singular vectors), in one pass over the data.
fn input_statistics(
    model: &Model,
    targets: &[Target],
    what: Statistic,
    masked: bool,
    req: &CalibrationRequest,
) -> Result<Calibration> {
    // The model with every target's input as an output, and nothing else: tract leaves
    // out what no target reads (the head).
    let mut capture = model.clone();
    let mut names: Vec<String> = Vec::new();
    for t in targets {
        let name = model.graph.value(t.input).name.clone();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    capture.graph.clear_outputs();
    for name in &names {
        let value = capture.graph.value_by_name(name).expect("target input");
        capture.graph.add_output(GraphIo {
            value,
            info: crate::proto::ValueInfoProto {
                name: Some(name.clone()),
                ..Default::default()
            },
        });
    }
    let capture = lowered(capture)?;
    let (threads, slice) = split(req.batch, req.threads);
    let shapes = crate::jobs::input_shapes(&capture, slice, req.seq)?;
    // Token data for a model of token ids, else examples of its inputs.
    let tokens = crate::runtime::input_names(&capture)
        .iter()
        .any(|n| n == "input_ids");
    let fields = fields_of(&capture, &shapes, &[], "", None);
    let batches = read_batches(model, req, (!tokens).then_some(&fields))?;
    let workers = Workers::new(&capture, shapes, fields, threads, slice)?;
    let width = |name: &str| {
        targets
            .iter()
            .find(|t| model.graph.value(t.input).name == name)
            .map(|t| t.d_in)
            .expect("a target reads it")
    };
    // Exact Gram matrices in graph order while they fit the budget; the rest sketched
    // with 2q + 16 columns (q: the eigenpairs the init reads).
    let mut left = req.memory;
    let mut sketched = Vec::new();
    let mut grams: Vec<InputGram> = Vec::new();
    for (k, n) in names.iter().enumerate() {
        let (d, sketch) = match what {
            Statistic::InputGram { components, .. } => {
                let d = width(n);
                let exact = 8 * d * d;
                if exact <= left {
                    left -= exact;
                    (d, None)
                } else {
                    let reader = targets
                        .iter()
                        .find(|t| model.graph.value(t.input).name == *n);
                    sketched.push(reader.map_or(n.clone(), |t| t.module.clone()));
                    (d, Some((2 * components + 16).min(d)))
                }
            }
            _ => (0, None),
        };
        grams.push(InputGram::new(d, sketch, 0x5EED ^ k as u64));
    }
    let gram_wanted = matches!(what, Statistic::InputGram { .. });
    let mut report = String::new();
    if gram_wanted {
        let bytes: usize = grams.iter().map(InputGram::bytes).sum();
        report = format!(
            "calibration: {} Gram matrices of {} inputs, {:.1} MB{}",
            names.len() - sketched.len(),
            names.len(),
            bytes as f64 / 1e6,
            if sketched.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} inputs sketched (their exact matrices would exceed --calibration-memory), e.g. the input of '{}'",
                    sketched.len(),
                    sketched[0]
                )
            }
        );
    }
    // AntiPaSTO: every target's right singular vectors `[d_in, k]` and their sums.
    let mut bases: Vec<(usize, Array2<f32>, Array1<f64>, u64)> = Vec::new();
    if what == Statistic::InputBasisL1 {
        for t in targets {
            let w = crate::passes::graft::effective_weight(&model.graph, t)?;
            let k = w.nrows().min(w.ncols());
            let v = crate::linalg::svd_exact(&w, k)?.v.mapv(|x| x as f32);
            let input = names
                .iter()
                .position(|n| *n == model.graph.value(t.input).name);
            bases.push((input.expect("named"), v, Array1::zeros(k), 0));
        }
    }
    for batch in &batches {
        let outs = workers.run(&batch.rows, &BTreeMap::new())?;
        for (w, out) in outs.iter().enumerate() {
            let first = w * slice;
            let part = &batch.rows[first..first + slice];
            for (k, gram) in grams.iter_mut().enumerate() {
                let x = out[k].to_f32();
                let d = *x.shape().last().unwrap_or(&0);
                if x.len() % (slice * d) != 0 || x.shape().last() != Some(&d) {
                    return Err(Error::Runtime(format!(
                        "calibration: '{}' is {:?}, not [{slice}, ..., {d}]",
                        names[k],
                        x.shape()
                    )));
                }
                let per_row = x.len() / (slice * d);
                let x = x
                    .into_shape_with_order((slice * per_row, d))
                    .map_err(|e| Error::Runtime(e.to_string()))?;
                for (i, row) in part.iter().enumerate() {
                    if first + i >= batch.real {
                        continue;
                    }
                    let tokens =
                        x.slice(tract_core::ndarray::s![i * per_row..(i + 1) * per_row, ..]);
                    let tokens = match (masked, counted_tokens(row, per_row)) {
                        (true, Some(keep)) => {
                            let kept: Vec<usize> = (0..per_row).filter(|&j| keep[j]).collect();
                            tokens.select(Axis(0), &kept)
                        }
                        _ => tokens.to_owned(),
                    };
                    if gram_wanted {
                        gram.add(tokens.view());
                    }
                    for (_, v, sums, n) in bases.iter_mut().filter(|b| b.0 == k) {
                        for row in tokens.dot(v).outer_iter() {
                            for (s, p) in sums.iter_mut().zip(row) {
                                *s += p.abs() as f64;
                            }
                        }
                        *n += tokens.nrows() as u64;
                    }
                }
            }
        }
    }
    let grams: Vec<Arc<InputGram>> = grams.into_iter().map(Arc::new).collect();
    let mut modules = BTreeMap::new();
    for (i, t) in targets.iter().enumerate() {
        let name = &model.graph.value(t.input).name;
        let k = names.iter().position(|n| n == name).expect("named");
        modules.insert(
            t.module.clone(),
            ModuleStats {
                gram: gram_wanted.then(|| grams[k].clone()),
                grad: None,
                basis_l1: bases.get(i).map(|(_, _, sums, n)| (sums.clone(), *n)),
            },
        );
    }
    Ok(Calibration {
        modules,
        batches: batches.len(),
        report,
    })
}

/// Which of a row's `n` tokens count (label not -100), when the row has labels of
/// that length.
fn counted_tokens(row: &Row, n: usize) -> Option<Vec<bool>> {
    match row.fields.get("labels") {
        Some(crate::tensor::Array::I64(l)) if l.len() == n => {
            Some(l.iter().map(|&v| v != -100).collect())
        }
        _ => None,
    }
}

/// The loss calibration data in `path` is for: JSONL lines holding a `label` are
/// classification examples, a `target` regression ones; anything else is token data.
fn loss_of_data(path: &std::path::Path) -> Result<Loss> {
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

    fn merged_weight(&self, w: &Array2<f32>, _p: &Params, _cfg: &Config) -> Array2<f32> {
        w.clone()
    }
}

fn weight_gradients(
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
