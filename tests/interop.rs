//! ONNX Runtime interop: every grafted model (fixture × variant, with non-zero adapter
//! values) passes onnx.checker and gives tract's outputs in ONNX Runtime
//! (`tests/interop.py`, run by the Python `common::python` provisions).

mod common;

use lora_graft::passes::merge::QuantizedWeights;

use common::{fixture, perturb, reference, run_tract, FIXTURES};
use lora_graft::adapter::{AdapterOverrides, LoadedAdapter};
use lora_graft::jobs;
use lora_graft::model::SaveOptions;
use lora_graft::Model;

#[test]
fn grafted_models_run_in_onnx_runtime_as_in_tract() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = Vec::new();
    for name in FIXTURES {
        let (inputs, reference_outputs) = reference(name);
        for variant in common::variant_names() {
            let mut model = Model::load(&fixture(name)).unwrap();
            let req = common::request_for(name, variant);
            let quantized = *name == "genai_int4";
            let mut outcome = match jobs::graft(&mut model, &req) {
                Ok(o) => o,
                Err(e) if quantized && common::refused_on_int4(variant) => {
                    assert!(e.to_string().contains("quantized"), "{e}");
                    continue;
                }
                Err(e) => panic!("{name} {variant}: {e}"),
            };
            // Checked against the base model at init: AntiPaSTO's δ starts at 4e-4 by
            // design; with δ = 0 (and no rotation) its branch is exactly zero.
            if quantized && variant == "antipasto" {
                for m in outcome.grafted.modules.clone() {
                    let zero = m.params["lora_delta_s"].mapv(|_| 0.0);
                    lora_graft::jobs::set_param(
                        &mut model,
                        &mut outcome,
                        &m.module,
                        "lora_delta_s",
                        zero,
                    )
                    .unwrap();
                }
            }
            // tract cannot run the int4 model (GroupQueryAttention): check it at init
            // against the reference ONNX Runtime outputs instead.
            let outputs = if quantized {
                reference_outputs.clone()
            } else {
                perturb(&mut model, &mut outcome, 11);
                let got = run_tract(&model, &inputs);
                model
                    .graph
                    .outputs()
                    .iter()
                    .zip(got)
                    .map(|(o, a)| (model.graph.value(o.value).name.clone(), a))
                    .collect()
            };
            // One folder per fixture: each links its own base data file.
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            let stem = format!("{name}/{variant}");
            model
                .save(
                    &dir.path().join(format!("{stem}.onnx")),
                    &SaveOptions::default(),
                )
                .unwrap();
            common::write_io(
                &dir.path().join(format!("{stem}.io.safetensors")),
                inputs.iter().cloned(),
                outputs,
            );
            let fp16 = name.ends_with("fp16");
            let entry = |model: String, io: &str, tol: f64, relative: bool| {
                serde_json::json!({
                    "model": model,
                    "base": fixture(name),
                    "io": io,
                    // The onnxruntime-genai builder's own model fails the full check (an op
                    // in the wrong domain); the grafted model gets the check the base passes.
                    "full_check": !quantized,
                    "tol": tol,
                    "relative": relative,
                })
            };
            let io_name = format!("{stem}.io.safetensors");
            // fp32: 1e-5 absolute (the bound). fp16: 1e-2 relative, one or two f16
            // ulps where the two runtimes accumulate in another order.
            let (tol, relative) = if fp16 { (1e-2, true) } else { (1e-5, false) };
            manifest.push(entry(format!("{stem}.onnx"), &io_name, tol, relative));
            if quantized {
                continue;
            }
            // The same adapter applied from its file to the base, and merged into it.
            let adapter_path = dir.path().join(format!("{stem}.safetensors"));
            std::fs::write(
                &adapter_path,
                outcome.adapter_file(&req).to_bytes().unwrap(),
            )
            .unwrap();
            let adapter = LoadedAdapter::read(&adapter_path, &AdapterOverrides::default()).unwrap();
            let mut applied = Model::load(&fixture(name)).unwrap();
            jobs::apply(&mut applied, &adapter).unwrap();
            applied
                .save(
                    &dir.path().join(format!("{stem}.applied.onnx")),
                    &SaveOptions::default(),
                )
                .unwrap();
            manifest.push(entry(
                format!("{stem}.applied.onnx"),
                &io_name,
                tol,
                relative,
            ));
            let merged = common::merged(name, &adapter, QuantizedWeights::Refuse).unwrap();
            merged
                .save(
                    &dir.path().join(format!("{stem}.merged.onnx")),
                    &SaveOptions::default(),
                )
                .unwrap();
            // Merged vs adapted: 1e-4 relative (the bound; other summation order).
            manifest.push(entry(
                format!("{stem}.merged.onnx"),
                &io_name,
                if fp16 { 1e-2 } else { 1e-4 },
                true,
            ));
        }
    }
    common::run_interop(dir.path(), &manifest);
}
