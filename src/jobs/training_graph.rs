//! The training graph of a request: graft, concrete shapes, the loss, and the
//! gradient pass.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ir::build::Builder;
use crate::jobs::graft::{graft, Outcome};
use crate::jobs::request::{GraftRequest, TrainingRequest};
use crate::model::Model;
use crate::passes::{grad, run_pass, PassContext};

/// A training graph, made.
#[derive(Clone)]
pub struct Training {
    /// The training model (trainable tensors are inputs).
    pub model: Model,
    /// The graft it was made from (initial adapter values).
    pub outcome: Outcome,
    /// Loss and gradient outputs.
    pub graph: crate::passes::grad::TrainingGraph,
    /// Concrete shapes of every input (model inputs, labels, trainable tensors).
    pub input_shapes: HashMap<String, Vec<usize>>,
    /// The graft request it was made with.
    pub request: GraftRequest,
    /// The number of classes the loss reads (classification).
    pub classes: Option<usize>,
}

/// `decoder.head_size` of the onnxruntime-genai `genai_config.json` beside `model`.
fn genai_head_size(model: &Model) -> Option<usize> {
    let text = std::fs::read_to_string(model.dir.join("genai_config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["model"]["decoder"]["head_size"]
        .as_u64()
        .filter(|&h| (1..=1 << 16).contains(&h))
        .map(|h| h as usize)
}

/// Concrete shapes of the model's inputs: symbolic dims become `batch`, then `seq`;
/// a KV cache's `past_*` length is 0 and a `total_*` length is `seq`.
pub fn input_shapes(
    model: &Model,
    batch: usize,
    seq: usize,
) -> Result<HashMap<String, Vec<usize>>> {
    use crate::proto::tensor_shape_proto::dimension::Value as Dim;
    let mut symbols: Vec<String> = Vec::new();
    let mut shapes = HashMap::new();
    for name in crate::runtime::input_names(model) {
        let io = model
            .graph
            .inputs()
            .iter()
            .find(|io| model.graph.value(io.value).name == name)
            .expect("input");
        let Some(crate::proto::type_proto::Value::TensorType(t)) =
            io.info.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(Error::Usage(format!("input '{name}' is not a tensor")));
        };
        let dims = t
            .shape
            .as_ref()
            .map(|s| s.dim.as_slice())
            .unwrap_or_default();
        let mut shape = Vec::new();
        for d in dims {
            shape.push(match &d.value {
                Some(Dim::DimValue(v)) => *v as usize,
                // A KV cache is empty in training: past length 0, total = the sequence.
                Some(Dim::DimParam(p)) if p.contains("past") => 0,
                Some(Dim::DimParam(p)) if p.contains("total") => seq,
                // A KV cache's head size (onnxruntime-genai's `kv_cache_dim`): its config.
                Some(Dim::DimParam(p))
                    if name.starts_with("past")
                        && !symbols.contains(p)
                        && genai_head_size(model).is_some() =>
                {
                    genai_head_size(model).expect("some")
                }
                Some(Dim::DimParam(p)) => {
                    if !symbols.contains(p) {
                        symbols.push(p.clone());
                    }
                    match symbols.iter().position(|s| s == p) {
                        Some(0) => batch,
                        Some(1) => seq,
                        _ => return Err(Error::Usage(format!("input '{name}' has a third symbolic dim '{p}': only batch, sequence and a KV cache's past_*/total_* lengths get sizes; export the model with '{p}' fixed"))),
                    }
                }
                None => return Err(Error::Usage(format!("input '{name}' has a dim of unknown size"))),
            });
        }
        shapes.insert(name, shape);
    }
    Ok(shapes)
}

/// Grafts `req.graft` onto `model` and builds its training graph.
pub fn training_graph(mut model: Model, req: &TrainingRequest) -> Result<Training> {
    let outcome = graft(&mut model, &req.graft)?;
    training_graph_of(model, outcome, req)
}

/// An error naming the first bfloat16 tensor of `model`: tract, which runs the gradient
/// pass's shapes and training, has no bfloat16.
fn no_bfloat16(model: &Model) -> Result<()> {
    use crate::proto::tensor_proto::DataType as D;
    let g = &model.graph;
    match g
        .initializers()
        .find(|(_, init)| init.elem_type() == D::Bfloat16 as i32)
    {
        Some((id, _)) => Err(Error::Usage(format!(
            "{}: a bfloat16 tensor; training runs on tract, which has no bfloat16: convert the model to float32 (or float16) first",
            g.value(id).name
        ))),
        None => Ok(()),
    }
}

/// The training graph of `model`, grafted already as `outcome` says (by
/// [`graft`] with `req.graft`).
pub fn training_graph_of(
    mut model: Model,
    mut outcome: Outcome,
    req: &TrainingRequest,
) -> Result<Training> {
    // onnxruntime's fused ops into default-domain ones the gradient rules know.
    crate::jobs::graft::lower(&mut model, &mut outcome)?;
    let mut shapes = input_shapes(&model, req.batch, req.seq)?;
    let trainable_names: Vec<String> = outcome
        .grafted
        .modules
        .iter()
        .flat_map(|m| m.trainable.iter().map(move |p| format!("{}.{p}", m.module)))
        .collect();
    // Shapes from tract, with the trainable tensors as inputs (as constants tract would
    // fold what is computed from them alone, and forget those values' names).
    let mut probe = model.clone();
    let mut probe_shapes = shapes.clone();
    for name in &trainable_names {
        let t = probe.graph.value_by_name(name).expect("adapter tensor");
        let init = probe.graph.initializer(t).cloned();
        probe_shapes.insert(
            name.clone(),
            init.as_ref()
                .map(|i| i.dims().iter().map(|&d| d as usize).collect())
                .unwrap_or_default(),
        );
        grad::make_input(&mut probe.graph, t, init, req.graft.adapter_dtype.onnx());
    }
    no_bfloat16(&probe)?;
    let facts = crate::runtime::value_facts(&probe, &probe_shapes)
        .map_err(|e| e.context("shapes for the gradient pass"))?;
    drop(probe);
    let mut by_name: grad::Shapes = facts
        .into_iter()
        .filter_map(|(name, f)| {
            f.shape
                .iter()
                .map(|d| d.parse::<usize>().ok())
                .collect::<Option<Vec<_>>>()
                .map(|s| (name, s))
        })
        .collect();
    let output = match &req.output {
        Some(o) => model
            .graph
            .value_by_name(o)
            .filter(|v| model.graph.is_output(*v))
            .ok_or_else(|| Error::Usage(format!("the model has no output '{o}'")))?,
        // The first float output (an integer one, as argmax ids, has no gradient).
        None => {
            let declared =
                |io: &crate::ir::GraphIo| match io.info.r#type.as_ref()?.value.as_ref()? {
                    crate::proto::type_proto::Value::TensorType(t) => t.elem_type,
                    _ => None,
                };
            model
                .graph
                .outputs()
                .iter()
                .find(|io| declared(io).is_none_or(crate::dtype::is_float))
                .map(|io| io.value)
                .ok_or_else(|| {
                    Error::Usage(
                        "the model has no float output for the loss to read; name one with --loss-output"
                            .into(),
                    )
                })?
        }
    };
    let output_name = model.graph.value(output).name.clone();
    let opset = crate::passes::graft::default_opset(&model.proto);
    let dtype = req.graft.adapter_dtype.onnx();
    let model_outputs = model.graph.outputs().len();
    let loss = {
        let dtypes = crate::ir::infer::value_dtypes(&model.graph)?;
        let mut e = Builder::new(&mut model.graph, opset, dtype, "loss".into(), '/');
        e.dtypes = dtypes;
        for v in e.graph.value_ids().collect::<Vec<_>>() {
            if let Some(s) = by_name.get(&e.graph.value(v).name) {
                e.shapes.insert(v, s.clone());
            }
        }
        let loss = grad::loss::build(&mut e, req.loss, output)?;
        for (v, s) in &e.shapes {
            by_name.insert(e.graph.value(*v).name.clone(), s.clone());
        }
        loss
    };
    if !req.keep_outputs {
        model.graph.clear_outputs();
    }
    let trainable: Vec<crate::ir::ValueId> = trainable_names
        .iter()
        .map(|k| model.graph.value_by_name(k).expect("adapter tensor"))
        .collect();
    for &t in &trainable {
        let init = model.graph.initializer(t).expect("initializer");
        shapes.insert(
            model.graph.value(t).name.clone(),
            init.dims().iter().map(|&d| d as usize).collect(),
        );
    }
    let label_shape = by_name
        .get(req.loss.label_name())
        .cloned()
        .unwrap_or_default();
    shapes.insert(req.loss.label_name().to_string(), label_shape);
    let classes = match req.loss {
        grad::loss::Loss::Class => by_name
            .get(&model.graph.value(output).name)
            .and_then(|s| s.get(1).copied()),
        _ => None,
    };
    let mut pass = grad::Grad {
        loss,
        trainable: &trainable,
        shapes: &by_name,
        made: None,
    };
    run_pass(&mut model.graph, &PassContext { opset }, &mut pass).map_err(|e| match e {
        Error::NoGradientPath => Error::Usage(format!(
            "{}: the loss reads output '{output_name}'; choose another with --loss-output",
            Error::NoGradientPath
        )),
        e => e.context("gradient pass"),
    })?;
    let made = pass.made.expect("the pass ran");
    // The training graph's model outputs go after loss and gradients.
    if req.keep_outputs {
        model.graph.rotate_outputs(model_outputs);
    }
    Ok(Training {
        model,
        outcome,
        graph: made,
        input_shapes: shapes,
        request: req.graft.clone(),
        classes,
    })
}
