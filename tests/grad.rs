//! The gradient pass: end to end against central finite differences, DeLoRA's finite
//! gradient at init, and the training graph's contract.

mod common;

use std::collections::HashMap;

use common::{fixture, reference, scalar, Session};
use lora_graft::jobs::{self, GraftRequest, Training, TrainingRequest};
use lora_graft::passes::grad::loss::Loss;
use lora_graft::passes::variants::Config;
use lora_graft::rng::Rng;
use lora_graft::tensor::Array;
use lora_graft::Model;
use tract_core::ndarray::{ArrayD, IxDyn};

fn training(name: &str, variant: &str, loss: Loss, batch: usize, seq: usize) -> Training {
    let graft = common::calibrated(common::request_r(variant, 2, 4.0), name);
    training_of(name, graft, loss, batch, seq)
}

fn training_of(
    name: &str,
    graft: lora_graft::jobs::GraftRequest,
    loss: Loss,
    batch: usize,
    seq: usize,
) -> Training {
    let variant = graft.variant.name();
    let req = TrainingRequest::new(graft, loss, batch, seq);
    jobs::training_graph(Model::load(&fixture(name)).unwrap(), &req)
        .unwrap_or_else(|e| panic!("{name} {variant}: {e}"))
}

/// Inputs of a training graph: the reference model inputs, labels/targets, and the
/// adapter tensors with B (and lambda) set non-zero so every gradient is non-trivial.
fn feeds(t: &Training, name: &str, seed: u64) -> HashMap<String, Array> {
    let (inputs, _) = reference(name);
    let mut feeds: HashMap<String, Array> = inputs.into_iter().collect();
    let mut rng = Rng::new(seed);
    for (label, shape) in [
        ("labels", t.input_shapes.get("labels")),
        ("target", t.input_shapes.get("target")),
    ] {
        if let Some(shape) = shape {
            let n: usize = shape.iter().product();
            let a = if label == "labels" {
                Array::I64(
                    ArrayD::from_shape_vec(
                        IxDyn(shape),
                        // Class labels below the class count; one causal-LM label
                        // ignored (-100), so the mask is exercised.
                        (0..n)
                            .map(|i| match t.classes {
                                Some(c) => (i * 37 % c) as i64,
                                None if i == 3 => -100,
                                None => (i * 37 % 500) as i64,
                            })
                            .collect(),
                    )
                    .unwrap(),
                )
            } else {
                Array::F32(ArrayD::from_shape_fn(IxDyn(shape), |_| rng.normal() as f32))
            };
            feeds.insert(label.into(), a);
        }
    }
    for m in &t.outcome.grafted.modules {
        for (p, values) in m.params.iter().filter(|(p, _)| m.trainable.contains(p)) {
            let mut v = lora_graft::passes::graft::onnx_layout(values);
            // The tensors that start at zero (B, VeRA's λ_b) are set non-zero.
            if *p == "lora_B" || *p == "vera_lambda_b" {
                v.mapv_inplace(|_| rng.uniform_in(-0.3, 0.3) as f32);
            }
            if *p == "lora_lambda" {
                v.fill(2.0);
            }
            // AntiPaSTO's rotations: far enough from 0 for tanh and the Cayley map to bend.
            if *p == "lora_rot_T" {
                v.mapv_inplace(|_| rng.uniform_in(-1.0, 1.0) as f32);
            }
            feeds.insert(format!("{}.{p}", m.module), Array::F32(v));
        }
    }
    feeds
}

/// Central differences on `samples` entries of every trainable tensor; returns the
/// worst relative error of the sampled gradient vector per tensor.
/// The session finite differences run: `t`'s training graph with every stop-gradient
/// value (DoRA's norm) held at its value for `base`, as the gradient pass treats it
/// (PyTorch's `detach`), so that both see the same function.
fn frozen_session(t: &Training, base: &HashMap<String, Array>) -> Session {
    use lora_graft::ir::{build::stops_gradient, GraphIo, Initializer};
    let graph = &t.model.graph;
    let stops: Vec<_> = graph
        .node_ids()
        .filter(|&n| stops_gradient(graph.node(n)))
        .map(|n| (n, graph.node(n).outputs[0].unwrap()))
        .collect();
    if stops.is_empty() {
        return Session::new(t);
    }
    let name = |v| graph.value(v).name.clone();
    let mut probe = t.clone();
    for &(_, v) in &stops {
        probe.model.graph.add_output(GraphIo {
            value: v,
            info: lora_graft::proto::ValueInfoProto {
                name: Some(name(v)),
                ..Default::default()
            },
        });
    }
    let values = Session::new(&probe).run(base);
    let mut frozen = t.clone();
    for &(n, v) in &stops {
        let init = Initializer::from_array(&values[&name(v)]).unwrap();
        frozen.model.graph.make_initializer(v, init);
        frozen.model.graph.remove_node(n);
    }
    Session::new(&frozen)
}

