//! Structural checks: every input defined, no cycles, unique names, outputs produced.

use std::collections::HashSet;

use petgraph::graphmap::DiGraphMap;

use super::{Def, Graph, NodeId};
use crate::error::{Error, Result};

impl Graph {
    /// Checks the rules every pass must keep. Errors name the node and value at fault.
    pub fn validate(&self) -> Result<()> {
        for id in self.node_ids() {
            let node = self.node(id);
            for v in node.reads() {
                if self.value(v).def == Def::Undefined {
                    return Err(Error::Graph(format!(
                        "node '{}' ({}) reads '{}', which no node, input or initializer defines",
                        node.name(),
                        node.op(),
                        self.value(v).name
                    )));
                }
            }
        }
        let mut node_names = HashSet::new();
        for id in self.node_ids() {
            let name = self.node(id).name();
            if !name.is_empty() && !node_names.insert(name) {
                return Err(Error::Graph(format!("two nodes are named '{name}'")));
            }
        }
        for out in &self.outputs {
            if self.value(out.value).def == Def::Undefined {
                return Err(Error::Graph(format!(
                    "graph output '{}' is not produced by any node, input or initializer",
                    self.value(out.value).name
                )));
            }
        }
        self.topological_order().map(|_| ())
    }

    /// A readable description of one cycle of the graph (for errors).
    pub(super) fn describe_cycle(&self) -> String {
        let mut dependencies = DiGraphMap::<NodeId, ()>::new();
        for id in self.node_ids() {
            dependencies.add_node(id);
            for v in self.node(id).reads() {
                if let Def::Node(producer, _) = self.value(v).def {
                    dependencies.add_edge(producer, id, ());
                }
            }
        }
        let cycle = petgraph::algo::tarjan_scc(&dependencies)
            .into_iter()
            .find(|scc| scc.len() > 1 || dependencies.contains_edge(scc[0], scc[0]))
            .unwrap_or_default();
        let names: Vec<String> = cycle
            .iter()
            .map(|&id| format!("'{}' ({})", self.node(id).name(), self.node(id).op()))
            .collect();
        format!("the graph has a cycle through nodes {}", names.join(", "))
    }
}
