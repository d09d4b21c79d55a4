//! The binary's command line: clap types with a `ValueEnum` for every closed choice and
//! the variant resolved in the registry once; bad values are one-line errors.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lora_graft::adapter::meta::FilterText;
use lora_graft::adapter::AdapterOverrides;
use lora_graft::calibrate::CalibrationRequest;
use lora_graft::jobs::{AdapterDtype, GraftRequest};
use lora_graft::passes::grad::loss::Loss;
use lora_graft::passes::merge::PissaBase;
use lora_graft::passes::target::{Filters, Role};
use lora_graft::passes::variants::antipasto::{AntipastoOptions, RotateBasis};
use lora_graft::passes::variants::delora::DeloraInit;
use lora_graft::passes::variants::lora_ga::{Direction, LoraGaOptions, Scale};
use lora_graft::passes::variants::road::RoadVariant;
use lora_graft::passes::variants::{self, Alpha, Config, Variant};
use lora_graft::train::Schedule;
use lora_graft::{Error, Result};
use regex::Regex;

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
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub graft: GraftArgs,
}

/// The variant and its settings (shared by grafting and `grad`).
#[derive(Args, Debug, Clone)]
pub struct VariantArgs {
    /// The adapter variant (lora, pissa, delora, ...).
    #[arg(long, value_parser = parse_variant)]
    pub variant: Option<&'static dyn Variant>,
    /// Rank.
    #[arg(short, long, default_value_t = 8)]
    pub r: usize,
    /// LoRA alpha (the scale is alpha / r; default 16.0); kept as given in the adapter's
    /// cfg. With --adapter-in, the alpha of a file that does not say it.
    #[arg(long)]
    pub alpha: Option<String>,
    /// rsLoRA scale alpha / sqrt(r).
    #[arg(long)]
    pub rslora: bool,
    /// DeLoRA's initial lambda.
    #[arg(long, default_value_t = 15.0)]
    lambda0: f64,
    /// PiSSA: randomized SVD with N power iterations (PEFT's pissa_niter_N) instead of the exact SVD.
    #[arg(long, value_name = "N")]
    pub pissa_niter: Option<usize>,
    /// DeLoRA's init: the paper's (kaiming B minus a frozen copy of the branch; small first
    /// steps) or lora-lite's (B = 0; the file loads in lora-lite on the original weights).
    #[arg(long, value_enum, default_value_t = DeloraInit::Paper)]
    pub delora_init: DeloraInit,
    /// ROAD's sub-variant.
    #[arg(long, value_enum, default_value_t = RoadVariant::Road1)]
    pub road_variant: RoadVariant,
    /// ROAD's group of output channels (even, dividing every adapted layer's outputs).
    #[arg(long, default_value_t = 64)]
    pub road_group_size: usize,
    /// Seed of the random inits (the same seed gives byte-identical outputs).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Adapter dtype.
    #[arg(long, value_enum, default_value_t = AdapterDtype::Float32)]
    pub adapter_dtype: AdapterDtype,
    /// LoRA-GA: which of the gradient's top 2r singular pairs A and B take.
    #[arg(long, value_enum, default_value_t = Direction::ArB2r)]
    pub lora_ga_direction: Direction,
    /// LoRA-GA: how A and B are scaled.
    #[arg(long, value_enum, default_value_t = Scale::Stable)]
    pub lora_ga_scale: Scale,
    /// LoRA-GA: γ of the stable scaling (B · d_out^¼ / √γ).
    #[arg(long, default_value_t = 16.0, value_parser = finite_positive)]
    pub lora_ga_gamma: f64,
    /// AntiPaSTO: rows of the basis each rotation block turns (2 or 4).
    #[arg(long, default_value_t = 4)]
    pub antipasto_block_size: usize,
    /// AntiPaSTO: θmax, the bound of the rotation's tanh, in radians.
    #[arg(long, default_value_t = 0.5, value_parser = finite_positive)]
    pub max_rotation_angle: f64,
    /// AntiPaSTO: the basis the rotation turns.
    #[arg(long, value_enum, default_value_t = RotateBasis::V)]
    pub rotate_basis: RotateBasis,
    /// EVA as PEFT computes it: the centered PCA of the unpadded tokens and the rank
    /// budget r × layers redistributed by explained variance (alpha scaled with each
    /// layer's rank), instead of lora-lite's uncentered SVD at rank r everywhere.
    #[arg(long)]
    pub eva_peft: bool,
    /// --eva-peft: components computed per layer, round(r · rho), competing for the budget.
    #[arg(long, default_value_t = 2.0, value_parser = finite_positive)]
    pub eva_rho: f64,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
}

