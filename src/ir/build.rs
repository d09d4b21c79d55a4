//! The one node builder: every pass that adds nodes (variants' branches, losses, the
//! gradient rules) adds them through [`Builder`], which names nodes and constants under
//! one prefix, picks the attribute-or-input form of an op for the model's opset, and
//! tracks the static shapes of what it makes when they are known.

use std::collections::HashMap;

use tract_core::ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::ir::{Graph, Initializer, ValueId};
use crate::proto::{attribute_proto::AttributeType, AttributeProto};
use crate::tensor::Array;

/// Adds nodes and constants to one graph under a name prefix.
pub struct Builder<'g> {
    /// The graph being extended.
    pub graph: &'g mut Graph,
    /// Default-domain opset of the model (decides attribute-or-input forms).
    pub opset: i64,
    /// Element type of the float constants made (the computation's type).
    pub dtype: i32,
    /// Node and constant name prefix, e.g. `model.layers.0.self_attn.q_proj.lora`.
    pub prefix: String,
    /// Separator between the prefix and a node's op or a constant's tag.
    pub sep: char,
    /// Static shapes, by value (known ones: given, or made here with a shape).
    pub shapes: HashMap<ValueId, Vec<usize>>,
    /// Element types of values, where known (see [`crate::ir::infer::value_dtypes`]).
    pub dtypes: HashMap<ValueId, i32>,
}

impl<'g> Builder<'g> {
    /// A builder with no known shapes or types.
    pub fn new(graph: &'g mut Graph, opset: i64, dtype: i32, prefix: String, sep: char) -> Self {
        Builder {
            graph,
            opset,
            dtype,
            prefix,
            sep,
            shapes: HashMap::new(),
            dtypes: HashMap::new(),
        }
    }

    /// Adds `op(inputs)` with `attributes` and one output; returns the output.
    pub fn op(
        &mut self,
        op: &str,
        inputs: &[ValueId],
        attributes: Vec<AttributeProto>,
    ) -> Result<ValueId> {
        let name = format!("{}{}{op}", self.prefix, self.sep);
        Ok(self.graph.add_op(op, &name, inputs, attributes, 1)?.1[0])
    }

    /// [`Builder::op`] whose output has the static shape `shape`.
    pub fn op_shaped(
        &mut self,
        op: &str,
        inputs: &[ValueId],
        attributes: Vec<AttributeProto>,
        shape: Vec<usize>,
    ) -> Result<ValueId> {
        let out = self.op(op, inputs, attributes)?;
        self.shapes.insert(out, shape);
        Ok(out)
    }

    /// The static shape of `v`; an error names the value when none is known.
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

    /// The element type of `v`: known, else its initializer's, else the builder's.
    pub fn dtype_of(&self, v: ValueId) -> i32 {
        self.dtypes
            .get(&v)
            .copied()
            .or_else(|| self.graph.initializer(v).map(|i| i.elem_type()))
            .unwrap_or(self.dtype)
    }

    /// A scalar constant in the builder's dtype, named `<prefix><sep><tag>`.
    pub fn scalar(&mut self, tag: &str, v: f64) -> ValueId {
        let a = Array::from_f32(ArrayD::from_elem(IxDyn(&[]), v as f32), self.dtype)
            .expect("float dtype");
        let id = self.constant(tag, &a);
        self.shapes.insert(id, vec![]);
        id
    }

    /// A constant of `shape` in the builder's dtype, named `<prefix><sep><tag>`.
    pub fn floats(&mut self, tag: &str, shape: &[usize], values: &[f64]) -> ValueId {
        let values = values.iter().map(|&v| v as f32).collect();
        let a = ArrayD::from_shape_vec(IxDyn(shape), values).expect("shape");
        let a = Array::from_f32(a, self.dtype).expect("float dtype");
        let id = self.constant(tag, &a);
        self.shapes.insert(id, shape.to_vec());
        id
    }

    /// An int64 1-D constant, named `<prefix><sep><tag>`.
    pub fn ints(&mut self, tag: &str, values: &[i64]) -> ValueId {
        let a = Array::I64(
            ArrayD::from_shape_vec(IxDyn(&[values.len()]), values.to_vec()).expect("1-D"),
        );
        let id = self.constant(tag, &a);
        self.shapes.insert(id, vec![values.len()]);
        id
    }

