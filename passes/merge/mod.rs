//! Merging: folds each module's adapter into its base weight (`W' = W + ΔW`; PiSSA:
//! `W − s·B₀A₀ + s·BA`), leaving the original graph with no adapter node.

use std::collections::BTreeMap;

mod requantize;

use super::graft::{
    apply_weight, complete_start, effective_weight, par_map_then, weight_patch, WeightPatch,
    PARALLEL_MEMORY_BUDGET,
};
use super::target::Target;
use super::variants::lora::Lora;
use super::variants::{Config, Dims, Params, Variant};
use crate::error::{Error, Result};
use crate::ir::Graph;
use tract_core::ndarray::Array1;

/// What the base model of a merge of a variant with a frozen start (PiSSA, OLoRA) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PissaBase {
    /// The original W: `W' = W − s·B₀A₀ + s·BA`, with the start `A₀`, `B₀` from the
    /// adapter file, or recomputed from W by the same deterministic SVD or QR init when
    /// the file has none (PEFT's and lora-lite's files; PEFT's rank-2r conversion, folded).
    Original,
    /// PEFT's `W_res = W − s·B₀A₀` (a model PEFT's PiSSA or OLoRA init rewrote, or one
    /// lora-graft served on `W_res`): `W' = W_res + s·BA`.
    Residual,
}

/// What a merge writes into a quantized weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizedWeights {
    /// Nothing: it refuses, saying which of the others would do.
    Refuse,
    /// The merged weight as float, the dequantization chain dropped.
    Dequantize,
    /// The merged weight quantized again in the weight's own format (`MatMulNBits`: same
    /// bits, block size and zero-point scheme, as onnxruntime's quantizer writes it).
    Requantize,
}

/// The pass: folds `adapters` (module -> torch-layout tensors) into the weights of
/// `targets`.
pub struct Merge<'a> {
    /// The adapted layers.
    pub targets: &'a [Target],
    /// The adapter's variant.
    pub variant: &'a dyn Variant,
    /// Its settings.
    pub cfg: &'a Config,
    /// module -> its tensors.
    pub adapters: &'a BTreeMap<String, Params>,
    /// The dtype the adapter was made in (it rounds a recomputed init).
    pub adapter_dtype: i32,
    /// What the base weights hold.
    pub base: PissaBase,
    /// What to write into quantized weights.
    pub quantized: QuantizedWeights,
    /// The output's data file, for the merged weights to be written to as they are
    /// made; without it they go to the scratch file until saved.
    pub sink: Option<&'a crate::ir::DataSink>,
    /// How many modules it merged.
    pub merged: usize,
    /// Per requantized module, `‖W_q − W‖ / ‖W‖`: the requantized weight against the
    /// float merged one.
    pub requantized: Vec<(String, f64)>,
}

impl super::Pass for Merge<'_> {
    fn name(&self) -> &'static str {
        "merge"
    }

    fn run(&mut self, graph: &mut Graph, _: &super::PassContext) -> Result<()> {
        let (merged, requantized) = self.merge(graph)?;
        self.merged = merged;
        self.requantized = requantized;
        Ok(())
    }
}

