//! The adapter variants, one file each, behind one small trait that mirrors lora-lite's
//! contract: parameter specs, an optional weight-reading init, the subgraph spliced
//! around the linear output, and the merge formula. [`VARIANTS`] is the registry.

pub mod delora;
pub mod lora;
pub mod pissa;

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::ir::{Graph, Initializer, ValueId};
use crate::proto::{attribute_proto::AttributeType, AttributeProto};
use crate::rng::Rng;
use crate::tensor::Array;

/// Every variant, keyed by its CLI name. One line per variant.
pub const VARIANTS: &[&dyn Variant] = &[&lora::Lora, &pissa::Pissa, &delora::Delora];

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
    /// alpha, and its JSON text as given (`16` stays an integer, `16.0` a float).
    pub alpha: f64,
    /// alpha as JSON.
    pub alpha_json: String,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
    /// DeLoRA's initial lambda.
    pub lambda0: f64,
    /// PiSSA: randomized SVD with this many power iterations instead of the exact SVD.
    pub pissa_niter: Option<usize>,
    /// Seed of every random init.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            r: 8,
            alpha: 16.0,
            alpha_json: "16.0".into(),
            rslora: false,
            lambda0: 15.0,
            pissa_niter: None,
            seed: 0,
        }
    }
}

impl Config {
    /// The LoRA scale `s`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
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
                Init::Zeros => vec![0.0; n],
                Init::Constant(v) => vec![v as f32; n],
                Init::Kaiming => {
                    let fan_in = *spec.shape.last().unwrap_or(&1) as f64;
                    let bound = 1.0 / fan_in.sqrt();
                    (0..n)
                        .map(|_| rng.uniform_in(-bound, bound) as f32)
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

/// A LoRA-family variant. See `README.md`, "Adding a variant".
pub trait Variant: Sync {
    /// The CLI and `cfg.variant` name.
    fn name(&self) -> &'static str;

    /// The adapter tensors of a `d_in -> d_out` layer, torch layout.
    fn param_specs(&self, dims: Dims, cfg: &Config) -> Vec<ParamSpec>;

    /// Whether [`Variant::init`] reads the base weight.
    fn reads_weight(&self) -> bool {
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

    /// Extra `cfg` fields as `(name, JSON)`, after lora-lite's common ones.
    fn cfg_fields(&self, _cfg: &Config) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// Values computed from the parameters alone, once per module (a module called
    /// twice shares them); [`Variant::branch`] finds them in `p` under their names.
    fn module_values(
        &self,
        _b: &mut Branch,
        _p: &BTreeMap<&'static str, ValueId>,
        _cfg: &Config,
    ) -> Result<Vec<(&'static str, ValueId)>> {
        Ok(Vec::new())
    }

    /// Builds the branch from the layer input `x` (adapter dtype) to the delta added to
    /// the layer output. `p` maps key suffixes to the parameter initializers (ONNX
    /// layout: every 2-D tensor transposed).
    fn branch(
        &self,
        b: &mut Branch,
        x: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        cfg: &Config,
    ) -> Result<ValueId>;

    /// `ΔW` in torch layout `[d_out, d_in]`: the merged weight is `W + ΔW`.
    fn delta_w(&self, p: &Params, cfg: &Config) -> Array2<f32>;
}

/// A 2-D view of a torch-layout parameter.
pub fn mat(p: &Params, name: &str) -> Array2<f32> {
    p[name]
        .clone()
        .into_dimensionality()
        .expect("2-D parameter")
}

/// Builds an adapter branch into a graph: nodes and constants named under one prefix,
/// opset-aware where ops changed form.
pub struct Branch<'g> {
    /// The graph being spliced.
    pub graph: &'g mut Graph,
    /// Node and constant name prefix, e.g. `model.layers.0.self_attn.q_proj.lora`.
    pub prefix: String,
    /// The default-domain opset of the model.
    pub opset: i64,
    /// Element type of the branch's computation.
    pub dtype: i32,
}

impl Branch<'_> {
    /// Adds `op(inputs)` with `attributes`; returns its output.
    pub fn op(
        &mut self,
        op: &str,
        inputs: &[ValueId],
        attributes: Vec<AttributeProto>,
    ) -> Result<ValueId> {
        let name = format!("{}.{op}", self.prefix);
        Ok(self.graph.add_op(op, &name, inputs, attributes, 1)?.1[0])
    }

    /// A scalar constant in the branch's dtype.
    pub fn scalar(&mut self, tag: &str, v: f64) -> ValueId {
        let a = Array::from_f32(ArrayD::from_elem(IxDyn(&[]), v as f32), self.dtype)
            .expect("float dtype");
        let name = format!("{}.{tag}", self.prefix);
        self.graph
            .add_initializer(&name, Initializer::new(a.to_proto("")))
    }

    /// An int64 1-D constant.
    fn ints(&mut self, tag: &str, values: &[i64]) -> ValueId {
        let a =
            Array::I64(ArrayD::from_shape_vec(IxDyn(&[values.len()]), values.to_vec()).unwrap());
        let name = format!("{}.{tag}", self.prefix);
        self.graph
            .add_initializer(&name, Initializer::new(a.to_proto("")))
    }

    /// `Unsqueeze(x, axes)`, with axes as an input from opset 13.
    pub fn unsqueeze(&mut self, x: ValueId, axes: &[i64]) -> Result<ValueId> {
        if self.opset >= 13 {
            let axes = self.ints("axes", axes);
            self.op("Unsqueeze", &[x, axes], vec![])
        } else {
            self.op("Unsqueeze", &[x], vec![ints_attr("axes", axes)])
        }
    }

    /// `ReduceSumSquare(x, axes, keepdims=0)`, with axes as an input from opset 18.
    pub fn reduce_sum_square(&mut self, x: ValueId, axes: &[i64]) -> Result<ValueId> {
        let keep = int_attr("keepdims", 0);
        if self.opset >= 18 {
            let axes = self.ints("axes", axes);
            self.op("ReduceSumSquare", &[x, axes], vec![keep])
        } else {
            self.op("ReduceSumSquare", &[x], vec![keep, ints_attr("axes", axes)])
        }
    }
}

/// An integer attribute.
pub fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(AttributeType::Int as i32),
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(AttributeType::Ints as i32),
        ..Default::default()
    }
}
