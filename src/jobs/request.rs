//! What a user asks of a job, typed: the variant resolved once, the adapter dtype as
//! an enum, the target filters compiled.

use crate::adapter::meta::FilterText;
use crate::passes::grad::loss::Loss;
use crate::passes::graft::inputs::InputBase;
use crate::passes::target::Filters;
use crate::passes::variants::{self, Config, Variant};
use crate::proto::tensor_proto::DataType;

/// The element type of the adapter tensors and their branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AdapterDtype {
    /// IEEE float32.
    #[default]
    #[value(name = "float32", alias = "fp32", alias = "f32")]
    Float32,
    /// IEEE float16.
    #[value(name = "float16", alias = "fp16", alias = "f16")]
    Float16,
    /// bfloat16.
    #[value(name = "bfloat16", alias = "bf16")]
    Bfloat16,
}

impl AdapterDtype {
    /// The ONNX element type.
    pub fn onnx(self) -> i32 {
        match self {
            AdapterDtype::Float32 => DataType::Float as i32,
            AdapterDtype::Float16 => DataType::Float16 as i32,
            AdapterDtype::Bfloat16 => DataType::Bfloat16 as i32,
        }
    }

    /// torch's name, as lora-lite's `cfg.dtype` holds it.
    pub fn torch_name(self) -> &'static str {
        match self {
            AdapterDtype::Float32 => "float32",
            AdapterDtype::Float16 => "float16",
            AdapterDtype::Bfloat16 => "bfloat16",
        }
    }

    /// From torch's name (or the short forms `fp16`, `bf16`, ...).
    pub fn from_torch_name(name: &str) -> Option<AdapterDtype> {
        <AdapterDtype as clap::ValueEnum>::from_str(name, false).ok()
    }
}

/// Everything `lora-graft model.onnx --variant ...` asks for.
#[derive(Debug, Clone)]
pub struct GraftRequest {
    /// The variant, resolved from its name once.
    pub variant: &'static dyn Variant,
    /// Rank, alpha, seeds, variant options.
    pub cfg: Config,
    /// Adapter element type.
    pub adapter_dtype: AdapterDtype,
    /// Targeting.
    pub filters: Filters,
    /// The filters as the user wrote them, for the `cfg` metadata.
    pub filter_text: FilterText,
    /// Serve the adapters as graph inputs (`--adapter-inputs`), relative to this base.
    pub adapter_inputs: Option<InputBase>,
    /// With adapter inputs: this many stacked slots picked per batch row
    /// (`--adapter-slots`), against the original weights.
    pub adapter_slots: Option<usize>,
    /// The data a calibrated init (EVA, LoRA-GA) runs the model over (`--calibration`).
    pub calibration: Option<crate::calibrate::CalibrationRequest>,
    /// The adapter's values are set from a file afterwards (`--adapter-in`, `--resume`):
    /// a calibrated init needs no data then.
    pub values_from_file: bool,
}

impl GraftRequest {
    /// The default request (lora-lite's defaults) for `variant`.
    pub fn new(variant: &'static dyn Variant) -> GraftRequest {
        GraftRequest {
            variant,
            cfg: Config::default(),
            adapter_dtype: AdapterDtype::Float32,
            filters: Filters::default(),
            filter_text: FilterText::default(),
            adapter_inputs: None,
            adapter_slots: None,
            calibration: None,
            values_from_file: false,
        }
    }
}

impl Default for GraftRequest {
    fn default() -> Self {
        GraftRequest::new(variants::VARIANTS[0])
    }
}

/// What `lora-graft grad` (and training) asks for.
#[derive(Debug, Clone)]
pub struct TrainingRequest {
    /// The graft (variant, r, filters...).
    pub graft: GraftRequest,
    /// The loss.
    pub loss: Loss,
    /// Training batch size (the first symbolic input dim).
    pub batch: usize,
    /// Training sequence length (the second symbolic input dim).
    pub seq: usize,
    /// Training only: rows of one forward and backward pass, a divisor of `batch`
    /// (gradient accumulation); `None`: the batch split evenly over the threads.
    pub micro_batch: Option<usize>,
    /// The model output the loss reads (default: the first).
    pub output: Option<String>,
    /// Also expose the model's outputs.
    pub keep_outputs: bool,
}

impl TrainingRequest {
    /// A request for the loss over the model's first output, without the model outputs.
    pub fn new(graft: GraftRequest, loss: Loss, batch: usize, seq: usize) -> TrainingRequest {
        TrainingRequest {
            graft,
            loss,
            batch,
            seq,
            micro_batch: None,
            output: None,
            keep_outputs: false,
        }
    }
}
