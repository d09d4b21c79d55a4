//! Merging: folds each module's adapter into its base weight (`W' = W + ΔW`; PiSSA:
//! `W − s·B₀A₀ + s·BA`), leaving the original graph with no adapter node.

use std::collections::BTreeMap;

use super::graft::{
    apply_weight, complete_start, effective_weight, par_map, weight_patch, WeightPatch,
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
                    // The weight, its merged copy, and PiSSA's recomputed init.
                    8 * t.d_in * t.d_out + variant.working_set(dims, &cfg.for_module(module))
                })
                .unwrap_or(0)
        };
        let patches = par_map(
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
            QuantizedWeights::Requantize if packed && !nbits => {
                return Err(Error::Usage(format!(
                    "cannot merge into '{module}': --requantize writes MatMulNBits, DequantizeLinear and Mul(Cast(int8)) weights back, and this one is {}; use the grafted model",
                    t0.op
                )))
            }
            QuantizedWeights::Requantize => {}
            _ if packed => {
                return Err(Error::Usage(format!(
                    "cannot merge into '{module}': its weight is quantized ({}) and packed; {}",
                    t0.op,
                    if nbits {
                        "--requantize writes the merged weight back in that format, or use the grafted model"
                    } else {
                        "use the grafted model, or merge into a float model and quantize after"
                    }
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
                    Lora.merged_weight(&w, params, cfg) // W_res + s·BA
                }
                (true, PissaBase::Original) => {
                    let dtype = self.adapter_dtype;
                    let params =
                        complete_start(params.clone(), module, variant, cfg, dtype, || {
                            Ok(w.clone())
                        })?;
                    variant.merged_weight(&w, &params, cfg)
                }
                _ => variant.merged_weight(&w, params, cfg),
            };
        if merged_w.iter().any(|v| !v.is_finite()) {
            return Err(Error::Usage(format!(
            "the merged weight would hold NaN or infinite values: the adapter's values times its scale {} overflow float32; check the adapter",
            cfg.scale()
        )));
        }
        if self.quantized == QuantizedWeights::Requantize && nbits {
            return requantized(graph, module, group, &merged_w).map(|(p, e)| (p, Some(e)));
        }
        if self.quantized == QuantizedWeights::Requantize && t0.quantized {
            return requantized_int8(graph, module, group, &merged_w).map(|(p, e)| (p, Some(e)));
        }
        Ok((weight_patch(graph, dtypes, module, group, merged_w)?, None))
    }
}

/// `‖a − b‖ / ‖b‖`.
fn relative_error(
    a: &tract_core::ndarray::Array2<f32>,
    b: &tract_core::ndarray::Array2<f32>,
) -> f64 {
    let norm = |x: &tract_core::ndarray::Array2<f32>| {
        x.iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt()
    };
    norm(&(a - b)) / norm(b).max(f64::MIN_POSITIVE)
}

/// `merged` (torch layout) written back into the symmetric int8 weight that
/// `DequantizeLinear(q, scale[, zero point 0], axis)` or `Mul(Cast(q), scale)` makes:
/// per tensor or per channel as its scale is, as onnxruntime's quantizer does
/// ([`crate::quant::quantize_int8_symmetric`]); and `‖W_q − W‖ / ‖W‖`.
fn requantized_int8(
    graph: &Graph,
    module: &str,
    group: &[&Target],
    merged: &tract_core::ndarray::Array2<f32>,
) -> Result<(WeightPatch, f64)> {
    use crate::ir::{Def, ValueId};
    use crate::proto::tensor_proto::DataType;
    use crate::tensor::Array;
    use tract_core::ndarray::{Array2, ArrayD, Axis, IxDyn};
    let t0 = group[0];
    let cannot = |why: &str| {
        Error::Usage(format!(
            "cannot requantize '{module}': {why}; use --dequantize"
        ))
    };
    let node = graph.node(t0.node);
    let producer = |v: ValueId| match graph.value(v).def {
        Def::Node(n, _) => Some(graph.node(n)),
        _ => None,
    };
    let weight = node.inputs[1].ok_or_else(|| cannot("no weight input"))?;
    let dq = producer(weight).ok_or_else(|| cannot("its weight is stored, not dequantized"))?;
    // The int8 values, the scale, and the axis the scale runs along (None: one scale).
    let constant = |v: Option<ValueId>| v.filter(|&v| graph.initializer(v).is_some());
    let (q, scale, axis_attr) = match dq.op() {
        "DequantizeLinear" => {
            if dq.attr_int("block_size", 0) > 0 {
                return Err(cannot("its DequantizeLinear is blocked"));
            }
            if let Some(zp) = constant(dq.inputs.get(2).copied().flatten()) {
                let zero =
                    crate::interp::evaluate(graph, zp).map_err(|e| cannot(&e.to_string()))?;
                if zero.to_f64().iter().any(|&z| z != 0.0) {
                    return Err(cannot("its zero points are not 0 (asymmetric)"));
                }
            }
            (
                constant(dq.inputs[0]),
                constant(dq.inputs.get(1).copied().flatten()),
                Some(dq.attr_int("axis", 1)),
            )
        }
        "Mul" => {
            let (a, b) = (dq.inputs[0], dq.inputs.get(1).copied().flatten());
            let cast_of = |v: Option<ValueId>| {
                let n = producer(v?)?;
                (n.op() == "Cast").then(|| constant(n.inputs[0])).flatten()
            };
            match (cast_of(a), cast_of(b)) {
                (Some(q), None) => (Some(q), constant(b), None),
                (None, Some(q)) => (Some(q), constant(a), None),
                _ => return Err(cannot("its Mul is not Cast(int8) times a scale")),
            }
        }
        _ => {
            return Err(cannot(
                "its dequantization is neither DequantizeLinear nor Mul(Cast)",
            ))
        }
    };
    let (q, scale) = (
        q.ok_or_else(|| cannot("its int8 values are computed"))?,
        scale.ok_or_else(|| cannot("its scale is computed"))?,
    );
    let (q_init, s_init) = (
        graph.initializer(q).expect("stored"),
        graph.initializer(scale).expect("stored"),
    );
    if q_init.elem_type() != DataType::Int8 as i32 || s_init.elem_type() != DataType::Float as i32 {
        return Err(cannot("it is not int8 with a float32 scale"));
    }
    if group.len() > 1 || graph.value(q).users.len() > 1 || graph.value(scale).users.len() > 1 {
        return Err(cannot("its quantized weight is shared with other nodes"));
    }
    // What the node reads: [d_in, d_out] (MatMul; Gemm transB=0) or [d_out, d_in].
    let seen: Array2<f32> = if t0.op == "Gemm" && t0.layout == super::target::Layout::OutIn {
        merged.clone()
    } else {
        merged.t().to_owned()
    };
    let dims: Vec<usize> = q_init.dims().iter().map(|&d| d as usize).collect();
    if dims != seen.shape() {
        return Err(cannot("its int8 values are not the weight's shape"));
    }
    let s_dims: Vec<usize> = s_init.dims().iter().map(|&d| d as usize).collect();
    let channels: usize = s_dims.iter().product();
    // The axis of `seen` the scale runs along.
    let axis = if channels <= 1 {
        None
    } else {
        let axis = match axis_attr {
            Some(a) => Some(if a < 0 { (a + 2) as usize } else { a as usize }),
            None => (s_dims.len() == 2)
                .then(|| (0..2).find(|&i| s_dims[i] > 1))
                .flatten(),
        };
        match axis {
            Some(a) if a < 2 && seen.shape()[a] == channels => Some(a),
            _ => return Err(cannot("its scale is neither one value nor one per channel")),
        }
    };
    let mut q_new = Array2::<i8>::zeros(seen.dim());
    let mut scales = Vec::new();
    match axis {
        None => {
            let values: Vec<f32> = seen.iter().copied().collect();
            let (s, qs) = crate::quant::quantize_int8_symmetric(&values);
            q_new = Array2::from_shape_vec(seen.dim(), qs).expect("same size");
            scales.push(s);
        }
        Some(a) => {
            for (c, lane) in seen.axis_iter(Axis(a)).enumerate() {
                let values: Vec<f32> = lane.iter().copied().collect();
                let (s, qs) = crate::quant::quantize_int8_symmetric(&values);
                for (dst, v) in q_new.index_axis_mut(Axis(a), c).iter_mut().zip(qs) {
                    *dst = v;
                }
                scales.push(s);
            }
        }
    }
    let back: Array2<f32> = {
        let mut b = q_new.mapv(f32::from);
        match axis {
            None => b.mapv_inplace(|v| v * scales[0]),
            Some(a) => {
                for (c, mut lane) in b.axis_iter_mut(Axis(a)).enumerate() {
                    lane.mapv_inplace(|v| v * scales[c]);
                }
            }
        }
        b
    };
    let error = relative_error(&back, &seen);
    let named = |array: Array, old: &crate::ir::Initializer| -> Result<crate::ir::Initializer> {
        let mut init = crate::ir::Initializer::from_array(&array)?;
        init.proto.name = old.proto.name.clone();
        Ok(init)
    };
    let q_array = Array::I8(q_new.into_dyn());
    let s_array =
        Array::F32(ArrayD::from_shape_vec(IxDyn(&s_dims), scales).expect("one per channel"));
    Ok((
        WeightPatch::Requantized(vec![
            (q, named(q_array, q_init)?),
            (scale, named(s_array, s_init)?),
        ]),
        error,
    ))
}

/// `merged` `[N, K]` written back into the `MatMulNBits` node's own initializers (its
/// bits, block size, zero-point scheme and scale type), and `‖W_q − W‖ / ‖W‖`.
fn requantized(
    graph: &Graph,
    module: &str,
    group: &[&Target],
    merged: &tract_core::ndarray::Array2<f32>,
) -> Result<(WeightPatch, f64)> {
    use crate::tensor::Array;
    let node = graph.node(group[0].node);
    let bits = node.attr_int("bits", 4) as usize;
    let block = node.attr_int("block_size", 0) as usize;
    let cannot = |why: String| Error::Usage(format!("cannot requantize '{module}': {why}"));
    // B, scales and zero points must be this module's own initializers.
    let slot = |i: usize| -> Result<Option<(crate::ir::ValueId, &crate::ir::Initializer)>> {
        let Some(v) = node.inputs.get(i).copied().flatten() else {
            return Ok(None);
        };
        let init = graph
            .initializer(v)
            .ok_or_else(|| cannot(format!("its input {i} is computed, not stored")))?;
        let users: std::collections::HashSet<_> = graph.value(v).users.iter().collect();
        if users.len() > 1 || group.len() > 1 {
            return Err(cannot(format!("its input {i} is shared with other nodes")));
        }
        Ok(Some((v, init)))
    };
    let (b, scales, zp) = (slot(1)?, slot(2)?, slot(3)?);
    let ((b, b_init), (s, s_init)) = (
        b.ok_or_else(|| cannot("no B".into()))?,
        scales.ok_or_else(|| cannot("no scales".into()))?,
    );
    if zp.is_some_and(|(_, z)| z.elem_type() != crate::proto::tensor_proto::DataType::Uint8 as i32)
    {
        return Err(cannot("its zero points are not packed uint8".into()));
    }
    let scale_type = s_init.elem_type();
    let fp16 = scale_type == crate::proto::tensor_proto::DataType::Float16 as i32;
    let q = crate::quant::quantize_nbits(merged, bits, block, zp.is_none(), |x| {
        if fp16 {
            half::f16::from_f32(x).to_f32()
        } else {
            x
        }
    });
    let (n, k) = merged.dim();
    let back = crate::quant::dequantized_nbits(&q, n, k, bits, block);
    let norm = |a: &tract_core::ndarray::Array2<f32>| {
        a.iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt()
    };
    let error = norm(&(&back - merged)) / norm(merged).max(f64::MIN_POSITIVE);
    let shaped = |values: Array, old: &crate::ir::Initializer| -> Result<crate::ir::Initializer> {
        let dims: Vec<usize> = old.dims().iter().map(|&d| d as usize).collect();
        let values = match values {
            Array::U8(a) => Array::U8(
                a.into_shape_with_order(dims)
                    .map_err(|e| cannot(e.to_string()))?,
            ),
            Array::F32(a) => Array::F32(
                a.into_shape_with_order(dims)
                    .map_err(|e| cannot(e.to_string()))?,
            ),
            other => other,
        };
        let mut init = crate::ir::Initializer::from_array(&values)?;
        init.proto.name = old.proto.name.clone();
        Ok(init)
    };
    let dyn1 = |v: Vec<u8>| {
        Array::U8(tract_core::ndarray::ArrayD::from_shape_vec(vec![v.len()], v).expect("1-D"))
    };
    let scale_values =
        tract_core::ndarray::ArrayD::from_shape_vec(vec![q.scales.len()], q.scales.clone())
            .expect("1-D");
    let scale_values = Array::from_f32(scale_values, scale_type)
        .ok_or_else(|| cannot("its scales are not float".into()))?;
    let mut inits = vec![
        (b, shaped(dyn1(q.packed), b_init)?),
        (s, shaped(scale_values, s_init)?),
    ];
    if let (Some((z, z_init)), Some(zps)) = (zp, q.zero_points) {
        inits.push((z, shaped(dyn1(zps), z_init)?));
    }
    Ok((WeightPatch::Requantized(inits), error))
}
