//! Settling a square layer's role (reader or writer) from the graph around it, its
//! module name, or the user's `--role`.

use super::*;

/// Sets `t.role` from its shape; a square layer from the graph, its name or `--role`.
pub(super) fn settle_role(
    graph: &Graph,
    t: &mut Target,
    d_model: usize,
    filters: &Filters,
    cache: &mut AncestorCache,
) -> Result<()> {
    let (role, source) = if t.d_in == d_model && t.d_out != d_model {
        (Role::Reader, RoleSource::Shape)
    } else if t.d_out == d_model && t.d_in != d_model {
        (Role::Writer, RoleSource::Shape)
    } else if t.d_in != d_model {
        (Role::Inner, RoleSource::Shape)
    } else if let Some((_, role)) = filters
        .role_overrides
        .iter()
        .find(|(r, _)| r.is_match(&t.module))
    {
        (*role, RoleSource::Flag)
    } else if let Some(role) = role_from_graph(graph, t, cache) {
        (role, RoleSource::Graph)
    } else if let Some(role) = role_from_name(&t.module) {
        (role, RoleSource::Name)
    } else {
        return Err(Error::Usage(format!(
            "layer '{}' ({} '{}') is square ({} -> {} = d_model) and neither the graph nor its name tells whether it reads or writes the residual stream; settle it with --role '{}=reader' (or =writer), or leave it out with --exclude-names",
            t.module, t.op, t.node_name, t.d_in, t.d_out, regex::escape(&t.module)
        )));
    };
    t.role = role;
    t.role_source = source;
    Ok(())
}

/// Ops a value passes through unchanged in meaning (layout or a constant operand).
pub(super) fn passes_through(graph: &Graph, node: NodeId, from: ValueId) -> bool {
    let n = graph.node(node);
    match n.op() {
        "Reshape" | "Transpose" | "Identity" | "Cast" | "Dropout" | "Squeeze" | "Unsqueeze"
        | "Flatten" => n.inputs.first().copied().flatten() == Some(from),
        "Add" | "Sub" | "Mul" | "Div" => n
            .inputs
            .iter()
            .flatten()
            .all(|&i| i == from || is_constant(graph, i)),
        _ => false,
    }
}

#[derive(Default)]
pub(super) struct AncestorCache {
    nodes: HashMap<ValueId, HashSet<NodeId>>,
}

impl AncestorCache {
    /// Nodes `v` depends on.
    fn of(&mut self, graph: &Graph, v: ValueId) -> &HashSet<NodeId> {
        self.nodes.entry(v).or_insert_with(|| {
            let mut seen = HashSet::new();
            let mut queue: VecDeque<ValueId> = VecDeque::from([v]);
            while let Some(x) = queue.pop_front() {
                if let Some(p) = graph.producer(x) {
                    if seen.insert(p) {
                        queue.extend(graph.node(p).reads());
                    }
                }
            }
            seen
        })
    }
}

