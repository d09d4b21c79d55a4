//! The calibration run: the base model over data, gathering per target what a
//! data-calibrated init reads, streamed batch by batch (no activations are kept):
//! the Gram matrix `XᵀX` of the target's inputs and their sum, in f64 (EVA), or the
//! gradient of the loss with respect to the target's weight (LoRA-GA), from the
//! gradient pass on a zero probe `y + x·P` around every target (`∂L/∂P = ∂L/∂Wᵀ`).
//! Both run on the data-parallel workers that training uses.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        use faer::linalg::matmul::triangular::{matmul, BlockStructure};
        let x = x.as_standard_layout();
        let rows = x.as_slice().expect("standard");
        match &self.omega {
            None => {
                // Xᵀ stored row-major (X column-major): faer's kernels run it twice as fast.
                let xt = x.t().as_standard_layout().into_owned();
                let a = faer::MatRef::from_row_major_slice(xt.as_slice().expect("standard"), d, n);
                // XᵀX's lower triangle only (it is symmetric).
                let mut g = faer::Mat::<f32>::zeros(d, d);
                let full = BlockStructure::Rectangular;
                matmul(
                    g.as_mut(),
                    BlockStructure::TriangularLower,
                    faer::Accum::Replace,
                    a,
                    full,
                    a.transpose(),
                    full,
                    1.0f32,
                    faer::Par::Seq,
                );
                // Column j of g's lower triangle into row j of xtx's upper one, both
                // contiguous; [`InputGram::finish`] mirrors it once.
                for j in 0..d {
                    let col = g
                        .col(j)
                        .try_as_col_major()
                        .expect("column-major")
                        .as_slice();
                    let mut row = self.xtx.row_mut(j);
                    let row = row.as_slice_mut().expect("row-major");
                    for (r, &c) in row[j..].iter_mut().zip(&col[j..]) {
                        *r += c as f64;
                    }
                }
            }
            Some(o) => {
                // Xᵀ(XΩ): thin products, on X as it is.
                let m = faer::MatRef::from_row_major_slice(rows, n, d);
                let o = faer::Mat::<f32>::from_fn(d, o.ncols(), |i, j| o[[i, j]] as f32);
                let g = m.transpose() * (m * &o);
                for ((i, j), v) in self.xtx.indexed_iter_mut() {
                    *v += g[(i, j)] as f64;
                }
            }
        }
        let (sum, squares) = (
            self.sum.as_slice_mut().expect("contiguous"),
            self.squares.as_slice_mut().expect("contiguous"),
        );
        for token in rows.chunks_exact(d) {
            for ((s, q), &v) in sum.iter_mut().zip(squares.iter_mut()).zip(token) {
                let v = v as f64;
                *s += v;
                *q += v * v;
            }
        }
        self.tokens += n as u64;
    }

    /// Completes the exact matrix's lower triangle from the upper one [`InputGram::add`]
    /// accumulates.
    fn finish(&mut self) {
        if self.omega.is_none() {
            let d = self.xtx.nrows();
            for i in 0..d {
                for j in 0..i {
                    self.xtx[[i, j]] = self.xtx[[j, i]];
                }
            }
        }
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
    let mut bases: Vec<BasisSums> = Vec::new();
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
    let threads = req.threads.max(1);
    let (mut forward, mut statistics) = (Duration::ZERO, Duration::ZERO);
    for batch in &batches {
        let start = Instant::now();
        let outs = workers.run(&batch.rows, &BTreeMap::new())?;
        forward += start.elapsed();
        let start = Instant::now();
        // Each input's outputs over the workers, taken without a copy.
        let mut per_input: Vec<Vec<crate::tensor::Array>> =
            names.iter().map(|_| Vec::new()).collect();
        for out in outs {
            for (k, a) in out.into_iter().enumerate().take(names.len()) {
                per_input[k].push(a);
            }
        }
        let inputs = per_input
            .into_iter()
            .enumerate()
            .map(|(k, parts)| batch_tokens(parts, &names[k], batch, slice, masked))
            .collect::<Result<Vec<_>>>()?;
        // The inputs' statistics on every thread, each input on one.
        std::thread::scope(|scope| {
            let mut work: Vec<ThreadShare> =
                (0..threads).map(|_| (Vec::new(), Vec::new())).collect();
            // Largest first, each to the least loaded thread (cost: d² for an exact
            // matrix, d·k for a sketch).
            let mut order: Vec<(usize, &mut InputGram)> = grams
                .iter_mut()
                .enumerate()
                .filter(|_| gram_wanted)
                .collect();
            order.sort_by_key(|(_, g)| std::cmp::Reverse(g.xtx.len()));
            let mut load = vec![0usize; threads];
            for (k, g) in order {
                let t = (0..threads).min_by_key(|&t| load[t]).expect("a thread");
                load[t] += g.xtx.len();
                work[t].0.push((k, g));
            }
            for b in bases.iter_mut() {
                work[b.0 % threads].1.push(b);
            }
            for (gs, bs) in work {
                let inputs = &inputs;
                scope.spawn(move || {
                    for (k, g) in gs {
                        g.add(inputs[k].view());
                    }
                    for (k, v, sums, n) in bs {
                        let x = &inputs[*k];
                        for row in x.dot(&*v).outer_iter() {
                            for (s, p) in sums.iter_mut().zip(row) {
                                *s += p.abs() as f64;
                            }
                        }
                        *n += x.nrows() as u64;
                    }
                });
            }
        });
        statistics += start.elapsed();
    }
    if !report.is_empty() {
        report.push_str(&format!(
            "; forward {:.2} s, statistics {:.2} s ({:.2}x the forward)",
            forward.as_secs_f64(),
            statistics.as_secs_f64(),
            (forward + statistics).as_secs_f64() / forward.as_secs_f64().max(1e-9)
        ));
    }
    let grams: Vec<Arc<InputGram>> = grams
        .into_iter()
        .map(|mut g| {
            g.finish();
            Arc::new(g)
        })
        .collect();
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

/// A target's input index, its weight's right singular vectors `[d_in, k]`, the sums
/// `Σ_n |x_n · v_k|` and the tokens summed over (AntiPaSTO's selection).
type BasisSums = (usize, Array2<f32>, Array1<f64>, u64);

/// One statistics thread's share of a batch: Gram matrices (with their input index) and
/// basis sums.
type ThreadShare<'a> = (Vec<(usize, &'a mut InputGram)>, Vec<&'a mut BasisSums>);

