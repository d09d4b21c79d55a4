//! Editing the graph: fresh names, values and initializers, nodes added, rewired and
//! removed, graph inputs and outputs, and compaction with the renumbering it did.

use std::collections::HashSet;

use super::*;

impl Graph {
    /// A name not used by any value, derived from `base`.
    pub fn fresh_name(&self, base: &str) -> String {
        if !self.names.contains_key(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !self.names.contains_key(n))
            .expect("some suffix is free")
    }

    /// A node name not used by any live node, derived from `base`: `base`, else the
    /// smallest free `base_N` (N ≥ 1). Amortised O(1): a hint per base remembers where
    /// the search stopped, and is lowered when a node with a suffix is removed.
    pub fn fresh_node_name(&mut self, base: &str) -> String {
        if !self.node_names.contains_key(base) {
            return base.to_string();
        }
        let start = self.node_suffix_hint.get(base).copied().unwrap_or(1);
        let (i, name) = (start..)
            .map(|i| (i, format!("{base}_{i}")))
            .find(|(_, n)| !self.node_names.contains_key(n))
            .expect("some suffix is free");
        self.node_suffix_hint.insert(base.to_string(), i);
        name
    }

    fn name_node(&mut self, name: &str) {
        *self.node_names.entry(name.to_string()).or_insert(0) += 1;
    }

