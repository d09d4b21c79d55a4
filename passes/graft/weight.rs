//! A target's weight: read as the effective f32 matrix through its chain of layout and
//! dequantization ops, and rewritten (a merge, PiSSA served on `W_res`) in its own layout and
//! dtype; and the torch <-> ONNX layout of adapter tensors.

use super::*;

/// Rounds f32 values to the precision of `dtype` (identity for float32).
pub fn rounding(dtype: i32) -> impl Fn(&mut ArrayD<f32>) {
    move |a: &mut ArrayD<f32>| {
        if dtype != DataType::Float as i32 {
            if let Some(r) = Array::from_f32(a.clone(), dtype) {
                *a = r.to_f32();
            }
        }
    }
}

/// A torch-layout tensor in ONNX layout: every 2-D tensor transposed.
pub fn onnx_layout(a: &ArrayD<f32>) -> ArrayD<f32> {
    if a.ndim() == 2 {
        a.t().as_standard_layout().to_owned()
    } else {
        a.clone()
    }
}

/// The effective weight of `t` in torch layout `[d_out, d_in]`, f32, Gemm's alpha folded in.
pub fn effective_weight(graph: &Graph, t: &Target) -> Result<Array2<f32>> {
    let node = graph.node(t.node);
    if t.layout == Layout::Packed {
        // MatMulNBits: [N, K] is the torch layout.
        return crate::quant::dequantize_nbits(graph, node).map_err(|reason| Error::Node {
            node: t.node_name.clone(),
            op: t.op.clone(),
            reason: format!("cannot dequantize the weight: {reason}"),
        });
    }
    let w = node.inputs[1].expect("weight input");
    let a = crate::interp::evaluate(graph, w).map_err(|e| Error::Node {
        node: t.node_name.clone(),
        op: t.op.clone(),
        reason: format!("cannot read the weight: {e}"),
    })?;
    if let Some(init) = graph.initializer(t.weight) {
        init.release_pages();
    }
    let m: Array2<f32> = a
        .into_f32()
        .into_dimensionality()
        .map_err(|_| Error::Node {
            node: t.node_name.clone(),
            op: t.op.clone(),
            reason: "the weight is not 2-D".into(),
        })?;
    let torch = match t.layout {
        Layout::OutIn if t.op == "Gemm" => m,
        // MatMul sees [d_in, d_out] whatever the chain did; Gemm transB=0 too.
        // A transposed view of the same buffer: no copy, and the stored layout's
        // contiguous rows stay contiguous for whoever reads them.
        _ => m.reversed_axes(),
    };
    Ok(if t.alpha != 1.0 {
        torch * t.alpha
    } else {
        torch
    })
}

/// When the weight of `group` reaches its nodes through Transpose and float Cast nodes
/// only, each read by nothing else, the number of Transposes on the way.
fn private_chain(graph: &Graph, group: &[&Target]) -> Option<usize> {
    let in_group = |n: &crate::ir::NodeId| group.iter().any(|t| t.node == *n);
    let w = graph.node(group[0].node).inputs[1]?;
    if group
        .iter()
        .any(|t| graph.node(t.node).inputs[1] != Some(w))
    {
        return None;
    }
    if !graph.value(w).users.iter().all(in_group) {
        return None;
    }
    let (mut v, mut transposes) = (w, 0);
    loop {
        match graph.value(v).def {
            Def::Initializer => return Some(transposes),
            Def::Node(n, _) => {
                let node = graph.node(n);
                match node.op() {
                    "Transpose" => transposes += 1,
                    "Cast" => {}
                    _ => return None,
                }
                let input = node.inputs.first().copied().flatten()?;
                if graph.value(input).users.len() != 1 {
                    return None;
                }
                v = input;
            }
            _ => return None,
        }
    }
}

/// A rewritten weight, made before the graph is edited.
pub enum WeightPatch {
    /// The initializer's new contents (its Transpose/Cast chain is the module's own).
    InPlace(ValueId, Initializer),
    /// A new initializer the module's nodes read directly (a tied weight's own copy).
    Own(Initializer),
    /// New contents of the initializers a quantized weight is stored in (`MatMulNBits`'
    /// packed values, scales and zero points), in their format.
    Requantized(Vec<(ValueId, Initializer)>),
}