/// A square layer's role from the graph: writer when its output (through layout ops
/// and a bias) is added to a value its own input was computed from (the residual
/// stream it read); reader when its output feeds attention or an activation.
pub(super) fn role_from_graph(
    graph: &Graph,
    t: &Target,
    cache: &mut AncestorCache,
) -> Option<Role> {
    const ATTENTION: &[&str] = &[
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "Softmax",
    ];
    const ACTIVATION: &[&str] = &[
        "Relu",
        "Gelu",
        "FastGelu",
        "BiasGelu",
        "QuickGelu",
        "Sigmoid",
        "Tanh",
        "Erf",
        "Elu",
        "Selu",
        "LeakyRelu",
        "Softplus",
        "HardSigmoid",
        "HardSwish",
        "Mish",
    ];
    // Writer: follow the output through pass-through ops to a residual add.
    let mut frontier = vec![t.output];
    let mut seen = HashSet::new();
    while let Some(v) = frontier.pop() {
        for &u in &graph.value(v).users {
            if !seen.insert(u) {
                continue;
            }
            let n = graph.node(u);
            let residual_add = n.op() == "Add"
                || (n.domain() == "com.microsoft"
                    && matches!(
                        n.op(),
                        "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization"
                    ));
            if residual_add && !passes_through(graph, u, v) {
                let others: Vec<ValueId> = n
                    .inputs
                    .iter()
                    .take(2)
                    .flatten()
                    .copied()
                    .filter(|&o| o != v)
                    .collect();
                let input_ancestors = cache.of(graph, t.input).clone();
                let reads_stream = others.iter().any(|&o| {
                    o == t.input
                        || graph
                            .producer(o)
                            .is_some_and(|p| input_ancestors.contains(&p))
                        || (graph.value(o).def == Def::Input && input_depends_on(graph, t.input, o))
                });
                if reads_stream {
                    return Some(Role::Writer);
                }
            } else if passes_through(graph, u, v) {
                frontier.extend(n.outputs.iter().flatten().copied());
            }
        }
    }
    // Reader: a bounded walk forward to attention or an activation.
    let mut queue: VecDeque<(ValueId, usize)> = VecDeque::from([(t.output, 0)]);
    let mut seen = HashSet::new();
    while let Some((v, depth)) = queue.pop_front() {
        for &u in &graph.value(v).users {
            if !seen.insert(u) || u == t.node {
                continue;
            }
            let n = graph.node(u);
            let attention_matmul =
                n.op() == "MatMul" && n.inputs.iter().flatten().all(|&i| !is_constant(graph, i));
            if attention_matmul || ATTENTION.contains(&n.op()) || ACTIVATION.contains(&n.op()) {
                return Some(Role::Reader);
            }
            let linear = matches!(n.op(), "MatMul" | "Gemm" | "MatMulNBits" | "MatMulInteger");
            if depth < 12 && !linear {
                queue.extend(n.outputs.iter().flatten().map(|&o| (o, depth + 1)));
            }
        }
    }
    None
}

pub(super) fn input_depends_on(graph: &Graph, v: ValueId, input: ValueId) -> bool {
    let mut queue = VecDeque::from([v]);
    let mut seen = HashSet::new();
    while let Some(x) = queue.pop_front() {
        if x == input {
            return true;
        }
        if let Some(p) = graph.producer(x) {
            if seen.insert(p) {
                queue.extend(graph.node(p).reads());
            }
        }
    }
    false
}

/// A square layer's role from its module name, as lora-lite decides it.
pub(super) fn role_from_name(module: &str) -> Option<Role> {
    let last = module.rsplit('.').next().unwrap_or(module);
    match last {
        "q_proj" | "k_proj" | "v_proj" | "query" | "key" | "value" | "q" | "k" | "v"
        | "qkv_proj" | "c_attn" | "in_proj" => Some(Role::Reader),
        "o_proj" | "out_proj" | "down_proj" | "c_proj" | "wo" => Some(Role::Writer),
        "dense" if module.contains("attention") => Some(Role::Writer),
        _ => None,
    }
}

/// Whether `t` is an output head: the last linear before a graph output (through
/// layout ops, a bias and a softmax), mapping the residual stream to another width (a
/// vocabulary or class count).
pub fn is_output_head(graph: &Graph, t: &Target, d_model: usize) -> bool {
    if t.d_out == d_model {
        return false;
    }
    let mut frontier = vec![t.output];
    let mut seen = HashSet::new();
    while let Some(v) = frontier.pop() {
        if graph.is_output(v) {
            return true;
        }
        for &u in &graph.value(v).users {
            let n = graph.node(u);
            let onward = passes_through(graph, u, v)
                || matches!(n.op(), "Softmax" | "LogSoftmax" | "Sigmoid")
                    && n.inputs.first().copied().flatten() == Some(v);
            if onward && seen.insert(u) {
                frontier.extend(n.outputs.iter().flatten().copied());
            }
        }
    }
    false
}
