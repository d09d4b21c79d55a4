//! The adapter variants, one file each, behind one small trait that mirrors lora-lite's
//! contract: parameter specs, an optional weight-reading init, the subgraph spliced
//! around the linear output, and the merge formula. [`VARIANTS`] is the registry.

pub mod antipasto;
pub mod delora;
pub mod dora;
pub mod eva;
pub mod hra;
pub mod ia3;
pub mod ia3_ff;
pub mod lora;
pub mod lora_ga;
pub mod olora;
pub mod pissa;
pub mod road;
pub mod vera;

use std::collections::BTreeMap;

use tract_core::ndarray::{Array1, Array2, ArrayD, Axis, IxDyn};

use crate::error::{Error, Result};
use crate::ir::build::Builder;
use crate::ir::ValueId;
use crate::rng::Rng;

/// Every variant, keyed by its CLI name. One line per variant.
pub const VARIANTS: &[&dyn Variant] = &[
    &lora::Lora,
    &pissa::Pissa,
    &delora::Delora,
    &ia3::Ia3,
    &ia3_ff::Ia3Ff,
    &dora::Dora,
    &hra::Hra,
    &olora::Olora,
    &road::Road,
    &vera::Vera,
    &eva::Eva,
    &lora_ga::LoraGa,
    &antipasto::Antipasto,
];

impl std::fmt::Debug for dyn Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The variant called `name`.
pub fn variant(name: &str) -> Result<&'static dyn Variant> {
    VARIANTS
        .iter()
        .copied()
        .find(|v| v.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = VARIANTS.iter().map(|v| v.name()).collect();
            Error::Usage(format!(
                "unknown variant '{name}'; choose one of {}",
                names.join(", ")
            ))
        })
}

/// The variant-independent settings (lora-lite's AdapterConfig, plus PEFT's options).
#[derive(Debug, Clone)]
pub struct Config {
    /// Rank.
    pub r: usize,
    /// alpha, as given (`16` stays an integer in the adapter's `cfg`, `16.0` a float).
    pub alpha: Alpha,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
    /// DeLoRA's initial lambda.
    pub lambda0: f64,
    /// PiSSA: randomized SVD with this many power iterations instead of the exact SVD.
    pub pissa_niter: Option<usize>,
    /// DeLoRA's init: the paper's (identity through `W_res`, small first steps) or
    /// lora-lite's (`B = 0`).
    pub delora_init: delora::DeloraInit,
    /// ROAD's sub-variant.
    pub road_variant: road::RoadVariant,
    /// ROAD's group of output channels (lora-lite's `group_size`, default 64).
    pub road_group_size: usize,
    /// Seed of every random init.
    pub seed: u64,
    /// LoRA-GA's direction and scaling.
    pub lora_ga: lora_ga::LoraGaOptions,
    /// AntiPaSTO's block size, rotation bound, rotated basis and calibrated selection.
    pub antipasto: antipasto::AntipastoOptions,
    /// EVA as PEFT computes it (centered PCA of the unpadded tokens, ranks redistributed
    /// by explained variance), with this `rho`; `None`: lora-lite's EVA.
    pub eva_peft: Option<f64>,
    /// Modules whose rank or alpha differ from `r` and `alpha` (PEFT's `rank_pattern`,
    /// `alpha_pattern`), by module path.
    pub modules: BTreeMap<String, ModuleRank>,
}

/// A module's own rank and alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleRank {
    /// Rank.
    pub r: usize,
    /// alpha.
    pub alpha: Alpha,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            r: 8,
            alpha: Alpha::parse("16.0").expect("a number"),
            rslora: false,
            lambda0: 15.0,
            pissa_niter: None,
            delora_init: delora::DeloraInit::Paper,
            road_variant: road::RoadVariant::Road1,
            road_group_size: 64,
            seed: 0,
            lora_ga: lora_ga::LoraGaOptions::default(),
            eva_peft: None,
            antipasto: antipasto::AntipastoOptions::default(),
            modules: BTreeMap::new(),
        }
    }
}

