//! The targeting pass: golden target lists for every fixture, roles, filters, errors.

mod common;

use common::{check_golden, fixture, FIXTURES};
use lora_graft::passes::target::{self, Filters, Role, RoleSource, Targeting};
use lora_graft::Model;
use regex::Regex;

fn targets(name: &str, filters: &Filters) -> lora_graft::Result<Targeting> {
    let model = Model::load(&fixture(name)).unwrap();
    target::run(&model.graph, filters)
}

fn all_roles() -> Filters {
    Filters {
        roles: vec![Role::Reader, Role::Writer, Role::Inner],
        ..Filters::default()
    }
}

#[test]
fn golden_target_lists() {
    for name in FIXTURES {
        let t = targets(name, &all_roles()).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_golden(&format!("{name}/targets.txt"), &t.to_string());
    }
}

fn modules(t: &Targeting) -> Vec<String> {
    t.targets.iter().map(|t| t.module.clone()).collect()
}

#[test]
fn llama_targets_carry_hf_module_names() {
    let t = targets("llama", &Filters::default()).unwrap();
    let mut expected = Vec::new();
    for layer in 0..2 {
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            expected.push(format!("model.layers.{layer}.{m}"));
        }
    }
    let mut got = modules(&t);
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    assert_eq!(t.d_model, 64);
    let o = t
        .targets
        .iter()
        .find(|t| t.module.ends_with("o_proj"))
        .unwrap();
    assert_eq!(
        (o.role, o.role_source),
        (Role::Writer, RoleSource::Graph),
        "o_proj settled from the graph"
    );
    let q = t
        .targets
        .iter()
        .find(|t| t.module.ends_with("q_proj"))
        .unwrap();
    assert_eq!((q.role, q.role_source), (Role::Reader, RoleSource::Graph));
    let down = t
        .targets
        .iter()
        .find(|t| t.module.ends_with("down_proj"))
        .unwrap();
    assert_eq!((down.d_in, down.d_out, down.role), (128, 64, Role::Writer));
}

#[test]
fn gpt2_gemm_targets() {
    let t = targets("gpt2", &Filters::default()).unwrap();
    let got = modules(&t);
    for layer in 0..2 {
        for m in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] {
            assert!(
                got.contains(&format!("transformer.h.{layer}.{m}")),
                "{m} in {got:?}"
            );
        }
    }
    assert_eq!(got.len(), 8);
    let c_attn = &t.targets[0];
    assert_eq!(
        (c_attn.op.as_str(), c_attn.d_in, c_attn.d_out, c_attn.bias),
        ("Gemm", 64, 192, true)
    );
    let c_proj = t
        .targets
        .iter()
        .find(|t| t.module == "transformer.h.0.attn.c_proj")
        .unwrap();
    assert_eq!(
        (c_proj.role, c_proj.role_source),
        (Role::Writer, RoleSource::Graph)
    );
}

#[test]
fn bert_targets_from_node_paths() {
    let t = targets("bert", &Filters::default()).unwrap();
    let got = modules(&t);
    for m in [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.0.output.dense",
    ] {
        assert!(got.contains(&m.to_string()), "{m} in {got:?}");
    }
    assert_eq!(got.len(), 12);
    let out = t
        .targets
        .iter()
        .find(|t| t.module == "encoder.layer.1.attention.output.dense")
        .unwrap();
    assert_eq!(
        (out.role, out.role_source, out.layer),
        (Role::Writer, RoleSource::Graph, Some(1))
    );
}

#[test]
fn handmade_odd_cases() {
    let t = targets("handmade", &all_roles()).unwrap();
    assert_eq!(t.d_model, 16);
    let by = |m: &str| {
        t.targets
            .iter()
            .filter(|t| t.module == m)
            .collect::<Vec<_>>()
    };
    let gemm = by("blocks.0.gemm");
    assert_eq!(gemm.len(), 1);
    assert_eq!(
        (gemm[0].alpha, gemm[0].d_in, gemm[0].d_out, gemm[0].bias),
        (0.5, 16, 32, true)
    );
    assert_eq!(gemm[0].layout, target::Layout::OutIn);
    let down = by("blocks.0.down");
    assert_eq!(down[0].chain, ["Transpose"]);
    assert_eq!(
        (down[0].d_in, down[0].d_out, down[0].role),
        (32, 16, Role::Writer)
    );
    // One tied module called twice: two nodes, one module, both marked shared;
    // the first reads the stream and feeds Tanh, the second is added back into it.
    let tied = by("blocks.1.tied");
    assert_eq!(tied.len(), 2);
    assert!(tied.iter().all(|t| t.shared));
    assert_eq!(
        (tied[0].role, tied[0].role_source),
        (Role::Reader, RoleSource::Graph)
    );
    assert_eq!(
        (tied[1].role, tied[1].role_source),
        (Role::Writer, RoleSource::Graph)
    );
    let up = by("blocks.1.up");
    assert!(up[0].bias, "separate bias Add found");
}

