//! The gradient pass: reverse-mode autodiff from a loss to the trainable tensors,
//! emitting default-domain ONNX ops with constant axes and shapes, so the training
//! graph runs on tract and ONNX Runtime alike.
//!
//! Only nodes on a path from a trainable tensor to the loss get gradient code; the
//! rules are a table ([`rules::RULES`]), one line per op, with explicit
//! non-differentiable entries.

mod fused;
pub mod loss;
mod portable;
pub mod rules;

pub use portable::{portable, Rewritten};

use crate::ir::build::{tensor_type, Builder};
use crate::ir::infer::value_dtypes;

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::ir::{Def, Graph, GraphIo, Initializer, NodeId, ValueId};

/// Static shapes of the forward graph's values, by name (from tract, for the
/// training batch and sequence sizes).
pub type Shapes = HashMap<String, Vec<usize>>;

/// What the pass made.
#[derive(Debug, Clone)]
pub struct TrainingGraph {
    /// The scalar loss value (a graph output named `loss`).
    pub loss: String,
    /// `grad.<tensor>` output per trainable tensor, in order.
    pub gradients: Vec<(String, String)>,
    /// Nodes of the forward graph that got gradient code.
    pub differentiated: usize,
}

/// Differentiates `loss` (a scalar value of `graph`) with respect to the initializers
/// `trainable`, which become graph inputs. Adds outputs `loss` and `grad.<name>`.
/// When the loss brings its gradient with respect to its input (`loss.seed`), the pass
/// starts from there.
pub struct Grad<'a> {
    /// The loss (and its own gradient seed, when it brings one).
    pub loss: loss::BuiltLoss,
    /// The tensors to differentiate with respect to.
    pub trainable: &'a [ValueId],
    /// Static shapes of the forward values, by name.
    pub shapes: &'a Shapes,
    /// What it made.
    pub made: Option<TrainingGraph>,
}

impl super::Pass for Grad<'_> {
    fn name(&self) -> &'static str {
        "grad"
    }

    fn run(&mut self, graph: &mut Graph, cx: &super::PassContext) -> Result<()> {
        self.made = Some(differentiate(
            graph,
            cx.opset,
            self.loss,
            self.trainable,
            self.shapes,
        )?);
        Ok(())
    }
}

