//! The one element-type inference: the type of every value of a graph, from the
//! initializers and typed graph inputs forward through one rule per op.

use std::collections::HashMap;

use crate::error::Result;
use crate::ir::{Graph, Node, ValueId};
use crate::proto::tensor_proto::DataType;

/// The element type of `v` when it is declared: an initializer or a typed graph input.
pub fn declared_type(graph: &Graph, v: ValueId) -> Option<i32> {
    if let Some(init) = graph.initializer(v) {
        return Some(init.elem_type());
    }
    let io = graph.inputs.iter().find(|io| io.value == v)?;
    match io.info.r#type.as_ref()?.value.as_ref()? {
        crate::proto::type_proto::Value::TensorType(t) => Some(t.elem_type()),
        _ => None,
    }
}

/// The element type of `node`'s outputs, given its inputs' types (`typed(slot)`):
/// a Cast gives its `to`, a Constant its value's type, comparisons and logic bool,
/// Shape and the like int64, Where its second input's type, DequantizeLinear its
/// scale's type, and any other op the type of its first typed input (ONNX requires
/// the float operands of an op to agree).
pub fn output_dtype(node: &Node, typed: impl Fn(usize) -> Option<i32>) -> Option<i32> {
    let first = || typed(0).or_else(|| (1..node.inputs.len()).find_map(&typed));
    match node.op() {
        "Where" => typed(1),
        "DequantizeLinear" => typed(1),
        "Cast" => Some(node.attr_int("to", DataType::Float as i64) as i32),
        "Constant" => node
            .attr("value")
            .and_then(|a| a.t.as_ref())
            .map(|t| t.data_type()),
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And" | "Or"
        | "Xor" | "IsNaN" | "IsInf" => Some(DataType::Bool as i32),
        "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" => Some(DataType::Int64 as i32),
        "ConstantOfShape" => None,
        _ => first(),
    }
}

/// The element type of every value whose type follows from the declared ones.
pub fn value_dtypes(graph: &Graph) -> Result<HashMap<ValueId, i32>> {
    let mut types: HashMap<ValueId, i32> = HashMap::new();
    for (v, init) in graph.initializers() {
        types.insert(v, init.elem_type());
    }
    for io in &graph.inputs {
        if let Some(t) = declared_type(graph, io.value) {
            types.entry(io.value).or_insert(t);
        }
    }
    for id in graph.topological_order()? {
        let node = graph.node(id);
        let ty = output_dtype(node, |i| {
            node.inputs
                .get(i)
                .copied()
                .flatten()
                .and_then(|v| types.get(&v).copied())
        });
        if let Some(t) = ty {
            for &o in node.outputs.iter().flatten() {
                types.entry(o).or_insert(t);
            }
        }
    }
    Ok(types)
}

/// The rank of `v` where the graph tells it: declared (an initializer, a graph input
/// with a shape), or followed back through ops whose output rank their inputs' give
/// (elementwise ops, casts, reductions, Unsqueeze and Squeeze with constant axes, and
/// `EmbedLayerNormalization`'s 1-D mask index). `None` when that is not known.
pub fn rank(graph: &Graph, v: ValueId) -> Option<usize> {
    if let Some(init) = graph.initializer(v) {
        return Some(init.dims().len());
    }
    if let Some(io) = graph.inputs.iter().find(|io| io.value == v) {
        return match io.info.r#type.as_ref()?.value.as_ref()? {
            crate::proto::type_proto::Value::TensorType(t) => Some(t.shape.as_ref()?.dim.len()),
            _ => None,
        };
    }
    let crate::ir::Def::Node(n, slot) = graph.value(v).def else {
        return None;
    };
    let node = graph.node(n);
    let input = |i: usize| rank(graph, node.inputs.get(i).copied().flatten()?);
    // The number of axes a node names, by attribute or constant input 1.
    let axes = || {
        node.attr_ints("axes").map(<[i64]>::len).or_else(|| {
            let a = node.inputs.get(1).copied().flatten()?;
            graph
                .initializer(a)
                .map(|i| i.dims().iter().product::<i64>() as usize)
        })
    };
    match node.op() {
        "EmbedLayerNormalization" if slot == 1 => Some(1),
        "Cast" | "Identity" | "Not" | "Neg" | "Abs" | "Relu" | "Sigmoid" | "Tanh" | "Erf"
        | "Sqrt" | "Exp" | "Log" | "Softmax" => input(0),
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Less" | "Greater" | "LessOrEqual"
        | "GreaterOrEqual" | "And" | "Or" | "Xor" | "Where" | "Max" | "Min" => {
            (0..node.inputs.len())
                .map(input)
                .collect::<Option<Vec<usize>>>()?
                .into_iter()
                .max()
        }
        op if op.starts_with("Reduce") => {
            if node.attr_int("keepdims", 1) != 0 {
                input(0)
            } else {
                input(0)?.checked_sub(axes()?)
            }
        }
        "Unsqueeze" => Some(input(0)? + axes()?),
        "Squeeze" => input(0)?.checked_sub(axes()?),
        _ => None,
    }
}
