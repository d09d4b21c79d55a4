//! The lowering pass against ONNX Runtime's own kernels, one op at a time: every op in
//! `passes::lower::LOWERINGS` has cases in `tests/lowering.py` (a one-node model with
//! seeded inputs, ONNX Runtime's outputs); the lowered model, run by tract, gives them.

mod common;

use common::{python, root, run_tract};
use lora_graft::adapter::AdapterFile;
use lora_graft::passes::lower::{Lower, LOWERINGS};
use lora_graft::passes::{run_pass, PassContext};
use lora_graft::Model;

#[test]
fn every_lowering_matches_onnx_runtime_op_by_op() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(python())
        .arg(root().join("tests/lowering.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tests/lowering.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("manifest.json")).unwrap())
            .unwrap();
    let mut covered = std::collections::BTreeSet::new();
    for case in &manifest {
        let name = case["case"].as_str().unwrap();
        let op = case["op"].as_str().unwrap();
        if !LOWERINGS.iter().any(|(_, o, _, _)| *o == op) {
            continue; // ops tract and the gradient rules take as they are
        }
        let mut model = Model::load(&dir.path().join(format!("{name}.onnx"))).unwrap();
        let mut pass = Lower::default();
        let cx = PassContext {
            opset: lora_graft::passes::graft::default_opset(&model.proto),
        };
        run_pass(&mut model.graph, &cx, &mut pass).unwrap();
        assert_eq!(pass.lowered.get(op), Some(&1), "{name}: {:?}", pass.lowered);
        assert!(
            model
                .graph
                .node_ids()
                .all(|n| model.graph.node(n).domain() != "com.microsoft"),
            "{name}: a contrib op is left"
        );
        let io = AdapterFile::read(&dir.path().join(format!("{name}.io.safetensors"))).unwrap();
        let inputs: Vec<(String, lora_graft::tensor::Array)> = io
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("input.").map(|n| (n.to_string(), v.clone())))
            .collect();
        let got = run_tract(&model, &inputs);
        let fp16 = case["dtype"].as_str() == Some("float16");
        // fp32: 1e-5 relative (another summation order); fp16: 2e-3 (a float16 ulp or
        // two, onnxruntime computing in float and rounding at the end).
        let tol = if fp16 { 2e-3 } else { 1e-5 };
        for (i, out_name) in case["outputs"].as_array().unwrap().iter().enumerate() {
            let out_name = out_name.as_str().unwrap();
            if out_name.is_empty() {
                continue;
            }
            let want = &io.tensors[&format!("output.{out_name}")];
            let slot = model
                .graph
                .outputs()
                .iter()
                .position(|o| model.graph.value(o.value).name == out_name)
                .unwrap_or(i);
            let d = common::max_abs_diff(&got[slot], want) / common::max_abs(want).max(1e-30);
            assert!(
                d <= tol,
                "{name} output {out_name}: {d:e} from ONNX Runtime"
            );
        }
        covered.insert(op.to_string());
    }
    for (_, op, _, _) in LOWERINGS {
        assert!(
            covered.contains(*op),
            "no ONNX Runtime case checks the lowering of {op}"
        );
    }
}

/// Models as onnxruntime's transformer optimizer leaves them: `bert_optimized` (an sdpa
/// export: `SkipLayerNormalization` x4, `BiasGelu` x2), `bert_fused` (an eager export:
/// also `Attention` x2 on the 1-D mask index that `EmbedLayerNormalization` computes) and
/// `gpt2_fused` (`Attention` x2 with `unidirectional`, `EmbedLayerNormalization` with
/// position ids, `FastGelu`). The LoRA on the query, key and value projections inside
/// `Attention` exposes them (`MultiHeadAttention` then). Lowered, tract gives ONNX
/// Runtime's outputs, and the LoRA trains: its training graph builds (the fused ops
/// lowered into ops the gradient rules know) and its gradients match central finite
/// differences.
#[test]
fn optimized_models_run_lowered_and_their_gradients_match_finite_differences() {
    let fused = [("SkipLayerNormalization", 4), ("BiasGelu", 2)];
    optimized_model("bert_optimized", &fused);
    let fused = [
        ("SkipLayerNormalization", 4),
        ("BiasGelu", 2),
        ("MultiHeadAttention", 2),
        ("EmbedLayerNormalization", 1),
    ];
    optimized_model("bert_fused", &fused);
    let fused = [
        ("SkipLayerNormalization", 4),
        ("FastGelu", 2),
        ("MultiHeadAttention", 2),
        ("EmbedLayerNormalization", 1),
    ];
    optimized_model("gpt2_fused", &fused);
}