/// The tokens `[n, d]` of one input over a batch's real rows, from each worker's output
/// (`masked`: only the counted ones); no copy when one worker ran whole rows.
fn batch_tokens(
    parts: Vec<crate::tensor::Array>,
    name: &str,
    batch: &Batch,
    slice: usize,
    masked: bool,
) -> Result<Array2<f32>> {
    let workers = parts.len();
    let mut kept = Vec::new();
    for (w, part) in parts.into_iter().enumerate() {
        let first = w * slice;
        let x = part.into_f32();
        let d = *x.shape().last().unwrap_or(&0);
        if d == 0 || x.len() % (slice * d) != 0 {
            return Err(Error::Runtime(format!(
                "calibration: '{name}' is {:?}, not [{slice}, ..., d]",
                x.shape()
            )));
        }
        let per_row = x.len() / (slice * d);
        let x: Array2<f32> = x
            .into_shape_with_order((slice * per_row, d))
            .map_err(|e| Error::Runtime(e.to_string()))?;
        let rows = &batch.rows[first..first + slice];
        let all = first + slice <= batch.real
            && !(masked
                && rows
                    .iter()
                    .any(|r| counted_tokens(r, per_row).is_some_and(|c| c.iter().any(|&k| !k))));
        if all && workers == 1 {
            return Ok(x);
        }
        let keep: Vec<usize> = (0..slice)
            .filter(|&i| first + i < batch.real)
            .flat_map(|i| {
                let counted = counted_tokens(&rows[i], per_row).filter(|_| masked);
                (0..per_row)
                    .filter(move |&j| counted.as_ref().is_none_or(|c| c[j]))
                    .map(move |j| i * per_row + j)
            })
            .collect();
        kept.push(if all { x } else { x.select(Axis(0), &keep) });
    }
    let views: Vec<_> = kept.iter().map(|p| p.view()).collect();
    tract_core::ndarray::concatenate(Axis(0), &views).map_err(|e| Error::Runtime(e.to_string()))
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
