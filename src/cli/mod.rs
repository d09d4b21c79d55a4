//! The binary's command line: clap types with a `ValueEnum` for every closed choice and
//! the variant resolved in the registry once; bad values are one-line errors.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use lora_graft::adapter::AdapterOverrides;
use lora_graft::passes::grad::loss::Loss;
use lora_graft::passes::merge::PissaBase;
use lora_graft::passes::variants::Variant;
use lora_graft::train::Schedule;
use lora_graft::Result;

mod targets;
mod values;
mod variant;

pub use targets::TargetArgs;
use values::{at_least_one, finite_non_negative, parse_variant};
pub use values::{clap_error, every_core, parse_alpha, variant_names};
pub use variant::VariantArgs;

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
        /// Merge into quantized weights (DequantizeLinear, Mul(Cast(int8), scale),
        /// MatMulNBits) by writing the merged weights as float.
        #[arg(long, conflicts_with = "requantize")]
        dequantize: bool,
        /// Merge into MatMulNBits weights by quantizing the merged weights again in their
        /// format (same bits, block size and zero-point scheme, as onnxruntime's quantizer
        /// does); prints the requantization error against the float merge.
        #[arg(long)]
        requantize: bool,
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
        /// Rows per forward and backward pass, a divisor of --batch: the batch's gradient
        /// is accumulated over passes, so each worker thread holds the activations of M
        /// rows, not of its share of the batch (default: the batch split evenly over the
        /// threads).
        #[arg(long, value_name = "M", value_parser = at_least_one)]
        micro_batch: Option<usize>,
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
