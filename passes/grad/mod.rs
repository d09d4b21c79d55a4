//! The gradient pass: reverse-mode autodiff from a loss to the trainable tensors,
//! emitting default-domain ONNX ops with constant axes and shapes, so the training
//! graph runs on tract and ONNX Runtime alike.
//!
//! Only nodes on a path from a trainable tensor to the loss get gradient code; the
//! rules are a table ([`rules::RULES`]), one line per op, with explicit
//! non-differentiable entries.

pub mod loss;
pub mod rules;

use std::collections::{HashMap, HashSet};

use tract_core::ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::ir::{Def, Graph, GraphIo, Initializer, NodeId, ValueId};
use crate::proto::AttributeProto;
use crate::tensor::Array;

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

/// Emits nodes with static shapes for one graph; the rules' toolbox.
pub struct Emit<'g> {
    /// The graph being extended.
    pub graph: &'g mut Graph,
    /// Default-domain opset (decides attribute-or-input forms).
    pub opset: i64,
    /// Static shapes, by value (forward values from tract, gradient values as made).
    pub shapes: HashMap<ValueId, Vec<usize>>,
    /// Element type of the gradients being made (the float type of the node being
    /// differentiated: a gradient has its value's type).
    pub dtype: i32,
    /// Element types of the forward values (see [`value_dtypes`]).
    pub dtypes: HashMap<ValueId, i32>,
    /// Node name prefix of the node being differentiated.
    pub prefix: String,
}

pub use crate::passes::variants::{int_attr, ints_attr};