fn differentiate(
    graph: &mut Graph,
    opset: i64,
    loss: loss::BuiltLoss,
    trainable: &[ValueId],
    shapes: &Shapes,
) -> Result<TrainingGraph> {
    let (root, seed) = match loss.seed {
        Some((x, dx)) => (x, Some(dx)),
        None => (loss.loss, None),
    };
    let loss = loss.loss;
    // Shapes by value id.
    let mut by_id: HashMap<ValueId, Vec<usize>> = HashMap::new();
    for v in graph.value_ids() {
        let value = graph.value(v);
        if let Some(s) = shapes.get(&value.name) {
            by_id.insert(v, s.clone());
        } else if let Some(init) = &value.init {
            by_id.insert(v, init.dims().iter().map(|&d| d as usize).collect());
        }
    }
    let dtype = trainable
        .first()
        .and_then(|&t| graph.initializer(t))
        .map(|i| i.elem_type())
        .unwrap_or(crate::proto::tensor_proto::DataType::Float as i32);

    // Nodes on a path from a trainable tensor to the loss.
    let order = graph.topological_order()?;
    let mut from_trainable: HashSet<ValueId> = trainable.iter().copied().collect();
    for &id in &order {
        let node = graph.node(id);
        if rules::NO_GRADIENT.contains(&node.op()) || crate::ir::build::stops_gradient(node) {
            continue;
        }
        if node.reads().any(|v| from_trainable.contains(&v)) {
            from_trainable.extend(node.outputs.iter().flatten().copied());
        }
    }
    let mut to_loss: HashSet<ValueId> = HashSet::from([root]);
    for &id in order.iter().rev() {
        let node = graph.node(id);
        if node.outputs.iter().flatten().any(|o| to_loss.contains(o)) {
            to_loss.extend(node.reads());
        }
    }
    let on_path = |v: ValueId| from_trainable.contains(&v) && to_loss.contains(&v);
    if !on_path(root) {
        return Err(Error::NoGradientPath);
    }
    let path: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|&id| graph.node(id).outputs.iter().flatten().any(|&o| on_path(o)))
        .collect();

    let dtypes = value_dtypes(graph)?;
    let loss_dtype = dtypes.get(&loss).copied().unwrap_or(dtype);
    let mut emit = Builder::new(graph, opset, loss_dtype, "grad".into(), '/');
    emit.shapes = by_id;
    emit.dtypes = dtypes;
    let mut grads: HashMap<ValueId, ValueId> = HashMap::new();
    emit.prefix = "grad/seed".into();
    let seed = match seed {
        Some(dx) => dx,
        None => emit.scalar("c", 1.0),
    };
    grads.insert(root, seed);
    for &id in path.iter().rev() {
        let node = emit.graph.node(id).clone();
        let out_grads: Vec<Option<ValueId>> = node
            .outputs
            .iter()
            .map(|o| o.and_then(|o| grads.get(&o).copied()))
            .collect();
        if out_grads.iter().all(Option::is_none) {
            continue;
        }
        let wanted: Vec<bool> = node.inputs.iter().map(|i| i.is_some_and(on_path)).collect();
        if !wanted.iter().any(|&w| w) {
            continue;
        }
        emit.prefix = format!(
            "grad/{}",
            if node.name().is_empty() {
                node.op()
            } else {
                node.name()
            }
        );
        // An RMS norm's `x·r`: the fused rule gives x its gradient through both factors,
        // so r's chain gets none from here (other readers of r still give it theirs).
        if let (Some(norm), Some(g)) = (fused::rms_norm(&emit, &node), out_grads[0]) {
            if wanted[norm.x_slot] {
                let dx = fused::rms_norm_grad(&mut emit, norm, g)?;
                add_gradient(&mut emit, &mut grads, norm.x, dx)?;
                continue;
            }
        }
        // A SwiGLU gate whose silu input wants a gradient: the fused rule gives the
        // gate's input its gradient directly, so the silu and sigmoid nodes get none
        // from here (and their outputs are not kept for the backward).
        if let (Some(gate), Some(g)) = (fused::swiglu(&emit, &node), out_grads[0]) {
            if wanted[1 - gate.up_slot] {
                let (dx, dup) = fused::swiglu_grad(&mut emit, gate, g)?;
                add_gradient(&mut emit, &mut grads, gate.x, dx)?;
                if wanted[gate.up_slot] {
                    add_gradient(&mut emit, &mut grads, gate.up, dup)?;
                }
                continue;
            }
        }
        let rule = rules::rule(&node).ok_or_else(|| Error::Node {
            node: node.name().to_string(),
            op: node.op().to_string(),
            reason: "no gradient rule for this op (it lies between the adapter and the loss)"
                .into(),
        })?;
        // Gradients made for this node have its output's type.
        if let Some(&t) = node.outputs[0].and_then(|o| emit.dtypes.get(&o)) {
            emit.dtype = t;
        }
        let input_grads = rule(&mut emit, &node, &out_grads, &wanted).map_err(|e| match e {
            Error::Node { .. } => e,
            other => Error::Node {
                node: node.name().to_string(),
                op: node.op().to_string(),
                reason: other.to_string(),
            },
        })?;
        for (slot, g) in input_grads.into_iter().enumerate() {
            let (Some(g), Some(input)) = (g, node.inputs.get(slot).copied().flatten()) else {
                continue;
            };
            if !wanted[slot] {
                continue;
            }
            add_gradient(&mut emit, &mut grads, input, g)?;
        }
    }

    // Trainable initializers become inputs; gradients and the loss become outputs.
    let graph = emit.graph;
    graph_output(graph, loss, "loss", loss_dtype, &[])?;
    let mut gradients = Vec::new();
    for &t in trainable {
        let name = graph.value(t).name.clone();
        let g = match grads.get(&t) {
            Some(&g) => g,
            None => {
                let shape = emit.shapes.get(&t).cloned().unwrap_or_default();
                let mut e = Builder::new(graph, opset, dtype, format!("grad/{name}"), '/');
                e.shapes.insert(t, shape.clone());
                let z = e.zeros(&shape)?;
                graph_output(e.graph, z, &format!("grad.{name}"), dtype, &shape)?;
                gradients.push((name.clone(), format!("grad.{name}")));
                let init = e.graph.initializer(t).cloned();
                make_input(e.graph, t, init, dtype);
                continue;
            }
        };
        let shape = emit.shapes.get(&t).cloned().unwrap_or_default();
        graph_output(graph, g, &format!("grad.{name}"), dtype, &shape)?;
        gradients.push((name.clone(), format!("grad.{name}")));
        let init = graph.initializer(t).cloned();
        make_input(graph, t, init, dtype);
    }
    Ok(TrainingGraph {
        loss: "loss".into(),
        gradients,
        differentiated: path.len(),
    })
}

/// Adds `g` to the gradient of `v` gathered so far.
fn add_gradient(
    emit: &mut Builder,
    grads: &mut HashMap<ValueId, ValueId>,
    v: ValueId,
    g: ValueId,
) -> Result<()> {
    let total = match grads.get(&v) {
        Some(&prev) => emit.bin("Add", prev, g)?,
        None => g,
    };
    grads.insert(v, total);
    Ok(())
}

/// Exposes `v` as a graph output called `name` (through an Identity when `v` has
/// another name already).
fn graph_output(
    graph: &mut Graph,
    v: ValueId,
    name: &str,
    dtype: i32,
    shape: &[usize],
) -> Result<()> {
    let out = if graph.value(v).name == name {
        v
    } else {
        let out = graph.new_value(name);
        if graph.value(out).name != name {
            return Err(Error::Usage(format!(
                "the model already has a value named '{name}'"
            )));
        }
        let proto = crate::proto::NodeProto {
            name: Some(graph.fresh_node_name(&format!("{name}/Identity"))),
            op_type: Some("Identity".into()),
            ..Default::default()
        };
        graph.add_node(proto, vec![Some(v)], vec![Some(out)])?;
        out
    };
    let info = crate::proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(tensor_type(dtype, shape)),
        ..Default::default()
    };
    graph.add_output(GraphIo { value: out, info });
    Ok(())
}

/// Turns the initializer `t` into a graph input of the same type.
pub fn make_input(graph: &mut Graph, t: ValueId, init: Option<Initializer>, dtype: i32) {
    let shape: Vec<usize> = init
        .as_ref()
        .map(|i| i.dims().iter().map(|&d| d as usize).collect())
        .unwrap_or_default();
    let dtype = init.as_ref().map(|i| i.elem_type()).unwrap_or(dtype);
    graph.initializer_to_input(t);
    let info = crate::proto::ValueInfoProto {
        name: Some(graph.value(t).name.clone()),
        r#type: Some(tensor_type(dtype, &shape)),
        ..Default::default()
    };
    graph.add_input(GraphIo { value: t, info });
    debug_assert_eq!(graph.value(t).def, Def::Input);
}