/// The data a calibrated init (eva, lora_ga) runs the model over.
#[derive(Args, Debug, Clone)]
pub struct CalibrationArgs {
    /// Calibration data for eva and lora_ga: token ids (JSONL) or text (with
    /// --tokenizer), as train's --data; read in file order.
    #[arg(long, value_name = "DATA")]
    pub calibration: Option<PathBuf>,
    /// At most this many calibration batches.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub calibration_batches: usize,
    /// Megabytes the exact Gram matrices of eva's calibration may hold; inputs beyond
    /// it are sketched (a randomized one-pass sketch of the leading directions).
    #[arg(long, default_value_t = 1024, value_parser = at_least_one)]
    pub calibration_memory: usize,
}

impl CalibrationArgs {
    /// The request, for batches of `batch` rows of `seq` tokens.
    pub fn request(
        &self,
        tokenizer: Option<PathBuf>,
        batch: usize,
        seq: usize,
        loss: Option<Loss>,
        threads: Option<usize>,
    ) -> Option<CalibrationRequest> {
        Some(CalibrationRequest {
            data: self.calibration.clone()?,
            tokenizer,
            batches: self.calibration_batches,
            batch,
            seq,
            loss,
            threads: threads.unwrap_or_else(every_core),
            memory: self.calibration_memory.saturating_mul(1 << 20),
        })
    }
}

impl VariantArgs {
    /// The graft request these options and `filters` make.
    pub fn request(&self, filters: &TargetArgs) -> Result<GraftRequest> {
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
                alpha: parse_alpha(self.alpha.as_deref().unwrap_or("16.0"))?,
                rslora: self.rslora,
                lambda0: self.lambda0,
                pissa_niter: self.pissa_niter,
                delora_init: self.delora_init,
                road_variant: self.road_variant,
                road_group_size: self.road_group_size,
                seed: self.seed,
                eva_peft: self.eva_peft.then_some(self.eva_rho),
                antipasto: AntipastoOptions {
                    block_size: self.antipasto_block_size,
                    max_angle: self.max_rotation_angle,
                    basis: self.rotate_basis,
                    // With calibration data, the Wanda-style selection.
                    select: self.calibration.calibration.is_some(),
                },
                lora_ga: LoraGaOptions {
                    direction: self.lora_ga_direction,
                    scale: self.lora_ga_scale,
                    gamma: self.lora_ga_gamma,
                },
                modules: Default::default(),
            },
            adapter_dtype: self.adapter_dtype,
            filters: filters.filters()?,
            filter_text: filters.text(),
            adapter_inputs: None,
            adapter_slots: None,
            calibration: None,
            values_from_file: false,
        })
    }
}