    fn constant(&mut self, tag: &str, a: &Array) -> ValueId {
        let name = format!("{}{}{tag}", self.prefix, self.sep);
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

    /// `op(x, axes, keepdims)` for a Reduce op, with axes as an input from opset 13 for
    /// ReduceSum and from opset 18 for the others; the axes constant is tagged
    /// `axes_tag`, and the output gets `shape` when given.
    pub fn reduce_op(
        &mut self,
        op: &str,
        x: ValueId,
        axes: &[i64],
        keepdims: bool,
        axes_tag: &str,
        shape: Option<Vec<usize>>,
    ) -> Result<ValueId> {
        let keep = int_attr("keepdims", keepdims as i64);
        let axes_as_input = if op == "ReduceSum" { 13 } else { 18 };
        let out = if self.opset >= axes_as_input {
            let a = self.ints(axes_tag, axes);
            self.op(op, &[x, a], vec![keep])?
        } else {
            self.op(op, &[x], vec![keep, ints_attr("axes", axes)])?
        };
        if let Some(shape) = shape {
            self.shapes.insert(out, shape);
        }
        Ok(out)
    }

    /// `ReduceSumSquare(x, axes, keepdims=0)`.
    pub fn reduce_sum_square(&mut self, x: ValueId, axes: &[i64]) -> Result<ValueId> {
        self.reduce_op("ReduceSumSquare", x, axes, false, "axes", None)
    }

    /// `x`, held constant by the gradient pass (PyTorch's `detach`): an `Identity`
    /// marked with the node metadata [`STOP_GRADIENT`]; runtimes see a plain Identity.
    pub fn stop_gradient(&mut self, x: ValueId) -> Result<ValueId> {
        let name = format!("{}{}StopGradient", self.prefix, self.sep);
        let (node, outs) = self.graph.add_op("Identity", &name, &[x], vec![], 1)?;
        self.graph
            .node_mut(node)
            .proto
            .metadata_props
            .push(crate::proto::StringStringEntryProto {
                key: Some(STOP_GRADIENT.into()),
                value: Some("true".into()),
            });
        Ok(outs[0])
    }
}

/// The node metadata key that marks an `Identity` as a stop-gradient.
pub const STOP_GRADIENT: &str = "lora_graft.stop_gradient";

/// Whether `node` is a stop-gradient made by [`Builder::stop_gradient`].
pub fn stops_gradient(node: &crate::ir::Node) -> bool {
    node.op() == "Identity"
        && node
            .proto
            .metadata_props
            .iter()
            .any(|m| m.key() == STOP_GRADIENT)
}

/// Shape-aware helpers (the gradient rules' toolbox): every output gets its static shape.
impl Builder<'_> {
    /// Zeros of `shape` in the gradient dtype.
    pub fn zeros(&mut self, shape: &[usize]) -> Result<ValueId> {
        let z = self.scalar("c", 0.0);
        let s = self.ints("i", &shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
        self.op_shaped("Expand", &[z, s], vec![], shape.to_vec())
    }

    /// Elementwise binary op with numpy broadcasting.
    pub fn bin(&mut self, op: &str, a: ValueId, b: ValueId) -> Result<ValueId> {
        let shape = broadcast(&self.shape(a)?, &self.shape(b)?);
        self.op_shaped(op, &[a, b], vec![], shape)
    }

    /// Elementwise unary op.
    pub fn un(&mut self, op: &str, a: ValueId) -> Result<ValueId> {
        let shape = self.shape(a)?;
        self.op_shaped(op, &[a], vec![], shape)
    }

    /// `Reshape(x, shape)`.
    pub fn reshape(&mut self, x: ValueId, shape: &[usize]) -> Result<ValueId> {
        if self.shape(x)? == shape {
            return Ok(x);
        }
        let s = self.ints("i", &shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
        self.op_shaped("Reshape", &[x, s], vec![], shape.to_vec())
    }

    /// `Transpose(x, perm)`.
    pub fn transpose(&mut self, x: ValueId, perm: &[usize]) -> Result<ValueId> {
        let s = self.shape(x)?;
        let shape = perm.iter().map(|&p| s[p]).collect();
        let perm: Vec<i64> = perm.iter().map(|&p| p as i64).collect();
        self.op_shaped("Transpose", &[x], vec![ints_attr("perm", &perm)], shape)
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
        self.reduce_op(op, x, &ax, keepdims, "i", Some(shape))
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
        let s = self.ints("i", &shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
        self.op_shaped("Expand", &[x, s], vec![], shape.to_vec())
    }

    /// A float 0/1 mask of `cond` (a bool value), in the gradient dtype.
    pub fn mask(&mut self, cond: ValueId) -> Result<ValueId> {
        let shape = self.shape(cond)?;
        self.op_shaped(
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

/// A string attribute.
pub fn string_attr(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        s: Some(v.as_bytes().to_vec()),
        r#type: Some(AttributeType::String as i32),
        ..Default::default()
    }
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
