//! Serving adapters as graph inputs (`--adapter-inputs`), ONNX Runtime's Multi-LoRA
//! convention: around every target `y' = y + (x A) B`, where `A [d_in, k]` and
//! `B [k, d_out]` are graph inputs *and* initializers of the same name (the initializer
//! is the default when no adapter is active). Every servable variant reaches this form
//! through [`Variant::low_rank`] (scale folded into `B`).

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD};

use super::super::variants::{Config, Dims, Init, LowRank, ParamSpec, Params, Variant};
use crate::error::Result;
use crate::ir::build::Builder;
use crate::ir::{Graph, GraphIo, Initializer, NodeId, ValueId};
use crate::proto::{tensor_shape_proto, type_proto, TensorShapeProto, TypeProto, ValueInfoProto};
use crate::tensor::Array;

/// Which base weights the adapter inputs are relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputBase {
    /// The weights the variant trains against: PiSSA's and OLoRA's `W_res`, whose
    /// defaults are then the init factors (the model with no adapter active is the
    /// original); the original weights for every other variant (empty defaults).
    #[default]
    Trained,
    /// The original weights, empty defaults: a PiSSA or OLoRA adapter is served as a
    /// plain update of rank 2r, `[s·B, −s·B₀]·[A; A₀]`.
    Original,
}

/// The graph input names of `module`'s adapter: `(<module>.lora_A, <module>.lora_B)`.
pub fn input_names(module: &str) -> (String, String) {
    (format!("{module}.lora_A"), format!("{module}.lora_B"))
}

/// The symbolic rank dimension of `module`'s inputs: one name per layer, since ONNX
/// Runtime (1.32) fails to re-use buffers when one shared name meets different ranks.
pub fn rank_dim(module: &str) -> String {
    format!("{module}.r")
}

/// `(A, B)` of `lr` in ONNX layout: `A = downᵀ [d_in, k]`, `B = upᵀ [k, d_out]`.
pub fn onnx_factors(lr: &LowRank) -> (ArrayD<f32>, ArrayD<f32>) {
    let a: Array2<f32> = lr.down.t().as_standard_layout().into_owned();
    let b: Array2<f32> = lr.up.t().as_standard_layout().into_owned();
    (a.into_dyn(), b.into_dyn())
}

/// Adds `module`'s adapter inputs with `defaults` as their initializers, in `dtype`.
pub fn add_inputs(
    graph: &mut Graph,
    module: &str,
    defaults: &LowRank,
    dtype: i32,
) -> Result<BTreeMap<&'static str, ValueId>> {
    let (a, b) = onnx_factors(defaults);
    let (name_a, name_b) = input_names(module);
    let rank = rank_dim(module);
    let mut ids = BTreeMap::new();
    for (key, name, values) in [("lora_A", name_a, a), ("lora_B", name_b, b)] {
        if graph.value_by_name(&name).is_some() {
            return Err(crate::error::Error::Usage(format!(
                "the model already has a tensor named '{name}'; was it grafted already?"
            )));
        }
        let shape = values.shape().to_vec();
        let array = Array::from_f32(values, dtype).ok_or_else(|| {
            crate::error::Error::Usage(format!(
                "'{module}' computes in {}, not a float type adapter inputs can use",
                crate::dtype::name(dtype)
            ))
        })?;
        let id = graph.add_initializer(&name, Initializer::new(array.to_proto("")));
        let dims = if key == "lora_A" {
            [Dim::Value(shape[0]), Dim::Param(&rank)]
        } else {
            [Dim::Param(&rank), Dim::Value(shape[1])]
        };
        graph.add_input(GraphIo {
            value: id,
            info: ValueInfoProto {
                name: Some(graph.value(id).name.clone()),
                r#type: Some(tensor_type(dtype, &dims)),
                ..Default::default()
            },
        });
        ids.insert(key, id);
    }
    Ok(ids)
}

/// A dimension of an input's declared shape.
enum Dim<'a> {
    Value(usize),
    Param(&'a str),
}