impl Emit<'_> {
    /// The static shape of `v`; an error names the value when tract gave none.
    pub fn shape(&self, v: ValueId) -> Result<Vec<usize>> {
        if let Some(s) = self.shapes.get(&v) {
            return Ok(s.clone());
        }
        // Values computed from initializers alone (a weight through a Transpose) are
        // folded away before tract sees the model: evaluate them here.
        crate::interp::evaluate(self.graph, v)
            .map(|a| a.shape().to_vec())
            .map_err(|_| {
                Error::Graph(format!(
                    "no static shape for '{}' (needed by the gradient pass)",
                    self.graph.value(v).name
                ))
            })
    }

    /// `op(inputs)` with one output of shape `shape`.
    pub fn op(
        &mut self,
        op: &str,
        inputs: &[ValueId],
        attrs: Vec<AttributeProto>,
        shape: Vec<usize>,
    ) -> Result<ValueId> {
        let name = format!("{}/{op}", self.prefix);
        let out = self.graph.add_op(op, &name, inputs, attrs, 1)?.1[0];
        self.shapes.insert(out, shape);
        Ok(out)
    }

    /// A float constant of the gradient dtype.
    pub fn scalar(&mut self, v: f64) -> ValueId {
        let a = Array::from_f32(ArrayD::from_elem(IxDyn(&[]), v as f32), self.dtype)
            .expect("float dtype");
        let id = self.graph.add_initializer(
            &format!("{}/c", self.prefix),
            Initializer::new(a.to_proto("")),
        );
        self.shapes.insert(id, vec![]);
        id
    }

    /// An int64 1-D constant.
    pub fn ints(&mut self, values: &[i64]) -> ValueId {
        let a =
            Array::I64(ArrayD::from_shape_vec(IxDyn(&[values.len()]), values.to_vec()).unwrap());
        let id = self.graph.add_initializer(
            &format!("{}/i", self.prefix),
            Initializer::new(a.to_proto("")),
        );
        self.shapes.insert(id, vec![values.len()]);
        id
    }

    /// Zeros of `shape` in the gradient dtype.
    pub fn zeros(&mut self, shape: &[usize]) -> Result<ValueId> {
        let z = self.scalar(0.0);
        let s = self.ints(&shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
        self.op("Expand", &[z, s], vec![], shape.to_vec())
    }

    /// Elementwise binary op with numpy broadcasting.
    pub fn bin(&mut self, op: &str, a: ValueId, b: ValueId) -> Result<ValueId> {
        let shape = broadcast(&self.shape(a)?, &self.shape(b)?);
        self.op(op, &[a, b], vec![], shape)
    }

    /// Elementwise unary op.
    pub fn un(&mut self, op: &str, a: ValueId) -> Result<ValueId> {
        let shape = self.shape(a)?;
        self.op(op, &[a], vec![], shape)
    }

    /// `Reshape(x, shape)`.
    pub fn reshape(&mut self, x: ValueId, shape: &[usize]) -> Result<ValueId> {
        if self.shape(x)? == shape {
            return Ok(x);
        }
        let s = self.ints(&shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
        self.op("Reshape", &[x, s], vec![], shape.to_vec())
    }

    /// `Transpose(x, perm)`.
    pub fn transpose(&mut self, x: ValueId, perm: &[usize]) -> Result<ValueId> {
        let s = self.shape(x)?;
        let shape = perm.iter().map(|&p| s[p]).collect();
        let perm: Vec<i64> = perm.iter().map(|&p| p as i64).collect();
        self.op("Transpose", &[x], vec![ints_attr("perm", &perm)], shape)
    }

    /// `ReduceSum(x, axes, keepdims)` (axes as an input from opset 13).
    pub fn reduce_sum(&mut self, x: ValueId, axes: &[usize], keepdims: bool) -> Result<ValueId> {
        self.reduce("ReduceSum", x, axes, keepdims)
    }

    /// `op(x, axes, keepdims)` for a Reduce op (axes as an input from opset 13 for
    /// ReduceSum, from opset 18 for the others).
    pub fn reduce(
        &mut self,
        op: &str,
        x: ValueId,
        axes: &[usize],
        keepdims: bool,
    ) -> Result<ValueId> {
        let s = self.shape(x)?;
        if axes.is_empty() {
            return Ok(x);
        }
        let shape: Vec<usize> = s
            .iter()
            .enumerate()
            .filter_map(|(i, &d)| {
                if axes.contains(&i) {
                    keepdims.then_some(1)
                } else {
                    Some(d)
                }
            })
            .collect();
        let ax: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
        let keep = int_attr("keepdims", keepdims as i64);
        let axes_as_input = if op == "ReduceSum" { 13 } else { 18 };
        if self.opset >= axes_as_input {
            let a = self.ints(&ax);
            self.op(op, &[x, a], vec![keep], shape)
        } else {
            self.op(op, &[x], vec![keep, ints_attr("axes", &ax)], shape)
        }
    }

    /// Sums `g` down to `shape` (undoes numpy broadcasting).
    pub fn unbroadcast(&mut self, g: ValueId, shape: &[usize]) -> Result<ValueId> {
        let gs = self.shape(g)?;
        if gs == shape {
            return Ok(g);
        }
        let extra = gs.len() - shape.len();
        let axes: Vec<usize> = (0..gs.len())
            .filter(|&i| i < extra || (shape[i - extra] == 1 && gs[i] != 1))
            .collect();
        let summed = self.reduce_sum(g, &axes, true)?;
        self.reshape(summed, shape)
    }

    /// `Expand(x, shape)`.
    pub fn expand(&mut self, x: ValueId, shape: &[usize]) -> Result<ValueId> {
        if self.shape(x)? == shape {
            return Ok(x);
        }
        let s = self.ints(&shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
        self.op("Expand", &[x, s], vec![], shape.to_vec())
    }

    /// A float 0/1 mask of `cond` (a bool value), in the gradient dtype.
    pub fn mask(&mut self, cond: ValueId) -> Result<ValueId> {
        let shape = self.shape(cond)?;
        self.op(
            "Cast",
            &[cond],
            vec![int_attr("to", self.dtype as i64)],
            shape,
        )
    }
}

/// Numpy broadcast of two shapes (compatible: the forward graph ran; if not, the
/// larger per axis, and tract reports the mismatch when it loads the graph).
pub fn broadcast(a: &[usize], b: &[usize]) -> Vec<usize> {
    crate::interp::broadcast_shape(a, b).unwrap_or_else(|_| {
        let n = a.len().max(b.len());
        let dim = |s: &[usize], i: usize| {
            if i + s.len() >= n {
                s[i + s.len() - n]
            } else {
                1
            }
        };
        (0..n).map(|i| dim(a, i).max(dim(b, i))).collect()
    })
}

/// Differentiates `loss` (a scalar value of `graph`) with respect to the initializers
/// `trainable`, which become graph inputs. Adds outputs `loss` and `grad.<name>`.
/// When the loss brings its gradient with respect to its input (`loss.seed`), the pass
/// starts from there.
pub fn run(
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
        if rules::NO_GRADIENT.contains(&node.op()) {
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
        return Err(Error::Usage(
            "the loss does not depend on any trainable tensor".into(),
        ));
    }
    let path: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|&id| graph.node(id).outputs.iter().flatten().any(|&o| on_path(o)))
        .collect();

    let dtypes = value_dtypes(graph)?;
    let loss_dtype = dtypes.get(&loss).copied().unwrap_or(dtype);
    let mut emit = Emit {
        graph,
        opset,
        shapes: by_id,
        dtype: loss_dtype,
        dtypes,
        prefix: "grad".into(),
    };
    let mut grads: HashMap<ValueId, ValueId> = HashMap::new();
    emit.prefix = "grad/seed".into();
    let seed = match seed {
        Some(dx) => dx,
        None => emit.scalar(1.0),
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
        let rule = rules::rule(&node).ok_or_else(|| Error::Node {
            node: node.name().to_string(),
            op: node.op().to_string(),
            reason: match rules::UNSUPPORTED.iter().find(|(op, _)| *op == node.op()) {
                Some((_, why)) => format!("no gradient rule: {why}"),
                None => {
                    "no gradient rule for this op (it lies between the adapter and the loss)".into()
                }
            },
        })?;
        // Gradients made for this node have its output's type.
        if let Some(&t) = node.outputs[0].and_then(|o| emit.dtypes.get(&o)) {
            emit.dtype = t;
        }
        emit.prefix = format!(
            "grad/{}",
            if node.name().is_empty() {
                node.op()
            } else {
                node.name()
            }
        );
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
            let total = match grads.get(&input) {
                Some(&prev) => emit.bin("Add", prev, g)?,
                None => g,
            };
            grads.insert(input, total);
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
                let mut e = Emit {
                    graph,
                    opset,
                    shapes: HashMap::from([(t, shape.clone())]),
                    dtype,
                    dtypes: HashMap::new(),
                    prefix: format!("grad/{name}"),
                };
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
    graph.validate().map_err(|e| e.context("grad"))?;
    Ok(TrainingGraph {
        loss: "loss".into(),
        gradients,
        differentiated: path.len(),
    })
}

/// The element type of every value, propagated from the initializers and the graph
/// inputs: a Cast gives its `to`, comparisons give bool, Shape and the like int64, Where
/// its second input's type, and any other op the type of its first typed input (enough for the float values on a
/// gradient path, whose types ONNX requires to agree).
pub fn value_dtypes(graph: &Graph) -> Result<HashMap<ValueId, i32>> {
    use crate::proto::tensor_proto::DataType as D;
    let mut types: HashMap<ValueId, i32> = HashMap::new();
    for (v, init) in graph.initializers() {
        types.insert(v, init.elem_type());
    }
    for io in &graph.inputs {
        if let Some(crate::proto::type_proto::Value::TensorType(t)) =
            io.info.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            types.insert(io.value, t.elem_type());
        }
    }
    for id in graph.topological_order()? {
        let node = graph.node(id);
        let typed = |i: usize| {
            node.inputs
                .get(i)
                .copied()
                .flatten()
                .and_then(|v| types.get(&v).copied())
        };
        let first = typed(0).or_else(|| (1..node.inputs.len()).find_map(typed));
        let ty = match node.op() {
            "Where" => typed(1),
            "Cast" => Some(node.attr_int("to", 1) as i32),
            "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And"
            | "Or" | "Xor" | "IsNaN" | "IsInf" => Some(D::Bool as i32),
            "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" => Some(D::Int64 as i32),
            "ConstantOfShape" | "Constant" => None,
            _ => first,
        };
        for &o in node.outputs.iter().flatten() {
            if let Some(t) = ty {
                types.entry(o).or_insert(t);
            }
        }
    }
    Ok(types)
}

/// A tensor type proto of `dtype` and static `shape`.
pub fn tensor_type(dtype: i32, shape: &[usize]) -> crate::proto::TypeProto {
    use crate::proto::tensor_shape_proto::{dimension::Value as Dim, Dimension};
    use crate::proto::{type_proto, TensorShapeProto, TypeProto};
    TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(dtype),
            shape: Some(TensorShapeProto {
                dim: shape
                    .iter()
                    .map(|&d| Dimension {
                        value: Some(Dim::DimValue(d as i64)),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    }
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
    graph.outputs.push(GraphIo { value: out, info });
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
    graph.inputs.push(GraphIo { value: t, info });
    debug_assert_eq!(graph.value(t).def, Def::Input);
}
