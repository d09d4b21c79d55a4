//! The variants against implementations we did not write: lora-lite (commit in
//! `fixtures/make.py`) and HF PEFT. For each fixture and variant, `fixtures/variants/`
//! holds the adapter file the oracle saved (perturbed away from its init), the PyTorch
//! output with it, and the autograd gradients of the loss. lora-graft loads the file
//! (`--adapter-in`), and its grafted model and training graph must give the same.

mod common;

use std::path::PathBuf;

use common::{fixture, max_abs, max_abs_diff, reference, root, scalar, Session};
use lora_graft::adapter::{AdapterFile, AdapterOverrides, LoadedAdapter};
use lora_graft::jobs::{self, TrainingRequest};
use lora_graft::passes::grad::loss::Loss;
use lora_graft::tensor::Array;
use lora_graft::Model;

/// The oracle cases, as named in `fixtures/variants/` (`<fixture>.<case>.*`): lora-lite's
/// files say their variant in `cfg`; PEFT's (with `adapter_config.json`) do not.
const CASES: &[&str] = &[
    "ia3", "ia3_ff", "dora", "hra", "olora", "road_1", "road_2", "road_4", "vera",
];

/// What a PEFT file's `adapter_config.json` says that the file does not: the variant
/// and alpha (lora-lite's files carry their `cfg`).
fn overrides(name: &str, case: &str) -> AdapterOverrides {
    let config = root()
        .join("fixtures/variants")
        .join(format!("{name}.{case}.adapter_config.json"));
    let Ok(text) = std::fs::read_to_string(&config) else {
        return AdapterOverrides::default();
    };
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    AdapterOverrides {
        variant: Some(lora_graft::passes::variants::variant(case).unwrap()),
        alpha: json["lora_alpha"]
            .as_f64()
            .map(lora_graft::passes::variants::Alpha::from),
        ..AdapterOverrides::default()
    }
}

fn file(name: &str, case: &str, what: &str) -> PathBuf {
    root()
        .join("fixtures/variants")
        .join(format!("{name}.{case}.{what}.safetensors"))
}

/// The fixture with the oracle's adapter file applied.
fn applied(name: &str, case: &str) -> (Model, jobs::Outcome, LoadedAdapter) {
    let adapter = LoadedAdapter::read(&file(name, case, "adapter"), &overrides(name, case))
        .unwrap_or_else(|e| panic!("{name} {case}: {e}"));
    let mut model = Model::load(&fixture(name)).unwrap();
    let outcome =
        jobs::apply(&mut model, &adapter).unwrap_or_else(|e| panic!("{name} {case}: {e}"));
    (model, outcome, adapter)
}

#[test]
fn outputs_match_the_oracles() {
    for name in ["llama", "gpt2", "bert"] {
        let (inputs, base) = reference(name);
        for case in CASES {
            let (model, _, _) = applied(name, case);
            let got = common::run_tract(&model, &inputs);
            let want = AdapterFile::read(&file(name, case, "out")).unwrap();
            let (out_name, base_out) = &base[0];
            let want = &want.tensors[&format!("output.{out_name}")];
            // 1e-4 of the largest output: fp32 on both sides, summed in other orders.
            let err = max_abs_diff(&got[0], want) / max_abs(want);
            assert!(err <= 1e-4, "{name} {case}: {err:e} relative to the oracle");
            // The adapter moved the output far beyond that tolerance.
            let moved = max_abs_diff(base_out, want) / max_abs(want);
            assert!(
                moved > 1e-3,
                "{name} {case}: the oracle's adapter moved only {moved:e}"
            );
        }
    }
}

#[test]
fn gradients_match_the_oracles_autograd() {
    for name in ["llama", "gpt2", "bert"] {
        for case in CASES {
            let (model, outcome, adapter) = applied(name, case);
            let loss = if name == "bert" {
                Loss::Mse
            } else {
                Loss::CausalLm
            };
            let req = TrainingRequest::new(adapter.req.clone(), loss, 2, 7);
            let t = jobs::training_graph_of(model, outcome, &req).unwrap();
            let mut feeds = common::loss_feeds(name, &t);
            for m in &t.outcome.grafted.modules {
                for p in &m.trainable {
                    let values = lora_graft::passes::graft::onnx_layout(&m.params[p]);
                    feeds.insert(format!("{}.{p}", m.module), Array::F32(values));
                }
            }
            let out = Session::new(&t).run(&feeds);
            let torch = AdapterFile::read(&file(name, case, "grad")).unwrap();
            let want_loss = torch.tensors["loss"].to_f64()[[]];
            let got_loss = scalar(&out["loss"]);
            assert!(
                (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                "{name} {case}: loss {got_loss} vs the oracle's {want_loss}"
            );
            // The oracle's keys are its adapter file's: lora-lite `<module>.<name>`, PEFT
            // `base_model.model.<module>.<name>.weight`.
            for (tensor, g) in &t.graph.gradients {
                let keys = [
                    format!("grad.{tensor}"),
                    format!("grad.base_model.model.{tensor}.weight"),
                    format!("grad.base_model.model.{tensor}"),
                ];
                let want = keys
                    .iter()
                    .find_map(|k| torch.tensors.get(k))
                    .unwrap_or_else(|| panic!("{name} {case}: no gradient of {tensor}"))
                    .to_f32();
                let got = lora_graft::passes::graft::onnx_layout(&out[g].to_f32());
                let got = Array::F32(got.into_shape_with_order(want.raw_dim()).unwrap());
                let want = Array::F32(want);
                // 1e-4 of the tensor's largest entry (the bound): fp32 on both
                // sides, summed in different orders.
                let err = max_abs_diff(&got, &want);
                let scale = max_abs(&want).max(1e-12);
                assert!(
                    err <= 1e-4 * scale,
                    "{name} {case} {tensor}: max error {err:e}, largest gradient {scale:e}"
                );
            }
        }
    }
}
