//! The calibration run: the base model over data, gathering per target what a
//! data-calibrated init reads, streamed batch by batch (no activations are kept):
//! the Gram matrix `XᵀX` of the target's inputs and their sum, in f64 (EVA), or the
//! gradient of the loss with respect to the target's weight (LoRA-GA), from the
//! gradient pass on a zero probe `y + x·P` around every target (`∂L/∂P = ∂L/∂Wᵀ`).
//! Both run on the data-parallel workers that training uses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tract_core::ndarray::{Array1, Array2, Axis};

use crate::data::Row;
use crate::error::{Error, Result};
use crate::ir::GraphIo;
use crate::passes::grad::loss::Loss;
use crate::passes::target::Target;
use crate::passes::{run_pass, PassContext};
use crate::tensor::Array;
use crate::train::workers::{batch_input, fields_of, split, Workers};
use crate::Model;

mod gram;
mod probe;
mod stream;

pub use gram::InputGram;
use probe::weight_gradients;
pub use probe::WeightProbe;
use stream::Segments;
pub use stream::SEGMENT_BYTES;

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
    /// The weight bytes of one streamed segment of the model ([`SEGMENT_BYTES`]).
    pub segment: usize,
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
    let widest = targets.iter().map(|t| t.d_in).max().unwrap_or(1);
    crate::jobs::check_batch_fits(
        model,
        (req.batch, req.seq),
        widest,
        "--calibration-batch and --calibration-seq",
    )?;
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
    let graph_inputs = crate::runtime::input_names(&capture);
    let tokens = graph_inputs.iter().any(|n| n == "input_ids");
    let fields = fields_of(&capture, &shapes, &[], "", None);
    let batches = read_batches(model, req, (!tokens).then_some(&fields))?;
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
    // The model streamed a segment at a time over every batch. The store holds, per
    // batch and worker, the values that cross the cuts (the graph inputs to start).
    let segments = Segments::cut(&capture, req.segment)?;
    let mut store: Vec<Vec<HashMap<String, Array>>> = Vec::new();
    for batch in &batches {
        let mut per_worker = Vec::new();
        for w in 0..threads {
            let part = &batch.rows[w * slice..(w + 1) * slice];
            let values = graph_inputs
                .iter()
                .map(|n| Ok((n.clone(), batch_input(&fields, &shapes, n, part)?)))
                .collect::<Result<HashMap<_, _>>>()?;
            per_worker.push(values);
        }
        store.push(per_worker);
    }
    // The segment after which each captured input is complete.
    let ready_after: Vec<usize> = names
        .iter()
        .map(|n| {
            (0..segments.len())
                .find(|&s| segments.makes[s].contains(n))
                .unwrap_or(0)
        })
        .collect();
    let (mut forward, mut statistics, mut loading) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for s in 0..segments.len() {
        let start = Instant::now();
        let workers = {
            let first = &store[0][0];
            let part = segments.model(&capture, s, &|n| first.get(n))?;
            let part_shapes = crate::runtime::input_names(&part)
                .into_iter()
                .map(|n| {
                    let shape = first[&n].shape().to_vec();
                    (n, shape)
                })
                .collect();
            Workers::new(&part, part_shapes, fields.clone(), threads, slice)?.sharing(req.threads)
        };
        loading += start.elapsed();
        let outputs = workers.outputs().to_vec();
        let ready: Vec<usize> = (0..names.len()).filter(|&k| ready_after[k] == s).collect();
        let later: HashSet<&String> = segments.reads[s + 1..].iter().flatten().collect();
        for (batch, values) in batches.iter().zip(store.iter_mut()) {
            let start = Instant::now();
            let outs = workers.run_with(workers.threads(), &|w, name| {
                values[w]
                    .get(name)
                    .cloned()
                    .ok_or_else(|| Error::Runtime(format!("calibration: '{name}' was not carried")))
            })?;
            forward += start.elapsed();
            let start = Instant::now();
            for (w, out) in outs.into_iter().enumerate() {
                values[w].extend(outputs.iter().cloned().zip(out));
            }
            // The inputs complete after this segment, taken out of the store unless a
            // later segment reads them.
            let mut inputs: Vec<Option<Array2<f32>>> = names.iter().map(|_| None).collect();
            for &k in &ready {
                let parts = values
                    .iter_mut()
                    .map(|v| {
                        if later.contains(&names[k]) {
                            v[&names[k]].clone()
                        } else {
                            v.remove(&names[k]).expect("captured")
                        }
                    })
                    .collect();
                inputs[k] = Some(batch_tokens(parts, &names[k], batch, slice, masked)?);
            }
            for name in &segments.last_use[s] {
                for v in values.iter_mut() {
                    v.remove(name);
                }
            }
            add_statistics(&inputs, &mut grams, &mut bases, gram_wanted, req.threads);
            statistics += start.elapsed();
        }
        for &k in &ready {
            grams[k].finish();
        }
    }
    let mut report = String::new();
    if gram_wanted {
        let bytes: usize = grams.iter().map(InputGram::bytes).sum();
        report = format!(
            "calibration: {} Gram matrices of {} inputs, {:.1} MB{}; {} segment{}; loaded in {:.2} s, forward {:.2} s, statistics {:.2} s ({:.2}x the forward)",
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
            },
            segments.len(),
            if segments.len() == 1 { "" } else { "s" },
            loading.as_secs_f64(),
            forward.as_secs_f64(),
            statistics.as_secs_f64(),
            (forward + statistics).as_secs_f64() / forward.as_secs_f64().max(1e-9)
        );
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

/// Adds a batch's tokens `[n, d]` of the inputs it has (`Some`) to their statistics, on
/// `threads` threads, each input on one, largest first, each to the least loaded thread
/// (cost: d² for an exact matrix, d·k for a sketch).
fn add_statistics(
    inputs: &[Option<Array2<f32>>],
    grams: &mut [InputGram],
    bases: &mut [BasisSums],
    gram_wanted: bool,
    threads: usize,
) {
    let threads = threads.max(1);
    std::thread::scope(|scope| {
        let mut work: Vec<ThreadShare> = (0..threads).map(|_| (Vec::new(), Vec::new())).collect();
        let mut order: Vec<(usize, &mut InputGram)> = grams
            .iter_mut()
            .enumerate()
            .filter(|(k, _)| gram_wanted && inputs[*k].is_some())
            .collect();
        order.sort_by_key(|(_, g)| std::cmp::Reverse(g.xtx.len()));
        let mut load = vec![0usize; threads];
        for (k, g) in order {
            let t = (0..threads).min_by_key(|&t| load[t]).expect("a thread");
            load[t] += g.xtx.len();
            work[t].0.push((k, g));
        }
        for b in bases.iter_mut().filter(|b| inputs[b.0].is_some()) {
            work[b.0 % threads].1.push(b);
        }
        for (gs, bs) in work {
            scope.spawn(move || {
                for (k, g) in gs {
                    g.add(inputs[k].as_ref().expect("ready").view());
                }
                for (k, v, sums, n) in bs {
                    let x = inputs[*k].as_ref().expect("ready");
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