fn check_fd(name: &str, variant: &str, loss: Loss, batch: usize, seq: usize, h: f64, tol: f64) {
    check_fd_of(
        &training(name, variant, loss, batch, seq),
        name,
        variant,
        h,
        tol,
    );
}

fn check_fd_of(t: &Training, name: &str, variant: &str, h: f64, tol: f64) {
    let s = Session::new(t);
    let base = feeds(t, name, 3);
    let out = s.run(&base);
    assert!(scalar(&out["loss"]).is_finite());
    let frozen = frozen_session(t, &base);
    let mut rng = Rng::new(9);
    for (tensor, grad_name) in &t.graph.gradients {
        let g = out[grad_name].to_f64();
        let theta = base[tensor].to_f32();
        let (mut num, mut ana) = (Vec::new(), Vec::new());
        for _ in 0..4 {
            let i = (rng.next_u64() as usize) % theta.len();
            let mut plus = base.clone();
            let mut minus = base.clone();
            let mut tp = theta.clone();
            tp.as_slice_mut().unwrap()[i] += h as f32;
            plus.insert(tensor.clone(), Array::F32(tp));
            let mut tm = theta.clone();
            tm.as_slice_mut().unwrap()[i] -= h as f32;
            minus.insert(tensor.clone(), Array::F32(tm));
            let fd = (scalar(&frozen.run(&plus)["loss"]) - scalar(&frozen.run(&minus)["loss"]))
                / (2.0 * h);
            num.push(fd);
            ana.push(g.as_slice().unwrap()[i]);
        }
        let diff: f64 = num
            .iter()
            .zip(&ana)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = ana.iter().map(|a| a * a).sum::<f64>().sqrt();
        // The f32 loss is only known to ~1e-6 relative: its central difference carries
        // ~1e-6·|L|/h of noise per entry, which bounds what FD can check on tiny
        // gradients (the PyTorch references check those).
        let noise = 1e-6 * scalar(&out["loss"]).abs() / h * (num.len() as f64).sqrt();
        assert!(
            diff <= tol * norm + noise,
            "{name} {variant} {tensor}: fd {num:?} vs grad {ana:?}"
        );
    }
}

#[test]
fn antipasto_rotations_of_four_match_finite_differences() {
    // Blocks of 4: the Cayley map's polynomial with its Pfaffian term, both bases.
    use lora_graft::passes::variants::antipasto::RotateBasis;
    for basis in [RotateBasis::V, RotateBasis::U] {
        let mut graft = common::request_r("antipasto", 4, 8.0);
        graft.cfg.antipasto.basis = basis;
        assert_eq!(graft.cfg.antipasto.block_size, 4);
        let t = training_of("llama", graft, Loss::CausalLm, 2, 7);
        check_fd_of(&t, "llama", &format!("antipasto {basis:?}"), 1e-2, 3e-2);
    }
}

#[test]
fn class_loss_gradients_match_finite_differences() {
    // The cross-entropy's closed-form gradient, on a [batch, classes] output.
    for variant in common::variant_names() {
        check_fd("handmade", variant, Loss::Class, 2, 1, 1e-2, 2e-2);
    }
}

#[test]
fn handmade_gradients_match_finite_differences() {
    for variant in common::variant_names() {
        // f32 model: h = 1e-2 keeps the rounding error of the loss (~1e-7·|L|/h) small
        // against the truncation error (~h²); 2e-2 relative on the sampled vector.
        // h = 3e-3: EVA's unit rows along the inputs' principal directions make the loss
        // curve enough along B for h = 1e-2 to miss by 3 %.
        check_fd("handmade", variant, Loss::Mse, 2, 1, 3e-3, 2e-2);
    }
}

