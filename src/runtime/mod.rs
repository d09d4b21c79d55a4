//! The tract bridge: hands an in-memory model to tract (folded for concrete input
//! shapes), runs it, and reports the type and shape of every value.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost::Message;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::error::{Error, Result};
use crate::ir::Def;
use crate::model::Model;
use crate::tensor::Array;

mod add_into;
pub mod cross_entropy;
mod kernel;
mod masked_softmax;
mod matmul;
pub use matmul::product_f32;
pub mod nbits;
mod pattern;
pub(crate) mod profile;
pub mod rms_norm_grad;
pub mod softmax_grad;
pub mod swiglu;
mod vexp;

/// tract's ONNX front end with lora-graft's kernels: `MatMulNBits` and its input
/// gradient on the packed weight ([`nbits`]), the SwiGLU gate's gradient ([`swiglu`]),
/// a softmax's gradient ([`softmax_grad`]), an RMS norm's gradient ([`rms_norm_grad`])
/// and the cross-entropy's value and gradient ([`cross_entropy`]).
fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register.insert("MatMulNBits", nbits::parse_forward);
    onnx.op_register
        .insert(nbits::INPUT_GRAD_OP, nbits::parse_input_grad);
    onnx.op_register
        .insert(swiglu::SWIGLU_GRAD_OP, swiglu::parse);
    onnx.op_register
        .insert(softmax_grad::SOFTMAX_GRAD_OP, softmax_grad::parse);
    onnx.op_register
        .insert(rms_norm_grad::RMS_NORM_GRAD_OP, rms_norm_grad::parse);
    onnx.op_register
        .insert(cross_entropy::CROSS_ENTROPY_GRAD_OP, cross_entropy::parse);
    onnx
}

/// A model optimised by tract for fixed input shapes, ready to run many times.
pub struct Runner {
    plan: Arc<TypedRunnableModel>,
    /// Input names, in the order [`Runner::run`] takes them.
    pub inputs: Vec<String>,
    /// Output names, in the order [`Runner::run`] returns them.
    pub outputs: Vec<String>,
}

/// The element type and shape tract infers for one value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ValueFact {
    /// tract's datum type name (`F32`, `I64`, ...).
    pub dtype: String,
    /// Dims as text (concrete numbers once input shapes are fixed).
    pub shape: Vec<String>,
}