/// The most power iterations `--pissa-niter` (or a file's `pissa_niter`) may ask for:
/// PEFT uses 4 to 16; more only costs time.
pub const MAX_PISSA_NITER: usize = 64;

impl Config {
    /// Checks the settings that file contents or options can push out of range: the
    /// scale must be a finite float32, `pissa_niter` at most [`MAX_PISSA_NITER`].
    pub fn check(&self) -> Result<()> {
        let s = self.scale();
        // r = 0 is refused per layer, with the range r must be in.
        if self.r > 0 && !(s as f32).is_finite() {
            return Err(Error::Usage(format!(
                "alpha {} with r {} gives the scale {s:e}, which float32 cannot hold; use a smaller alpha",
                self.alpha.value(),
                self.r
            )));
        }
        if let Some(n) = self.pissa_niter.filter(|&n| n > MAX_PISSA_NITER) {
            return Err(Error::Usage(format!(
                "pissa_niter {n} is more than {MAX_PISSA_NITER} power iterations; use 4 to 16"
            )));
        }
        Ok(())
    }

    /// The settings of `module`: its own rank and alpha where it has them.
    pub fn for_module(&self, module: &str) -> std::borrow::Cow<'_, Config> {
        match self.modules.get(module) {
            None => std::borrow::Cow::Borrowed(self),
            Some(m) => std::borrow::Cow::Owned(Config {
                r: m.r,
                alpha: m.alpha.clone(),
                modules: BTreeMap::new(),
                ..self.clone()
            }),
        }
    }

    /// The LoRA scale `s`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha.value() / (self.r as f64).sqrt()
        } else {
            self.alpha.value() / self.r as f64
        }
    }
}

/// LoRA's alpha as the user wrote it: `16` stays an integer in the adapter's `cfg`,
/// `16.0` a float, as in Python.
#[derive(Debug, Clone, PartialEq)]
pub struct Alpha(pub serde_json::Number);

impl Alpha {
    /// Parses a number's text (`16`, `16.0`, `1e1`).
    pub fn parse(text: &str) -> Option<Alpha> {
        crate::adapter::meta::number_as_given(text).map(Alpha)
    }

    /// The value.
    pub fn value(&self) -> f64 {
        self.0.as_f64().unwrap_or(f64::NAN)
    }
}

impl From<f64> for Alpha {
    /// An integral value is kept as an integer (as Python's `alpha=8`).
    fn from(v: f64) -> Alpha {
        Alpha::parse(&format!("{v}")).unwrap_or_else(|| Alpha(0.into()))
    }
}

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// `kaiming_uniform_(a=sqrt(5))` on the torch-layout tensor: `U(±1/sqrt(cols))`.
    Kaiming,
    /// All zeros.
    Zeros,
    /// Every element `v`.
    Constant(f64),
    /// Normal with this mean and standard deviation (AntiPaSTO's `δ`).
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
    /// Kaiming on half the rows, each row then repeated (`u_2k = u_2k+1`): HRA's
    /// paired reflections, whose product is the identity.
    KaimingPairs,
    /// A frozen copy of the weight-reading init's value (PiSSA's `lora_A0`): recomputed
    /// from the weights when a file does not hold it.
    Start,
}

/// One adapter tensor of a layer.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// Key suffix, e.g. `lora_A`.
    pub name: &'static str,
    /// Shape in torch layout.
    pub shape: Vec<usize>,
    /// Initial values (before a weight-reading init).
    pub init: Init,
    /// Trained (true) or a frozen buffer (false).
    pub trainable: bool,
}

/// A layer's adapter tensors in torch layout (f32), by key suffix.
pub type Params = BTreeMap<&'static str, ArrayD<f32>>;