#[test]
fn genai_int4_matmulnbits_targets() {
    let t = targets("genai_int4", &Filters::default()).unwrap();
    let qkv = t
        .targets
        .iter()
        .find(|t| t.module == "model.layers.0.attn.qkv_proj")
        .unwrap();
    assert_eq!(qkv.op, "MatMulNBits");
    assert!(qkv.quantized);
    assert_eq!((qkv.d_in, qkv.d_out), (64, 128));
    let o = t
        .targets
        .iter()
        .find(|t| t.module == "model.layers.0.attn.o_proj")
        .unwrap();
    assert_eq!(
        (o.role, o.role_source),
        (Role::Writer, RoleSource::Graph),
        "o_proj feeds SkipSimplifiedLayerNormalization"
    );
    assert_eq!(t.targets.len(), 10, "{:?}", modules(&t));
}

#[test]
fn filter_target_roles() {
    let t = targets(
        "llama",
        &Filters {
            roles: vec![Role::Writer],
            ..Filters::default()
        },
    )
    .unwrap();
    let mut got = modules(&t);
    got.sort();
    assert_eq!(
        got,
        [
            "model.layers.0.mlp.down_proj",
            "model.layers.0.self_attn.o_proj",
            "model.layers.1.mlp.down_proj",
            "model.layers.1.self_attn.o_proj"
        ]
    );
}

#[test]
fn filter_target_names() {
    let f = Filters {
        names: vec![
            Regex::new(r"q_proj$").unwrap(),
            Regex::new(r"v_proj$").unwrap(),
        ],
        ..Filters::default()
    };
    assert_eq!(targets("llama", &f).unwrap().targets.len(), 4);
}

#[test]
fn filter_exclude_names() {
    let mut f = Filters::default();
    f.excludes.push(Regex::new("mlp").unwrap());
    let t = targets("llama", &f).unwrap();
    assert!(modules(&t).iter().all(|m| m.contains("self_attn")));
    assert_eq!(t.targets.len(), 8);
    // Without the default excludes, lm_head (a reader, 64 -> 512) is still left out as
    // the output head; asked for, it comes in.
    let f = Filters {
        excludes: vec![],
        ..Filters::default()
    };
    assert!(!modules(&targets("llama", &f).unwrap()).contains(&"lm_head".to_string()));
    let f = Filters {
        include_heads: true,
        ..f
    };
    assert!(modules(&targets("llama", &f).unwrap()).contains(&"lm_head".to_string()));
}

#[test]
fn filter_layers() {
    let f = Filters {
        layers: Some(vec![1]),
        ..Filters::default()
    };
    let t = targets("llama", &f).unwrap();
    assert_eq!(t.targets.len(), 7);
    assert!(t.targets.iter().all(|t| t.layer == Some(1)));
}

#[test]
fn strip_prefix() {
    let f = Filters {
        strip_prefix: Some("model.".into()),
        ..Filters::default()
    };
    assert!(
        modules(&targets("llama", &f).unwrap()).contains(&"layers.0.self_attn.q_proj".to_string())
    );
}

#[test]
fn a_filter_that_matches_nothing_says_which_removed_what() {
    let f = Filters {
        names: vec![Regex::new("no_such_module").unwrap()],
        ..Filters::default()
    };
    let err = targets("llama", &f).unwrap_err().to_string();
    assert!(
        err.contains("no target left: found 15 linear layers"),
        "{err}"
    );
    assert!(err.contains("--exclude-names removed 1 (lm_head)"), "{err}");
    assert!(err.contains("--target-names removed 14"), "{err}");
}