#[test]
fn fp16_model_gradients_match_the_fp32_model() {
    // handmade_fp16 is handmade with its weights and inputs rounded to fp16; its
    // gradients (fp16 through the model, f32 in the adapter branch and the loss) equal
    // the fp32 model's at the same adapter values within fp16 rounding: 3e-2 relative on
    // each tensor (finite differences cannot resolve an fp16 loss).
    for variant in common::variant_names() {
        let t32 = training("handmade", variant, Loss::Mse, 2, 1);
        let mut t16 = training("handmade_fp16", variant, Loss::Mse, 2, 1);
        // The same frozen tensors too: LoRA-GA's start is the SVD of each model's own
        // calibration gradient (0.7 apart between fp16 and fp32 here).
        for m in &t32.outcome.grafted.modules {
            for (name, values) in m.params.iter().filter(|(n, _)| !m.trainable.contains(n)) {
                lora_graft::jobs::set_param(
                    &mut t16.model,
                    &mut t16.outcome,
                    &m.module,
                    name,
                    values.clone(),
                )
                .unwrap();
            }
        }
        let f32_feeds = feeds(&t32, "handmade", 3);
        let mut f16_feeds = f32_feeds.clone();
        for (name, value) in reference("handmade_fp16").0 {
            f16_feeds.insert(name, value);
        }
        let (g32, g16) = (
            Session::new(&t32).run(&f32_feeds),
            Session::new(&t16).run(&f16_feeds),
        );
        assert_eq!(g16["loss"].elem_type(), g32["loss"].elem_type(), "f32 loss");
        for (tensor, grad) in &t32.graph.gradients {
            let rel = common::relative_frobenius(&g16[grad], &g32[grad]);
            assert!(
                rel <= 3e-2,
                "{variant} {tensor}: fp16 gradient off by {rel:e} relative"
            );
        }
    }
}

#[test]
fn llama_causal_lm_gradients_match_finite_differences() {
    for variant in common::variant_names() {
        // 3e-2 relative on the sampled vector: f32 forward through 2 layers + softmax.
        check_fd("llama", variant, Loss::CausalLm, 2, 7, 1e-2, 3e-2);
    }
}

#[test]
fn gpt2_and_bert_gradients_match_finite_differences() {
    for variant in common::variant_names() {
        check_fd("gpt2", variant, Loss::CausalLm, 2, 7, 1e-2, 3e-2);
        check_fd("bert", variant, Loss::Mse, 2, 7, 1e-2, 3e-2);
    }
}

/// onnxruntime-genai's int4 Llama (every variant), Qwen2 and Phi-3 (LoRA, DeLoRA): the
/// gradient pass runs through the lowered GroupQueryAttention (rotary embeddings,
/// grouped heads, causal mask, empty KV cache), `MatMulNBits` and the RMS norms.
#[test]
fn genai_int4_gradients_match_finite_differences_through_lowered_attention() {
    for variant in common::variant_names().filter(|v| !common::refused_on_int4(v)) {
        check_fd("genai_int4", variant, Loss::CausalLm, 1, 7, 1e-2, 3e-2);
    }
    for name in ["genai_qwen2", "genai_phi3"] {
        for variant in ["lora", "delora"] {
            check_fd(name, variant, Loss::CausalLm, 1, 7, 1e-2, 3e-2);
        }
    }
}

#[test]
fn delora_gradient_at_init_is_finite() {
    // B = 0 at init (lora-lite's): the NaN trap of variants.md §0.6 (ReduceL2's
    // backward at 0).
    let mut req = TrainingRequest::new(common::request_r("delora", 2, 4.0), Loss::CausalLm, 2, 7);
    req.graft.cfg.delora_init = lora_graft::passes::variants::delora::DeloraInit::LoraLite;
    let t = jobs::training_graph(Model::load(&fixture("llama")).unwrap(), &req).unwrap();
    let s = Session::new(&t);
    let mut f = feeds(&t, "llama", 3);
    for m in &t.outcome.grafted.modules {
        for (p, values) in &m.params {
            f.insert(
                format!("{}.{p}", m.module),
                Array::F32(lora_graft::passes::graft::onnx_layout(values)),
            );
        }
    }
    let out = s.run(&f);
    for (tensor, g) in &t.graph.gradients {
        let g = out[g].to_f64();
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{tensor}: non-finite gradient at init"
        );
        if tensor.ends_with("lora_B") {
            assert!(
                g.iter().any(|&v| v != 0.0),
                "{tensor}: B gets a gradient at init"
            );
        } else {
            assert!(
                g.iter().all(|&v| v == 0.0),
                "{tensor}: zero at init (B = 0)"
            );
        }
    }
}

#[test]
fn golden_training_graph_of_the_hand_built_fixture() {
    let t = training("handmade", "lora", Loss::Mse, 2, 1);
    common::check_golden("handmade/train.lora.txt", &t.model.graph.dump().unwrap());
    let names: Vec<&str> = t
        .model
        .graph
        .outputs()
        .iter()
        .map(|o| o.info.name())
        .collect();
    assert_eq!(names[..2], ["loss", "grad.blocks.0.gemm.lora_A"]);
}

