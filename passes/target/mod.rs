//! Targeting: finds the linear layers of a graph, names them after their PyTorch
//! modules, classifies them as reader / writer / inner, and applies lora-lite's filters.
//! Recognising one linear layer is [`linear`]'s; settling a square layer's role,
//! [`roles`]'.

mod linear;
pub mod roles;

use std::collections::{HashMap, HashSet, VecDeque};

use regex::Regex;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::{Def, Graph, NodeId, ValueId};

pub use linear::{dynamic_quantized, layer_index};
use linear::{is_constant, linear, weight_chain};
use roles::{settle_role, AncestorCache};

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
    /// Also adapt output heads (see [`roles::is_output_head`]), left out by default.
    pub include_heads: bool,
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
            include_heads: false,
        }
    }
}

impl Targeting {
    /// Follows [`Graph::compact`]'s renumbering after a pass edited the graph: a weight
    /// the pass replaced (PiSSA's `W_res`) is found again as the linear node's weight.
    /// A linear node the pass replaced (lowering's 8-bit `MatMulNBits` → `MatMul`) is
    /// found again as the product that now makes the target's output.
    pub fn remap(&mut self, remap: &crate::ir::Remap, graph: &Graph) {
        for t in &mut self.targets {
            t.input = remap.value(t.input).expect("a pass dropped a target input");
            t.output = remap
                .value(t.output)
                .expect("a pass dropped a target output");
            t.node = match remap.node(t.node) {
                Some(node) => node,
                None => {
                    let node = replacement(graph, t.output).expect("a pass removed a target node");
                    t.op = graph.node(node).op().to_string();
                    node
                }
            };
            t.weight = remap
                .value(t.weight)
                .or_else(|| graph.value_by_name(&t.weight_name))
                .or_else(|| graph.node(t.node).inputs.get(1).copied().flatten())
                .expect("a linear node has a weight");
        }
    }
}

