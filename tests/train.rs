//! `lora-graft train`: it learns, its AdamW is PyTorch's, resuming is exact, and bad
//! input is a clear error that overwrites no checkpoint.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::{fixture, reference};
use lora_graft::adapter::AdapterFile;
use lora_graft::jobs::TrainingRequest;
use lora_graft::passes::grad::loss::Loss;
use lora_graft::tensor::Array;
use lora_graft::train::{self, AdamW, Engine, Row, TrainOptions};
use lora_graft::Model;

fn request(variant: &str, r: usize, alpha: f64, batch: usize, seq: usize) -> TrainingRequest {
    TrainingRequest::new(
        common::calibrated(common::request_r(variant, r, alpha), "llama"),
        Loss::CausalLm,
        batch,
        seq,
    )
}

fn options(variant: &str, steps: usize, out: &std::path::Path) -> TrainOptions {
    TrainOptions {
        steps,
        lr: 1e-2,
        threads: 2,
        quiet: true,
        ..TrainOptions::new(
            request(variant, 8, 16.0, 8, 32),
            common::root().join("fixtures/corpus.jsonl"),
            out.to_path_buf(),
        )
    }
}

fn run(opts: &TrainOptions) -> lora_graft::Result<train::TrainReport> {
    train::run(&fixture("llama"), opts, Arc::new(AtomicBool::new(false)))
}

#[test]
fn two_hundred_steps_cut_the_loss_by_at_least_30_percent() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = Vec::new();
    for variant in common::variant_names() {
        let mut opts = options(
            variant,
            200,
            &dir.path().join(format!("{variant}.safetensors")),
        );
        // The IA3 gates and ROAD's rotations hold one or two scalars per channel (about
        // a thousand parameters here, not LoRA's 10^5): on the attention and MLP layers
        // alone they level off at 25-28 % on this random fixture at any learning rate
        // (measured: 1e-2 to 1e-1). With the output head adapted too (the logits' own
        // gate or rotation), a cosine schedule and lr 1e-1 they cut 32 % (IA3_FF), 36 %
        // (IA3) and 39 % (ROAD); that is the configuration held to the 30 % here.
        // VeRA trains r + d_out scalars per layer over frozen random projections: it is
        // used at high rank and learning rate (the paper: r 256+); at r 32, lr 3e-2 it
        // cuts 34 % (r 8: 30 % at 3e-2, 25 % at 1e-2).
        // AntiPaSTO trains r shifts and r/4 rotation blocks per layer (lora-lite's default
        // r is 256): at r 8 it levels off at 17 % (lr 1e-1); at r 32, with the head
        // adapted and a cosine schedule at lr 1e-1, it cuts 34 %.
        let gate = variant.starts_with("ia3") || variant == "road" || variant == "antipasto";
        let lr = match variant {
            _ if gate => 1e-1,
            "vera" => 3e-2,
            _ => 1e-2,
        };
        if gate {
            let filters = &mut opts.training.graft.filters;
            filters.include_heads = true;
            filters.excludes.retain(|r| r.as_str() != "lm_head");
            opts.schedule = train::Schedule::Cosine;
            opts.warmup = 10;
        }
        if variant == "vera" || variant == "antipasto" {
            opts.training.graft.cfg.r = 32;
        }
        opts.lr = lr;
        let emitted = format!("{variant}.onnx");
        opts.emit_model = Some(dir.path().join(&emitted));
        let report = run(&opts).unwrap();
        // ONNX Runtime: the emitted model's loss on the corpus is below the base model's.
        manifest.push(serde_json::json!({
            "model": emitted,
            "base": fixture("llama"),
            "full_check": true,
            "lm_data": opts.data,
            "seq": opts.training.seq,
        }));
        let first = report.losses[0];
        let last: f64 = report.losses[190..].iter().sum::<f64>() / 10.0;
        assert!(
            last <= 0.7 * first,
            "{variant}: loss {first:.3} -> {last:.3}"
        );
        // The checkpoint is a lora-lite adapter file.
        let file = AdapterFile::read(&dir.path().join(format!("{variant}.safetensors"))).unwrap();
        assert!(file.metadata["cfg"].contains(&format!("\"variant\": \"{variant}\"")));
    }
    common::run_interop(dir.path(), &manifest);
}

