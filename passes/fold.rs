//! Constant folding for concrete input shapes: every node computable from
//! initializers, constants and input shapes becomes an initializer.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::interp;
use crate::ir::{Def, Graph, Initializer, NodeId, ValueId};
use crate::tensor::Array;

/// Initializers larger than this are never read by the fold (weights stay untouched),
/// and results larger than this are not materialised.
pub const MAX_FOLD_ELEMENTS: usize = 1 << 20;

/// What the fold did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FoldReport {
    /// Nodes evaluated and removed.
    pub folded: usize,
    /// Initializers created for values still read by the rest of the graph.
    pub materialised: usize,
}

/// The pass: folds a graph for the concrete shapes of its inputs (`name -> dims`).
pub struct Fold<'a> {
    /// Concrete input shapes by input name.
    pub input_shapes: &'a HashMap<String, Vec<usize>>,
    /// What it did.
    pub report: FoldReport,
}

impl<'a> Fold<'a> {
    /// The pass for `input_shapes`.
    pub fn new(input_shapes: &'a HashMap<String, Vec<usize>>) -> Fold<'a> {
        Fold {
            input_shapes,
            report: FoldReport::default(),
        }
    }
}

impl super::Pass for Fold<'_> {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn run(&mut self, graph: &mut Graph, _: &super::PassContext) -> Result<()> {
        self.report = fold(graph, self.input_shapes)?;
        Ok(())
    }
}

fn fold(graph: &mut Graph, input_shapes: &HashMap<String, Vec<usize>>) -> Result<FoldReport> {
    let mut known: HashMap<ValueId, Array> = HashMap::new();
    let mut shapes: HashMap<ValueId, Vec<usize>> = HashMap::new();
    for io in graph.inputs() {
        if let Some(shape) = input_shapes.get(&graph.value(io.value).name) {
            shapes.insert(io.value, shape.clone());
        }
    }
    let mut folded: Vec<NodeId> = Vec::new();
    for id in graph.topological_order()? {
        let node = graph.node(id);
        if !matches!(node.domain(), "" | "ai.onnx")
            || !interp::supports(node)
            || !node.captures.is_empty()
        {
            continue;
        }
        let outputs = if matches!(node.op(), "Shape" | "Size") {
            // Shape and Size only need the input's shape.
            let Some(shape) = node.inputs.first().copied().flatten().and_then(|v| {
                shapes.get(&v).cloned().or_else(|| {
                    graph
                        .initializer(v)
                        .map(|i| i.dims().iter().map(|&d| d as usize).collect())
                })
            }) else {
                continue;
            };
            match interp::eval_shape_op(node, &shape) {
                Ok(a) => vec![a],
                Err(_) => continue,
            }
        } else {
            let mut inputs: Vec<Option<Array>> = Vec::with_capacity(node.inputs.len());
            let mut computable = true;
            for input in &node.inputs {
                match input {
                    None => inputs.push(None),
                    Some(v) => match constant_value(graph, *v, &known)? {
                        Some(a) => inputs.push(Some(a)),
                        None => {
                            computable = false;
                            break;
                        }
                    },
                }
            }
            if !computable {
                continue;
            }
            let refs: Vec<Option<&Array>> = inputs.iter().map(Option::as_ref).collect();
            match interp::eval(node, &refs) {
                Ok(outputs) => outputs,
                Err(_) => continue, // left for the runtime, which may know better
            }
        };
        if outputs.len() != node.outputs.len()
            || outputs.iter().any(|o| o.len() > MAX_FOLD_ELEMENTS)
        {
            continue;
        }
        for (v, a) in node.outputs.clone().into_iter().zip(outputs) {
            if let Some(v) = v {
                shapes.insert(v, a.shape().to_vec());
                known.insert(v, a);
            }
        }
        folded.push(id);
    }
    let folded_set: HashSet<NodeId> = folded.iter().copied().collect();
    let mut report = FoldReport::default();
    let mut materialise: Vec<(ValueId, Array)> = Vec::new();
    let mut read_initializers: HashSet<ValueId> = HashSet::new();
    for &id in &folded {
        let node = graph.node(id);
        for v in node.reads() {
            if graph.value(v).def == Def::Initializer {
                read_initializers.insert(v);
            }
        }
        for v in node.outputs.iter().flatten() {
            let needed = graph.is_output(*v)
                || graph
                    .value(*v)
                    .users
                    .iter()
                    .any(|u| !folded_set.contains(u));
            if needed {
                materialise.push((*v, known.remove(v).expect("folded value")));
            }
        }
    }
    for &id in &folded {
        graph.remove_node(id);
        report.folded += 1;
    }
    for (v, a) in materialise {
        let proto = a.to_proto(&graph.value(v).name);
        graph.make_initializer(v, Initializer::new(proto));
        report.materialised += 1;
    }
    for v in read_initializers {
        if graph.value(v).users.is_empty() && !graph.is_output(v) {
            graph.remove_initializer(v);
        }
    }
    Ok(report)
}

/// The value of `v` when it is a known folded value or a small decodable initializer.
fn constant_value(
    graph: &Graph,
    v: ValueId,
    known: &HashMap<ValueId, Array>,
) -> Result<Option<Array>> {
    if let Some(a) = known.get(&v) {
        return Ok(Some(a.clone()));
    }
    let Some(init) = graph.initializer(v) else {
        return Ok(None);
    };
    match crate::dtype::numel(init.dims()) {
        Some(n) if n as usize <= MAX_FOLD_ELEMENTS => {}
        _ => return Ok(None),
    }
    match Array::from_proto(&init.proto, init.raw_bytes()) {
        Ok(a) => Ok(Some(a)),
        Err(crate::tensor::DecodeError::Unsupported(_)) => Ok(None),
        Err(crate::tensor::DecodeError::Inconsistent(reason)) => Err(Error::Graph(format!(
            "initializer '{}': {reason}",
            graph.value(v).name
        ))),
    }
}