/// The product node that makes `output` through the Identity and bias `Add` a lowering
/// leaves after it.
fn replacement(graph: &Graph, output: ValueId) -> Option<NodeId> {
    let mut v = output;
    loop {
        let crate::ir::Def::Node(n, _) = graph.value(v).def else {
            return None;
        };
        match graph.node(n).op() {
            "Identity" | "Add" => v = graph.node(n).inputs.first().copied().flatten()?,
            "MatMul" | "Gemm" => return Some(n),
            _ => return None,
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
    /// The wrapper prefix taken off every module name (see [`wrapper_prefix`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wrapper_prefix: Option<String>,
}

/// The first attribute names of Hugging Face models (`model.layers…`, `transformer.h…`,
/// `encoder.layer…`): a wrapper is recognised by holding one of them, and is never one.
const MODEL_ROOTS: &[&str] = &[
    "model",
    "transformer",
    "encoder",
    "decoder",
    "embeddings",
    "pooler",
    "lm_head",
    "embed_tokens",
    "layers",
    "norm",
    "h",
    "wte",
    "wpe",
    "ln_f",
    "bert",
    "roberta",
    "distilbert",
    "gpt_neox",
    "classifier",
    "score",
    "shared",
];

/// The first path component (with its dot) that every module path of the model shares,
/// when it is a wrapper: an export of a module that holds the model as one attribute
/// (`inner.encoder.layer.0…`, `inner.embeddings…`). Read from the linears' module
/// paths and the parameter names of the initializers (`….weight`, `….bias`): a wrapper
/// holds a model's root attributes (see [`MODEL_ROOTS`]), and is not one itself.
pub fn wrapper_prefix(graph: &Graph, linears: &[Target]) -> Option<String> {
    let params = graph
        .initializers()
        .map(|(v, _)| graph.value(v).name.as_str())
        .filter(|n| {
            (n.ends_with(".weight") || n.ends_with(".bias")) && n.matches('.').count() >= 2
        });
    let mut first: Option<&str> = None;
    let mut roots = false;
    for name in linears.iter().map(|t| t.module.as_str()).chain(params) {
        let (head, rest) = name.split_once('.')?;
        if first.is_some_and(|f| f != head) {
            return None;
        }
        first = Some(head);
        let child = rest.split('.').next().unwrap_or(rest);
        roots |= MODEL_ROOTS.contains(&child);
    }
    let first = first?;
    (roots && !MODEL_ROOTS.contains(&first)).then(|| format!("{first}."))
}

/// The linear layer at node `id` (module named under `filters`), role left unsettled
/// (`Inner`): for a node found by other means than targeting (the node an adapter
/// input was spliced around).
pub fn linear_at(graph: &Graph, id: NodeId, filters: &Filters) -> Option<Target> {
    linear(graph, id, filters)
}

/// An error naming the weight when a linear layer's stored weight holds no numbers
/// (a string, boolean, complex or unknown element type): no exporter writes that, and
/// no runtime multiplies by it.
fn numeric_weight(graph: &Graph, t: &Target) -> Result<()> {
    use crate::proto::tensor_proto::DataType as D;
    let Some(init) = graph.initializer(t.weight) else {
        return Ok(());
    };
    match D::try_from(init.elem_type()) {
        Ok(D::Undefined | D::String | D::Bool | D::Complex64 | D::Complex128) | Err(_) => {
            Err(Error::Usage(format!(
                "{}: the weight of linear layer '{}' ({}) has element type {}, not a number; the model is not valid ONNX (re-export it)",
                t.weight_name,
                t.module,
                t.node_name,
                crate::dtype::name(init.elem_type())
            )))
        }
        Ok(_) => Ok(()),
    }
}

/// Finds the targets of `graph` under `filters`.
pub fn run(graph: &Graph, filters: &Filters) -> Result<Targeting> {
    let order = graph.topological_order()?;
    let mut linears: Vec<Target> = order
        .iter()
        .filter_map(|&id| linear(graph, id, filters))
        .collect();
    let found = linears.len();
    // A wrapper's prefix comes off unless the user says otherwise or the adapter being
    // applied names its modules with it.
    let wrapper = match filters.strip_prefix {
        Some(_) => None,
        None => wrapper_prefix(graph, &linears).filter(|p| {
            filters
                .modules
                .as_ref()
                .is_none_or(|ms| !ms.iter().any(|m| m.starts_with(p.as_str())))
        }),
    };
    if let Some(p) = &wrapper {
        for t in &mut linears {
            t.module = t.module[p.len()..].to_string();
        }
    }
    for t in &linears {
        numeric_weight(graph, t)?;
    }
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
    // Output heads are left out unless asked for, or unless they are all there is (a
    // one-layer model).
    let heads: HashSet<NodeId> = linears
        .iter()
        .filter(|t| roles::is_output_head(graph, t, d_model))
        .map(|t| t.node)
        .collect();
    if !filters.include_heads && filters.modules.is_none() && heads.len() < linears.len() {
        keep(&mut linears, "output heads (--include-heads)", &|t| {
            !heads.contains(&t.node)
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
        wrapper_prefix: wrapper,
    })
}

/// `d_model`: the token-embedding width, else `--d-model`, else the most common
/// linear input width.
fn d_model(graph: &Graph, linears: &[Target], filters: &Filters) -> Result<(usize, String)> {
    for id in graph.node_ids() {
        let node = graph.node(id);
        if node.op() != "Gather" || node.attr_int("axis", 0) != 0 {
            continue;
        }
        let (Some(data), Some(indices)) = (
            node.inputs.first().copied().flatten(),
            node.inputs.get(1).copied().flatten(),
        ) else {
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
                // Padded by hand: a format width above u16::MAX panics, and names
                // come from the model.
                .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.len())))
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
        )?;
        if let Some(p) = &self.wrapper_prefix {
            writeln!(
                f,
                "module names without the wrapper prefix '{p}' every module path shares (--strip-prefix '' keeps it)"
            )?;
        }
        Ok(())
    }
}