/// x [batch, 16] -> MatMul(W [16, 16] "blocks.0.mix.weight") -> y: square, and nothing
/// in the graph or the name says reader or writer.
fn ambiguous_model(dir: &std::path::Path) -> std::path::PathBuf {
    use lora_graft::proto::*;
    use prost::Message;
    let w = TensorProto {
        name: Some("blocks.0.mix.weight".into()),
        dims: vec![16, 16],
        data_type: Some(1),
        raw_data: Some(vec![0; 16 * 16 * 4]),
        ..Default::default()
    };
    let vi = |n: &str| ValueInfoProto {
        name: Some(n.into()),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: Some(10),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(18),
        }],
        graph: Some(GraphProto {
            node: vec![NodeProto {
                name: Some("/blocks.0/mix/MatMul".into()),
                op_type: Some("MatMul".into()),
                input: vec!["x".into(), "blocks.0.mix.weight".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            initializer: vec![w],
            input: vec![vi("x")],
            output: vec![vi("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    let path = dir.join("ambiguous.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    path
}

#[test]
fn an_ambiguous_square_layer_is_an_error_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(&ambiguous_model(dir.path())).unwrap();
    let err = target::run(&model.graph, &Filters::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 'blocks.0.mix'"), "{err}");
    assert!(err.contains("--role"), "{err}");
    let f = Filters {
        role_overrides: vec![(Regex::new("mix").unwrap(), Role::Writer)],
        ..Filters::default()
    };
    let t = target::run(&model.graph, &f).unwrap();
    assert_eq!(
        (t.targets[0].role, t.targets[0].role_source),
        (Role::Writer, RoleSource::Flag)
    );
}

#[test]
fn targets_command_prints_table_and_json() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lora-graft"))
        .args(["targets", "--json"])
        .arg(fixture("llama"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["targets"].as_array().unwrap().len(), 14);
    assert_eq!(v["targets"][0]["module"], "model.layers.0.self_attn.q_proj");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lora-graft"))
        .args(["targets", "--target-names", "nothing_here"])
        .arg(fixture("llama"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no target left") && stderr.contains("model.onnx"),
        "{stderr}"
    );
}

#[test]
fn a_chain_of_200k_identity_nodes_is_targeted_in_linear_time() {
    // A hang guard, not a speed claim: the walk back over 200k nodes used to recurse
    // (quadratic, and deep enough to overflow a stack); 60 s is far beyond linear.
    use lora_graft::proto::{GraphProto, TensorProto};
    let n = 200_000;
    let mut nodes = vec![common::node("mm", "MatMul", &["x", "w"], &["h0"])];
    for i in 0..n {
        let (a, b) = (format!("h{i}"), format!("h{}", i + 1));
        nodes.push(common::node(&format!("id{i}"), "Identity", &[&a], &[&b]));
    }
    let proto = GraphProto {
        name: Some("g".into()),
        node: nodes,
        input: vec![common::vi("x")],
        output: vec![common::vi(&format!("h{n}"))],
        initializer: vec![TensorProto {
            name: Some("w".into()),
            dims: vec![16, 16],
            data_type: Some(1),
            raw_data: Some(vec![0; 1024]),
            ..Default::default()
        }],
        ..Default::default()
    };
    let graph = lora_graft::ir::Graph::from_proto(proto, |_| Ok(None)).unwrap();
    let began = std::time::Instant::now();
    let filters = Filters {
        d_model: Some(16),
        role_overrides: vec![(
            regex::Regex::new("mm").unwrap(),
            lora_graft::passes::target::Role::Reader,
        )],
        ..Filters::default()
    };
    let t = target::run(&graph, &filters).unwrap();
    assert_eq!(t.targets.len(), 1);
    assert!(began.elapsed().as_secs() < 60, "{:?}", began.elapsed());
}

#[test]
fn output_heads_are_left_out_by_structure_not_name() {
    // x -> up (16->32) -> Relu -> down (32->16) -> + x -> head (16->10) -> + b -> y:
    // "m.out" carries no head-like name; it is the last linear before the output and
    // maps the stream to 10 classes.
    use lora_graft::proto::{GraphProto, TensorProto};
    let w = |name: &str, dims: Vec<i64>| TensorProto {
        name: Some(name.into()),
        dims: dims.clone(),
        data_type: Some(1),
        raw_data: Some(vec![0; 4 * dims.iter().product::<i64>() as usize]),
        ..Default::default()
    };
    let proto = GraphProto {
        name: Some("g".into()),
        node: vec![
            common::node("m.up", "MatMul", &["x", "m.up.weight"], &["h"]),
            common::node("relu", "Relu", &["h"], &["a"]),
            common::node("m.down", "MatMul", &["a", "m.down.weight"], &["d"]),
            common::node("res", "Add", &["d", "x"], &["s"]),
            common::node("m.out", "MatMul", &["s", "m.out.weight"], &["o"]),
            common::node("bias", "Add", &["o", "m.out.bias"], &["y"]),
        ],
        input: vec![common::vi("x")],
        output: vec![common::vi("y")],
        initializer: vec![
            w("m.up.weight", vec![16, 32]),
            w("m.down.weight", vec![32, 16]),
            w("m.out.weight", vec![16, 10]),
            w("m.out.bias", vec![10]),
        ],
        ..Default::default()
    };
    let graph = lora_graft::ir::Graph::from_proto(proto, |_| Ok(None)).unwrap();
    let modules = |f: &Filters| -> Vec<String> {
        let t = target::run(&graph, f).unwrap();
        t.targets.iter().map(|t| t.module.clone()).collect()
    };
    let filters = Filters {
        d_model: Some(16),
        ..Filters::default()
    };
    assert_eq!(modules(&filters), ["m.up", "m.down"]);
    let with_heads = Filters {
        include_heads: true,
        ..filters
    };
    assert_eq!(modules(&with_heads), ["m.up", "m.down", "m.out"]);
}

/// An export with generic node and weight names (`node_MatMul_3`, `val_1000`) still
/// names its targets by module when each product's bias is named after it
/// (`encoder.layer.0.attention.self.query.bias`), unless the bias is shared.
#[test]
fn generic_names_take_the_module_from_an_unshared_bias() {
    let named = |model: &lora_graft::Model| -> Vec<String> {
        target::run(&model.graph, &Filters::default())
            .unwrap()
            .targets
            .into_iter()
            .map(|t| t.module)
            .collect()
    };
    let want = named(&Model::load(&fixture("bert")).unwrap());
    assert!(want.contains(&"encoder.layer.0.attention.self.query".to_string()));
    let mut model = Model::load(&fixture("bert_int8")).unwrap();
    let ids: Vec<_> = model.graph.node_ids().collect();
    for (i, id) in ids.into_iter().enumerate() {
        let op = model.graph.node(id).op().to_string();
        let node = model.graph.node_mut(id);
        node.proto.name = Some(format!("node_{op}_{i}"));
        node.proto.metadata_props.clear();
    }
    assert_eq!(named(&model), want, "modules from the biases");
    // A bias two products share names neither.
    let q_bias = model
        .graph
        .value_by_name("encoder.layer.0.attention.self.query.bias")
        .unwrap();
    let k_add =
        model
            .graph
            .node_ids()
            .find(|&n| {
                model.graph.node(n).inputs.iter().flatten().any(|&v| {
                    model.graph.value(v).name == "encoder.layer.0.attention.self.key.bias"
                })
            })
            .unwrap();
    let slot = model.graph.node(k_add).inputs.iter().position(|v| {
        v.is_some_and(|v| model.graph.value(v).name == "encoder.layer.0.attention.self.key.bias")
    });
    model.graph.set_input(k_add, slot.unwrap(), Some(q_bias));
    let names = named(&model);
    assert!(
        !names
            .iter()
            .any(|n| n == "encoder.layer.0.attention.self.query"
                || n == "encoder.layer.0.attention.self.key"),
        "a shared bias named a module: {names:?}"
    );
}

/// An export of a module that wraps the model (`inner.` before every parameter name, as
/// in the weight-only int8 MiniLM of issue 15, whose generic nodes are named by their
/// `inner.encoder….bias`): targets are named as the unwrapped model's, so adapters
/// trained in PyTorch on the model apply by name; `--strip-prefix ''` keeps the names as
/// they are. Models whose own paths share a first component are left alone (the fixtures
/// above: `model.` beside `lm_head`, `transformer.`, `encoder.` beside `embeddings.`).
#[test]
fn a_wrapper_prefix_is_taken_off_every_module_name() {
    for name in ["bert_int8", "bert"] {
        let plain = targets(name, &all_roles()).unwrap();
        assert_eq!(plain.wrapper_prefix, None, "{name}");
        let mut model = Model::load(&fixture(name)).unwrap();
        let renames: Vec<_> = model
            .graph
            .initializers()
            .map(|(v, _)| (v, model.graph.value(v).name.clone()))
            .filter(|(_, n)| n.contains('.'))
            .collect();
        for (v, n) in renames {
            model.graph.rename_value(v, &format!("inner.{n}"));
        }
        let wrapped = target::run(&model.graph, &all_roles()).unwrap();
        assert_eq!(
            wrapped.wrapper_prefix.as_deref(),
            Some("inner."),
            "{name}: {:?}",
            modules(&wrapped)
        );
        assert_eq!(modules(&wrapped), modules(&plain), "{name}");
        assert!(wrapped.to_string().contains("wrapper prefix 'inner.'"));
        let kept = target::run(
            &model.graph,
            &Filters {
                strip_prefix: Some(String::new()),
                ..all_roles()
            },
        )
        .unwrap();
        assert!(
            kept.targets.iter().all(|t| t.module.starts_with("inner.")),
            "{name}: {:?}",
            modules(&kept)
        );
        // An adapter trained on the wrapped names (lora-graft before it stripped them)
        // still applies: its names keep the prefix.
        let adapter = target::run(
            &model.graph,
            &Filters {
                modules: Some(modules(&kept).into_iter().collect()),
                ..all_roles()
            },
        )
        .unwrap();
        assert_eq!(modules(&adapter), modules(&kept), "{name}");
    }
    for name in FIXTURES {
        let t = targets(name, &all_roles()).unwrap();
        assert_eq!(t.wrapper_prefix, None, "{name}");
    }
}