/// Creates the tensors of `specs` with their simple inits.
pub fn init_params(specs: &[ParamSpec], rng: &mut Rng) -> Params {
    specs
        .iter()
        .map(|spec| {
            let n: usize = spec.shape.iter().product();
            let values: Vec<f32> = match spec.init {
                Init::Zeros | Init::Start => vec![0.0; n],
                Init::Constant(v) => vec![v as f32; n],
                Init::Normal { mean, std } => {
                    (0..n).map(|_| (mean + std * rng.normal()) as f32).collect()
                }
                Init::Kaiming => {
                    let fan_in = *spec.shape.last().unwrap_or(&1) as f64;
                    let bound = 1.0 / fan_in.sqrt();
                    (0..n)
                        .map(|_| rng.uniform_in(-bound, bound) as f32)
                        .collect()
                }
                Init::KaimingPairs => {
                    let cols = *spec.shape.last().unwrap_or(&1);
                    let bound = 1.0 / (cols as f64).sqrt();
                    let half: Vec<f32> = (0..n / 2)
                        .map(|_| rng.uniform_in(-bound, bound) as f32)
                        .collect();
                    half.chunks(cols.max(1))
                        .flat_map(|row| row.iter().chain(row).copied())
                        .collect()
                }
            };
            (
                spec.name,
                ArrayD::from_shape_vec(IxDyn(&spec.shape), values).expect("shape"),
            )
        })
        .collect()
}

/// The layer an init or merge works on.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
}

/// Where a variant's subgraph sits around the linear node `y = x W^T (+ b)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splice {
    /// `y' = y + branch(x)` on the pre-bias output; the branch returns the delta
    /// (LoRA, PiSSA, DeLoRA, VeRA, OLoRA).
    Delta,
    /// `y' = branch(x, y)` replaces the pre-bias output; the bias is added after,
    /// unchanged (DoRA).
    PreBias,
    /// `y' = branch(y)` replaces the post-bias output, so the bias goes through it
    /// (IA3, ROAD).
    PostBias,
    /// `x' = branch(x)` feeds the linear node instead of `x`, on a new edge that no
    /// other reader of `x` sees (IA3_FF, HRA).
    Input,
}

/// A LoRA-family variant. See `README.md`, "Adding a variant".
pub trait Variant: Sync {
    /// The CLI and `cfg.variant` name.
    fn name(&self) -> &'static str;

    /// The adapter tensors of a `d_in -> d_out` layer, torch layout.
    fn param_specs(&self, dims: Dims, cfg: &Config) -> Vec<ParamSpec>;

    /// Checks the settings against one layer (HRA's even rank, ROAD's groups); the
    /// message says what to change.
    fn check_layer(&self, _d: Dims, _cfg: &Config) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Tensors shared by every layer (VeRA's frozen projections): each layer's params
    /// of these names are the leading slices of them, and the adapter file holds
    /// them once, under these names.
    fn shared_params(&self) -> &'static [&'static str] {
        &[]
    }

    /// The shared tensors (see [`Variant::shared_params`]) for layers up to `max`.
    fn shared_init(&self, _max: Dims, _cfg: &Config, _rng: &mut Rng) -> Params {
        Params::new()
    }

    /// Whether the variant has a rank (`r`): the IA3 gates have none.
    fn uses_rank(&self) -> bool {
        true
    }

    /// Whether the variant scales by `alpha` (LoRA's `s = alpha / r`): a file that does
    /// not say its alpha cannot be used without one.
    fn uses_alpha(&self) -> bool {
        false
    }

    /// Where the branch is spliced.
    fn splice(&self) -> Splice {
        Splice::Delta
    }

    /// Whether [`Variant::init`] reads the base weight.
    fn reads_weight(&self) -> bool {
        false
    }

    /// Whether the branch reads the layer's weight in the graph (DoRA's norm of
    /// `W + s·BA`): it is then in `p` as `weight`, `[d_in, d_out]`, adapter dtype.
    fn weight_in_graph(&self) -> bool {
        false
    }

    /// Whether the variant starts from a LoRA pair read off the weight and subtracts a
    /// frozen copy of it (`lora_A0`, `lora_B0`: PiSSA, OLoRA), so the model starts
    /// unchanged with its weights untouched. `W_res = W − s·B₀A₀` (PEFT's form of the
    /// same adapter, whose files hold no `A₀`, `B₀`) is then an equivalent base.
    fn frozen_start(&self) -> bool {
        false
    }

