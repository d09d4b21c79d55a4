//! The `lora-graft` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lora_graft::adapter::meta::FilterText;
use lora_graft::adapter::{AdapterOverrides, LoadedAdapter};
use lora_graft::jobs::{self, AdapterDtype, GraftRequest, TrainingRequest};
use lora_graft::model::{SaveOptions, SaveReport};
use lora_graft::passes::grad::loss::Loss;
use lora_graft::passes::merge::PissaBase;
use lora_graft::passes::target::{self, Filters, Role};
use lora_graft::passes::variants::{self, Alpha, Config, Variant};
use lora_graft::train::{self, Schedule, TrainOptions};
use lora_graft::{inspect, Error, Model, Result};
use regex::Regex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Graft LoRA-family adapters into ONNX models.
///
/// `lora-graft model.onnx --variant lora|pissa|delora` writes `model.<variant>.onnx`
/// and `model.<variant>.safetensors` beside the input.
#[derive(Parser)]
#[command(
    name = "lora-graft",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    graft: GraftArgs,
}

/// The variant and its settings (shared by grafting and `grad`).
#[derive(Args, Debug, Clone)]
struct VariantArgs {
    /// The adapter variant (lora, pissa, delora, ...).
    #[arg(long, value_parser = parse_variant)]
    variant: Option<&'static dyn Variant>,
    /// Rank.
    #[arg(short, long, default_value_t = 8)]
    r: usize,
    /// LoRA alpha (the scale is alpha / r); kept as given in the adapter's cfg.
    #[arg(long, default_value = "16.0")]
    alpha: String,
    /// rsLoRA scale alpha / sqrt(r).
    #[arg(long)]
    rslora: bool,
    /// DeLoRA's initial lambda.
    #[arg(long, default_value_t = 15.0)]
    lambda0: f64,
    /// PiSSA: randomized SVD with N power iterations (PEFT's pissa_niter_N) instead of the exact SVD.
    #[arg(long, value_name = "N")]
    pissa_niter: Option<usize>,
    /// Seed of the random inits (the same seed gives byte-identical outputs).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Adapter dtype.
    #[arg(long, value_enum, default_value_t = AdapterDtype::Float32)]
    adapter_dtype: AdapterDtype,
}

impl VariantArgs {
    /// The graft request these options and `filters` make.
    fn request(&self, filters: &TargetArgs) -> Result<GraftRequest> {
        let Some(variant) = self.variant else {
            return Err(Error::Usage(format!(
                "no --variant given; choose {}",
                variant_names(" or ")
            )));
        };
        Ok(GraftRequest {
            variant,
            cfg: Config {
                r: self.r,
                alpha: parse_alpha(&self.alpha)?,
                rslora: self.rslora,
                lambda0: self.lambda0,
                pissa_niter: self.pissa_niter,
                seed: self.seed,
            },
            adapter_dtype: self.adapter_dtype,
            filters: filters.filters()?,
            filter_text: filters.text(),
        })
    }
}