impl Merge<'_> {
    fn merge(&self, graph: &mut Graph) -> Result<(usize, Vec<(String, f64)>)> {
        let (targets, variant, cfg) = (self.targets, self.variant, self.cfg);
        let modules: Vec<(&String, &Params)> = self.adapters.iter().collect();
        let dtypes = crate::ir::infer::value_dtypes(graph)?;
        // New weights are computed in parallel, read-only; the graph is edited afterwards.
        let cost = |&(module, _): &(&String, &Params)| {
            targets
                .iter()
                .find(|t| &t.module == module)
                .map(|t| {
                    let dims = Dims {
                        d_in: t.d_in,
                        d_out: t.d_out,
                    };
                    // The weight (merged in its own f32 buffer), its output bytes, and
                    // PiSSA's recomputed init.
                    8 * t.d_in * t.d_out + variant.working_set(dims, &cfg.for_module(module))
                })
                .unwrap_or(0)
        };
        let patches = par_map_then(
            &modules,
            cost,
            PARALLEL_MEMORY_BUDGET,
            |&(module, params)| {
                let group: Vec<&Target> = targets.iter().filter(|t| &t.module == module).collect();
                let (patch, error) = self
                    .merged_weight(graph, &dtypes, module, &group, params)
                    .map_err(|e| e.context(format!("merging '{module}'")))?;
                Ok::<_, Error>((group, patch, error))
            },
            // Out of memory (to the output's data file), in module order.
            |i, merged| {
                let (group, patch, error) = merged?;
                let placed = patch
                    .place(self.sink)
                    .map_err(|e| e.context(format!("merging '{}'", modules[i].0)))?;
                Ok::<_, Error>((group, placed, error))
            },
        );
        // Biases the variant changes (IA3 scales them, ROAD rotates them): small, here.
        let mut biases = Vec::new();
        for &(module, params) in &modules {
            let Some(t) = targets.iter().find(|t| &t.module == module) else {
                continue;
            };
            if let Some(patch) = self.merged_bias(graph, t, params)? {
                biases.push(patch);
            }
        }
        let (mut merged, mut requantized) = (0, Vec::new());
        for (&(module, _), patch) in modules.iter().zip(patches) {
            let (group, patch, error) = patch?;
            apply_weight(graph, module, &group, patch);
            merged += 1;
            if let Some(e) = error {
                requantized.push((module.clone(), e));
            }
        }
        for (value, init) in biases {
            graph.replace_initializer(value, init);
        }
        Ok((merged, requantized))
    }

    /// The new bias initializer of target `t`, when the variant changes its bias.
    fn merged_bias(
        &self,
        graph: &Graph,
        t: &Target,
        params: &Params,
    ) -> Result<Option<(crate::ir::ValueId, crate::ir::Initializer)>> {
        let Some(bias) = super::graft::bias(graph, t) else {
            return Ok(None);
        };
        let cannot = |why: &str| {
            Error::Usage(format!(
                "cannot merge {} into '{}': its bias {why}; use the grafted model",
                self.variant.name(),
                t.module
            ))
        };
        let Some(init) = graph.initializer(bias.value) else {
            // Computed, not stored: only a variant that leaves biases alone can merge.
            let probe = Array1::zeros(t.d_out);
            return match self
                .variant
                .merged_bias(&probe, params, &self.cfg.for_module(&t.module))
            {
                None => Ok(None),
                Some(_) => Err(cannot("is computed in the graph, not stored")),
            };
        };
        let dtype = init.elem_type();
        let array = crate::interp::evaluate(graph, bias.value)
            .map_err(|e| cannot(&format!("cannot be read ({e})")))?;
        let shape = array.shape().to_vec();
        let b: Array1<f32> = match array.into_f32().into_shape_with_order(t.d_out) {
            Ok(b) => b,
            Err(_) => return Err(cannot("is not one value per output")),
        };
        let Some(new) = self
            .variant
            .merged_bias(&b, params, &self.cfg.for_module(&t.module))
        else {
            return Ok(None);
        };
        if graph.value(bias.value).users.len() > 1 {
            return Err(cannot("is shared with other nodes"));
        }
        let new = new.into_shape_with_order(shape).expect("same size");
        let new = crate::tensor::Array::from_f32(new, dtype)
            .ok_or_else(|| cannot("is not a float tensor"))?;
        Ok(Some((
            bias.value,
            crate::ir::Initializer::from_array(&new)?,
        )))
    }

    /// The patch that writes `module`'s merged weight, and its requantization error when
    /// it was requantized.
    fn merged_weight(
        &self,
        graph: &Graph,
        dtypes: &std::collections::HashMap<crate::ir::ValueId, i32>,
        module: &str,
        group: &[&Target],
        params: &Params,
    ) -> Result<(WeightPatch, Option<f64>)> {
        let (variant, cfg) = (self.variant, &*self.cfg.for_module(module));
        let t0 = group
            .first()
            .ok_or_else(|| Error::Usage(format!("no target '{module}' in the model")))?;
        let nbits = t0.op == "MatMulNBits";
        let packed = t0.quantized
            && (t0.layout == super::target::Layout::Packed || t0.op == "MatMulInteger");
        match self.quantized {
            QuantizedWeights::Requantize => {}
            _ if packed => {
                return Err(Error::Usage(format!(
                    "cannot merge into '{module}': its weight is quantized ({}) and packed; --requantize writes the merged weight back in that format, or use the grafted model",
                    t0.op,
                )))
            }
            QuantizedWeights::Refuse if t0.quantized => {
                return Err(Error::Usage(format!(
                    "cannot merge into '{module}': its weight is quantized ({}); --dequantize writes the merged weight as float, or use the grafted model",
                    t0.chain.join(" <- ")
                )))
            }
            _ => {}
        }
        let w = effective_weight(graph, t0)?;
        let merged_w =
            match (variant.frozen_start(), self.base) {
                (true, PissaBase::Residual) => {
                    Lora.merged_weight(w, params, cfg) // W_res + s·BA
                }
                (true, PissaBase::Original) => {
                    let dtype = self.adapter_dtype;
                    let params =
                        complete_start(params.clone(), module, variant, cfg, dtype, || {
                            Ok(w.clone())
                        })?;
                    variant.merged_weight(w, &params, cfg)
                }
                _ => variant.merged_weight(w, params, cfg),
            };
        if merged_w.iter().any(|v| !v.is_finite()) {
            return Err(Error::Usage(format!(
            "the merged weight would hold NaN or infinite values: the adapter's values times its scale {} overflow float32; check the adapter",
            cfg.scale()
        )));
        }
        if self.quantized == QuantizedWeights::Requantize && nbits {
            return requantize::matmul_nbits(graph, module, group, &merged_w)
                .map(|(p, e)| (p, Some(e)));
        }
        if self.quantized == QuantizedWeights::Requantize && t0.quantized {
            return requantize::dequantized(graph, module, group, &merged_w)
                .map(|(p, e)| (p, Some(e)));
        }
        Ok((weight_patch(graph, dtypes, module, group, merged_w)?, None))
    }
}