    /// Bytes [`Variant::init`] holds at once for one layer (the weight and its copies),
    /// so that initialising layers in parallel stays within a memory budget.
    fn working_set(&self, dims: Dims, _cfg: &Config) -> usize {
        if self.reads_weight() {
            // The f32 weight as read, and its rewritten copy.
            8 * dims.d_in * dims.d_out
        } else {
            0
        }
    }

    /// Weight-reading init, after [`init_params`]: `w` is the effective weight in torch
    /// layout `[d_out, d_in]`, f32. Returns the replacement weight when the variant
    /// rewrites it (PiSSA's `W_res`). `round` rounds a tensor to the adapter dtype.
    fn init(
        &self,
        _w: &Array2<f32>,
        _params: &mut Params,
        _cfg: &Config,
        _rng: &mut Rng,
        _round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<Option<Array2<f32>>> {
        Ok(None)
    }

    /// What the variant's init reads from a calibration run over data (EVA's input
    /// statistics, LoRA-GA's weight gradients); `None`: it needs no data.
    fn calibration(&self, _cfg: &Config) -> Option<crate::calibrate::Statistic> {
        None
    }

    /// Per-module ranks and alphas the variant picks from the whole calibration run
    /// before any layer is initialised (PEFT EVA's redistribution of the rank budget);
    /// rank 0 leaves a module out. `modules` are the target modules in graph order.
    fn calibrated_ranks(
        &self,
        _cal: &crate::calibrate::Calibration,
        _modules: &[String],
        _cfg: &Config,
    ) -> Result<BTreeMap<String, ModuleRank>> {
        Ok(BTreeMap::new())
    }

    /// The data-calibrated init, after [`Variant::init`], from the module's statistics
    /// of the calibration run (and the weight, `Some` when [`Variant::reads_weight`]).
    fn init_calibrated(
        &self,
        _w: Option<&Array2<f32>>,
        _stats: &crate::calibrate::ModuleStats,
        _params: &mut Params,
        _cfg: &Config,
        _round: &dyn Fn(&mut ArrayD<f32>),
    ) -> Result<()> {
        Ok(())
    }

    /// Extra `cfg` fields, after lora-lite's common ones.
    fn cfg_fields(&self, _cfg: &Config) -> Vec<(&'static str, serde_json::Value)> {
        Vec::new()
    }

    /// Values computed from the parameters alone, once per module (a module called
    /// twice shares them); [`Variant::branch`] finds them in `p` under their names.
    fn module_values(
        &self,
        _b: &mut Builder,
        _p: &BTreeMap<&'static str, ValueId>,
        _cfg: &Config,
    ) -> Result<Vec<(&'static str, ValueId)>> {
        Ok(Vec::new())
    }

    /// Builds the branch (see [`Splice`]) from the layer input `x` and the output `y` at
    /// the splice point (pre- or post-bias; `x` itself for [`Splice::Input`] and
    /// [`Splice::Delta`], whose branch reads only `x`), both in
    /// the adapter dtype. `p` maps key suffixes to the parameter initializers (ONNX
    /// layout: every 2-D tensor transposed).
    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<ValueId>;

    /// The merged weight in torch layout `[d_out, d_in]` from the base weight `w` (for
    /// PiSSA and OLoRA, `W_res`): the model with it and no adapter computes what the
    /// adapted model does. Takes `w` by value: a variant that updates it in place writes
    /// the merged weight into `w`'s own memory, in `w`'s memory order.
    fn merged_weight(&self, w: Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32>;

    /// The merged bias, when the variant changes it (IA3 scales it, ROAD rotates it).
    fn merged_bias(&self, _b: &Array1<f32>, _p: &Params, _cfg: &Config) -> Option<Array1<f32>> {
        None
    }

    /// The adapter as a plain low-rank update of the weight it trains against,
    /// `ΔW = up · down` (scale folded in), for serving as adapter inputs; or why it is
    /// not one (the message names what serving it would need).
    fn low_rank(&self, _p: &Params, _cfg: &Config) -> std::result::Result<LowRank, String> {
        Err("it is not a low-rank update of the weight".into())
    }
}

/// A low-rank weight update `ΔW = up · down`, torch layout: `up [d_out, k]`,
/// `down [k, d_in]`; ONNX Runtime's adapter inputs are `A = downᵀ`, `B = upᵀ`.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    /// `[d_out, k]`.
    pub up: Array2<f32>,
    /// `[k, d_in]`.
    pub down: Array2<f32>,
}

impl LowRank {
    /// The rank-0 update of a `d_in -> d_out` layer.
    pub fn empty(d: Dims) -> LowRank {
        LowRank {
            up: Array2::zeros((d.d_out, 0)),
            down: Array2::zeros((0, d.d_in)),
        }
    }