/// onnxruntime-genai's int4 builds of Llama, Qwen2 and Phi-3 train end to end (their
/// GroupQueryAttention lowered for the gradient pass, the int4 weights kept packed): the
/// loss falls by 30 % in 200 steps, the trained adapter applied to the original model
/// (fused ops kept) gives a lower loss than the base model in ONNX Runtime, and
/// onnxruntime-genai generates with it.
#[test]
fn the_genai_int4_models_train_and_their_adapters_serve_in_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = Vec::new();
    let runs = [
        ("genai_int4", &["lora", "delora", "pissa"][..]),
        ("genai_qwen2", &["lora"][..]),
        ("genai_phi3", &["lora"][..]),
    ];
    for (name, variants) in runs {
        for &variant in variants {
            let out = dir.path().join(format!("{name}.{variant}.safetensors"));
            let opts = options(variant, 200, &out);
            let report = train::run(&fixture(name), &opts, Arc::new(AtomicBool::new(false)))
                .unwrap_or_else(|e| panic!("{name} {variant}: {e}"));
            let first = report.losses[0];
            let last: f64 = report.losses[190..].iter().sum::<f64>() / 10.0;
            assert!(
                last <= 0.7 * first,
                "{name} {variant}: loss {first:.3} -> {last:.3}"
            );
            let adapter =
                lora_graft::adapter::LoadedAdapter::read(&out, &Default::default()).unwrap();
            let mut model = Model::load(&fixture(name)).unwrap();
            lora_graft::jobs::apply(&mut model, &adapter).unwrap();
            let folder = format!("{name}.{variant}");
            std::fs::create_dir_all(dir.path().join(&folder)).unwrap();
            let emitted = format!("{folder}/model.onnx");
            model
                .save(&dir.path().join(&emitted), &Default::default())
                .unwrap();
            manifest.push(serde_json::json!({
                "model": emitted,
                "base": fixture(name),
                "full_check": false,
                "lm_data": opts.data,
                "seq": opts.training.seq,
            }));
            if variant == "lora" {
                let serving = dir.path().join(format!("{name}.serving"));
                common::genai_serves(name, &serving, &adapter, &model);
            }
        }
    }
    common::run_interop(dir.path(), &manifest);
}

