//! AntiPaSTO against lora-lite (`fixtures/make.py antipasto`): outputs of lora-lite's own
//! adapter files with perturbed `δ` and rotations (both bases, blocks of 4 and 2), the
//! Wanda-style calibrated selection, and a reloaded calibrated adapter.

mod common;

use lora_graft::adapter::{AdapterFile, LoadedAdapter};
use lora_graft::jobs;
use lora_graft::Model;

fn antipasto_file(file: &str) -> std::path::PathBuf {
    common::root().join("fixtures/antipasto").join(file)
}

#[test]
fn lora_lites_adapters_give_lora_lites_outputs() {
    let (inputs, _) = common::reference("llama");
    for case in ["bs4_V", "bs4_U", "bs2_V"] {
        let path = antipasto_file(&format!("llama.{case}.adapter.safetensors"));
        let adapter = LoadedAdapter::read(&path, &Default::default()).unwrap();
        assert_eq!(adapter.req.variant.name(), "antipasto");
        let mut model = Model::load(&common::fixture("llama")).unwrap();
        jobs::apply(&mut model, &adapter).unwrap();
        let got = common::run_tract(&model, &inputs);
        let want = AdapterFile::read(&antipasto_file(&format!("llama.{case}.out.safetensors")))
            .unwrap()
            .tensors["logits"]
            .clone();
        let base = common::run_tract(&Model::load(&common::fixture("llama")).unwrap(), &inputs);
        // float32 on both sides; lora-lite folds W − U S Vh into the weight, lora-graft
        // subtracts it in the branch: 1e-4 of the largest logit.
        let d = common::max_abs_diff(&got[0], &want) / common::max_abs(&want);
        assert!(d <= 1e-4, "{case}: {d:e} from lora-lite's outputs");
        // Merged into the weights (the rotation by elimination, not the graph's polynomial).
        let mut merged = Model::load(&common::fixture("llama")).unwrap();
        jobs::merge(
            &mut merged,
            &adapter,
            lora_graft::passes::merge::PissaBase::Original,
            lora_graft::passes::merge::QuantizedWeights::Refuse,
        )
        .unwrap();
        let m = common::run_tract(&merged, &inputs);
        let d = common::max_abs_diff(&m[0], &want) / common::max_abs(&want);
        assert!(d <= 1e-4, "{case}: merged {d:e} from lora-lite's outputs");
        // The rotations and shifts are large enough to matter.
        let moved = common::max_abs_diff(&base[0], &want) / common::max_abs(&want);
        assert!(
            moved > 1e-2,
            "{case}: the adapter moves the outputs by only {moved:e}"
        );
    }
}

#[test]
fn calibrated_selection_and_reload() {
    let text = std::fs::read_to_string(antipasto_file("llama.calibrated.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut model = Model::load(&common::fixture("llama")).unwrap();
    let mut req = common::request_r("antipasto", 8, 16.0);
    req.cfg.antipasto.select = true;
    req.calibration = Some(common::oracle_calibration("llama"));
    let outcome = jobs::graft(&mut model, &req).unwrap();
    let mut not_top = 0;
    for m in &outcome.grafted.modules {
        // lora-lite scores its components on activations of a model whose every target
        // already lost its top-r part (attach() runs init() first): only the first
        // layer's q, k, v see the real inputs. lora-graft scores on the model's own
        // activations; make.py computed lora-lite's rule on those too.
        let want: Vec<usize> = json["selected_if_x_c_from_unmodified_model"][&m.module]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as usize)
            .collect();
        let sv: Vec<f64> = json["singular_values"][&m.module]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got = &m.params["lora_S"];
        for (k, &i) in want.iter().enumerate() {
            let rel = (got[[k]] as f64 - sv[i]).abs() / sv[i];
            assert!(
                rel <= 1e-5,
                "{}: component {k} is not singular pair {i}",
                m.module
            );
        }
        if m.module.starts_with("model.layers.0.self_attn.") && !m.module.ends_with("o_proj") {
            assert_eq!(
                json["selected"][&m.module],
                json["selected_if_x_c_from_unmodified_model"][&m.module]
            );
        }
        not_top += usize::from(want != (0..8).collect::<Vec<_>>());
    }
    assert!(
        not_top >= 10,
        "the selection differs from the top r on {not_top} modules only"
    );
    // A reloaded calibrated adapter keeps the base it was trained with.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("antipasto.safetensors");
    std::fs::write(&path, outcome.adapter_file(&req).to_bytes().unwrap()).unwrap();
    let loaded = LoadedAdapter::read(&path, &Default::default()).unwrap();
    let mut applied = Model::load(&common::fixture("llama")).unwrap();
    jobs::apply(&mut applied, &loaded).unwrap();
    let (inputs, _) = common::reference("llama");
    let (a, b) = (
        common::run_tract(&applied, &inputs),
        common::run_tract(&model, &inputs),
    );
    assert!(
        common::max_abs_diff(&a[0], &b[0]) <= 1e-6,
        "reloaded differs"
    );
}
