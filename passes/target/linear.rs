//! Recognising a linear layer: the node, its constant weight through a chain of
//! layout and dequantization ops, its bias, and its PyTorch module name.

use super::*;

/// The target for node `id`, if it is a linear layer with a constant weight.
pub(super) fn linear(graph: &Graph, id: NodeId, filters: &Filters) -> Option<Target> {
    let node = graph.node(id);
    let (op, domain) = (node.op(), node.domain());
    if !matches!(op, "MatMul" | "MatMulInteger" | "Gemm" | "MatMulNBits") {
        return None;
    }
    let mut input = node.inputs.first().copied().flatten()?;
    let mut output = node.outputs.first().copied().flatten()?;
    if is_constant(graph, input) {
        return None;
    }
    // onnxruntime's dynamic quantization: the layer is float in, float out around it.
    let mut weight_scale = 1.0;
    if op == "MatMulInteger" {
        let scale;
        (input, output, scale) = dynamic_quantized(graph, id)?;
        let scale = crate::interp::evaluate(graph, scale).ok()?.to_f64();
        if scale.len() != 1 {
            return None;
        }
        weight_scale = scale.iter().next().copied()? as f32;
    }
    let w = node.inputs.get(1).copied().flatten()?;
    let (weight, chain, layout, d_in, d_out, alpha, bias_input, quantized) = match (domain, op) {
        ("" | "ai.onnx", "MatMul" | "MatMulInteger") => {
            let (root, chain, shape) = weight_chain(graph, w)?;
            let [d_in, d_out] = shape[..] else {
                return None;
            };
            let transposed = chain.iter().any(|c| c == "Transpose");
            let quantized = op == "MatMulInteger" || is_quantized(graph, root, &chain);
            let layout = if transposed {
                Layout::OutIn
            } else {
                Layout::InOut
            };
            (
                root,
                chain,
                layout,
                d_in,
                d_out,
                weight_scale,
                false,
                quantized,
            )
        }
        ("" | "ai.onnx", "Gemm") => {
            if node.attr_int("transA", 0) != 0 {
                return None;
            }
            let (root, chain, shape) = weight_chain(graph, w)?;
            let [r, c] = shape[..] else { return None };
            let trans_b = node.attr_int("transB", 0) != 0;
            let (d_in, d_out, layout) = if trans_b {
                (c, r, Layout::OutIn)
            } else {
                (r, c, Layout::InOut)
            };
            let quantized = is_quantized(graph, root, &chain);
            let has_c = node.inputs.get(2).copied().flatten().is_some();
            (
                root,
                chain,
                layout,
                d_in,
                d_out,
                node.attr_float("alpha", 1.0),
                has_c,
                quantized,
            )
        }
        ("com.microsoft", "MatMulNBits") => {
            let packed = graph.initializer(w)?.dims();
            let (k, n) = (node.attr_int("K", 0), node.attr_int("N", 0));
            let (bits, block) = (node.attr_int("bits", 4), node.attr_int("block_size", 0));
            // K and N must be those of the packed weight [N, ceil(K / block), block·bits/8].
            if k <= 0 || n <= 0 || block <= 0 || !(2..=8).contains(&bits) {
                return None;
            }
            if packed != [n, (k + block - 1) / block, block * bits / 8] {
                return None;
            }
            let has_bias = node.inputs.get(5).copied().flatten().is_some();
            (
                w,
                vec![],
                Layout::Packed,
                k as usize,
                n as usize,
                1.0,
                has_bias,
                true,
            )
        }
        _ => return None,
    };
    let module = module_name(graph, id, weight, filters);
    let bias = bias_input || separate_bias(graph, output, d_out);
    Some(Target {
        layer: layer_index(&module),
        module,
        node: id,
        node_name: node.name().to_string(),
        op: op.to_string(),
        input,
        output,
        weight,
        weight_name: graph.value(weight).name.clone(),
        chain,
        layout,
        d_in,
        d_out,
        alpha,
        bias,
        role: Role::Inner,
        role_source: RoleSource::Shape,
        shared: is_shared(graph, weight),
        quantized,
    })
}