/// Writes `w_res` (torch layout, alpha folded in) as the weight of every node of `group`:
/// in place when nothing else reads the initializer, else as a new initializer of the
/// module's own that the nodes read directly (a tied weight gets its own copy).
pub fn set_weight(
    graph: &mut Graph,
    module: &str,
    group: &[&Target],
    w_res: Array2<f32>,
) -> Result<()> {
    let dtypes = crate::ir::infer::value_dtypes(graph)?;
    let patch = weight_patch(graph, &dtypes, module, group, w_res)?.place(None)?;
    apply_weight(graph, module, group, patch);
    Ok(())
}

/// The patch that [`set_weight`] applies, its tensors in memory until
/// [`WeightPatch::place`]d.
pub fn weight_patch(
    graph: &Graph,
    dtypes: &HashMap<ValueId, i32>,
    module: &str,
    group: &[&Target],
    w_res: Array2<f32>,
) -> Result<WeightPatch> {
    let t0 = group[0];
    // What the node sees: torch layout for Gemm transB=1, else [d_in, d_out]; Gemm's
    // alpha divided back out. (Views: the bytes are laid out once, when written.)
    let w = if t0.alpha != 1.0 {
        w_res / t0.alpha
    } else {
        w_res
    };
    let seen = if t0.op == "Gemm" && t0.layout == Layout::OutIn {
        w
    } else {
        w.reversed_axes()
    };
    let not_float = || Error::Usage(format!("the weight of '{module}' is not a float tensor"));
    // A quantized weight's new values are float: the nodes read a new initializer, and
    // the dequantization chain goes.
    let private = private_chain(graph, group).filter(|_| !t0.quantized);
    if let Some(transposes) = private {
        // The weight and its Transpose/Cast chain belong to this module alone: rewrite
        // the initializer itself, in its own layout and dtype (the graph keeps its shape).
        let root = t0.weight;
        let dtype = graph
            .initializer(root)
            .expect("weight initializer")
            .elem_type();
        let values = if transposes % 2 == 1 {
            seen.reversed_axes()
        } else {
            seen
        };
        let array = Array::from_f32(values.into_dyn(), dtype).ok_or_else(not_float)?;
        return Ok(WeightPatch::InPlace(root, Initializer::unplaced(&array)));
    }
    let dtype = compute_dtype(graph, dtypes, t0);
    let array = Array::from_f32(seen.into_dyn(), dtype).ok_or_else(not_float)?;
    Ok(WeightPatch::Own(Initializer::unplaced(&array)))
}

impl WeightPatch {
    /// The patch with its large tensors' bytes moved out of memory, to `sink` (the
    /// output's data file) or the scratch file ([`Initializer::place`]).
    pub fn place(self, sink: Option<&crate::ir::DataSink>) -> Result<WeightPatch> {
        Ok(match self {
            WeightPatch::InPlace(root, init) => WeightPatch::InPlace(root, init.place(sink)?),
            WeightPatch::Own(init) => WeightPatch::Own(init.place(sink)?),
            WeightPatch::Requantized(inits) => WeightPatch::Requantized(
                inits
                    .into_iter()
                    .map(|(v, init)| Ok((v, init.place(sink)?)))
                    .collect::<Result<_>>()?,
            ),
        })
    }
}

/// Applies a [`WeightPatch`] of `module`.
pub fn apply_weight(graph: &mut Graph, module: &str, group: &[&Target], patch: WeightPatch) {
    match patch {
        WeightPatch::InPlace(root, init) => graph.replace_initializer(root, init),
        WeightPatch::Requantized(inits) => {
            for (value, init) in inits {
                graph.replace_initializer(value, init);
            }
        }
        WeightPatch::Own(init) => {
            let res = graph.add_initializer(&format!("{module}.weight_res"), init);
            for t in group {
                let old = graph.node(t.node).inputs[1].expect("weight input");
                graph.set_input(t.node, 1, Some(res));
                graph.remove_if_dead(old);
            }
            debug_assert!(graph.value(res).def == Def::Initializer);
        }
    }
}