/// `bert_optimized` in float16 (its weights and activations; float32 at the edges), lowered:
/// ONNX Runtime's outputs within 2e-3 relative (float16 rounding in another order).
#[test]
fn optimized_fp16_bert_runs_lowered() {
    let name = "bert_optimized_fp16";
    let (inputs, outputs) = common::reference(name);
    let mut model = Model::load(&common::fixture(name)).unwrap();
    let mut outcome = lora_graft::jobs::graft(&mut model, &common::request("lora")).unwrap();
    let lowered = lora_graft::jobs::lower(&mut model, &mut outcome).unwrap();
    assert_eq!(
        lowered.get("SkipLayerNormalization"),
        Some(&4),
        "{lowered:?}"
    );
    let got = run_tract(&model, &inputs).remove(0);
    let d = common::max_abs_diff(&got, &outputs[0].1) / common::max_abs(&outputs[0].1);
    assert!(d <= 2e-3, "{d:e} from ONNX Runtime");
}

fn optimized_model(name: &str, fused: &[(&str, usize)]) {
    use lora_graft::jobs::{self, TrainingRequest};
    use lora_graft::passes::grad::loss::Loss;
    use lora_graft::tensor::Array;
    let (inputs, outputs) = common::reference(name);
    let mut model = Model::load(&common::fixture(name)).unwrap();
    let req = common::request("lora");
    let mut outcome = jobs::graft(&mut model, &req).unwrap();
    let lowered = jobs::lower(&mut model, &mut outcome).unwrap();
    for (op, count) in fused {
        assert_eq!(lowered.get(*op), Some(count), "{name}: {lowered:?}");
    }
    let got = run_tract(&model, &inputs).remove(0);
    // At init (B = 0) the grafted, lowered model is the optimized one: ONNX Runtime's
    // outputs within 1e-5 relative (LayerNorm's mean and variance summed in another order).
    let d = common::max_abs_diff(&got, &outputs[0].1) / common::max_abs(&outputs[0].1);
    assert!(d <= 1e-5, "{name}: {d:e} from ONNX Runtime");

    let model = Model::load(&common::fixture(name)).unwrap();
    let t = jobs::training_graph(model, &TrainingRequest::new(req, Loss::Mse, 2, 7)).unwrap();
    let session = common::Session::new(&t);
    let mut feeds = common::loss_feeds(name, &t);
    // Adapter values away from init, so the fused ops' gradients all act.
    let mut rng = lora_graft::rng::Rng::new(3);
    for m in &t.outcome.grafted.modules {
        for p in &m.trainable {
            let key = format!("{}.{p}", m.module);
            let shape = t.input_shapes[&key].clone();
            let n: usize = shape.iter().product();
            let values = (0..n).map(|_| rng.uniform_in(-0.3, 0.3) as f32).collect();
            feeds.insert(
                key,
                Array::F32(tract_core::ndarray::ArrayD::from_shape_vec(shape, values).unwrap()),
            );
        }
    }
    let base = session.run(&feeds);
    let loss = common::scalar(&base["loss"]);
    let mut checked = 0;
    for m in &t.outcome.grafted.modules {
        for leaf in ["lora_A", "lora_B"] {
            let key = format!("{}.{leaf}", m.module);
            let grad = base[&format!("grad.{key}")].to_f64();
            // The entry with the largest gradient, where float32 differences resolve it.
            let (i, &g) = grad
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            // Large enough that the float32 loss resolves the smallest of these
            // gradients (bert_fused: 1e-3) ten times over its noise; gpt2_fused's loss
            // (512 logits a token) bends within 3e-2 (5 % off), so 3e-3 there.
            let h = if name == "gpt2_fused" { 3e-3 } else { 3e-2 };
            let at = |delta: f32| {
                let mut f = feeds.clone();
                let Array::F32(a) = f.get_mut(&key).unwrap() else {
                    unreachable!()
                };
                a.as_slice_mut().unwrap()[i] += delta;
                common::scalar(&session.run(&f)["loss"])
            };
            let fd = (at(h as f32) - at(-h as f32)) / (2.0 * h);
            // 2 % of the gradient, plus the float32 loss's own noise in a central
            // difference (about 1e-6·|L|/h, as tests/grad.rs bounds it).
            let noise = 2e-6 * loss.abs() / h;
            assert!(
                (g - fd).abs() <= 2e-2 * g.abs() + noise,
                "{name} {key}[{i}]: gradient {g:e}, finite difference {fd:e} (noise {noise:e})"
            );
            assert!(
                g.abs() > 10.0 * noise,
                "{name} {key}: gradient {g:e} below the noise {noise:e} (loss {loss:e}): vacuous"
            );
            checked += 1;
        }
    }
    let modules = t.outcome.grafted.modules.len();
    assert!(
        modules >= 6 && checked == 2 * modules,
        "{name}: {checked} tensors checked"
    );
}

