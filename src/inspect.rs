//! `lora-graft inspect`: what a user wants to know about a model before adapting it.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::dtype;
use crate::ir::dump::type_text;
use crate::model::Model;

/// A summary of a model.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The model file.
    pub path: String,
    /// ONNX IR version.
    pub ir_version: i64,
    /// Opset imports as `(domain, version)`; `""` is the default domain.
    pub opsets: Vec<(String, i64)>,
    /// Producer name and version.
    pub producer: String,
    /// Graph inputs that are not initializers: `(name, type)`.
    pub inputs: Vec<(String, String)>,
    /// Graph outputs: `(name, type)`.
    pub outputs: Vec<(String, String)>,
    /// Number of nodes.
    pub nodes: usize,
    /// Node count per op (`domain::Op` outside the default domain).
    pub ops: BTreeMap<String, usize>,
    /// Number of initializers.
    pub initializers: usize,
    /// Initializer bytes per element type.
    pub initializer_bytes: BTreeMap<String, u64>,
    /// External data files: location -> (tensors, bytes).
    pub external_data: BTreeMap<String, (usize, u64)>,
    /// Model-level metadata keys.
    pub metadata_keys: Vec<String>,
    /// Node-level metadata keys, with the number of nodes carrying each.
    pub node_metadata_keys: BTreeMap<String, usize>,
}

impl Report {
    /// Summarises `model`.
    pub fn new(model: &Model) -> Report {
        let g = &model.graph;
        let io = |list: &[crate::ir::GraphIo], skip_inits: bool| {
            list.iter()
                .filter(|io| !skip_inits || g.value(io.value).def != crate::ir::Def::Initializer)
                .map(|io| {
                    (
                        io.info.name().to_string(),
                        type_text(io.info.r#type.as_ref()),
                    )
                })
                .collect()
        };
        let mut ops = BTreeMap::new();
        let mut node_metadata_keys = BTreeMap::new();
        for id in g.node_ids() {
            let node = g.node(id);
            let op = match node.domain() {
                "" | "ai.onnx" => node.op().to_string(),
                d => format!("{d}::{}", node.op()),
            };
            *ops.entry(op).or_insert(0) += 1;
            for m in &node.proto.metadata_props {
                *node_metadata_keys.entry(m.key().to_string()).or_insert(0) += 1;
            }
        }
        let mut initializer_bytes = BTreeMap::new();
        let mut external_data: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        for (_, init) in g.initializers() {
            let bytes = dtype::numel(init.dims())
                .and_then(|n| dtype::storage_bytes(init.elem_type(), n))
                .unwrap_or(0);
            *initializer_bytes
                .entry(dtype::name(init.elem_type()).to_string())
                .or_insert(0) += bytes;
            if let Some(ext) = &init.external {
                let loc = init
                    .proto
                    .external_data
                    .iter()
                    .find(|e| e.key() == "location")
                    .map(|e| e.value().to_string())
                    .unwrap_or_else(|| ext.file.path.display().to_string());
                let entry = external_data.entry(loc).or_insert((0, 0));
                entry.0 += 1;
                entry.1 += ext.length as u64;
            }
        }
        Report {
            path: model.path.display().to_string(),
            ir_version: model.proto.ir_version(),
            opsets: model
                .proto
                .opset_import
                .iter()
                .map(|o| (o.domain().to_string(), o.version()))
                .collect(),
            producer: format!(
                "{} {}",
                model.proto.producer_name(),
                model.proto.producer_version()
            )
            .trim()
            .to_string(),
            inputs: io(g.inputs(), true),
            outputs: io(g.outputs(), false),
            nodes: g.node_count(),
            ops,
            initializers: g.initializers().count(),
            initializer_bytes,
            external_data,
            metadata_keys: model
                .proto
                .metadata_props
                .iter()
                .map(|m| m.key().to_string())
                .collect(),
            node_metadata_keys,
        }
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model      {}", self.path)?;
        let opsets: Vec<String> = self
            .opsets
            .iter()
            .map(|(d, v)| format!("{}={v}", if d.is_empty() { "ai.onnx" } else { d }))
            .collect();
        writeln!(
            f,
            "ir         {}   opsets {}",
            self.ir_version,
            opsets.join(" ")
        )?;
        if !self.producer.is_empty() {
            writeln!(f, "producer   {}", self.producer)?;
        }
        for (name, ty) in &self.inputs {
            writeln!(f, "input      {name}: {ty}")?;
        }
        for (name, ty) in &self.outputs {
            writeln!(f, "output     {name}: {ty}")?;
        }
        let ops: Vec<String> = {
            let mut v: Vec<(&String, &usize)> = self.ops.iter().collect();
            v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            v.iter().map(|(op, n)| format!("{op} {n}")).collect()
        };
        writeln!(f, "nodes      {}: {}", self.nodes, ops.join(", "))?;
        let total: u64 = self.initializer_bytes.values().sum();
        let by_type: Vec<String> = self
            .initializer_bytes
            .iter()
            .map(|(t, b)| format!("{t} {}", human(*b)))
            .collect();
        writeln!(
            f,
            "weights    {} initializers, {} ({})",
            self.initializers,
            human(total),
            by_type.join(", ")
        )?;
        for (loc, (n, bytes)) in &self.external_data {
            writeln!(f, "external   {loc}: {n} tensors, {}", human(*bytes))?;
        }
        if !self.metadata_keys.is_empty() {
            writeln!(f, "metadata   {}", self.metadata_keys.join(", "))?;
        }
        for (key, n) in &self.node_metadata_keys {
            writeln!(f, "node meta  {key} on {n} nodes")?;
        }
        Ok(())
    }
}
