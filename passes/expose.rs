//! Exposing fused projections: onnxruntime's transformer optimizer folds a layer's query,
//! key and value projections into one `Attention` node (`x·W_qkv + b` inside the op), so
//! no linear layer is left for an adapter on `query`, `key` or `value`. This pass
//! rewrites such an `Attention` into three `MatMul`s on the column blocks of `W_qkv`
//! feeding onnxruntime's `MultiHeadAttention` (still one fused attention kernel, the bias
//! and masks as they were), the weights named after the modules they were
//! (`encoder.layer.0.attention.self.query.weight`), so PEFT and lora-lite adapters made
//! on the PyTorch model apply by name. `jobs::expose_fused_projections` runs it only
//! where an adapter lands on one of them.

use crate::error::Result;
use crate::ir::{Def, Graph, Initializer, NodeId, ValueId};
use crate::proto::NodeProto;
use crate::tensor::Array;

/// Module names of the three projections, by the attention block's path (from the
/// node's output name): one line per model family, the first whose suffix matches.
const PROJECTIONS: &[(&str, [&str; 3])] = &[
    // BERT, RoBERTa, ...: `encoder.layer.N.attention.self.{query,key,value}`
    ("attention.self", ["query", "key", "value"]),
    // Llama-style names, should an optimizer fuse them
    ("self_attn", ["q_proj", "k_proj", "v_proj"]),
];

/// Rewrites every exposable `Attention`; `modules` lists the projections made.
#[derive(Debug, Default)]
pub struct ExposeProjections {
    /// The query, key and value modules made (`….query`, ...), per rewritten node.
    pub modules: Vec<String>,
}

impl super::Pass for ExposeProjections {
    fn name(&self) -> &'static str {
        "expose"
    }

    fn run(&mut self, graph: &mut Graph, _: &super::PassContext) -> Result<()> {
        let found: Vec<NodeId> = graph
            .node_ids()
            .filter(|&id| exposable(graph, id).is_some())
            .collect();
        for id in found {
            let projections = exposable(graph, id).expect("checked");
            let node = graph.node(id).clone();
            let x = node.inputs[0].expect("checked");
            let matmul = |graph: &mut Graph, module: &str, weight: ValueId| {
                let name = format!("/{}/MatMul", module.replace('.', "/"));
                graph
                    .add_op("MatMul", &name, &[x, weight], vec![], 1)
                    .map(|(_, out)| out[0])
            };
            let projected = match projections {
                Projections::Separate(prefix, names, blocks) => {
                    let mut projected = Vec::new();
                    for (name, block) in names.iter().zip(blocks) {
                        let module = format!("{prefix}.{name}");
                        let weight = graph.add_initializer(
                            &graph.fresh_name(&format!("{module}.weight")),
                            Initializer::from_array(&Array::F32(block.into_dyn()))?,
                        );
                        projected.push(matmul(graph, &module, weight)?);
                        self.modules.push(module);
                    }
                    projected
                }
                Projections::Packed(module, sizes) => {
                    let weight = node.inputs[1].expect("checked");
                    let qkv = matmul(graph, &module, weight)?;
                    self.modules.push(module.clone());
                    let sizes = graph.add_initializer(
                        &graph.fresh_name(&format!("{module}.split")),
                        Initializer::from_array(&Array::I64(
                            tract_core::ndarray::ArrayD::from_shape_vec(
                                vec![3],
                                sizes.iter().map(|&s| s as i64).collect(),
                            )
                            .expect("3 sizes"),
                        ))?,
                    );
                    let name = format!("/{}/Split", module.replace('.', "/"));
                    let axis = vec![crate::ir::build::int_attr("axis", -1)];
                    graph.add_op("Split", &name, &[qkv, sizes], axis, 3)?.1
                }
            };
            let attributes = ["num_heads", "scale", "mask_filter_value", "unidirectional"]
                .into_iter()
                .filter_map(|a| node.attr(a).cloned())
                .collect();
            // MultiHeadAttention(query, key, value, bias, key_padding_mask, attention_bias)
            let slot = |i: usize| node.inputs.get(i).copied().flatten();
            let mut inputs: Vec<Option<ValueId>> = projected.into_iter().map(Some).collect();
            inputs.extend([slot(2), slot(3), slot(5)]);
            while inputs.last() == Some(&None) {
                inputs.pop();
            }
            graph.remove_node(id);
            let proto = NodeProto {
                name: Some(graph.fresh_node_name(&format!("{}.mha", node.name()))),
                op_type: Some("MultiHeadAttention".into()),
                domain: Some("com.microsoft".into()),
                attribute: attributes,
                ..Default::default()
            };
            graph.add_node(proto, inputs, vec![node.outputs[0]])?;
            if let Some(w) = node.inputs[1] {
                graph.remove_if_dead(w);
            }
        }
        Ok(())
    }
}