#[test]
fn three_adamw_steps_match_pytorch() {
    let (inputs, _) = reference("llama");
    let ids = inputs
        .iter()
        .find(|(n, _)| n == "input_ids")
        .unwrap()
        .1
        .to_f64();
    let rows: Vec<Row> = ids
        .outer_iter()
        .map(|r| {
            let v: Vec<i64> = r.iter().map(|&x| x as i64).collect();
            Row::tokens(v.clone(), v)
        })
        .collect();
    // The variants whose AdamW references make.py wrote (the optimizer is variant-blind).
    for variant in ["lora", "pissa", "delora"] {
        let mut req = request(variant, 4, 8.0, 2, 7);
        // make.py's references start from lora-lite's init (B = 0).
        req.graft.cfg.delora_init = lora_graft::passes::variants::delora::DeloraInit::LoraLite;
        let engine = Engine::new(Model::load(&fixture("llama")).unwrap(), &req, 1).unwrap();
        let dir = common::root().join("fixtures/grad");
        let start =
            AdapterFile::read(&dir.join(format!("llama.{variant}.adapter.safetensors"))).unwrap();
        let want =
            AdapterFile::read(&dir.join(format!("llama.{variant}.adamw3.safetensors"))).unwrap();
        let mut params = std::collections::BTreeMap::new();
        for (tensor, _) in &engine.training().graph.gradients {
            let torch = start.tensors[tensor].to_f32();
            let shape = engine.training().input_shapes[tensor].clone();
            let onnx = lora_graft::passes::graft::onnx_layout(&torch)
                .into_shape_with_order(shape)
                .unwrap();
            params.insert(tensor.clone(), onnx);
        }
        // 1. The optimizer alone: fed torch's gradient at each step, our AdamW gives
        //    torch's tensors within 1e-5 of each tensor's largest entry (f32 arithmetic
        //    in both; measured below 1e-6).
        let torch_layout = |tensor: &str, a: &tract_core::ndarray::ArrayD<f32>| {
            lora_graft::passes::graft::onnx_layout(a)
                .into_shape_with_order(start.tensors[tensor].shape().to_vec())
                .unwrap()
        };
        let mut fed = params.clone();
        let mut opt = AdamW::new(1e-2, 0.01);
        for step in 0..3 {
            let grads = params
                .iter()
                .map(|(tensor, p)| {
                    let g = want.tensors[&format!("grad.{step}.{tensor}")].to_f32();
                    let g = lora_graft::passes::graft::onnx_layout(&g)
                        .into_shape_with_order(p.raw_dim())
                        .unwrap();
                    (tensor.clone(), g)
                })
                .collect();
            opt.update(&mut fed, &grads);
        }
        for (tensor, got) in &fed {
            let want_t = Array::F32(want.tensors[tensor].to_f32());
            let got = Array::F32(torch_layout(tensor, got));
            let scale = common::max_abs(&want_t);
            let worst = common::max_abs_diff(&got, &want_t);
            assert!(
                worst <= 1e-5 * scale,
                "{variant} {tensor}: AdamW on torch's gradients is off by {worst:e} (scale {scale:e})"
            );
        }
        // 2. The whole loop: our gradients and our AdamW.
        let mut opt = AdamW::new(1e-2, 0.01);
        for step in 0..3 {
            let res = engine.step(&rows, &params).unwrap();
            let want_loss = want.tensors[&format!("loss.{step}")].to_f64()[[]];
            // Step 0 (the forward of the same weights) to 1e-6 relative; later steps to
            // 5e-5. From step 1 on, Adam moves entries whose gradient is at round-off by
            // up to lr either way, so any change in the order of a sum (a kernel's
            // blocking, an exp's last bit) moves the loss: measured for LoRA, 7e-8 at
            // step 0 and 1.1e-5 to 2.8e-5 at step 2 across kernels that differ only so
            // (PiSSA and DeLoRA, whose gradients are not at round-off: 1e-7).
            let bound = if step == 0 { 1e-6 } else { 5e-5 };
            assert!(
                (res.loss - want_loss).abs() <= bound * want_loss,
                "{variant} step {step}: loss {} vs {want_loss}",
                res.loss
            );
            opt.update(&mut params, &res.grads);
        }
        // The losses of the three steps agree (above). The tensors agree in Frobenius
        // norm within 1e-2 of each tensor: not to 1e-5, because Adam moves entries whose
        // gradient is at fp32 round-off (~1e-8, where the two implementations' gradients
        // differ) by up to lr, differently in each, and those feed the next gradients.
        for (tensor, got) in &params {
            let want_t = want.tensors[tensor].to_f32();
            let got = lora_graft::passes::graft::onnx_layout(got)
                .into_shape_with_order(want_t.raw_dim())
                .unwrap();
            let rel = common::relative_frobenius(&Array::F32(got), &Array::F32(want_t));
            assert!(
                rel <= 1e-2,
                "{variant} {tensor}: relative Frobenius error {rel:e}"
            );
        }
    }
}