    /// The rank `k`.
    pub fn rank(&self) -> usize {
        self.down.nrows()
    }

    /// `self − other` as one update of rank `k + k'`: `[up, −up'] · [down; down']`.
    pub fn minus(self, other: &LowRank) -> LowRank {
        let neg = other.up.mapv(|v| -v);
        LowRank {
            up: tract_core::ndarray::concatenate(Axis(1), &[self.up.view(), neg.view()])
                .expect("same d_out"),
            down: tract_core::ndarray::concatenate(Axis(0), &[self.down.view(), other.down.view()])
                .expect("same d_in"),
        }
    }

    /// `ΔW`, torch layout.
    pub fn delta_w(&self) -> Array2<f32> {
        self.up.dot(&self.down)
    }

    /// `w + ΔW`, in `w`'s own memory and memory order (a weight read in torch layout is
    /// the transposed view of its ONNX bytes): one product accumulated into `w`, where
    /// `w + ΔW` of a row-major `ΔW` would walk one of them across its rows.
    pub fn added_to(&self, w: Array2<f32>) -> Array2<f32> {
        self.scaled_added_to(w, 1.0)
    }

    /// `w + s·ΔW` (the product scaled, as PEFT's `W + (B @ A) * s`), in `w`'s memory.
    pub fn scaled_added_to(&self, mut w: Array2<f32>, s: f32) -> Array2<f32> {
        self.accumulate(s, &mut w);
        w
    }

    /// `w −= ΔW` in place, in `w`'s memory order (see [`LowRank::added_to`]).
    pub fn subtract_from(&self, w: &mut Array2<f32>) {
        self.accumulate(-1.0, w);
    }

    fn accumulate(&self, s: f32, w: &mut Array2<f32>) {
        tract_core::ndarray::linalg::general_mat_mul(s, &self.up, &self.down, 1.0, w);
    }
}

/// The leading slice of a shared tensor of `shape` (VeRA's `A[:, :d_in]`, `B[:d_out, :]`).
pub fn leading_slice(shared: &ArrayD<f32>, shape: &[usize]) -> Option<ArrayD<f32>> {
    if shared.ndim() != shape.len() || shared.shape().iter().zip(shape).any(|(&s, &n)| n > s) {
        return None;
    }
    let view =
        shared.slice_each_axis(|ax| tract_core::ndarray::Slice::from(0..shape[ax.axis.index()]));
    Some(view.to_owned())
}

/// The L2 norms of `w`'s columns (`axis` 0: one per input, torch `W.norm(dim=0)`) or
/// rows (`axis` 1: one per output), in f64.
pub fn norms(w: &Array2<f32>, axis: usize) -> Array1<f64> {
    w.map_axis(tract_core::ndarray::Axis(axis), |v| {
        v.iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt()
    })
}

/// A 1-D copy of a parameter.
pub fn vec1(p: &Params, name: &str) -> Array1<f32> {
    p[name]
        .clone()
        .into_dimensionality()
        .expect("1-D parameter")
}

/// A 2-D copy of a torch-layout parameter.
pub fn mat(p: &Params, name: &str) -> Array2<f32> {
    p[name]
        .clone()
        .into_dimensionality()
        .expect("2-D parameter")
}