/// `(x, y, weight scale)` of a `MatMulInteger` that onnxruntime's `quantize_dynamic`
/// made: `x` quantized by a `DynamicQuantizeLinear` before it, the int32 product cast
/// and multiplied by `x_scale · w_scale` after it (`y`), the weight symmetric (zero
/// point 0); `w_scale` is the stored one. Other forms are not layers lora-graft adapts.
pub fn dynamic_quantized(graph: &Graph, id: NodeId) -> Option<(ValueId, ValueId, ValueId)> {
    let node = graph.node(id);
    let a = node.inputs.first().copied().flatten()?;
    let quantizer = graph.node(graph.producer(a)?);
    if quantizer.op() != "DynamicQuantizeLinear" {
        return None;
    }
    let x = quantizer.inputs.first().copied().flatten()?;
    if let Some(zp) = node.inputs.get(3).copied().flatten() {
        let zp = crate::interp::evaluate(graph, zp).ok()?;
        if zp.to_f64().iter().any(|&v| v != 0.0) {
            return None;
        }
    }
    let only_user = |v: ValueId, op: &str| -> Option<NodeId> {
        let users = &graph.value(v).users;
        (users.len() == 1 && graph.node(users[0]).op() == op).then(|| users[0])
    };
    let product = node.outputs.first().copied().flatten()?;
    let cast = only_user(product, "Cast")?;
    let cast_out = graph.node(cast).outputs.first().copied().flatten()?;
    let mul = graph.node(only_user(cast_out, "Mul")?);
    let scales = mul
        .inputs
        .iter()
        .flatten()
        .copied()
        .find(|&v| v != cast_out)?;
    let scales_mul = graph.node(graph.producer(scales)?);
    if scales_mul.op() != "Mul" {
        return None;
    }
    let w_scale = scales_mul
        .inputs
        .iter()
        .flatten()
        .copied()
        .find(|&v| graph.initializer(v).is_some())?;
    let y = mul.outputs.first().copied().flatten()?;
    Some((x, y, w_scale))
}

/// Whether `v` is computed from initializers alone.
pub(super) fn is_constant(graph: &Graph, v: ValueId) -> bool {
    // Iterative (a chain of 200k nodes must not overflow the stack), each value once.
    let mut known: HashMap<ValueId, bool> = HashMap::new();
    let mut stack = vec![v];
    let mut on_stack: HashSet<ValueId> = HashSet::from([v]);
    while let Some(&x) = stack.last() {
        if known.contains_key(&x) {
            stack.pop();
            on_stack.remove(&x);
            continue;
        }
        let value = match graph.value(x).def {
            Def::Initializer => Some(true),
            Def::Node(n, _) => {
                let node = graph.node(n);
                if node.op() == "Constant" {
                    Some(true)
                } else if !node.captures.is_empty() {
                    Some(false)
                } else {
                    let inputs: Vec<ValueId> = node.inputs.iter().flatten().copied().collect();
                    match inputs.iter().find(|i| !known.contains_key(i)) {
                        // A cycle (an invalid graph) is not constant.
                        Some(&pending) if on_stack.contains(&pending) => Some(false),
                        Some(&pending) => {
                            stack.push(pending);
                            on_stack.insert(pending);
                            None
                        }
                        None => Some(inputs.iter().all(|i| known[i])),
                    }
                }
            }
            _ => Some(false),
        };
        if let Some(c) = value {
            known.insert(x, c);
            stack.pop();
            on_stack.remove(&x);
        }
    }
    known[&v]
}

/// Follows a weight back through ops over initializers alone to its largest
/// initializer: `(root, ops from root to the linear node, effective 2-D shape)`.
pub(super) fn weight_chain(
    graph: &Graph,
    w: ValueId,
) -> Option<(ValueId, Vec<String>, Vec<usize>)> {
    if let Some(init) = graph.initializer(w) {
        let shape: Vec<usize> = init.dims().iter().map(|&d| d as usize).collect();
        return (shape.len() == 2).then_some((w, vec![], shape));
    }
    let n = graph.producer(w)?;
    let node = graph.node(n);
    if !is_constant(graph, w) || node.op() == "Constant" {
        return None;
    }
    // The operand carrying the weight: the one with the most elements.
    let main = node
        .inputs
        .iter()
        .flatten()
        .copied()
        .max_by_key(|&v| chain_numel(graph, v))?;
    let (root, mut chain, shape) = weight_chain(graph, main)?;
    let shape = match node.op() {
        "Transpose" => {
            let perm = node
                .attr_ints("perm")
                .map(<[i64]>::to_vec)
                .unwrap_or(vec![1, 0]);
            if perm != [1, 0] {
                return None;
            }
            vec![shape[1], shape[0]]
        }
        "Cast" | "DequantizeLinear" | "Mul" | "Div" | "Sub" | "Add" | "Identity" => shape,
        _ => return None,
    };
    chain.push(node.op().to_string());
    Some((root, chain, shape))
}