#[test]
fn training_graphs_run_in_onnx_runtime_as_in_tract() {
    use lora_graft::model::SaveOptions;
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = Vec::new();
    let cases = [
        ("handmade", "lora", Loss::Mse, 2, 1),
        ("handmade", "pissa", Loss::Mse, 2, 1),
        ("llama", "delora", Loss::CausalLm, 2, 7),
        ("gpt2", "lora", Loss::CausalLm, 2, 7),
        ("bert", "pissa", Loss::Mse, 2, 7),
        // tract runs MatMulNBits' input gradient on the packed weight (lora-graft's
        // kernel); the portable graph ONNX Runtime gets multiplies the float weight.
        ("genai_int4", "lora", Loss::CausalLm, 1, 7),
    ];
    for (name, variant, loss, batch, seq) in cases {
        let mut t = training(name, variant, loss, batch, seq);
        let f = feeds(&t, name, 3);
        let out = Session::new(&t).run(&f);
        let int4 = name == "genai_int4";
        let opset = lora_graft::passes::graft::default_opset(&t.model.proto);
        let rewritten = lora_graft::passes::grad::portable(&mut t.model.graph, opset).unwrap();
        let causal = matches!(loss, Loss::CausalLm);
        assert_eq!(
            rewritten.cross_entropies > 0,
            causal,
            "{name}: {rewritten:?}"
        );
        assert_eq!(
            rewritten.packed_gradients > 0,
            int4,
            "{name}: {rewritten:?}"
        );
        // Llama-family MLPs (silu(gate)·up) take the fused SwiGLU gradient.
        let swiglu = matches!(name, "llama" | "genai_int4");
        assert_eq!(
            rewritten.swiglu_gradients > 0,
            swiglu,
            "{name}: {rewritten:?}"
        );
        // The dynamo exporter's RMS norms (Llama) take the one-pass RmsNormGrad.
        assert_eq!(
            rewritten.rms_norm_gradients > 0,
            name == "llama",
            "{name}: {rewritten:?}"
        );
        // Attention's softmax (over its last axis) takes the one-pass SoftmaxGrad.
        assert_eq!(
            rewritten.softmax_gradients > 0,
            name != "handmade",
            "{name}: {rewritten:?}"
        );
        if int4 {
            common::float_accuracy(&mut t.model);
        }
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        let stem = format!("{name}/{variant}.train");
        t.model
            .save(
                &dir.path().join(format!("{stem}.onnx")),
                &SaveOptions::default(),
            )
            .unwrap();
        common::write_io(&dir.path().join(format!("{stem}.io.safetensors")), f, out);
        // 1e-5 relative to max(1, |value|): the bound, scaled for the large
        // gradients DeLoRA's norm clamp gives; DeLoRA's paper init subtracts a frozen
        // copy of its branch (two O(λ) terms cancel), which multiplies the fp32 rounding:
        // layer 0's v_proj.lora_A differs by 1.98e-5 between the two runtimes with the
        // op-by-op norm gradient and by 2.01e-5 with RmsNormGrad (which itself moves
        // tract's value by 6e-7 and ONNX Runtime's by 5e-7), so 3e-5.
        let tol = if variant == "delora" { 3e-5 } else { 1e-5 };
        manifest.push(serde_json::json!({
            "model": format!("{stem}.onnx"), "base": fixture(name), "io": format!("{stem}.io.safetensors"),
            "full_check": !int4, "tol": tol, "relative": true, "training": true,
        }));
    }
    common::run_interop(dir.path(), &manifest);
}

