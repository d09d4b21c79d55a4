//! Targeting: finds the linear layers of a graph, names them after their PyTorch
//! modules, classifies them as reader / writer / inner, and applies lora-lite's filters.

use std::collections::{HashMap, HashSet, VecDeque};

use regex::Regex;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::{Def, Graph, NodeId, ValueId};

/// lora-lite's roles, from a layer's shape relative to `d_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the residual stream: `d_in == d_model`.
    Reader,
    /// Writes the residual stream: `d_out == d_model`.
    Writer,
    /// Neither.
    Inner,
}

impl Role {
    /// `reader`, `writer` or `inner`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Inner => "inner",
        }
    }

    /// Parses `reader`, `writer` or `inner`.
    pub fn parse(s: &str) -> Result<Role> {
        match s.trim() {
            "reader" => Ok(Role::Reader),
            "writer" => Ok(Role::Writer),
            "inner" => Ok(Role::Inner),
            other => Err(Error::Usage(format!(
                "unknown role '{other}'; use reader, writer or inner"
            ))),
        }
    }
}

/// How a layer's role was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleSource {
    /// From `d_in`, `d_out` and `d_model` alone.
    Shape,
    /// A square layer, from where its output goes in the graph.
    Graph,
    /// A square layer, from its module name.
    Name,
    /// A square layer, from `--role`.
    Flag,
}

/// How the effective weight is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `[d_in, d_out]`: MatMul, Gemm transB = 0.
    InOut,
    /// `[d_out, d_in]` (torch layout): Gemm transB = 1, or MatMul through a Transpose.
    OutIn,
    /// MatMulNBits' packed blocks `[N, n_blocks, blob]`.
    Packed,
}

/// One linear layer the adapters can be grafted onto.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// PyTorch module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// The linear node.
    #[serde(skip)]
    pub node: NodeId,
    /// The node's name.
    pub node_name: String,
    /// Its op (`MatMul`, `Gemm`, `MatMulNBits`, `MatMulInteger`).
    pub op: String,
    /// The activation input.
    #[serde(skip)]
    pub input: ValueId,
    /// The node's output (before any separate bias Add).
    #[serde(skip)]
    pub output: ValueId,
    /// The weight initializer at the root of the weight chain.
    #[serde(skip)]
    pub weight: ValueId,
    /// Its name.
    pub weight_name: String,
    /// Ops between the initializer and the linear node (`Transpose`, `Cast`, ...).
    pub chain: Vec<String>,
    /// Layout of the weight as the linear node sees it.
    pub layout: Layout,
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// Gemm's alpha (1 for other ops).
    pub alpha: f32,
    /// Whether a bias follows (Gemm C, a bias input, or a separate Add).
    pub bias: bool,
    /// Reader, writer or inner.
    pub role: Role,
    /// How the role was settled.
    pub role_source: RoleSource,
    /// Layer index from `.layers.N.`, `.layer.N.`, `.h.N.`, `.blocks.N.`.
    pub layer: Option<usize>,
    /// The weight initializer is read by another node too (tied weights).
    pub shared: bool,
    /// The weight is quantized (int4/int8); weight-rewriting variants refuse it.
    pub quantized: bool,
}

/// lora-lite's targeting knobs, plus lora-graft's own.
#[derive(Debug, Clone)]
pub struct Filters {
    /// Roles to keep (lora-lite default: reader, writer).
    pub roles: Vec<Role>,
    /// Keep only modules matching one of these (empty: all).
    pub names: Vec<Regex>,
    /// Drop modules matching any of these.
    pub excludes: Vec<Regex>,
    /// Keep only these layer indices.
    pub layers: Option<Vec<usize>>,
    /// Removed from the front of every module name.
    pub strip_prefix: Option<String>,
    /// Residual width, when the graph does not tell.
    pub d_model: Option<usize>,
    /// Roles of square layers, by module regex (`--role REGEX=reader`).
    pub role_overrides: Vec<(Regex, Role)>,
    /// Exactly these modules (an adapter file's), whatever their role.
    pub modules: Option<std::collections::BTreeSet<String>>,
}