pub(super) fn chain_numel(graph: &Graph, v: ValueId) -> u64 {
    match graph.initializer(v) {
        Some(i) => crate::dtype::numel(i.dims()).unwrap_or(0),
        None => graph
            .producer(v)
            .map(|n| {
                graph
                    .node(n)
                    .inputs
                    .iter()
                    .flatten()
                    .map(|&i| chain_numel(graph, i))
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0),
    }
}

pub(super) fn is_quantized(graph: &Graph, root: ValueId, chain: &[String]) -> bool {
    use crate::proto::tensor_proto::DataType as D;
    let integer = graph.initializer(root).is_some_and(|i| {
        matches!(
            D::try_from(i.elem_type()),
            Ok(D::Int8 | D::Uint8 | D::Int4 | D::Uint4 | D::Int16 | D::Uint16 | D::Int32)
        )
    });
    integer || chain.iter().any(|c| c == "DequantizeLinear")
}

/// Whether the initializer is read by more than one node.
pub(super) fn is_shared(graph: &Graph, weight: ValueId) -> bool {
    let users: HashSet<NodeId> = graph.value(weight).users.iter().copied().collect();
    users.len() > 1
}

/// Whether `output` feeds an `Add` with a constant of `d_out` elements.
pub(super) fn separate_bias(graph: &Graph, output: ValueId, d_out: usize) -> bool {
    graph.value(output).users.iter().any(|&u| {
        let n = graph.node(u);
        n.op() == "Add"
            && n.inputs.iter().flatten().any(|&i| {
                i != output
                    && graph
                        .initializer(i)
                        .is_some_and(|init| crate::dtype::numel(init.dims()) == Some(d_out as u64))
            })
    })
}

/// The PyTorch module path of a linear node.
pub(super) fn module_name(graph: &Graph, id: NodeId, weight: ValueId, filters: &Filters) -> String {
    let node = graph.node(id);
    let from_scopes = node
        .proto
        .metadata_props
        .iter()
        .find(|m| m.key() == "pkg.torch.onnx.name_scopes")
        .and_then(|m| {
            let scopes = parse_py_list(m.value());
            // The last scope is the node's own (fx) name; the one before it is the module.
            scopes.len().checked_sub(2).map(|i| scopes[i].clone())
        })
        .filter(|s| !s.is_empty());
    let weight_name = &graph.value(weight).name;
    let from_weight = || {
        // A quantizer's suffix (onnxruntime's `<name>_quantized`) first.
        let name = weight_name
            .strip_suffix("_quantized")
            .unwrap_or(weight_name);
        let stem = name.split(".MatMul.").next().unwrap_or(name);
        stem.strip_suffix(".weight")
            .or_else(|| name.contains(".MatMul.weight").then_some(stem))
            .map(str::to_string)
    };
    // Generic node and weight names (`node_MatMul_48`, `val_49`) may still come with a
    // bias named after the module (`….query.bias`): taken when that bias belongs to this
    // node alone (exporters share identical biases across modules, which names nothing).
    let from_bias = || {
        let output = node.outputs.first().copied().flatten()?;
        let slot = match node.op() {
            "Gemm" => 2,
            "MatMulNBits" => 5,
            _ => usize::MAX,
        };
        let own_bias = node.inputs.get(slot).copied().flatten();
        let after = graph.value(output).users.iter().find_map(|&u| {
            let n = graph.node(u);
            (n.op() == "Add").then(|| n.inputs.iter().flatten().copied().find(|&i| i != output))?
        });
        let bias = own_bias
            .or(after)
            .filter(|&b| graph.initializer(b).is_some())?;
        let users: HashSet<NodeId> = graph.value(bias).users.iter().copied().collect();
        if users.len() != 1 {
            return None;
        }
        let name = &graph.value(bias).name;
        name.strip_suffix(".bias")
            .filter(|stem| !stem.is_empty())
            .map(str::to_string)
    };
    let from_node_path = || {
        let name = node.name().trim_start_matches('/');
        let parts: Vec<&str> = name.split('/').collect();
        if parts.len() > 1 {
            parts[..parts.len() - 1].join(".")
        } else {
            name.to_string()
        }
    };
    let name = from_scopes
        .or_else(from_weight)
        .or_else(from_bias)
        .unwrap_or_else(from_node_path);
    match &filters.strip_prefix {
        Some(p) => name.strip_prefix(p.as_str()).unwrap_or(&name).to_string(),
        None => name,
    }
}

/// Parses a Python list of strings as the dynamo exporter writes it: `['a', 'b']`.
pub(super) fn parse_py_list(s: &str) -> Vec<String> {
    let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
    let mut items = Vec::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' || c == '"' {
            let mut item = String::new();
            for d in chars.by_ref() {
                if d == c {
                    break;
                }
                item.push(d);
            }
            items.push(item);
        }
    }
    items
}

/// The layer index from `.layers.N.`, `.layer.N.`, `.h.N.` or `.blocks.N.`.
pub fn layer_index(module: &str) -> Option<usize> {
    let padded = format!(".{module}.");
    let re = Regex::new(r"\.(?:layers|layer|h|blocks)\.(\d+)\.").unwrap();
    re.captures(&padded).and_then(|c| c[1].parse().ok())
}
