//! The variant's options and the calibration data they may need: the graft request.

use std::path::PathBuf;

use clap::Args;
use lora_graft::calibrate::CalibrationRequest;
use lora_graft::jobs::{AdapterDtype, GraftRequest};
use lora_graft::passes::grad::loss::Loss;
use lora_graft::passes::variants::antipasto::{AntipastoOptions, RotateBasis};
use lora_graft::passes::variants::delora::DeloraInit;
use lora_graft::passes::variants::lora_ga::{Direction, LoraGaOptions, Scale};
use lora_graft::passes::variants::road::RoadVariant;
use lora_graft::passes::variants::{Config, Variant};
use lora_graft::{Error, Result};

use super::targets::TargetArgs;
use super::values::{
    at_least_one, every_core, finite, finite_positive, parse_alpha, parse_variant, variant_names,
};

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
    #[arg(long, default_value_t = 15.0, value_parser = finite)]
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
            segment: lora_graft::calibrate::SEGMENT_BYTES,
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