#[test]
fn micro_batches_give_the_batch_loss_and_gradient() {
    // Gradient accumulation: a batch of 4 rows run as passes of 1 or 2 rows, one or two
    // at a time, gives the loss and gradients of one pass over the 4 (rows with different
    // counted tokens, so the passes' weights differ).
    let ids: Vec<i64> = (0..4 * 12).map(|i| (i * 37 % 500) as i64 + 1).collect();
    let rows: Vec<Row> = ids
        .chunks(12)
        .enumerate()
        .map(|(k, r)| {
            let mut labels = r.to_vec();
            labels[..3 * k].fill(-100);
            Row::tokens(r.to_vec(), labels)
        })
        .collect();
    let engine = |micro_batch: Option<usize>, threads: usize| {
        let mut req = request("lora", 4, 8.0, 4, 12);
        req.micro_batch = micro_batch;
        Engine::new(Model::load(&fixture("llama")).unwrap(), &req, threads).unwrap()
    };
    let whole = engine(None, 1);
    let mut params = whole.initial_params();
    // B = 0 would make A's gradients zero: give B values.
    for (name, p) in params.iter_mut() {
        if name.ends_with("lora_B") {
            p.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = ((i % 7) as f32 - 3.0) * 0.01);
        }
    }
    let want = whole.step(&rows, &params).unwrap();
    assert_eq!(want.tokens, 11 + 9 + 6 + 3);
    for (micro_batch, threads) in [(1, 1), (1, 2), (2, 2), (1, 3)] {
        let got = engine(Some(micro_batch), threads)
            .step(&rows, &params)
            .unwrap();
        assert_eq!(got.tokens, want.tokens);
        // 1e-5 relative: the same f32 sums, accumulated in another order.
        assert!(
            (got.loss - want.loss).abs() <= 1e-5 * want.loss,
            "micro-batch {micro_batch}: loss {} vs {}",
            got.loss,
            want.loss
        );
        for (name, w) in &want.grads {
            let (g, w) = (Array::F32(got.grads[name].clone()), Array::F32(w.clone()));
            let (diff, scale) = (common::max_abs_diff(&g, &w), common::max_abs(&w));
            assert!(
                scale > 0.0 && diff <= 1e-5 * scale,
                "micro-batch {micro_batch} {name}: off by {diff:e} (scale {scale:e})"
            );
        }
    }
    let mut req = request("lora", 4, 8.0, 4, 12);
    req.micro_batch = Some(3);
    let err = Engine::new(Model::load(&fixture("llama")).unwrap(), &req, 2)
        .err()
        .expect("an error")
        .to_string();
    assert!(
        err.contains("--micro-batch 3 does not divide --batch 4"),
        "{err}"
    );
}

#[test]
fn resuming_gives_the_same_adapter_as_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.safetensors");
    run(&options("lora", 200, &whole)).unwrap();
    let split = dir.path().join("split.safetensors");
    run(&options("lora", 100, &split)).unwrap();
    let mut resumed = options("lora", 200, &split);
    resumed.resume = Some(split.clone());
    let report = run(&resumed).unwrap();
    assert_eq!((report.losses.len(), report.steps), (100, 200));
    let (a, b) = (
        AdapterFile::read(&whole).unwrap(),
        AdapterFile::read(&split).unwrap(),
    );
    assert_eq!(a.tensors, b.tensors, "bit-identical adapters");
}

#[test]
fn resume_refuses_an_adapter_and_optimizer_state_from_different_saves() {
    // A run killed between the two renames of a checkpoint leaves the adapter of one
    // save beside the optimizer state of the next: resuming must refuse the pair.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    run(&options("lora", 2, &a)).unwrap();
    run(&options("lora", 3, &b)).unwrap();
    let optim = |p: &std::path::Path| p.with_extension("optim.safetensors");
    std::fs::copy(optim(&b), optim(&a)).unwrap();
    let mut o = options("lora", 5, &dir.path().join("c.safetensors"));
    o.resume = Some(a.clone());
    let err = run(&o).expect_err("a torn pair").to_string();
    assert!(
        err.contains("from another save (step 3 against the adapter's 2)"),
        "{err}"
    );
    // The matching pair resumes.
    let mut o = options("lora", 5, &dir.path().join("c.safetensors"));
    o.resume = Some(b.clone());
    run(&o).unwrap();
}

fn expect_error(opts: &TrainOptions, needle: &str) {
    let before = std::fs::read(&opts.output).ok();
    let err = run(opts).expect_err("an error").to_string();
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert_eq!(
        std::fs::read(&opts.output).ok(),
        before,
        "the checkpoint is untouched"
    );
}

#[test]
fn bad_input_is_a_clear_error_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter.safetensors");
    run(&options("lora", 2, &out)).unwrap();
    let data = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let mut o = options("lora", 4, &out);
    o.data = data("empty.jsonl", "");
    expect_error(&o, "empty.jsonl: no data (the file is empty)");
    o.data = data(
        "bad.jsonl",
        "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, oops]}\n",
    );
    expect_error(&o, "bad.jsonl:2: not JSON");
    o.data = data("vocab.jsonl", "{\"input_ids\": [1, 2, 512]}\n");
    expect_error(
        &o,
        "vocab.jsonl:1: token id 512 is outside the model's vocabulary (0..512)",
    );
    let mut o = options("delora", 4, &out);
    o.resume = Some(out.clone());
    expect_error(&o, "cannot resume");
}