/// Gradients against PyTorch autograd on the same model, adapter values and batch
/// (`fixtures/grad/*`, made by `make.py` with hooks implementing variants.md).
#[test]
fn gradients_match_pytorch_autograd() {
    use lora_graft::adapter::AdapterFile;
    // The other variants' references are lora-lite's and PEFT's own (tests/oracles.rs).
    for name in ["llama", "gpt2", "bert"] {
        for variant in ["lora", "pissa", "delora"] {
            let loss = if name == "bert" {
                Loss::Mse
            } else {
                Loss::CausalLm
            };
            let req = TrainingRequest {
                graft: GraftRequest {
                    variant: lora_graft::passes::variants::variant(variant).unwrap(),
                    cfg: Config {
                        r: 4,
                        alpha: 8.0.into(),
                        // make.py's references start from lora-lite's init (B = 0).
                        delora_init: lora_graft::passes::variants::delora::DeloraInit::LoraLite,
                        ..Config::default()
                    },
                    ..GraftRequest::default()
                },
                loss,
                batch: 2,
                seq: 7,
                micro_batch: None,
                output: None,
                keep_outputs: false,
            };
            let t = jobs::training_graph(Model::load(&fixture(name)).unwrap(), &req).unwrap();
            let dir = common::root().join("fixtures/grad");
            let adapter =
                AdapterFile::read(&dir.join(format!("{name}.{variant}.adapter.safetensors")))
                    .unwrap();
            let torch =
                AdapterFile::read(&dir.join(format!("{name}.{variant}.grad.safetensors"))).unwrap();
            let mut feeds = common::loss_feeds(name, &t);
            for (tensor, _) in &t.graph.gradients {
                let values = adapter.tensors[tensor].to_f32();
                // lambda may be stored [1] (PEFT's shape) where lora-lite has [].
                let shape = &t.input_shapes[tensor];
                let values = lora_graft::passes::graft::onnx_layout(&values)
                    .into_shape_with_order(IxDyn(shape))
                    .unwrap();
                feeds.insert(tensor.clone(), Array::F32(values));
            }
            let out = Session::new(&t).run(&feeds);
            let want_loss = torch.tensors["loss"].to_f64()[[]];
            let got_loss = scalar(&out["loss"]);
            assert!(
                (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                "{name} {variant}: loss {got_loss} vs PyTorch {want_loss}"
            );
            for (tensor, g) in &t.graph.gradients {
                let want = torch.tensors[&format!("grad.{tensor}")].to_f32();
                let got = out[g].to_f32();
                let got = if got.ndim() == 2 {
                    got.t().as_standard_layout().to_owned()
                } else {
                    got
                }; // ONNX -> torch layout
                let got = Array::F32(got.into_shape_with_order(want.raw_dim()).unwrap());
                let want = Array::F32(want);
                let scale = common::max_abs(&want).max(1e-12);
                let err = common::max_abs_diff(&got, &want);
                // 1e-4 relative to the tensor's largest entry (the bound): fp32
                // on both sides, summed in different orders.
                assert!(
                    err <= 1e-4 * scale,
                    "{name} {variant} {tensor}: max error {err:e}, largest gradient {scale:e}"
                );
            }
        }
    }
}

#[test]
fn a_kv_cache_head_size_no_config_gives_is_a_clear_error() {
    // The genai model's KV cache has a symbolic head dim, `kv_cache_dim`, which its
    // genai_config.json gives; without the config the error names the input and the dim.
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.onnx", "model.onnx.data"] {
        std::fs::copy(fixture("genai_int4").with_file_name(f), dir.path().join(f)).unwrap();
    }
    let req = TrainingRequest::new(common::request("lora"), Loss::CausalLm, 1, 4);
    let model = Model::load(&dir.path().join("model.onnx")).unwrap();
    let err = jobs::training_graph(model, &req)
        .err()
        .expect("an error")
        .to_string();
    assert!(
        err.contains("input 'past_key_values.0.key' has a third symbolic dim 'kv_cache_dim'"),
        "{err}"
    );
}

#[test]
fn the_loss_reads_the_first_float_output_and_errors_name_it() {
    // handmade with an int64 ArgMax output put first, as a classifier exporting its
    // predicted ids beside the logits would.
    use lora_graft::ir::build::int_attr;
    use lora_graft::proto::ModelProto;
    use prost::Message;
    let mut proto =
        ModelProto::decode(std::fs::read(fixture("handmade")).unwrap().as_slice()).unwrap();
    let g = proto.graph.as_mut().unwrap();
    let y = g.output[0].name().to_string();
    let mut argmax = common::node("ids", "ArgMax", &[&y], &["ids"]);
    argmax.attribute.push(int_attr("axis", -1));
    g.node.push(argmax);
    let mut ids = common::vi("ids");
    ids.r#type = Some(lora_graft::proto::TypeProto {
        value: Some(lora_graft::proto::type_proto::Value::TensorType(
            lora_graft::proto::type_proto::Tensor {
                elem_type: Some(7), // int64
                shape: None,
            },
        )),
        ..Default::default()
    });
    g.output.insert(0, ids);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    let req = TrainingRequest::new(common::request_r("lora", 2, 4.0), Loss::Mse, 2, 1);
    let t = jobs::training_graph(Model::load(&path).unwrap(), &req).unwrap();
    assert!(t.graph.gradients.len() > 1);
    // Asked for the int output, the error names it and the option.
    let mut req = req;
    req.output = Some("ids".into());
    let err = jobs::training_graph(Model::load(&path).unwrap(), &req)
        .map(|_| ())
        .expect_err("ids has no gradient")
        .to_string();
    assert!(
        err.contains("output 'ids'") && err.contains("--loss-output"),
        "{err}"
    );
}