/// How an `Attention`'s projections come out.
enum Projections {
    /// Three modules (`prefix.query`, ...) of their own, with their weights `[D, D_q]`,
    /// `[D, D_k]`, `[D, D_v]` (BERT: the optimizer concatenated them).
    Separate(
        String,
        [&'static str; 3],
        Vec<tract_core::ndarray::Array2<f32>>,
    ),
    /// One module that was one projection already (GPT-2's `attn.c_attn`, named by its
    /// weight), split into query, key and value of these widths after the product.
    Packed(String, [usize; 3]),
}

/// For an `Attention` node this pass can rewrite, its projections. It must hold a stored
/// float32 weight, no past state, no rotary embedding, a mask the `MultiHeadAttention`
/// kernel reads the same way (none, `[B, T]`, `[B, S, T]`, or the `[B]` lengths
/// `EmbedLayerNormalization` makes), and only its first output used.
fn exposable(graph: &Graph, id: NodeId) -> Option<Projections> {
    let node = graph.node(id);
    if node.domain() != "com.microsoft" || node.op() != "Attention" {
        return None;
    }
    let slot = |i: usize| node.inputs.get(i).copied().flatten();
    if slot(4).is_some()
        || slot(6).is_some()
        || node.attr_int("do_rotary", 0) != 0
        || node.attr_int("past_present_share_buffer", 0) != 0
        || node
            .outputs
            .iter()
            .skip(1)
            .flatten()
            .any(|&v| !graph.value(v).users.is_empty() || graph.is_output(v))
    {
        return None;
    }
    if let Some(mask) = slot(3) {
        let from_embed = matches!(graph.value(mask).def,
            Def::Node(p, 1) if graph.node(p).op() == "EmbedLayerNormalization");
        let rank = crate::ir::infer::rank(graph, mask);
        if !(from_embed || matches!(rank, Some(2) | Some(3))) {
            return None;
        }
    }
    let weight = crate::interp::evaluate(graph, slot(1)?).ok()?;
    let Array::F32(weight) = weight else {
        return None;
    };
    let weight = weight
        .into_dimensionality::<tract_core::ndarray::Ix2>()
        .ok()?;
    let cols = weight.ncols();
    let sizes: Vec<usize> = match node.attr_ints("qkv_hidden_sizes") {
        Some([q, k, v]) => [*q, *k, *v].iter().map(|&s| s as usize).collect(),
        Some(_) => return None,
        None if cols % 3 == 0 => vec![cols / 3; 3],
        None => return None,
    };
    if sizes.iter().sum::<usize>() != cols || sizes[0] != sizes[1] {
        return None;
    }
    // A weight named after its module (`….c_attn.weight`) was one projection in the
    // model: it stays one.
    let weight_name = &graph.value(slot(1)?).name;
    if let Some(module) = weight_name.strip_suffix(".weight") {
        let sizes = [sizes[0], sizes[1], sizes[2]];
        return Some(Projections::Packed(module.to_string(), sizes));
    }
    let path = graph.value(node.outputs[0]?).name.clone();
    let scope: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let scope = scope[..scope.len().saturating_sub(1)].join(".");
    let (prefix, names) = match PROJECTIONS.iter().find(|(s, _)| scope.ends_with(s)) {
        Some((_, names)) => (scope, *names),
        None => (node.name().to_string(), ["q", "k", "v"]),
    };
    let mut start = 0;
    let blocks = sizes
        .iter()
        .map(|&s| {
            let block = weight
                .slice(tract_core::ndarray::s![.., start..start + s])
                .to_owned();
            start += s;
            block
        })
        .collect();
    Some(Projections::Separate(prefix, names, blocks))
}
