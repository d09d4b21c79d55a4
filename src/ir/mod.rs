//! The arena IR passes work on: nodes and values with typed ids, the producer and users
//! of every value, fresh unique names, splicing and removal with compaction.
//!
//! Everything a pass does not touch is kept verbatim: a node keeps its whole
//! `NodeProto` (attributes, domain, metadata, doc string) and the graph keeps every
//! `GraphProto` field other than nodes, initializers, inputs and outputs.

pub mod build;
pub mod dump;
mod edit;
pub mod infer;
mod proto;
mod storage;
pub mod validate;

pub use edit::Remap;
pub use storage::{
    spill_f64, DataFile, DataSink, ExternalBytes, Initializer, DATA_ALIGN, SPILL_BYTES,
};

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::proto::{NodeProto, ValueInfoProto};

/// Index of a node in the arena.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u32);

/// Index of a value (a named tensor edge) in the arena.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(u32);

/// Where a value comes from.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Def {
    /// Nothing defines it (an error unless a pass is about to define it).
    Undefined,
    /// A graph input that is not an initializer.
    Input,
    /// An initializer.
    Initializer,
    /// Output `slot` of a node.
    Node(NodeId, usize),
}

/// A named tensor of the graph.
#[derive(Clone, Debug)]
pub struct Value {
    /// Unique name in the graph.
    pub name: String,
    /// Its producer.
    pub def: Def,
    /// Nodes reading it, once per input slot or capture (order of insertion).
    pub users: Vec<NodeId>,
    /// The initializer, when `def` is [`Def::Initializer`].
    pub init: Option<Initializer>,
}

/// A node: the proto it came from (inputs and outputs cleared) and its edges.
#[derive(Clone, Debug)]
pub struct Node {
    /// Everything but the input and output names.
    pub proto: NodeProto,
    /// Input values; `None` for an omitted optional input (`""`).
    pub inputs: Vec<Option<ValueId>>,
    /// Output values; `None` for an omitted optional output.
    pub outputs: Vec<Option<ValueId>>,
    /// Outer values read by the node's subgraph attributes (If, Loop, Scan).
    pub captures: Vec<ValueId>,
}

impl Node {
    /// The op type, e.g. `MatMul`.
    pub fn op(&self) -> &str {
        self.proto.op_type()
    }

    /// The node's name (may be empty).
    pub fn name(&self) -> &str {
        self.proto.name()
    }

    /// The node's domain (`""` is the default ONNX domain).
    pub fn domain(&self) -> &str {
        self.proto.domain()
    }

    /// The attribute called `name`, if present.
    pub fn attr(&self, name: &str) -> Option<&crate::proto::AttributeProto> {
        self.proto.attribute.iter().find(|a| a.name() == name)
    }

    /// An integer attribute, or `default`.
    pub fn attr_int(&self, name: &str, default: i64) -> i64 {
        self.attr(name).and_then(|a| a.i).unwrap_or(default)
    }

    /// A float attribute, or `default`.
    pub fn attr_float(&self, name: &str, default: f32) -> f32 {
        self.attr(name).and_then(|a| a.f).unwrap_or(default)
    }

    /// An integer-list attribute, if present.
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }

    /// Every defined input value and capture, in order.
    pub fn reads(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.inputs
            .iter()
            .flatten()
            .copied()
            .chain(self.captures.iter().copied())
    }
}

/// A graph input or output: its value and the declared type.
#[derive(Clone, Debug)]
pub struct GraphIo {
    /// The value.
    pub value: ValueId,
    /// The declared name, type and shape, kept verbatim.
    pub info: ValueInfoProto,
}

/// The arena graph.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    nodes: Vec<Option<Node>>,
    values: Vec<Value>,
    /// Graph inputs, in order (may name initializers, as IR < 4 models do).
    inputs: Vec<GraphIo>,
    /// Graph outputs, in order.
    outputs: Vec<GraphIo>,
    /// Initializers in storage order.
    initializer_order: Vec<ValueId>,
    names: HashMap<String, ValueId>,
    /// Live nodes by name (how many bear each), for fresh names in O(1).
    node_names: HashMap<String, u32>,
    /// Per base name, the smallest `_N` suffix that may be free.
    node_suffix_hint: HashMap<String, u64>,
    /// Every `GraphProto` field the IR does not model, kept verbatim.
    pub rest: crate::proto::GraphProto,
}

impl Graph {
    /// The node `id`. Panics if it was removed: ids of removed nodes must not be kept.
    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes[id.0 as usize]
            .as_ref()
            .expect("node id of a removed node")
    }

    /// The node `id`, mutably (edges must be changed through the graph's methods).
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes[id.0 as usize]
            .as_mut()
            .expect("node id of a removed node")
    }

    /// Whether `id` names a live node.
    pub fn is_live(&self, id: NodeId) -> bool {
        self.nodes.get(id.0 as usize).is_some_and(Option::is_some)
    }

    /// Ids of all live nodes, in arena order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.is_some())
            .map(|(i, _)| NodeId(i as u32))
    }

    /// Number of live nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.is_some()).count()
    }

    /// The value `id`.
    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.0 as usize]
    }

    /// Ids of all values.
    pub fn value_ids(&self) -> impl Iterator<Item = ValueId> {
        (0..self.values.len() as u32).map(ValueId)
    }

    /// The value called `name`.
    pub fn value_by_name(&self, name: &str) -> Option<ValueId> {
        self.names.get(name).copied()
    }

    /// The initializer of `id`, if it is one.
    pub fn initializer(&self, id: ValueId) -> Option<&Initializer> {
        self.value(id).init.as_ref()
    }

    /// Initializers in storage order.
    pub fn initializers(&self) -> impl Iterator<Item = (ValueId, &Initializer)> + '_ {
        self.initializer_order.iter().map(|&v| {
            (
                v,
                self.values[v.0 as usize]
                    .init
                    .as_ref()
                    .expect("initializer"),
            )
        })
    }

    /// The node producing `id`, if a node does.
    pub fn producer(&self, id: ValueId) -> Option<NodeId> {
        match self.value(id).def {
            Def::Node(n, _) => Some(n),
            _ => None,
        }
    }

    /// Whether `id` is one of the graph outputs.
    pub fn is_output(&self, id: ValueId) -> bool {
        self.outputs.iter().any(|o| o.value == id)
    }
}
