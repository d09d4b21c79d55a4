//! Layer streaming: the capture graph cut, in topological order, into segments of at
//! most a weight budget. Each segment is handed to tract, run over every batch and
//! dropped before the next, so the run holds one segment's weights (not the model's)
//! plus, per batch, the values that cross the cuts.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::ir::{Def, GraphIo, NodeId, ValueId};
use crate::tensor::Array;
use crate::Model;

/// The default weight budget of one segment: 256 MiB.
pub const SEGMENT_BYTES: usize = 256 << 20;

/// A graph cut into segments.
pub(super) struct Segments {
    /// Each segment's nodes, in topological order.
    nodes: Vec<Vec<NodeId>>,
    /// Per segment: the values it reads that earlier segments or the graph inputs make.
    pub reads: Vec<Vec<String>>,
    /// Per segment: the values it makes that later segments or the graph outputs read.
    pub makes: Vec<Vec<String>>,
    /// Per segment: the carried values nothing after it reads (dropped once it has run).
    pub last_use: Vec<Vec<String>>,
    /// The values that depend on the input shapes alone (shape computations), the
    /// same in every batch: a segment reads them as constants, as tract wants.
    fixed: HashSet<String>,
}

impl Segments {
    /// Cuts `model`'s graph before every node that would take its segment's weights past
    /// `max_bytes` (a node whose weights alone exceed it gets a segment of its own).
    pub fn cut(model: &Model, max_bytes: usize) -> Result<Segments> {
        let g = &model.graph;
        let mut nodes: Vec<Vec<NodeId>> = vec![Vec::new()];
        let mut counted: HashSet<ValueId> = HashSet::new();
        let mut bytes = 0usize;
        for id in g.topological_order()? {
            let weights: Vec<ValueId> = g
                .node(id)
                .reads()
                .filter(|&v| g.value(v).def == Def::Initializer && !counted.contains(&v))
                .collect();
            let more: usize = weights
                .iter()
                .filter_map(|&v| g.initializer(v))
                .map(|i| i.raw_bytes().map_or(0, <[u8]>::len))
                .sum();
            if bytes + more > max_bytes && !nodes.last().expect("one").is_empty() {
                nodes.push(Vec::new());
                counted.clear();
                bytes = 0;
            }
            bytes += more;
            counted.extend(weights);
            nodes.last_mut().expect("one").push(id);
        }
        let segment_of: HashMap<NodeId, usize> = nodes
            .iter()
            .enumerate()
            .flat_map(|(s, ns)| ns.iter().map(move |&n| (n, s)))
            .collect();
        let n = nodes.len();
        // Where each carried value is made (`None`: a graph input) and last read.
        let made_in = |v: ValueId| match g.value(v).def {
            Def::Node(p, _) => Some(segment_of[&p]),
            _ => None,
        };
        let mut reads: Vec<Vec<String>> = vec![Vec::new(); n];
        let mut makes: Vec<Vec<String>> = vec![Vec::new(); n];
        let mut last: HashMap<ValueId, usize> = HashMap::new();
        for (s, ns) in nodes.iter().enumerate() {
            for &id in ns {
                for v in g.node(id).reads() {
                    let def = g.value(v).def;
                    if def == Def::Initializer || made_in(v) == Some(s) {
                        continue;
                    }
                    let name = &g.value(v).name;
                    if !reads[s].contains(name) {
                        reads[s].push(name.clone());
                    }
                    last.insert(v, s);
                    if let Some(p) = made_in(v) {
                        if !makes[p].contains(name) {
                            makes[p].push(name.clone());
                        }
                    }
                }
            }
        }
        for io in g.outputs() {
            if let Some(p) = made_in(io.value) {
                let name = &g.value(io.value).name;
                if !makes[p].contains(name) {
                    makes[p].push(name.clone());
                }
            }
            last.insert(io.value, n);
        }
        // Shape computations: `Shape` and `Size`, and what only they and constants feed.
        let mut fixed: HashSet<ValueId> = HashSet::new();
        for ns in &nodes {
            for &id in ns {
                let node = g.node(id);
                let pure = match node.op() {
                    "Shape" | "Size" => true,
                    op if op.starts_with("Random") => false,
                    _ => node
                        .reads()
                        .all(|v| g.value(v).def == Def::Initializer || fixed.contains(&v)),
                };
                if pure {
                    fixed.extend(node.outputs.iter().flatten().copied());
                }
            }
        }
        let fixed = fixed.into_iter().map(|v| g.value(v).name.clone()).collect();
        let mut last_use: Vec<Vec<String>> = vec![Vec::new(); n];
        for (v, s) in last {
            if s < n {
                last_use[s].push(g.value(v).name.clone());
            }
        }
        Ok(Segments {
            nodes,
            reads,
            makes,
            last_use,
            fixed,
        })
    }

    /// The number of segments.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Segment `s` as a model of its own: its nodes and their weights, the values it
    /// reads as inputs (typed like `carried`, their values in one worker's slice of a
    /// batch) or, for shape computations, as constants, the values it makes as outputs.
    pub fn model<'a>(
        &self,
        model: &Model,
        s: usize,
        carried: &dyn Fn(&str) -> Option<&'a Array>,
    ) -> Result<Model> {
        let g = &model.graph;
        let mine: HashSet<NodeId> = self.nodes[s].iter().copied().collect();
        let weights: HashSet<ValueId> = self.nodes[s]
            .iter()
            .flat_map(|&id| g.node(id).reads())
            .filter(|&v| g.value(v).def == Def::Initializer)
            .collect();
        let mut graph = g.clone_keeping(|v| weights.contains(&v));
        let others: Vec<NodeId> = graph.node_ids().filter(|n| !mine.contains(n)).collect();
        for id in others {
            graph.remove_node(id);
        }
        let reads: HashSet<&String> = self.reads[s].iter().collect();
        graph.retain_inputs(|io| reads.contains(&g.value(io.value).name));
        let declared: HashSet<String> = graph
            .inputs()
            .iter()
            .map(|io| graph.value(io.value).name.clone())
            .collect();
        for name in &self.reads[s] {
            if declared.contains(name) {
                continue;
            }
            let v = graph.value_by_name(name).expect("a read value");
            let value = carried(name).ok_or_else(|| {
                Error::Runtime(format!("calibration: no value carried for '{name}'"))
            })?;
            if self.fixed.contains(name) {
                let mut init = crate::ir::Initializer::from_array(value)?;
                init.proto.name = Some(name.clone());
                graph.make_initializer(v, init);
                continue;
            }
            let (elem, shape) = (value.elem_type(), value.shape().to_vec());
            if graph.value(v).def != Def::Input {
                graph.set_input_def(v);
            }
            graph.add_input(GraphIo {
                value: v,
                info: crate::proto::ValueInfoProto {
                    name: Some(name.clone()),
                    r#type: Some(crate::ir::build::tensor_type(elem, &shape)),
                    ..Default::default()
                },
            });
        }
        graph.clear_outputs();
        for name in &self.makes[s] {
            let v = graph.value_by_name(name).expect("a made value");
            graph.add_output(GraphIo {
                value: v,
                info: crate::proto::ValueInfoProto {
                    name: Some(name.clone()),
                    ..Default::default()
                },
            });
        }
        graph.compact();
        Ok(Model {
            proto: model.proto.clone(),
            graph,
            path: model.path.clone(),
            dir: model.dir.clone(),
        })
    }
}