impl Default for Filters {
    fn default() -> Self {
        Filters {
            roles: vec![Role::Reader, Role::Writer],
            names: Vec::new(),
            excludes: vec![
                Regex::new("lm_head").unwrap(),
                Regex::new("embed_tokens").unwrap(),
            ],
            layers: None,
            strip_prefix: None,
            d_model: None,
            role_overrides: Vec::new(),
            modules: None,
        }
    }
}

impl Targeting {
    /// Follows [`Graph::compact`]'s renumbering after a pass edited the graph: a weight
    /// the pass replaced (PiSSA's `W_res`) is found again as the linear node's weight.
    pub fn remap(&mut self, remap: &crate::ir::Remap, graph: &Graph) {
        for t in &mut self.targets {
            t.node = remap.node(t.node).expect("a pass removed a target node");
            t.input = remap.value(t.input).expect("a pass dropped a target input");
            t.output = remap
                .value(t.output)
                .expect("a pass dropped a target output");
            t.weight = remap
                .value(t.weight)
                .or_else(|| graph.value_by_name(&t.weight_name))
                .or_else(|| graph.node(t.node).inputs.get(1).copied().flatten())
                .expect("a linear node has a weight");
        }
    }
}

/// The targeting result.
#[derive(Debug, Clone, Serialize)]
pub struct Targeting {
    /// The residual width used for roles.
    pub d_model: usize,
    /// Where `d_model` came from.
    pub d_model_source: String,
    /// Every linear layer found, before filters.
    pub found: usize,
    /// The targets after filters, in graph order.
    pub targets: Vec<Target>,
    /// Weight parameters of the targets.
    pub target_params: u64,
    /// Weight parameters of the whole model (every initializer).
    pub model_params: u64,
}

/// Finds the targets of `graph` under `filters`.
pub fn run(graph: &Graph, filters: &Filters) -> Result<Targeting> {
    let order = graph.topological_order()?;
    let mut linears: Vec<Target> = order
        .iter()
        .filter_map(|&id| linear(graph, id, filters))
        .collect();
    let found = linears.len();
    let all_linears = linears.clone();
    if found == 0 {
        return Err(Error::Usage(
            "no linear layer found (MatMul, Gemm, MatMulNBits or MatMulInteger with a constant weight)".into(),
        ));
    }
    let (d_model, d_model_source) = d_model(graph, &linears, filters)?;

    // Name filters first: a square layer that is filtered out needs no role.
    let mut removed: Vec<String> = Vec::new();
    let mut keep = |list: &mut Vec<Target>, what: &str, pred: &dyn Fn(&Target) -> bool| {
        let before = list.len();
        let dropped: Vec<String> = list
            .iter()
            .filter(|t| !pred(t))
            .map(|t| t.module.clone())
            .collect();
        list.retain(|t| pred(t));
        if before != list.len() {
            let shown: Vec<&str> = dropped.iter().take(3).map(String::as_str).collect();
            let more = if dropped.len() > 3 { ", ..." } else { "" };
            removed.push(format!(
                "{what} removed {} ({}{more})",
                before - list.len(),
                shown.join(", ")
            ));
        }
    };
    if let Some(modules) = &filters.modules {
        keep(&mut linears, "the adapter's module list", &|t| {
            modules.contains(&t.module)
        });
    }
    keep(&mut linears, "--exclude-names", &|t| {
        !filters.excludes.iter().any(|r| r.is_match(&t.module))
    });
    if !filters.names.is_empty() {
        keep(&mut linears, "--target-names", &|t| {
            filters.names.iter().any(|r| r.is_match(&t.module))
        });
    }
    if let Some(layers) = &filters.layers {
        keep(&mut linears, "--layers", &|t| {
            t.layer.is_some_and(|l| layers.contains(&l))
        });
    }
    let mut ancestors = AncestorCache::default();
    for t in &mut linears {
        settle_role(graph, t, d_model, filters, &mut ancestors)?;
    }
    keep(&mut linears, "--target-roles", &|t| {
        filters.roles.contains(&t.role)
    });
    if linears.is_empty() {
        return Err(Error::NoTarget {
            found,
            removed: removed.join("; "),
        });
    }
    // Parameters count each weight once (a module called twice shares one), and a
    // packed int4 weight as its K·N logical entries.
    let mut logical: HashMap<ValueId, u64> = HashMap::new();
    for t in &all_linears {
        logical.insert(t.weight, (t.d_in * t.d_out) as u64);
    }
    let covered: HashSet<ValueId> = linears.iter().map(|t| t.weight).collect();
    let target_params = covered.iter().map(|w| logical[w]).sum();
    let model_params = graph
        .initializers()
        .map(|(v, i)| {
            logical
                .get(&v)
                .copied()
                .unwrap_or_else(|| crate::dtype::numel(i.dims()).unwrap_or(0))
        })
        .sum();
    Ok(Targeting {
        d_model,
        d_model_source,
        found,
        targets: linears,
        target_params,
        model_params,
    })
}