/// The main job's options.
#[derive(Args, Debug)]
pub struct GraftArgs {
    /// The .onnx model to adapt.
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub variant: VariantArgs,
    #[command(flatten)]
    pub filters: TargetArgs,
    /// Output model (default: <stem>.<variant>.onnx beside the input).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Output adapter file (default: the output model's path with .safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Graft this trained adapter (lora-graft's, lora-lite's or PEFT's safetensors)
    /// instead of new tensors: variant, r, alpha and targets come from the file.
    #[arg(long, value_name = "ADAPTER")]
    pub adapter_in: Option<PathBuf>,
    /// Serve adapters as graph inputs (ONNX Runtime's Multi-LoRA): every target gets
    /// inputs `<module>.lora_A [d_in, k]` and `<module>.lora_B [k, d_out]` whose defaults
    /// leave the model as it was; feed them with `export-adapter`'s .onnx_adapter.
    #[arg(long)]
    pub adapter_inputs: bool,
    /// With --adapter-inputs and a variant that starts from the weight (pissa, olora):
    /// serve adapters on the original weights as updates of rank 2r, instead of on PEFT's
    /// W_res = W − s·B₀A₀ (written as a new weight) with the start as the defaults.
    #[arg(long, requires = "adapter_inputs")]
    pub against_original: bool,
    /// Serve K adapters in one batch: stacked inputs `<module>.lora_A [K, d_in, r]`,
    /// `<module>.lora_B [K, r, d_out]` (made by `lora-graft pack`) and `adapter_index
    /// [batch]` (int64, -1 for none) picking each row's slot; against the original weights.
    #[arg(long, value_name = "K", value_parser = at_least_one)]
    pub adapter_slots: Option<usize>,
    /// A Hugging Face tokenizer.json, for text calibration data.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Rows per calibration batch.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub calibration_batch: usize,
    /// Tokens per calibration row.
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    pub calibration_seq: usize,
    /// Also rewrite onnxruntime's fused ops (SkipLayerNormalization, BiasGelu, FastGelu,
    /// Gelu, QuickGelu, BiasAdd) into default-domain ONNX ops in the emitted model.
    #[arg(long)]
    pub lower: bool,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Summarise a model (versions, inputs and outputs, ops, weights, external data) or
    /// an .onnx_adapter file.
    Inspect {
        /// The .onnx or .onnx_adapter file.
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
        /// PiSSA and OLoRA: whether the base holds the original W (the adapter's start
        /// A₀, B₀ subtracted; recomputed from W when the file has none) or PEFT's W_res.
        #[arg(long, value_enum, default_value_t = PissaBase::Original)]
        pissa_base: PissaBase,
        /// Merge into quantized weights (DequantizeLinear, Mul(Cast(int8), scale)) by
        /// writing the merged weights as float.
        #[arg(long)]
        dequantize: bool,
        #[command(flatten)]
        file: FileArgs,
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
        #[arg(long, value_parser = at_least_one)]
        batch: usize,
        /// Training sequence length (the second symbolic input dim).
        #[arg(long, default_value_t = 1, value_parser = at_least_one)]
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
        #[arg(long, value_parser = at_least_one)]
        steps: usize,
        /// Rows per step.
        #[arg(long, default_value_t = 8, value_parser = at_least_one)]
        batch: usize,
        /// Tokens per row.
        #[arg(long, default_value_t = 128, value_parser = at_least_one)]
        seq: usize,
        /// Peak learning rate.
        #[arg(long, default_value_t = 1e-4, value_parser = finite_non_negative)]
        lr: f64,
        /// AdamW weight decay.
        #[arg(long, default_value_t = 0.01, value_parser = finite_non_negative)]
        weight_decay: f64,
        /// Linear warmup steps.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        /// The learning-rate schedule after warmup.
        #[arg(long, value_enum, default_value_t = Schedule::Constant)]
        schedule: Schedule,
        /// Clip the global gradient norm (0: no clipping).
        #[arg(long, default_value_t = 1.0, value_parser = finite_non_negative)]
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
    /// Convert a trained adapter for ONNX runtimes: the tensors a model grafted with
    /// --adapter-inputs takes, as an .onnx_adapter file (ONNX Runtime, onnxruntime-genai).
    ExportAdapter {
        /// The adapter file (safetensors).
        adapter: PathBuf,
        /// onnx-adapter: the model grafted with --adapter-inputs that will serve it. peft:
        /// the base model (needed for PiSSA, OLoRA and VeRA).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::OnnxAdapter)]
        format: ExportFormat,
        /// Output file (default: the adapter's path with .onnx_adapter), or folder for
        /// peft (default: the adapter's path without extension, `.peft`).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The adapter version written in the file.
        #[arg(long, default_value_t = 1)]
        adapter_version: i32,
        /// The model version written in the file.
        #[arg(long, default_value_t = 1)]
        model_version: i32,
        #[command(flatten)]
        file: FileArgs,
    },
    /// Stack trained adapters into the slots of a model grafted with --adapter-slots:
    /// slot i holds the i-th adapter (ranks padded with zeros), for `adapter_index` i.
    Pack {
        /// The adapter files (safetensors), one per slot, in slot order.
        #[arg(required = true)]
        adapters: Vec<PathBuf>,
        /// The model grafted with --adapter-slots that will serve them.
        #[arg(long)]
        model: PathBuf,
        /// The stacked tensors (safetensors), fed as the model's inputs.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        file: FileArgs,
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

/// What an adapter file without lora-lite's `cfg` (a PEFT adapter) does not say.
#[derive(Args, Debug, Clone)]
pub struct FileArgs {
    /// Variant of a file without lora-lite's cfg (a PEFT adapter).
    #[arg(long, value_parser = parse_variant)]
    pub variant: Option<&'static dyn Variant>,
    /// alpha of a file without cfg.
    #[arg(long)]
    pub alpha: Option<String>,
    /// Remove this prefix from the model's module names.
    #[arg(long)]
    pub strip_prefix: Option<String>,
}

impl FileArgs {
    /// The overrides these options make.
    pub fn overrides(&self) -> Result<AdapterOverrides> {
        Ok(AdapterOverrides {
            variant: self.variant,
            alpha: self.alpha.as_deref().map(parse_alpha).transpose()?,
            strip_prefix: self.strip_prefix.clone(),
            ..Default::default()
        })
    }
}

/// What `export-adapter` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// ONNX Runtime's FlatBuffers adapter file (.onnx_adapter).
    #[value(name = "onnx-adapter")]
    OnnxAdapter,
    /// An HF PEFT folder (adapter_config.json, adapter_model.safetensors) that
    /// `PeftModel.from_pretrained` loads on the PyTorch model.
    Peft,
}

/// lora-lite's targeting knobs.
#[derive(Args, Clone, Debug)]
pub struct TargetArgs {
    /// Roles to adapt, comma-separated: reader, writer, inner.
    #[arg(long, value_delimiter = ',', default_value = "reader,writer")]
    pub target_roles: Vec<String>,
    /// Adapt only modules matching this regex (repeatable).
    #[arg(long = "target-names", value_name = "REGEX")]
    pub target_names: Vec<String>,
    /// Skip modules matching this regex (repeatable; default: lm_head, embed_tokens).
    #[arg(long = "exclude-names", value_name = "REGEX", default_values = ["lm_head", "embed_tokens"])]
    pub exclude_names: Vec<String>,
    /// Adapt only these layer indices, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// Remove this prefix from module names (e.g. a wrapper's `m.`).
    #[arg(long)]
    pub strip_prefix: Option<String>,
    /// The residual width, when the model has no token embedding to tell it.
    #[arg(long)]
    pub d_model: Option<usize>,
    /// Role of square layers matching REGEX: `REGEX=reader` or `REGEX=writer` (repeatable).
    #[arg(long = "role", value_name = "REGEX=ROLE")]
    pub roles: Vec<String>,
    /// Also adapt output heads (the last linear before an output, to a vocabulary or
    /// class count), which are left out by default.
    #[arg(long)]
    pub include_heads: bool,
}

fn regex(s: &str, flag: &str) -> Result<Regex> {
    Regex::new(s).map_err(|e| Error::Usage(format!("{flag} '{s}' is not a valid regex: {e}")))
}

impl TargetArgs {
    /// The filters as the user wrote them.
    pub fn text(&self) -> FilterText {
        FilterText {
            roles: self.target_roles.clone(),
            names: self.target_names.clone(),
            excludes: self.exclude_names.clone(),
            layers: self.layers.clone(),
        }
    }

    /// The filters, compiled.
    pub fn filters(&self) -> Result<Filters> {
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
            include_heads: self.include_heads,
        })
    }
}