/// The main job's options.
#[derive(Args, Debug)]
struct GraftArgs {
    /// The .onnx model to adapt.
    model: Option<PathBuf>,
    #[command(flatten)]
    variant: VariantArgs,
    #[command(flatten)]
    filters: TargetArgs,
    /// Output model (default: <stem>.<variant>.onnx beside the input).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Output adapter file (default: the output model's path with .safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Graft this trained adapter (lora-graft's, lora-lite's or PEFT's safetensors)
    /// instead of new tensors: variant, r, alpha and targets come from the file.
    #[arg(long, value_name = "ADAPTER")]
    adapter_in: Option<PathBuf>,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Summarise a model: versions, inputs and outputs, ops, weights, external data.
    Inspect {
        /// The .onnx file.
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fold a trained adapter into the base weights: the original graph, no adapter node.
    Merge {
        /// The base .onnx model.
        model: PathBuf,
        /// The adapter file (safetensors).
        adapter: PathBuf,
        /// Output model (default: <stem>.merged.onnx beside the input).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// PiSSA only: whether the base holds the original W (W_res is recomputed from
        /// the same SVD init) or already W_res (a model grafted by lora-graft).
        #[arg(long, value_enum, default_value_t = PissaBase::Original)]
        pissa_base: PissaBase,
        /// Variant of a file without lora-lite's cfg (a PEFT adapter).
        #[arg(long, value_parser = parse_variant)]
        variant: Option<&'static dyn Variant>,
        /// alpha of a file without cfg.
        #[arg(long)]
        alpha: Option<String>,
        /// Remove this prefix from the model's module names.
        #[arg(long)]
        strip_prefix: Option<String>,
    },
    /// Write the training graph: the adapted model, a loss, and one gradient per adapter
    /// tensor, in plain ONNX ops (runs on tract and ONNX Runtime).
    Grad {
        /// The .onnx model.
        model: PathBuf,
        #[command(flatten)]
        variant: VariantArgs,
        #[command(flatten)]
        filters: TargetArgs,
        /// The loss: causal-lm (logits [B, S, V], labels [B, S]), class, or mse.
        #[arg(long, value_enum, default_value_t = Loss::CausalLm)]
        loss: Loss,
        /// Training batch size (the first symbolic input dim).
        #[arg(long)]
        batch: usize,
        /// Training sequence length (the second symbolic input dim).
        #[arg(long, default_value_t = 1)]
        seq: usize,
        /// Also output the model's outputs.
        #[arg(long)]
        keep_outputs: bool,
        /// The training graph (default: <stem>.<variant>.train.onnx beside the input).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Fine-tune adapter tensors on token data, in Rust, with tract.
    Train {
        /// The .onnx model.
        model: PathBuf,
        #[command(flatten)]
        variant: VariantArgs,
        #[command(flatten)]
        filters: TargetArgs,
        /// Training data. causal-lm: JSONL lines {"input_ids": [...], "labels": [...]?} (or
        /// {"text": ...}), or plain text with --tokenizer, packed into rows of --seq.
        /// class / mse: JSONL lines with the model's inputs by name and "label" / "target".
        #[arg(long)]
        data: PathBuf,
        /// Evaluation data (same format), evaluated every --save-every steps.
        #[arg(long)]
        eval: Option<PathBuf>,
        /// A Hugging Face tokenizer.json, for text data.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// causal-lm, class (cross-entropy over [B, C] logits) or mse.
        #[arg(long, value_enum, default_value_t = Loss::CausalLm)]
        loss: Loss,
        /// The model output the loss reads (default: the first).
        #[arg(long = "loss-output", value_name = "NAME")]
        loss_output: Option<String>,
        /// Optimizer steps.
        #[arg(long)]
        steps: usize,
        /// Rows per step.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Tokens per row.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Peak learning rate.
        #[arg(long, default_value_t = 1e-4)]
        lr: f64,
        /// AdamW weight decay.
        #[arg(long, default_value_t = 0.01)]
        weight_decay: f64,
        /// Linear warmup steps.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        /// The learning-rate schedule after warmup.
        #[arg(long, value_enum, default_value_t = Schedule::Constant)]
        schedule: Schedule,
        /// Clip the global gradient norm (0: no clipping).
        #[arg(long, default_value_t = 1.0)]
        grad_clip: f64,
        /// Checkpoint (and evaluate) every K steps.
        #[arg(long, default_value_t = 0)]
        save_every: usize,
        /// Resume from a checkpoint written by an earlier run.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Worker threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// The adapter file to write (lora-lite's format).
        #[arg(short, long)]
        output: PathBuf,
        /// Also write the adapted model holding the trained values.
        #[arg(long)]
        emit_model: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// List the linear layers adapters would be grafted onto.
    Targets {
        /// The .onnx file.
        model: PathBuf,
        #[command(flatten)]
        filters: TargetArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// lora-lite's targeting knobs.
#[derive(Args, Clone, Debug)]
struct TargetArgs {
    /// Roles to adapt, comma-separated: reader, writer, inner.
    #[arg(long, value_delimiter = ',', default_value = "reader,writer")]
    target_roles: Vec<String>,
    /// Adapt only modules matching this regex (repeatable).
    #[arg(long = "target-names", value_name = "REGEX")]
    target_names: Vec<String>,
    /// Skip modules matching this regex (repeatable; default: lm_head, embed_tokens).
    #[arg(long = "exclude-names", value_name = "REGEX", default_values = ["lm_head", "embed_tokens"])]
    exclude_names: Vec<String>,
    /// Adapt only these layer indices, comma-separated.
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Remove this prefix from module names (e.g. a wrapper's `m.`).
    #[arg(long)]
    strip_prefix: Option<String>,
    /// The residual width, when the model has no token embedding to tell it.
    #[arg(long)]
    d_model: Option<usize>,
    /// Role of square layers matching REGEX: `REGEX=reader` or `REGEX=writer` (repeatable).
    #[arg(long = "role", value_name = "REGEX=ROLE")]
    roles: Vec<String>,
}

fn regex(s: &str, flag: &str) -> Result<Regex> {
    Regex::new(s).map_err(|e| Error::Usage(format!("{flag} '{s}' is not a valid regex: {e}")))
}

impl TargetArgs {
    fn text(&self) -> FilterText {
        FilterText {
            roles: self.target_roles.clone(),
            names: self.target_names.clone(),
            excludes: self.exclude_names.clone(),
            layers: self.layers.clone(),
        }
    }

    fn filters(&self) -> Result<Filters> {
        Ok(Filters {
            roles: self
                .target_roles
                .iter()
                .map(|r| Role::parse(r))
                .collect::<Result<_>>()?,
            names: self
                .target_names
                .iter()
                .map(|s| regex(s, "--target-names"))
                .collect::<Result<_>>()?,
            excludes: self
                .exclude_names
                .iter()
                .map(|s| regex(s, "--exclude-names"))
                .collect::<Result<_>>()?,
            layers: self.layers.clone(),
            strip_prefix: self.strip_prefix.clone(),
            d_model: self.d_model,
            role_overrides: self
                .roles
                .iter()
                .map(|s| {
                    let (re, role) = s.rsplit_once('=').ok_or_else(|| {
                        Error::Usage(format!(
                            "--role '{s}' should be REGEX=reader or REGEX=writer"
                        ))
                    })?;
                    Ok((regex(re, "--role")?, Role::parse(role)?))
                })
                .collect::<Result<_>>()?,
            modules: None,
        })
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let Some(command) = cli.command else {
        return graft(cli.graft);
    };
    match command {
        Command::Inspect { model, json } => {
            let model = Model::load(&model)?;
            let report = inspect::Report::new(&model);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serialisable")
                );
            } else {
                print!("{report}");
            }
        }
        Command::Grad {
            model,
            variant,
            filters,
            loss,
            batch,
            seq,
            keep_outputs,
            output,
        } => {
            let req = TrainingRequest {
                graft: variant.request(&filters)?,
                loss,
                batch,
                seq,
                output: None,
                keep_outputs,
            };
            let name = format!("{}.train", req.graft.variant.name());
            let (out, adapter_path) = jobs::default_paths(&model, &name, output.as_deref(), None);
            let training = jobs::training_graph(Model::load(&model)?, &req)?;
            let adapter = training.outcome.adapter_file(&req.graft);
            let report = jobs::write(&training.model, &adapter, &out, &adapter_path)?;
            println!(
                "training graph: loss ({}) and {} gradients, {} forward nodes differentiated",
                loss_name(loss),
                training.graph.gradients.len(),
                training.graph.differentiated
            );
            print_saved(&report);
            println!("wrote {} (initial adapter values)", adapter_path.display());
        }
        Command::Train {
            model,
            variant,
            filters,
            data,
            eval,
            tokenizer,
            loss,
            loss_output,
            steps,
            batch,
            seq,
            lr,
            weight_decay,
            warmup,
            schedule,
            grad_clip,
            save_every,
            resume,
            threads,
            output,
            emit_model,
            quiet,
        } => {
            reuse_freed_memory();
            let graft = variant.request(&filters)?;
            let opts = TrainOptions {
                training: TrainingRequest {
                    graft,
                    loss,
                    batch,
                    seq,
                    output: loss_output,
                    keep_outputs: false,
                },
                data,
                tokenizer,
                eval,
                steps,
                lr,
                weight_decay,
                warmup,
                schedule,
                grad_clip,
                seed: variant.seed,
                save_every,
                resume,
                output,
                emit_model,
                threads: threads.unwrap_or_else(|| {
                    std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(1)
                }),
                quiet,
            };
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
            let report = train::run(&model, &opts, stop)?;
            let (first, last) = (
                report.losses.first().copied().unwrap_or(f64::NAN),
                report.losses.last().copied().unwrap_or(f64::NAN),
            );
            if report.interrupted {
                println!("interrupted at step {}; checkpoint saved", report.steps);
            }
            println!("{} steps: loss {first:.4} -> {last:.4}", report.steps);
            println!("wrote {}", opts.output.display());
            if let Some(p) = &opts.emit_model {
                println!("wrote {}", p.display());
            }
        }
        Command::Merge {
            model,
            adapter,
            output,
            pissa_base,
            variant,
            alpha,
            strip_prefix,
        } => {
            let overrides = AdapterOverrides {
                variant,
                alpha: alpha.as_deref().map(parse_alpha).transpose()?,
                strip_prefix,
                ..Default::default()
            };
            let adapter = LoadedAdapter::read(&adapter, &overrides)?;
            let out = output.unwrap_or_else(|| jobs::default_paths(&model, "merged", None, None).0);
            let mut m = Model::load(&model)?;
            let merged = jobs::merge(&mut m, &adapter, pissa_base)?;
            let report = m.save(&out, &SaveOptions::default())?;
            println!(
                "merged {merged} modules of {} ({}) into their weights",
                adapter.path.display(),
                adapter.req.variant.name()
            );
            print_saved(&report);
        }
        Command::Targets {
            model,
            filters,
            json,
        } => {
            let path = model;
            let model = Model::load(&path)?;
            let targeting = target::run(&model.graph, &filters.filters()?)
                .map_err(|e| e.context(format!("{}: targeting", path.display())))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&targeting).expect("serialisable")
                );
            } else {
                print!("{targeting}");
            }
        }
    }
    Ok(())
}

/// Keeps freed memory in the process instead of returning it to the kernel: every
/// training step allocates the same large activations again, and fresh pages from the
/// kernel cost a page fault each (11 % of a step's time on the training benchmark).
fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called before any worker starts.
    unsafe {
        // 32 MiB: glibc's largest mmap threshold on 64-bit (it refuses more).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn graft(args: GraftArgs) -> Result<()> {
    let Some(input) = args.model else {
        return Err(Error::Usage(format!(
            "no model given; usage: lora-graft model.onnx --variant {} (see --help)",
            variant_names("|")
        )));
    };
    if let Some(adapter_in) = &args.adapter_in {
        let overrides = AdapterOverrides {
            variant: args.variant.variant,
            alpha: Some(parse_alpha(&args.variant.alpha)?),
            strip_prefix: args.filters.strip_prefix.clone(),
            role_overrides: args.filters.filters()?.role_overrides,
        };
        let adapter = LoadedAdapter::read(adapter_in, &overrides)?;
        let out = args.output.unwrap_or_else(|| {
            jobs::default_paths(&input, adapter.req.variant.name(), None, None).0
        });
        let mut model = Model::load(&input)?;
        let outcome = jobs::apply(&mut model, &adapter)?;
        let report = model.save(&out, &SaveOptions::default())?;
        println!(
            "{} modules adapted with {} from {}",
            outcome.grafted.modules.len(),
            adapter.req.variant.name(),
            adapter_in.display()
        );
        print_saved(&report);
        return Ok(());
    }
    let req = args
        .variant
        .request(&args.filters)
        .map_err(|e| e.context(input.display().to_string()))?;
    let variant = req.variant.name();
    let (out, adapter_path) = jobs::default_paths(
        &input,
        variant,
        args.output.as_deref(),
        args.adapter.as_deref(),
    );
    // Before the (long, for PiSSA on a large model) graft.
    jobs::check_output_paths(&input, &out, &adapter_path)?;
    let mut model = Model::load(&input)?;
    let outcome = jobs::graft(&mut model, &req)?;
    let adapter = outcome.adapter_file(&req);
    let report = jobs::write(&model, &adapter, &out, &adapter_path)?;
    println!(
        "{} targets adapted with {} (r = {}):",
        outcome.targeting.targets.len(),
        variant,
        req.cfg.r
    );
    for m in &outcome.grafted.modules {
        let roles: Vec<&str> = m.sites.iter().map(|s| s.role.as_str()).collect();
        println!(
            "  {:<48} {} -> {}  {}",
            m.module,
            m.dims.d_in,
            m.dims.d_out,
            roles.join(",")
        );
    }
    let trainable = outcome.grafted.trainable_params();
    let base = outcome.targeting.model_params.max(1);
    println!(
        "trainable parameters: {trainable} ({:.3}% of the base model's {base})",
        100.0 * trainable as f64 / base as f64
    );
    print_saved(&report);
    println!("wrote {}", adapter_path.display());
    Ok(())
}

/// alpha as given (`16` stays an integer, `16.0` a float).
fn parse_alpha(text: &str) -> Result<Alpha> {
    Alpha::parse(text).ok_or_else(|| Error::Usage(format!("--alpha '{text}' is not a number")))
}

/// Resolves `--variant NAME` in the registry, once.
fn parse_variant(name: &str) -> Result<&'static dyn Variant> {
    variants::variant(name)
}

/// The registry's names joined by `sep` (the last two by ` or ` when `sep` is `, `).
fn variant_names(last_sep: &str) -> String {
    let names: Vec<&str> = variants::VARIANTS.iter().map(|v| v.name()).collect();
    if last_sep == "|" {
        return names.join("|");
    }
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{}{last_sep}{last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// The CLI name of a loss.
fn loss_name(loss: Loss) -> String {
    use clap::ValueEnum;
    loss.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// A bad value of an option is a one-line error and exit code 1, like every other
/// usage error; the rest (help, version, missing arguments) is clap's.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use std::error::Error as _;
    let text = |k| match e.get(k) {
        Some(ContextValue::String(s)) => s.clone(),
        Some(ContextValue::Strings(v)) => v.join(", "),
        _ => String::new(),
    };
    match e.kind() {
        ErrorKind::ValueValidation => {
            if let Some(source) = e.source() {
                eprintln!("error: {source}");
                return ExitCode::FAILURE;
            }
        }
        ErrorKind::InvalidValue => {
            eprintln!(
                "error: {}: unknown value '{}'; choose one of {}",
                text(ContextKind::InvalidArg),
                text(ContextKind::InvalidValue),
                text(ContextKind::ValidValue)
            );
            return ExitCode::FAILURE;
        }
        _ => {}
    }
    e.exit()
}

/// Says what a save wrote.
fn print_saved(report: &SaveReport) {
    println!("wrote {}", report.model.display());
    for p in &report.linked {
        println!(
            "  linked external data {} (the input's, not copied)",
            p.display()
        );
    }
    for p in &report.cloned {
        println!("  cloned external data {} (copy-on-write)", p.display());
    }
    for p in &report.copied {
        println!(
            "  copied external data {} (runtimes need it in the model's folder)",
            p.display()
        );
    }
    if let Some(p) = &report.own_data {
        println!("  new tensors in {}", p.display());
    }
}