/// onnxruntime-genai's int4 builds of Llama, Qwen2 (QKV bias, grouped heads) and Phi-3
/// (`GroupQueryAttention` with rotary embeddings and an empty KV cache, `MatMulNBits`,
/// the RMS norms), lowered: ONNX Runtime gives the same outputs on them as on the
/// originals with its own GroupQueryAttention kernel, and tract runs them. (The builder
/// sets `accuracy_level = 4`, with which ONNX Runtime rounds the activations to int8
/// inside `MatMulNBits`, 2.7e-2 away from float: both models here compute in float,
/// `accuracy_level = 0`.)
#[test]
fn genai_models_lowered_run_as_onnx_runtime_does() {
    for name in ["genai_int4", "genai_qwen2", "genai_phi3"] {
        genai_lowered_runs_as_onnx_runtime_does(name);
    }
}

fn genai_lowered_runs_as_onnx_runtime_does(name: &str) {
    let (inputs, _) = common::reference(name);
    let mut model = Model::load(&common::fixture(name)).unwrap();
    common::float_accuracy(&mut model);
    let dir = tempfile::tempdir().unwrap();
    let float = dir.path().join("float.onnx");
    model.save(&float, &Default::default()).unwrap();
    let mut pass = Lower::default();
    let cx = PassContext {
        opset: lora_graft::passes::graft::default_opset(&model.proto),
    };
    run_pass(&mut model.graph, &cx, &mut pass).unwrap();
    assert_eq!(
        pass.lowered.get("GroupQueryAttention"),
        Some(&2),
        "{name}: {:?}",
        pass.lowered
    );
    let lowered = dir.path().join("lowered.onnx");
    model.save(&lowered, &Default::default()).unwrap();
    let got = run_tract(&model, &inputs);
    let logits = got[0].clone();
    let io = dir.path().join("io.safetensors");
    common::write_io(&io, inputs, [("logits".to_string(), logits)]);
    // 1e-5 relative: measured 6e-7 (the lowering's summation order).
    let out = std::process::Command::new(python())
        .arg(root().join("tests/lowering.py"))
        .args([
            "compare".as_ref(),
            float.as_os_str(),
            lowered.as_os_str(),
            io.as_os_str(),
            "1e-5".as_ref(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(got.iter().all(|a| a.to_f64().iter().all(|v| v.is_finite())));
}
