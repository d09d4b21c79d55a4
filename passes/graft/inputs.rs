//! Serving adapters as graph inputs (`--adapter-inputs`), ONNX Runtime's Multi-LoRA
//! convention: around every target `y' = y + (x A) B`, where `A [d_in, k]` and
//! `B [k, d_out]` are graph inputs *and* initializers of the same name (the initializer
//! is the default when no adapter is active). Every servable variant reaches this form
//! through [`Variant::low_rank`] (scale folded into `B`).

use std::collections::BTreeMap;

use tract_core::ndarray::{Array2, ArrayD};

use super::super::variants::{Config, Dims, Init, LowRank, ParamSpec, Params, Variant};
use crate::error::Result;
use crate::ir::build::{int_attr, Builder};
use crate::ir::{Graph, GraphIo, Initializer, NodeId, ValueId};
use crate::proto::{tensor_shape_proto, type_proto, TensorShapeProto, TypeProto, ValueInfoProto};
use crate::tensor::Array;

/// Which base weights the adapter inputs are relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputBase {
    /// The weights the variant's PEFT form trains against: PiSSA's and OLoRA's `W_res`
    /// (`W − s·B₀A₀`, written as a new weight), whose
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

/// The graph input that picks each batch row's adapter slot (`--adapter-slots`).
pub const ADAPTER_INDEX: &str = "adapter_index";

/// Adds `module`'s adapter inputs with `defaults` as their initializers, in `dtype`; or,
/// with `slots`, stacked inputs `[slots, d_in, k]`, `[slots, k, d_out]` with no default
/// (every slot is fed at run time).
pub fn add_inputs(
    graph: &mut Graph,
    module: &str,
    defaults: &LowRank,
    dtype: i32,
    slots: Option<usize>,
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
        let mut dims = if key == "lora_A" {
            vec![Dim::Value(shape[0]), Dim::Param(&rank)]
        } else {
            vec![Dim::Param(&rank), Dim::Value(shape[1])]
        };
        let id = match slots {
            Some(k) => {
                dims.insert(0, Dim::Value(k));
                let id = graph.new_value(&name);
                graph.set_input_def(id);
                id
            }
            None => {
                let array = Array::from_f32(values, dtype).ok_or_else(|| {
                    crate::error::Error::Usage(format!(
                        "'{module}' computes in {}, not a float type adapter inputs can use",
                        crate::dtype::name(dtype)
                    ))
                })?;
                graph.add_initializer(&name, Initializer::new(array.to_proto("")))
            }
        };
        add_graph_input(graph, id, dtype, &dims);
        ids.insert(key, id);
    }
    Ok(ids)
}

/// Adds the `adapter_index [batch]` input (int64; -1 is no adapter): the batch dim
/// named as the model's first input names it.
pub fn add_adapter_index(graph: &mut Graph) -> Result<ValueId> {
    use tensor_shape_proto::dimension::Value;
    if graph.value_by_name(ADAPTER_INDEX).is_some() {
        return Err(crate::error::Error::Usage(format!(
            "the model already has a tensor named '{ADAPTER_INDEX}'; was it grafted already?"
        )));
    }
    let batch = graph
        .inputs()
        .iter()
        .find(|io| graph.value(io.value).def == crate::ir::Def::Input)
        .and_then(|io| match &io.info.r#type.as_ref()?.value {
            Some(type_proto::Value::TensorType(t)) => t.shape.as_ref()?.dim.first()?.value.clone(),
            _ => None,
        });
    let name = match &batch {
        Some(Value::DimParam(p)) => p.clone(),
        _ => "batch".to_string(),
    };
    let dim = match batch {
        Some(Value::DimValue(v)) if v > 0 => Dim::Value(v as usize),
        _ => Dim::Param(&name),
    };
    let id = graph.new_value(ADAPTER_INDEX);
    graph.set_input_def(id);
    add_graph_input(
        graph,
        id,
        crate::proto::tensor_proto::DataType::Int64 as i32,
        &[dim],
    );
    Ok(id)
}

fn add_graph_input(graph: &mut Graph, id: ValueId, dtype: i32, dims: &[Dim]) {
    graph.add_input(GraphIo {
        value: id,
        info: ValueInfoProto {
            name: Some(graph.value(id).name.clone()),
            r#type: Some(tensor_type(dtype, dims)),
            ..Default::default()
        },
    });
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
    /// Layer widths, from the inputs' declared dims.
    pub dims: Dims,
    /// The inputs' element type (the model's activations').
    pub dtype: i32,
    /// The number of slots, in a model with `--adapter-slots`.
    pub slots: Option<usize>,
    /// The rank of the inputs' defaults (none with slots).
    pub default_rank: Option<usize>,
    /// The weights the inputs are relative to: PEFT's `W_res` when a frozen-start
    /// variant's defaults are its start, else the original ones.
    pub base: InputBase,
    /// The linear node the branch was spliced around, when the graph still shows it.
    pub node: Option<NodeId>,
}

