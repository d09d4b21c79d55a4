//! Conversion between `GraphProto` and the arena [`Graph`].

use std::collections::{BinaryHeap, HashSet};

use super::{Def, Graph, GraphIo, Initializer, Node, NodeId, ValueId};
use crate::error::{Error, Result};
use crate::proto::{GraphProto, NodeProto, TensorProto};

impl Graph {
    /// Builds the arena from a graph proto. `external` resolves the bytes of an
    /// initializer stored as external data (already checked by the loader).
    pub fn from_proto(
        mut proto: GraphProto,
        mut external: impl FnMut(&TensorProto) -> Result<Option<super::ExternalBytes>>,
    ) -> Result<Graph> {
        let nodes = std::mem::take(&mut proto.node);
        let initializers = std::mem::take(&mut proto.initializer);
        let inputs = std::mem::take(&mut proto.input);
        let outputs = std::mem::take(&mut proto.output);
        let mut graph = Graph {
            rest: proto,
            ..Graph::default()
        };
        for tensor in initializers {
            let name = tensor.name().to_string();
            if graph.names.contains_key(&name) {
                return Err(Error::Graph(format!(
                    "initializer '{name}' is defined twice"
                )));
            }
            let id = graph.intern(&name);
            let ext = external(&tensor)?;
            graph.define_initializer(
                id,
                Initializer {
                    proto: tensor,
                    external: ext,
                    new: false,
                },
            );
        }
        let mut seen_inputs = HashSet::new();
        for info in inputs {
            if !seen_inputs.insert(info.name().to_string()) {
                return Err(Error::Graph(format!(
                    "graph input '{}' is declared twice",
                    info.name()
                )));
            }
            let id = graph.intern(info.name());
            if graph.value(id).def == Def::Undefined {
                graph.values[id.0 as usize].def = Def::Input;
            }
            graph.inputs.push(GraphIo { value: id, info });
        }
        for mut node in nodes {
            let input_names = std::mem::take(&mut node.input);
            let output_names = std::mem::take(&mut node.output);
            let inputs = input_names
                .iter()
                .map(|n| (!n.is_empty()).then(|| graph.intern(n)))
                .collect();
            let outputs = output_names
                .iter()
                .map(|n| (!n.is_empty()).then(|| graph.intern(n)))
                .collect();
            let captured: Vec<String> = outer_names(&node);
            let id = graph.add_node(node, inputs, outputs)?;
            let captures: Vec<ValueId> = captured.iter().map(|n| graph.intern(n)).collect();
            for &c in &captures {
                graph.values[c.0 as usize].users.push(id);
            }
            graph.node_mut(id).captures = captures;
        }
        for info in outputs {
            let id = graph.intern(info.name());
            graph.outputs.push(GraphIo { value: id, info });
        }
        Ok(graph)
    }

    /// The graph as a proto: nodes in a stable topological order (the arena order
    /// wherever that is already topological), initializers through `tensor`.
    pub fn to_proto(
        &self,
        mut tensor: impl FnMut(&Initializer) -> TensorProto,
    ) -> Result<GraphProto> {
        let mut proto = self.rest.clone();
        proto.node = self
            .topological_order()?
            .into_iter()
            .map(|id| self.node_proto(id))
            .collect();
        proto.initializer = self.initializers().map(|(_, init)| tensor(init)).collect();
        proto.input = self.io_protos(&self.inputs);
        proto.output = self.io_protos(&self.outputs);
        Ok(proto)
    }

    fn io_protos(&self, io: &[GraphIo]) -> Vec<crate::proto::ValueInfoProto> {
        io.iter()
            .map(|io| {
                let mut info = io.info.clone();
                info.name = Some(self.value(io.value).name.clone());
                info
            })
            .collect()
    }

    /// The node's proto with its input and output names filled in.
    pub fn node_proto(&self, id: NodeId) -> NodeProto {
        let node = self.node(id);
        let name = |v: &Option<ValueId>| v.map(|v| self.value(v).name.clone()).unwrap_or_default();
        let mut proto = node.proto.clone();
        proto.input = node.inputs.iter().map(name).collect();
        proto.output = node.outputs.iter().map(name).collect();
        proto
    }

    /// Live nodes in topological order; among ready nodes the lowest id goes first,
    /// so an already sorted arena keeps its order. Fails on a cycle.
    pub fn topological_order(&self) -> Result<Vec<NodeId>> {
        let mut pending = vec![0usize; self.nodes.len()];
        for id in self.node_ids() {
            pending[id.0 as usize] = self
                .node(id)
                .reads()
                .filter(|&v| matches!(self.value(v).def, Def::Node(..)))
                .count();
        }
        let mut ready: BinaryHeap<std::cmp::Reverse<NodeId>> = self
            .node_ids()
            .filter(|id| pending[id.0 as usize] == 0)
            .map(std::cmp::Reverse)
            .collect();
        let mut order = Vec::with_capacity(self.nodes.len());
        while let Some(std::cmp::Reverse(id)) = ready.pop() {
            order.push(id);
            for out in self.node(id).outputs.iter().flatten() {
                for &user in &self.value(*out).users {
                    let p = &mut pending[user.0 as usize];
                    *p -= 1;
                    if *p == 0 {
                        ready.push(std::cmp::Reverse(user));
                    }
                }
            }
        }
        if order.len() != self.node_count() {
            return Err(Error::Graph(self.describe_cycle()));
        }
        Ok(order)
    }
}

/// Names a subgraph attribute reads from the enclosing scopes.
fn outer_names(node: &NodeProto) -> Vec<String> {
    let mut names = Vec::new();
    for attr in &node.attribute {
        for g in attr.g.iter().chain(&attr.graphs) {
            collect_outer(g, &mut HashSet::new(), &mut names);
        }
    }
    let mut seen = HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

fn collect_outer(graph: &GraphProto, outer_defined: &mut HashSet<String>, out: &mut Vec<String>) {
    let mut defined: HashSet<String> = outer_defined.clone();
    defined.extend(graph.input.iter().map(|i| i.name().to_string()));
    defined.extend(graph.initializer.iter().map(|i| i.name().to_string()));
    defined.extend(
        graph
            .sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref())
            .map(|v| v.name().to_string()),
    );
    for node in &graph.node {
        for input in &node.input {
            if !input.is_empty() && !defined.contains(input) {
                out.push(input.clone());
            }
        }
        for attr in &node.attribute {
            for g in attr.g.iter().chain(&attr.graphs) {
                collect_outer(g, &mut defined, out);
            }
        }
        defined.extend(node.output.iter().cloned());
    }
    for o in &graph.output {
        if !defined.contains(o.name()) {
            out.push(o.name().to_string());
        }
    }
}

impl Node {
    /// Whether any attribute holds a subgraph.
    pub fn has_subgraphs(&self) -> bool {
        self.proto
            .attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
    }
}