/// The target for node `id`, if it is a linear layer with a constant weight.
fn linear(graph: &Graph, id: NodeId, filters: &Filters) -> Option<Target> {
    let node = graph.node(id);
    let input = node.inputs.first().copied().flatten()?;
    let output = node.outputs.first().copied().flatten()?;
    if is_constant(graph, input) {
        return None;
    }
    let w = node.inputs.get(1).copied().flatten()?;
    let (op, domain) = (node.op(), node.domain());
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
            (root, chain, layout, d_in, d_out, 1.0, false, quantized)
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
            graph.initializer(w)?;
            let (k, n) = (node.attr_int("K", 0), node.attr_int("N", 0));
            if k <= 0 || n <= 0 {
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

/// Whether `v` is computed from initializers alone.
fn is_constant(graph: &Graph, v: ValueId) -> bool {
    match graph.value(v).def {
        Def::Initializer => true,
        Def::Node(n, _) => {
            let node = graph.node(n);
            node.op() == "Constant"
                || (node.captures.is_empty()
                    && node.inputs.iter().flatten().all(|&i| is_constant(graph, i)))
        }
        _ => false,
    }
}

/// Follows a weight back through ops over initializers alone to its largest
/// initializer: `(root, ops from root to the linear node, effective 2-D shape)`.
fn weight_chain(graph: &Graph, w: ValueId) -> Option<(ValueId, Vec<String>, Vec<usize>)> {
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

fn chain_numel(graph: &Graph, v: ValueId) -> u64 {
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

fn is_quantized(graph: &Graph, root: ValueId, chain: &[String]) -> bool {
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
fn is_shared(graph: &Graph, weight: ValueId) -> bool {
    let users: HashSet<NodeId> = graph.value(weight).users.iter().copied().collect();
    users.len() > 1
}

/// Whether `output` feeds an `Add` with a constant of `d_out` elements.
fn separate_bias(graph: &Graph, output: ValueId, d_out: usize) -> bool {
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
fn module_name(graph: &Graph, id: NodeId, weight: ValueId, filters: &Filters) -> String {
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
        let stem = weight_name.split(".MatMul.").next().unwrap_or(weight_name);
        stem.strip_suffix(".weight")
            .or_else(|| weight_name.contains(".MatMul.weight").then_some(stem))
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
        .unwrap_or_else(from_node_path);
    match &filters.strip_prefix {
        Some(p) => name.strip_prefix(p.as_str()).unwrap_or(&name).to_string(),
        None => name,
    }
}

/// Parses a Python list of strings as the dynamo exporter writes it: `['a', 'b']`.
fn parse_py_list(s: &str) -> Vec<String> {
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

/// `d_model`: the token-embedding width, else `--d-model`, else the most common
/// linear input width.
fn d_model(graph: &Graph, linears: &[Target], filters: &Filters) -> Result<(usize, String)> {
    for id in graph.node_ids() {
        let node = graph.node(id);
        if node.op() != "Gather" || node.attr_int("axis", 0) != 0 {
            continue;
        }
        let (Some(data), Some(indices)) = (node.inputs[0], node.inputs.get(1).copied().flatten())
        else {
            continue;
        };
        if is_constant(graph, indices) {
            continue;
        }
        if let Some((root, _, shape)) = weight_chain(graph, data) {
            return Ok((
                shape[1],
                format!("token embedding '{}'", graph.value(root).name),
            ));
        }
    }
    if let Some(d) = filters.d_model {
        return Ok((d, "--d-model".into()));
    }
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for t in linears {
        *counts.entry(t.d_in).or_insert(0) += 1;
    }
    let (d, _) = counts
        .into_iter()
        .max_by_key(|&(d, n)| (n, std::cmp::Reverse(d)))
        .ok_or_else(|| Error::Usage("cannot tell d_model; pass --d-model".into()))?;
    Ok((d, "most common linear input width".into()))
}

/// Sets `t.role` from its shape; a square layer from the graph, its name or `--role`.
fn settle_role(
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
fn passes_through(graph: &Graph, node: NodeId, from: ValueId) -> bool {
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
struct AncestorCache {
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
fn role_from_graph(graph: &Graph, t: &Target, cache: &mut AncestorCache) -> Option<Role> {
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

fn input_depends_on(graph: &Graph, v: ValueId, input: ValueId) -> bool {
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
fn role_from_name(module: &str) -> Option<Role> {
    let last = module.rsplit('.').next().unwrap_or(module);
    match last {
        "q_proj" | "k_proj" | "v_proj" | "query" | "key" | "value" | "q" | "k" | "v"
        | "qkv_proj" | "c_attn" | "in_proj" => Some(Role::Reader),
        "o_proj" | "out_proj" | "down_proj" | "c_proj" | "wo" => Some(Role::Writer),
        "dense" if module.contains("attention") => Some(Role::Writer),
        _ => None,
    }
}

impl std::fmt::Display for Targeting {
    /// The table `lora-graft targets` prints, with a summary line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows: Vec<[String; 7]> = self
            .targets
            .iter()
            .map(|t| {
                let mut marks = Vec::new();
                if t.shared {
                    marks.push("shared");
                }
                if t.quantized {
                    marks.push("quantized");
                }
                if t.bias {
                    marks.push("bias");
                }
                let role = match t.role_source {
                    RoleSource::Shape => t.role.as_str().to_string(),
                    RoleSource::Graph => format!("{} (graph)", t.role.as_str()),
                    RoleSource::Name => format!("{} (name)", t.role.as_str()),
                    RoleSource::Flag => format!("{} (flag)", t.role.as_str()),
                };
                let mut weight = t.weight_name.clone();
                for op in &t.chain {
                    weight = format!("{op}({weight})");
                }
                [
                    t.module.clone(),
                    t.op.clone(),
                    format!("{} -> {}", t.d_in, t.d_out),
                    role,
                    t.layer.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                    weight,
                    marks.join(","),
                ]
            })
            .collect();
        let header = [
            "module",
            "op",
            "d_in -> d_out",
            "role",
            "layer",
            "weight",
            "marks",
        ];
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: Vec<&str>| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            padded.join("  ").trim_end().to_string()
        };
        writeln!(f, "{}", line(header.to_vec()))?;
        for row in &rows {
            writeln!(f, "{}", line(row.iter().map(String::as_str).collect()))?;
        }
        let pct = 100.0 * self.target_params as f64 / self.model_params.max(1) as f64;
        writeln!(
            f,
            "{} targets of {} linear layers; d_model {} ({}); base parameters covered {} ({pct:.1}% of {})",
            self.targets.len(),
            self.found,
            self.d_model,
            self.d_model_source,
            self.target_params,
            self.model_params
        )
    }
}