fn tensor_type(dtype: i32, dims: &[Dim]) -> TypeProto {
    use tensor_shape_proto::{dimension::Value, Dimension};
    TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(dtype),
            shape: Some(TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|d| Dimension {
                        value: Some(match d {
                            Dim::Value(v) => Value::DimValue(*v as i64),
                            Dim::Param(p) => Value::DimParam(p.to_string()),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    }
}

/// One module of a model grafted with adapter inputs.
#[derive(Debug, Clone)]
pub struct ServedModule {
    /// Module path.
    pub module: String,
    /// Layer widths, from the inputs' fixed dims.
    pub dims: Dims,
    /// The `A` input (an initializer holding its default).
    pub a: ValueId,
    /// The `B` input.
    pub b: ValueId,
    /// The linear node the branch was spliced around, when the graph still shows it
    /// (`Add(node output, (x A) B)`).
    pub node: Option<NodeId>,
}

/// The adapter-input modules of `graph`: every graph input `<module>.lora_A` with a
/// default and its `<module>.lora_B`, in graph input order.
pub fn served_modules(graph: &Graph) -> Vec<ServedModule> {
    let overridable = |name: &str| {
        let v = graph.value_by_name(name)?;
        let is_input = graph.inputs().iter().any(|io| io.value == v);
        (is_input && graph.initializer(v).is_some_and(|i| i.dims().len() == 2)).then_some(v)
    };
    let mut out = Vec::new();
    for io in graph.inputs() {
        let name = &graph.value(io.value).name;
        let Some(module) = name.strip_suffix(".lora_A") else {
            continue;
        };
        let (Some(a), Some(b)) = (overridable(name), overridable(&input_names(module).1)) else {
            continue;
        };
        let (da, db) = (
            graph.initializer(a).unwrap().dims(),
            graph.initializer(b).unwrap().dims(),
        );
        out.push(ServedModule {
            module: module.to_string(),
            dims: Dims {
                d_in: da[0].max(0) as usize,
                d_out: db[1].max(0) as usize,
            },
            a,
            b,
            node: spliced_node(graph, b),
        });
    }
    out
}

/// The node whose output the branch reading `b` is added to.
fn spliced_node(graph: &Graph, b: ValueId) -> Option<NodeId> {
    let product = graph
        .value(b)
        .users
        .iter()
        .find(|&&n| graph.node(n).op() == "MatMul")?;
    let delta = graph.node(*product).outputs.first().copied().flatten()?;
    let add = graph
        .value(delta)
        .users
        .iter()
        .find(|&&n| graph.node(n).op() == "Add")?;
    let y = graph
        .node(*add)
        .inputs
        .iter()
        .flatten()
        .copied()
        .find(|&v| v != delta)?;
    graph.producer(y)
}

/// The served branch, `(x A) B` with the scale already in `B`: plain LoRA of any rank.
pub struct Served;

impl Variant for Served {
    fn name(&self) -> &'static str {
        "served"
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        let spec = |name, shape: [usize; 2]| ParamSpec {
            name,
            shape: shape.to_vec(),
            init: Init::Zeros,
            trainable: false,
        };
        vec![
            spec("lora_A", [cfg.r, d.d_in]),
            spec("lora_B", [d.d_out, cfg.r]),
        ]
    }

    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        _y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        _cfg: &Config,
    ) -> Result<ValueId> {
        let h = b.op("MatMul", &[x, p["lora_A"]], vec![])?; // [..., k]
        b.op("MatMul", &[h, p["lora_B"]], vec![]) // [..., d_out]
    }

    fn merged_weight(&self, w: &Array2<f32>, p: &Params, _cfg: &Config) -> Array2<f32> {
        w + &self.low_rank(p, _cfg).expect("low rank").delta_w()
    }

    fn low_rank(&self, p: &Params, _cfg: &Config) -> std::result::Result<LowRank, String> {
        Ok(LowRank {
            up: super::super::variants::mat(p, "lora_B"),
            down: super::super::variants::mat(p, "lora_A"),
        })
    }
}