/// The adapter-input modules of `graph`: every graph input `<module>.lora_A` with its
/// `<module>.lora_B`, in graph input order.
pub fn served_modules(graph: &Graph) -> Vec<ServedModule> {
    let declared = |name: &str| -> Option<(Vec<i64>, i32)> {
        let v = graph.value_by_name(name)?;
        let io = graph.inputs().iter().find(|io| io.value == v)?;
        let Some(type_proto::Value::TensorType(t)) = &io.info.r#type.as_ref()?.value else {
            return None;
        };
        let dims = t
            .shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(tensor_shape_proto::dimension::Value::DimValue(v)) => v,
                _ => -1,
            })
            .collect();
        Some((dims, t.elem_type?))
    };
    let mut out = Vec::new();
    for io in graph.inputs() {
        let name = &graph.value(io.value).name;
        let Some(module) = name.strip_suffix(".lora_A") else {
            continue;
        };
        let (Some((da, dtype)), Some((db, _))) = (declared(name), declared(&input_names(module).1))
        else {
            continue;
        };
        let slotted = da.len() == 3 && db.len() == 3;
        if !(slotted || da.len() == 2 && db.len() == 2) {
            continue;
        }
        let (d_in, d_out) = (da[da.len() - 2], db[db.len() - 1]);
        if d_in < 0 || d_out < 0 {
            continue;
        }
        let default_rank = graph
            .initializer(io.value)
            .map(|i| i.dims().last().copied().unwrap_or(0).max(0) as usize);
        out.push(ServedModule {
            module: module.to_string(),
            dims: Dims {
                d_in: d_in as usize,
                d_out: d_out as usize,
            },
            dtype,
            slots: slotted.then(|| da[0].max(0) as usize),
            default_rank,
            base: if default_rank.unwrap_or(0) > 0 {
                InputBase::Trained
            } else {
                InputBase::Original
            },
            node: spliced_node(graph, module),
        });
    }
    out
}

/// The node whose output `module`'s branch is added to: the first input of the Add the
/// graft pass names `<module>.lora.Add`.
fn spliced_node(graph: &Graph, module: &str) -> Option<NodeId> {
    let name = format!("{module}.lora.Add");
    let add = graph.node_ids().find(|&n| graph.node(n).name() == name)?;
    graph.producer(graph.node(add).inputs.first().copied().flatten()?)
}

/// The branch of a model with adapter slots: every batch row through its own slot,
/// `y'[b] = y[b] + (x[b] A[i_b]) B[i_b]` with `i_b = adapter_index[b]`, and no adapter
/// where `i_b = -1`. The activations are read as `[batch, tokens, d_in]` (batch-major, as
/// exporters flatten them) and the delta reshaped back to `y`'s shape.
pub struct Slotted;

impl Variant for Slotted {
    fn name(&self) -> &'static str {
        "slotted"
    }

    fn param_specs(&self, d: Dims, cfg: &Config) -> Vec<ParamSpec> {
        Served.param_specs(d, cfg)
    }

    // Once per module: the rows' slots gathered, B zeroed for rows with index -1.
    fn module_values(
        &self,
        b: &mut Builder,
        p: &BTreeMap<&'static str, ValueId>,
        _cfg: &Config,
    ) -> Result<Vec<(&'static str, ValueId)>> {
        let index = p["adapter_index"];
        let zero = b.ints("zero", &[0]);
        let slot = b.op("Max", &[index, zero], vec![])?;
        let a = b.op("Gather", &[p["lora_A"], slot], vec![int_attr("axis", 0)])?; // [B, d_in, k]
        let bm = b.op("Gather", &[p["lora_B"], slot], vec![int_attr("axis", 0)])?; // [B, k, d_out]
        let active = b.op("GreaterOrEqual", &[index, zero], vec![])?;
        let active = b.op("Cast", &[active], vec![int_attr("to", b.dtype as i64)])?;
        let active = b.unsqueeze(active, &[1, 2])?; // [B, 1, 1]
        let bm = b.op("Mul", &[bm, active], vec![])?;
        Ok(vec![("a_rows", a), ("b_rows", bm)])
    }

    fn branch(
        &self,
        b: &mut Builder,
        x: ValueId,
        _y: ValueId,
        p: &BTreeMap<&'static str, ValueId>,
        _cfg: &Config,
    ) -> Result<ValueId> {
        let batch = b.op("Shape", &[p["adapter_index"]], vec![])?; // [1]
        let x_shape = b.op("Shape", &[x], vec![])?;
        let (last, end) = (b.ints("last", &[-1]), b.ints("end", &[i64::MAX]));
        let d_in = b.op("Slice", &[x_shape, last, end], vec![])?;
        let rows = b.ints("rows", &[-1]);
        let to_rows = b.op("Concat", &[batch, rows, d_in], vec![int_attr("axis", 0)])?;
        let xr = b.op("Reshape", &[x, to_rows], vec![])?; // [B, T, d_in]
        let h = b.op("MatMul", &[xr, p["a_rows"]], vec![])?; // [B, T, k]
        let d = b.op("MatMul", &[h, p["b_rows"]], vec![])?; // [B, T, d_out]
        let (first, upto) = (b.ints("first", &[0]), b.ints("upto", &[-1]));
        let lead = b.op("Slice", &[x_shape, first, upto], vec![])?;
        let d_out = b.ints("d_out", &[-1]);
        let back = b.op("Concat", &[lead, d_out], vec![int_attr("axis", 0)])?;
        b.op("Reshape", &[d, back], vec![])
    }

    fn merged_weight(&self, w: Array2<f32>, _p: &Params, _cfg: &Config) -> Array2<f32> {
        w // per row: nothing to merge
    }
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

    fn merged_weight(&self, w: Array2<f32>, p: &Params, cfg: &Config) -> Array2<f32> {
        self.low_rank(p, cfg).expect("low rank").added_to(w)
    }

    fn low_rank(&self, p: &Params, _cfg: &Config) -> std::result::Result<LowRank, String> {
        Ok(LowRank {
            up: super::super::variants::mat(p, "lora_B"),
            down: super::super::variants::mat(p, "lora_A"),
        })
    }
}