thread_local! {
    /// How many [`guarded`] calls this thread is inside: the panic hook stays quiet
    /// while any is, since their panics become errors.
    static GUARDED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    /// Where the last quieted panic happened (`file:line`), for its error.
    static PANIC_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f`, turning a panic inside tract (or in the kernels lora-graft runs in it)
/// into an error (user models are untrusted), without the panic hook's message: the
/// error says it once, on one line, with where it happened.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(|g| g.get()) == 0 {
                previous(info);
            }
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()));
            PANIC_AT.with(|p| *p.borrow_mut() = at);
        }));
    });
    /// Leaves the guarded region however `f` ends.
    struct Region;
    impl Drop for Region {
        fn drop(&mut self) {
            GUARDED.with(|g| g.set(g.get() - 1));
        }
    }
    GUARDED.with(|g| g.set(g.get() + 1));
    let region = Region;
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    drop(region);
    caught.unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        // One line (an assertion's message spans several).
        let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
        let at = PANIC_AT.with(|p| p.borrow_mut().take());
        let at = at.map(|at| format!(" (at {at})")).unwrap_or_default();
        Err(Error::Runtime(format!(
            "tract failed while {what}: {msg}{at}"
        )))
    })
}

fn tract_err(e: impl std::fmt::Display) -> Error {
    Error::Runtime(format!("{e:#}"))
}

/// The model's real inputs (graph inputs that are not initializers), in order.
pub fn input_names(model: &Model) -> Vec<String> {
    let g = &model.graph;
    g.inputs()
        .iter()
        .filter(|io| g.value(io.value).def == Def::Input)
        .map(|io| g.value(io.value).name.clone())
        .collect()
}

/// Folds a copy of the model for `shapes` and parses it into a tract model with
/// concrete input facts.
fn parse(
    model: &Model,
    shapes: &HashMap<String, Vec<usize>>,
) -> Result<(InferenceModel, HashMap<String, OutletId>)> {
    let names = input_names(model);
    for name in &names {
        if !shapes.contains_key(name) {
            return Err(Error::Usage(format!(
                "no shape given for model input '{name}'"
            )));
        }
    }
    let mut graph = model.graph.clone();
    crate::passes::prepare_for_tract(&mut graph, shapes)?;
    let mut proto = model.proto.clone();
    let mut g = graph.to_proto(|init| init.runtime_proto())?;
    // Declared shapes (symbolic in dynamic exports) clash with concrete facts.
    g.value_info.clear();
    for out in &mut g.output {
        out.r#type = None;
    }
    proto.graph = Some(g);
    let pb =
        tract_onnx::pb::ModelProto::decode(proto.encode_to_vec().as_slice()).map_err(tract_err)?;
    let dir = model.dir.to_string_lossy().into_owned();
    let parsed = guarded("reading the model", || {
        onnx().parse(&pb, Some(&dir)).map_err(tract_err)
    })?;
    if !parsed.unresolved_inputs.is_empty() {
        return Err(Error::Runtime(format!(
            "unresolved inputs: {:?}",
            parsed.unresolved_inputs
        )));
    }
    let mut m = parsed.model;
    for (i, name) in names.iter().enumerate() {
        let io = model
            .graph
            .inputs()
            .iter()
            .find(|io| &model.graph.value(io.value).name == name)
            .expect("input");
        let elem = match &io.info.r#type.as_ref().and_then(|t| t.value.clone()) {
            Some(crate::proto::type_proto::Value::TensorType(t)) => t.elem_type(),
            _ => {
                return Err(Error::Usage(format!(
                    "model input '{name}' is not a tensor"
                )))
            }
        };
        let dt = datum_type(elem).ok_or_else(|| {
            Error::Runtime(format!(
                "input '{name}' has type {} which tract cannot take",
                crate::dtype::name(elem)
            ))
        })?;
        let fact = InferenceFact::dt_shape(dt, shapes[name].clone());
        m.set_input_fact(i, fact).map_err(tract_err)?;
    }
    Ok((m, parsed.outlets_by_name))
}

fn datum_type(elem: i32) -> Option<DatumType> {
    use crate::proto::tensor_proto::DataType as D;
    Some(match D::try_from(elem).ok()? {
        D::Float => f32::datum_type(),
        D::Double => f64::datum_type(),
        D::Float16 => f16::datum_type(),
        D::Int64 => i64::datum_type(),
        D::Int32 => i32::datum_type(),
        D::Int8 => i8::datum_type(),
        D::Uint8 => u8::datum_type(),
        D::Bool => bool::datum_type(),
        _ => return None,
    })
}

/// Which kernels a [`Runner`] picks beyond tract's decluttered ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Every op as written (no kernel choice that depends on the rest of the graph).
    Plain,
    /// tract's optimiser with lora-graft's products (faer, constant factors folded,
    /// attention's masked softmax and products read in part) and sums into a region
    /// (a zero `Pad` added, as a `Slice`'s gradient is). A subgraph rounds the
    /// same whatever is added beside it: a grafted model at init gives its base model's
    /// outputs bit for bit.
    Fused,
    /// [`Kernels::Fused`], and sums of products accumulated in place: an `Add` after a
    /// product rounds once instead of twice, so a subgraph's last bits depend on what
    /// reads it. For training graphs, which promise no bit-identity with another graph.
    Training,
}

impl Runner {
    /// Prepares `model` for inputs of the given shapes (`name -> dims`), with
    /// [`Kernels::Fused`].
    pub fn new(model: &Model, shapes: &HashMap<String, Vec<usize>>) -> Result<Runner> {
        Runner::with_kernels(model, shapes, Kernels::Fused)
    }

    /// Like [`Runner::new`], with the given kernels.
    pub fn with_kernels(
        model: &Model,
        shapes: &HashMap<String, Vec<usize>>,
        kernels: Kernels,
    ) -> Result<Runner> {
        let (m, _) = parse(model, shapes)?;
        let outputs = model
            .graph
            .outputs()
            .iter()
            .map(|o| model.graph.value(o.value).name.clone())
            .collect();
        let plan = guarded("optimising the model", || {
            let typed = m.into_typed().map_err(tract_err)?;
            let mut typed = typed.into_decluttered().map_err(tract_err)?;
            if kernels != Kernels::Plain {
                matmul::use_faer_matmuls(&mut typed).map_err(tract_err)?;
                matmul::fold_scalar_factors(&mut typed).map_err(tract_err)?;
                masked_softmax::use_masked_softmax(&mut typed).map_err(tract_err)?;
                matmul::restrict_to_live_outputs(&mut typed).map_err(tract_err)?;
                matmul::fuse_attention_gradients(&mut typed).map_err(tract_err)?;
                matmul::fuse_attention(&mut typed).map_err(tract_err)?;
                add_into::use_add_into(&mut typed).map_err(tract_err)?;
                if kernels == Kernels::Training {
                    matmul::accumulate_sums(&mut typed).map_err(tract_err)?;
                }
                typed = typed.into_optimized().map_err(tract_err)?;
            }
            typed.into_runnable().map_err(tract_err)
        })?;
        Ok(Runner {
            plan,
            inputs: input_names(model),
            outputs,
        })
    }

    /// Runs on `inputs` (in [`Runner::inputs`] order).
    pub fn run(&self, inputs: Vec<Array>) -> Result<Vec<Array>> {
        let values: TVec<TValue> = inputs
            .into_iter()
            .map(|a| to_tract(a).map(TValue::from))
            .collect::<Result<_>>()?;
        let outputs = guarded("running the model", || {
            if profile::enabled() {
                return profile::run(&self.plan, values).map_err(tract_err);
            }
            self.plan.run(values).map_err(tract_err)
        })?;
        outputs
            .into_iter()
            .map(|t| from_tract(t.into_tensor()))
            .collect()
    }
}

/// The type and shape tract infers for every named value, for the given input shapes.
pub fn value_facts(
    model: &Model,
    shapes: &HashMap<String, Vec<usize>>,
) -> Result<BTreeMap<String, ValueFact>> {
    // tract's inference facts by ONNX value name: every value, including the ones an
    // expansion (LayerNormalization) or a folded constant leaves unlabelled later.
    let (mut m, by_name) = parse(model, shapes)?;
    guarded("inferring shapes", || m.analyse(false).map_err(tract_err))?;
    let mut facts = BTreeMap::new();
    for (name, outlet) in by_name {
        let fact = m.outlet_fact(outlet).map_err(tract_err)?;
        let (Some(dt), Some(shape)) = (fact.datum_type.concretize(), fact.shape.concretize())
        else {
            continue;
        };
        facts.insert(
            name,
            ValueFact {
                dtype: format!("{dt:?}"),
                shape: shape.iter().map(|d| d.to_string()).collect(),
            },
        );
    }
    Ok(facts)
}

/// Converts an [`Array`] to a tract tensor.
pub fn to_tract(a: Array) -> Result<Tensor> {
    Ok(match a {
        Array::F32(x) => x.into(),
        Array::F64(x) => x.into(),
        Array::F16(x) => x.into(),
        Array::BF16(_) => {
            return Err(Error::Runtime(
                "tract has no bfloat16; give float32 inputs".into(),
            ))
        }
        Array::I64(x) => x.into(),
        Array::I32(x) => x.into(),
        Array::I8(x) => x.into(),
        Array::U8(x) => x.into(),
        Array::Bool(x) => x.into(),
    })
}

/// Converts a tract tensor to an [`Array`].
pub fn from_tract(t: Tensor) -> Result<Array> {
    let dt = t.datum_type();
    Ok(if dt == f32::datum_type() {
        Array::F32(t.into_plain_array::<f32>().map_err(tract_err)?)
    } else if dt == f64::datum_type() {
        Array::F64(t.into_plain_array::<f64>().map_err(tract_err)?)
    } else if dt == f16::datum_type() {
        Array::F16(t.into_plain_array::<f16>().map_err(tract_err)?)
    } else if dt == i64::datum_type() {
        Array::I64(t.into_plain_array::<i64>().map_err(tract_err)?)
    } else if dt == i32::datum_type() {
        Array::I32(t.into_plain_array::<i32>().map_err(tract_err)?)
    } else if dt == i8::datum_type() {
        Array::I8(t.into_plain_array::<i8>().map_err(tract_err)?)
    } else if dt == u8::datum_type() {
        Array::U8(t.into_plain_array::<u8>().map_err(tract_err)?)
    } else if dt == bool::datum_type() {
        Array::Bool(t.into_plain_array::<bool>().map_err(tract_err)?)
    } else if dt == TDim::datum_type() {
        // A shape computation tract kept symbolic: concrete once the inputs are.
        let t = t.cast_to::<i64>().map_err(tract_err)?.into_owned();
        Array::I64(t.into_plain_array::<i64>().map_err(tract_err)?)
    } else {
        return Err(Error::Runtime(format!(
            "output of type {dt:?} is not supported"
        )));
    })
}