    fn unname_node(&mut self, name: &str) {
        if let Some(n) = self.node_names.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                self.node_names.remove(name);
            }
        }
        if let Some((base, suffix)) = name.rsplit_once('_') {
            if let Ok(i) = suffix.parse::<u64>() {
                if let Some(h) = self.node_suffix_hint.get_mut(base) {
                    *h = (*h).min(i.max(1));
                }
            }
        }
    }

    /// The graph inputs, in order.
    pub fn inputs(&self) -> &[GraphIo] {
        &self.inputs
    }

    /// The graph outputs, in order.
    pub fn outputs(&self) -> &[GraphIo] {
        &self.outputs
    }

    /// Appends a graph input.
    pub fn add_input(&mut self, io: GraphIo) {
        self.inputs.push(io);
    }

    /// Appends a graph output.
    pub fn add_output(&mut self, io: GraphIo) {
        self.outputs.push(io);
    }

    /// Keeps the graph inputs `keep` accepts (their values stay).
    pub fn retain_inputs(&mut self, keep: impl Fn(&GraphIo) -> bool) {
        self.inputs.retain(keep);
    }

    /// A copy that holds only the initializers `keep` accepts; the others become
    /// undefined values (cheap when most of a large model's weights are left out).
    pub fn clone_keeping(&self, keep: impl Fn(ValueId) -> bool) -> Graph {
        let kept = |i: usize| keep(ValueId(i as u32));
        Graph {
            nodes: self.nodes.clone(),
            values: self
                .values
                .iter()
                .enumerate()
                .map(|(i, v)| match v.def {
                    Def::Initializer if !kept(i) => Value {
                        name: v.name.clone(),
                        def: Def::Undefined,
                        users: v.users.clone(),
                        init: None,
                    },
                    _ => v.clone(),
                })
                .collect(),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            initializer_order: self
                .initializer_order
                .iter()
                .copied()
                .filter(|v| keep(*v))
                .collect(),
            names: self.names.clone(),
            node_names: self.node_names.clone(),
            node_suffix_hint: self.node_suffix_hint.clone(),
            rest: self.rest.clone(),
        }
    }

    /// Renames value `v` to `name` (which must be free), its initializer's proto too.
    pub fn rename_value(&mut self, v: ValueId, name: &str) {
        debug_assert!(!self.names.contains_key(name), "{name} is taken");
        let value = &mut self.values[v.0 as usize];
        self.names.remove(&value.name);
        value.name = name.to_string();
        if let Some(init) = &mut value.init {
            init.proto.name = Some(name.to_string());
        }
        self.names.insert(name.to_string(), v);
    }

    /// Removes every graph output (their values stay).
    pub fn clear_outputs(&mut self) {
        self.outputs.clear();
    }

    /// Moves the first `n` outputs after the others.
    pub fn rotate_outputs(&mut self, n: usize) {
        self.outputs.rotate_left(n);
    }

    pub(super) fn intern(&mut self, name: &str) -> ValueId {
        if let Some(&id) = self.names.get(name) {
            return id;
        }
        let id = ValueId(self.values.len() as u32);
        self.values.push(Value {
            name: name.to_string(),
            def: Def::Undefined,
            users: Vec::new(),
            init: None,
        });
        self.names.insert(name.to_string(), id);
        id
    }

    /// A new value named `name` (made unique), defined by nothing yet.
    pub fn new_value(&mut self, name: &str) -> ValueId {
        let name = self.fresh_name(name);
        self.intern(&name)
    }

    /// Adds an initializer called `name` (made unique; the proto's name is set to it).
    pub fn add_initializer(&mut self, name: &str, mut init: Initializer) -> ValueId {
        let id = self.new_value(name);
        init.proto.name = Some(self.values[id.0 as usize].name.clone());
        self.define_initializer(id, init);
        id
    }

    pub(super) fn define_initializer(&mut self, id: ValueId, init: Initializer) {
        let value = &mut self.values[id.0 as usize];
        value.def = Def::Initializer;
        value.init = Some(init);
        self.initializer_order.push(id);
    }

    /// Turns the value `id` (a node output) into an initializer holding `init`:
    /// detaches it from its producer. Used by constant folding.
    pub fn make_initializer(&mut self, id: ValueId, mut init: Initializer) {
        if let Def::Node(n, slot) = self.value(id).def {
            self.node_mut(n).outputs[slot] = None;
        }
        init.proto.name = Some(self.value(id).name.clone());
        self.define_initializer(id, init);
    }

    /// Replaces the initializer `v`'s tensor (name kept).
    pub fn replace_initializer(&mut self, v: ValueId, mut init: Initializer) {
        init.proto.name = Some(self.value(v).name.clone());
        let value = &mut self.values[v.0 as usize];
        debug_assert_eq!(value.def, Def::Initializer);
        value.init = Some(init);
    }

    /// Makes input `slot` of `node` read `value`.
    pub fn set_input(&mut self, node: NodeId, slot: usize, value: Option<ValueId>) {
        let old = std::mem::replace(&mut self.node_mut(node).inputs[slot], value);
        if let Some(old) = old {
            let users = &mut self.values[old.0 as usize].users;
            if let Some(pos) = users.iter().position(|&u| u == node) {
                users.remove(pos);
            }
        }
        if let Some(v) = value {
            self.values[v.0 as usize].users.push(node);
        }
    }

    /// Removes the nodes and initializers that only fed `v` (now unread), walking back.
    pub fn remove_if_dead(&mut self, v: ValueId) {
        if !self.value(v).users.is_empty() || self.is_output(v) {
            return;
        }
        match self.value(v).def {
            Def::Initializer => self.remove_initializer(v),
            Def::Node(n, _) => {
                let node = self.node(n);
                let all_dead = node
                    .outputs
                    .iter()
                    .flatten()
                    .all(|&o| self.value(o).users.is_empty() && !self.is_output(o));
                if all_dead {
                    let reads: Vec<ValueId> = node.reads().collect();
                    self.remove_node(n);
                    for r in reads {
                        self.remove_if_dead(r);
                    }
                }
            }
            _ => {}
        }
    }

    /// Appends a node reading `inputs` and defining `outputs` (which must be undefined).
    pub fn add_node(
        &mut self,
        proto: NodeProto,
        inputs: Vec<Option<ValueId>>,
        outputs: Vec<Option<ValueId>>,
    ) -> Result<NodeId> {
        let id = NodeId(self.nodes.len() as u32);
        for (slot, out) in outputs.iter().enumerate() {
            if let Some(v) = *out {
                let value = &mut self.values[v.0 as usize];
                if value.def != Def::Undefined {
                    return Err(Error::Graph(format!(
                        "value '{}' is defined twice (again by node '{}' ({}))",
                        value.name,
                        proto.name(),
                        proto.op_type()
                    )));
                }
                value.def = Def::Node(id, slot);
            }
        }
        for v in inputs.iter().flatten() {
            self.values[v.0 as usize].users.push(id);
        }
        self.name_node(proto.name());
        self.nodes.push(Some(Node {
            proto,
            inputs,
            outputs,
            captures: Vec::new(),
        }));
        Ok(id)
    }

    /// Builds and appends a default-domain node `op(inputs) -> n_outputs fresh values`,
    /// named after `name`; returns the node and its outputs.
    pub fn add_op(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[ValueId],
        attributes: Vec<crate::proto::AttributeProto>,
        n_outputs: usize,
    ) -> Result<(NodeId, Vec<ValueId>)> {
        let name = self.fresh_node_name(name);
        let outputs: Vec<ValueId> = (0..n_outputs)
            .map(|i| self.new_value(&format!("{name}.out{i}")))
            .collect();
        let proto = NodeProto {
            name: Some(name),
            op_type: Some(op.to_string()),
            attribute: attributes,
            ..Default::default()
        };
        let node = self.add_node(
            proto,
            inputs.iter().map(|&v| Some(v)).collect(),
            outputs.iter().map(|&v| Some(v)).collect(),
        )?;
        Ok((node, outputs))
    }

    /// Makes every reader of `old` except `keep` read `new` instead; a graph output
    /// `old` keeps its name by swapping names with `new`, so the model's interface
    /// never changes.
    pub fn replace_uses(&mut self, old: ValueId, new: ValueId, keep: &[NodeId]) {
        let users = std::mem::take(&mut self.values[old.0 as usize].users);
        let (stay, moved): (Vec<NodeId>, Vec<NodeId>) =
            users.into_iter().partition(|u| keep.contains(u));
        self.values[old.0 as usize].users = stay;
        for &user in &moved {
            let node = self.nodes[user.0 as usize].as_mut().expect("live user");
            for input in node.inputs.iter_mut().flatten() {
                if *input == old {
                    *input = new;
                }
            }
            for capture in node.captures.iter_mut() {
                if *capture == old {
                    *capture = new;
                }
            }
        }
        self.values[new.0 as usize].users.extend(moved);
        if self.is_output(old) {
            self.swap_names(old, new);
            for out in &mut self.outputs {
                if out.value == old {
                    out.value = new;
                }
            }
        }
    }

    fn swap_names(&mut self, a: ValueId, b: ValueId) {
        let (ia, ib) = (a.0 as usize, b.0 as usize);
        let name_a = std::mem::take(&mut self.values[ia].name);
        let name_b = std::mem::replace(&mut self.values[ib].name, name_a.clone());
        self.values[ia].name = name_b.clone();
        self.names.insert(name_a, b);
        self.names.insert(name_b, a);
        for id in [a, b] {
            let name = self.values[id.0 as usize].name.clone();
            if let Some(init) = self.values[id.0 as usize].init.as_mut() {
                init.proto.name = Some(name);
            }
        }
    }

    /// Removes node `id`: its outputs become undefined, its reads are dropped.
    /// Values keep their ids until [`Graph::compact`].
    pub fn remove_node(&mut self, id: NodeId) {
        let node = self.nodes[id.0 as usize]
            .take()
            .expect("remove a live node");
        self.unname_node(node.name());
        for v in node.reads() {
            let users = &mut self.values[v.0 as usize].users;
            if let Some(pos) = users.iter().position(|&u| u == id) {
                users.remove(pos);
            }
        }
        for v in node.outputs.iter().flatten() {
            self.values[v.0 as usize].def = Def::Undefined;
        }
    }

    /// Turns the initializer `id` into a value defined as a graph input (the caller
    /// adds the `GraphIo`).
    pub fn initializer_to_input(&mut self, id: ValueId) {
        let value = &mut self.values[id.0 as usize];
        value.init = None;
        value.def = Def::Input;
        self.initializer_order.retain(|&v| v != id);
    }

    /// Marks the undefined value `id` as a graph input (the caller adds the `GraphIo`).
    pub fn set_input_def(&mut self, id: ValueId) {
        let value = &mut self.values[id.0 as usize];
        debug_assert_eq!(value.def, Def::Undefined);
        value.def = Def::Input;
    }

    /// Removes the initializer `id` (it must have no users left).
    pub fn remove_initializer(&mut self, id: ValueId) {
        let value = &mut self.values[id.0 as usize];
        debug_assert!(value.users.is_empty());
        value.init = None;
        value.def = Def::Undefined;
        self.initializer_order.retain(|&v| v != id);
    }

    /// Drops removed nodes and values nothing defines, reads or exports, and renumbers
    /// the arena. Ids held before are invalid afterwards: the returned [`Remap`] maps
    /// them to the new ones.
    pub fn compact(&mut self) -> Remap {
        let io: HashSet<ValueId> = self
            .inputs
            .iter()
            .chain(&self.outputs)
            .map(|io| io.value)
            .collect();
        let keep_value: Vec<bool> = self
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.def != Def::Undefined || !v.users.is_empty() || io.contains(&ValueId(i as u32))
            })
            .collect();
        let mut value_map = vec![None; self.values.len()];
        let mut next = 0u32;
        for (i, keep) in keep_value.iter().enumerate() {
            if *keep {
                value_map[i] = Some(ValueId(next));
                next += 1;
            }
        }
        let mut node_map = vec![None; self.nodes.len()];
        let mut next = 0u32;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.is_some() {
                node_map[i] = Some(NodeId(next));
                next += 1;
            }
        }
        let vmap = |v: ValueId| value_map[v.0 as usize].expect("kept value");
        let nmap = |n: NodeId| node_map[n.0 as usize].expect("kept node");

        let old_values = std::mem::take(&mut self.values);
        self.values = old_values
            .into_iter()
            .zip(&keep_value)
            .filter(|(_, k)| **k)
            .map(|(mut v, _)| {
                v.users = v.users.iter().map(|&u| nmap(u)).collect();
                if let Def::Node(n, slot) = v.def {
                    v.def = Def::Node(nmap(n), slot);
                }
                v
            })
            .collect();
        let old_nodes = std::mem::take(&mut self.nodes);
        self.nodes = old_nodes
            .into_iter()
            .flatten()
            .map(|mut n| {
                n.inputs = n.inputs.iter().map(|v| v.map(vmap)).collect();
                n.outputs = n.outputs.iter().map(|v| v.map(vmap)).collect();
                n.captures = n.captures.iter().map(|&v| vmap(v)).collect();
                Some(n)
            })
            .collect();
        for io in self.inputs.iter_mut().chain(self.outputs.iter_mut()) {
            io.value = vmap(io.value);
        }
        self.initializer_order = self.initializer_order.iter().map(|&v| vmap(v)).collect();
        self.names = self
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), ValueId(i as u32)))
            .collect();
        Remap {
            values: value_map,
            nodes: node_map,
        }
    }
}

/// How [`Graph::compact`] renumbered the arena.
#[derive(Debug, Clone, Default)]
pub struct Remap {
    values: Vec<Option<ValueId>>,
    nodes: Vec<Option<NodeId>>,
}

impl Remap {
    /// The new id of value `v`, or `None` when it was dropped.
    pub fn value(&self, v: ValueId) -> Option<ValueId> {
        self.values.get(v.0 as usize).copied().flatten()
    }

    /// The new id of node `n`, or `None` when it was removed.
    pub fn node(&self, n: NodeId) -> Option<NodeId> {
        self.nodes.get(n.0 as usize).copied().flatten()
    }
}