/// alpha as given (`16` stays an integer, `16.0` a float).
pub fn parse_alpha(text: &str) -> Result<Alpha> {
    Alpha::parse(text).ok_or_else(|| Error::Usage(format!("--alpha '{text}' is not a number")))
}

/// The number of cores (the default of `--threads`).
pub fn every_core() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A count that must be at least 1 (`--batch`, `--seq`, `--steps`).
fn at_least_one(text: &str) -> Result<usize> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(Error::Usage(format!(
            "'{text}' is not a whole number of at least 1"
        ))),
    }
}

/// A finite number above 0.
fn finite_positive(text: &str) -> Result<f64> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(Error::Usage(format!(
            "'{text}' is not a finite number above 0"
        ))),
    }
}

/// A finite number of at least 0 (`--grad-clip`; 0 turns clipping off).
fn finite_non_negative(text: &str) -> Result<f64> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(Error::Usage(format!(
            "'{text}' is not a finite number of at least 0"
        ))),
    }
}

/// Resolves `--variant NAME` in the registry, once.
fn parse_variant(name: &str) -> Result<&'static dyn Variant> {
    variants::variant(name)
}

/// The registry's names joined by `sep` (the last two by ` or ` when `sep` is `, `).
pub fn variant_names(last_sep: &str) -> String {
    let names: Vec<&str> = variants::VARIANTS.iter().map(|v| v.name()).collect();
    if last_sep == "|" {
        return names.join("|");
    }
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{}{last_sep}{last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// A bad value of an option is a one-line error and exit code 1, like every other
/// usage error; the rest (help, version, missing arguments) is clap's.
pub fn clap_error(e: clap::Error) -> ExitCode {
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
                eprintln!("error: {}: {source}", text(ContextKind::InvalidArg));
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