#[test]
fn a_sequence_the_model_cannot_take_is_an_error() {
    // GPT-2's position table has 64 rows.
    let dir = tempfile::tempdir().unwrap();
    let mut o = options("lora", 2, &dir.path().join("a.safetensors"));
    o.training.seq = 100;
    let err = train::run(&fixture("gpt2"), &o, Arc::new(AtomicBool::new(false)))
        .expect_err("an error")
        .to_string();
    assert!(!err.is_empty());
    assert!(!dir.path().join("a.safetensors").exists());
}

#[test]
fn emitted_model_holds_the_trained_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options("lora", 5, &dir.path().join("a.safetensors"));
    o.emit_model = Some(dir.path().join("adapted.onnx"));
    run(&o).unwrap();
    let file = AdapterFile::read(&dir.path().join("a.safetensors")).unwrap();
    let model = Model::load(&dir.path().join("adapted.onnx")).unwrap();
    for (key, torch) in &file.tensors {
        let v = model.graph.value_by_name(key).unwrap();
        let init = model.graph.initializer(v).unwrap();
        let onnx = lora_graft::tensor::Array::from_proto(&init.proto, init.raw_bytes())
            .unwrap()
            .to_f32();
        assert_eq!(
            onnx,
            lora_graft::passes::graft::onnx_layout(&torch.to_f32()),
            "{key}"
        );
    }
}

/// Mean cross-entropy of `logits` `[batch, seq, vocab]` predicting `ids[:, 1:]`.
fn causal_lm_loss(logits: &Array, ids: &Array) -> f64 {
    let logits = logits.to_f64();
    let ids = ids.to_f64();
    let (b, t, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
    let mut total = 0.0;
    for i in 0..b {
        for j in 0..t - 1 {
            let row: Vec<f64> = (0..v).map(|k| logits[[i, j, k]]).collect();
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            total += lse - row[ids[[i, j + 1]] as usize];
        }
    }
    total / (b * (t - 1)) as f64
}

#[test]
fn delora_first_step_moves_the_loss_as_much_as_lora() {
    // One AdamW step at lr 1e-3 from init, then the loss on the reference batch. With
    // lora-lite's B = 0, the max(‖b_i‖, 1e-4) clamp makes the first step a 1e4 gain (every
    // rank at full strength λ/r); the paper's init (kaiming B, W_res) moves like LoRA.
    use lora_graft::passes::variants::delora::DeloraInit;
    let (inputs, _) = reference("llama");
    let ids = inputs
        .iter()
        .find(|(n, _)| n == "input_ids")
        .unwrap()
        .1
        .clone();
    let base = causal_lm_loss(
        &common::run_tract(&Model::load(&fixture("llama")).unwrap(), &inputs)[0],
        &ids,
    );
    let dir = tempfile::tempdir().unwrap();
    let change = |variant: &str, init: DeloraInit| {
        let mut opts = options(
            variant,
            1,
            &dir.path().join(format!("{variant}.safetensors")),
        );
        opts.lr = 1e-3;
        opts.training.graft.cfg.delora_init = init;
        let emitted = dir.path().join(format!("{variant}.{}.onnx", init.name()));
        opts.emit_model = Some(emitted.clone());
        run(&opts).unwrap();
        let logits = common::run_tract(&Model::load(&emitted).unwrap(), &inputs);
        (causal_lm_loss(&logits[0], &ids) - base).abs()
    };
    let lora = change("lora", DeloraInit::Paper);
    let paper = change("delora", DeloraInit::Paper);
    let lite = change("delora", DeloraInit::LoraLite);
    eprintln!("first-step loss change: lora {lora:.3e}, delora (paper) {paper:.3e}, delora (lora-lite) {lite:.3e}");
    assert!(lora > 0.0);
    // Of the order of LoRA's: within a factor of 10 either way.
    assert!(
        paper <= 10.0 * lora && paper >= 0.1 * lora,
        "paper init: {paper:e} against LoRA's {lora:e}"
    );
    assert!(
        lite >= 10.0 * lora,
        "lora-lite init: {lite:e} against LoRA's {lora:e}"
    );
}
