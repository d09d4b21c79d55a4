//! Serving adapters as graph inputs (`--adapter-inputs`) and `.onnx_adapter` files:
//! every fixture × servable variant checked in ONNX Runtime (`tests/serving.py`): no
//! adapter active gives the base model, an exported adapter active gives the model with
//! the same adapter baked in; ONNX Runtime's own writer and reader agree with ours.

mod common;

use common::{assert_one_line_error, cli, fixture, perturb, reference, FIXTURES};
use lora_graft::adapter::{AdapterFile, AdapterOverrides, LoadedAdapter, OnnxAdapter};
use lora_graft::jobs::{self, GraftRequest};
use lora_graft::model::SaveOptions;
use lora_graft::passes::graft::inputs::InputBase;
use lora_graft::passes::variants::delora::DeloraInit;
use lora_graft::tensor::Array;
use lora_graft::Model;
use tract_core::ndarray::{ArrayD, IxDyn};

/// One served configuration: a variant, its options and the base it is served against.
struct Case {
    tag: &'static str,
    variant: &'static str,
    rslora: bool,
    delora_init: DeloraInit,
    base: InputBase,
}

const fn case(tag: &'static str, variant: &'static str, base: InputBase) -> Case {
    Case {
        tag,
        variant,
        rslora: false,
        delora_init: DeloraInit::Paper,
        base,
    }
}

/// Every variant whose adapter is a low-rank update, in each form it can be served.
const CASES: &[Case] = &[
    case("lora", "lora", InputBase::Trained),
    Case {
        rslora: true,
        ..case("rslora", "lora", InputBase::Trained)
    },
    case("pissa", "pissa", InputBase::Trained),
    case("pissa_original", "pissa", InputBase::Original),
    case("olora", "olora", InputBase::Trained),
    case("olora_original", "olora", InputBase::Original),
    case("delora", "delora", InputBase::Trained),
    Case {
        delora_init: DeloraInit::LoraLite,
        ..case("delora_lora_lite", "delora", InputBase::Trained)
    },
    case("vera", "vera", InputBase::Trained),
];

/// Variants that cannot be served as A/B inputs, and say so.
const NOT_SERVABLE: &[&str] = &["dora", "ia3", "ia3_ff", "hra", "road"];

fn request(c: &Case) -> GraftRequest {
    let mut req = common::request(c.variant);
    req.cfg.rslora = c.rslora;
    req.cfg.delora_init = c.delora_init;
    req
}

#[test]
fn served_adapters_match_baked_ones_in_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = Vec::new();
    for name in FIXTURES {
        let (inputs, _) = reference(name);
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        let io = format!("{name}/io.safetensors");
        common::write_io(&dir.path().join(&io), inputs, Vec::new());
        for c in CASES {
            let req = request(c);
            let stem = format!("{name}/{}", c.tag);
            let path = |suffix: &str| dir.path().join(format!("{stem}{suffix}"));
            // A trained adapter: the init moved away from zero.
            let mut model = Model::load(&fixture(name)).unwrap();
            let mut outcome = match jobs::graft(&mut model, &req) {
                Ok(o) => o,
                Err(e) if common::refused_on_int4(c.variant) => {
                    assert!(e.to_string().contains("quantized"), "{e}");
                    continue;
                }
                Err(e) => panic!("{stem}: {e}"),
            };
            perturb(&mut model, &mut outcome, 11);
            let adapter_path = path(".safetensors");
            std::fs::write(
                &adapter_path,
                outcome.adapter_file(&req).to_bytes().unwrap(),
            )
            .unwrap();
            let adapter = LoadedAdapter::read(&adapter_path, &AdapterOverrides::default()).unwrap();
            // Baked in, as `--adapter-in` does.
            let mut baked = Model::load(&fixture(name)).unwrap();
            jobs::apply(&mut baked, &adapter).unwrap();
            baked
                .save(&path(".baked.onnx"), &SaveOptions::default())
                .unwrap();
            // Served: the base with adapter inputs, and the adapter exported for it.
            let mut served = Model::load(&fixture(name)).unwrap();
            let served_req = GraftRequest {
                adapter_inputs: Some(c.base),
                ..req.clone()
            };
            match jobs::graft(&mut served, &served_req) {
                Ok(_) => {}
                // PiSSA and OLoRA on W_res would write a new weight: not on int4.
                Err(e) if req.variant.frozen_start() && c.base == InputBase::Trained => {
                    assert!(
                        common::QUANTIZED_FIXTURES.contains(name)
                            && e.to_string().contains("quantized"),
                        "{stem}: {e}"
                    );
                    continue;
                }
                Err(e) => panic!("{stem}: {e}"),
            }
            served
                .save(&path(".served.onnx"), &SaveOptions::default())
                .unwrap();
            let served = Model::load(&path(".served.onnx")).unwrap();
            let file = jobs::export::onnx_adapter(&served, &adapter, 1, 1).unwrap();
            std::fs::write(path(".onnx_adapter"), file.to_bytes().unwrap()).unwrap();
            let expected = AdapterFile {
                metadata: Default::default(),
                tensors: file.parameters.iter().cloned().collect(),
            };
            std::fs::write(path(".expected.safetensors"), expected.to_bytes().unwrap()).unwrap();
            let fp16 = name.ends_with("fp16");
            let rewrites = req.variant.frozen_start() && c.base == InputBase::Trained;
            manifest.push(serde_json::json!({
                "served": format!("{stem}.served.onnx"),
                "base": fixture(name),
                "baked": format!("{stem}.baked.onnx"),
                "adapter": format!("{stem}.onnx_adapter"),
                "expected": format!("{stem}.expected.safetensors"),
                "io": io,
                "full_check": !common::QUANTIZED_FIXTURES.contains(name),
                // fp32: the bounds, 1e-6 with no adapter, and 1e-5 with one
                // (another summation order). A served W_res (PiSSA, OLoRA) plus its
                // default factors gives W back only within two float32 roundings of
                // W (measured 1.7e-6): 4e-6 there. fp16: a few float16 ulps.
                "tol_base": match (fp16, rewrites) {
                    (true, _) => 2e-3,
                    (false, true) => 4e-6,
                    (false, false) => 1e-6,
                },
                "tol": if fp16 { 1e-2 } else { 1e-5 },
            }));
        }
        for variant in NOT_SERVABLE {
            let mut model = Model::load(&fixture(name)).unwrap();
            let req = GraftRequest {
                adapter_inputs: Some(InputBase::Trained),
                ..common::request(variant)
            };
            let e = jobs::graft(&mut model, &req)
                .expect_err(variant)
                .to_string();
            assert!(
                e.contains("cannot be served as adapter inputs") || e.contains("quantized"),
                "{name} {variant}: {e}"
            );
        }
    }
    run_serving(dir.path(), &manifest);
}

/// One batch through a model with 3 adapter slots (LoRA, DeLoRA, PiSSA: three variants
/// in one batch), rows picking slots 0, 1, 2 and none: row by row the outputs of the
/// models with each adapter baked in, in tract and in ONNX Runtime.
#[test]
fn slots_serve_many_adapters_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = Vec::new();
    let index = [0i64, 1, 2, -1];
    for name in FIXTURES {
        let (inputs, _) = reference(name);
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        // Four rows from the reference batch (repeated).
        let rows: Vec<(String, Array)> = inputs
            .iter()
            .map(|(n, a)| {
                let mut parts = vec![a; 4 / a.shape()[0].max(1)];
                parts.truncate(4);
                let tiled = Array::concat(&parts, 0).unwrap();
                (n.clone(), tiled)
            })
            .collect();
        if rows.iter().any(|(_, a)| a.shape()[0] != 4) {
            panic!("{name}: reference batch does not tile to 4 rows");
        }
        let io = format!("{name}/slots.io.safetensors");
        common::write_io(&dir.path().join(&io), rows.clone(), Vec::new());
        let quantized = common::QUANTIZED_FIXTURES.contains(name);
        let variants: &[&str] = if quantized {
            &["lora", "delora", "vera"]
        } else {
            &["lora", "delora", "pissa"]
        };
        let mut adapters = Vec::new();
        let mut baked_paths = Vec::new();
        for (slot, variant) in variants.iter().enumerate() {
            let path = dir.path().join(format!("{name}/slot{slot}.safetensors"));
            let (_, adapter) =
                common::trained(name, &common::request(variant), 20 + slot as u64, &path);
            let mut baked = Model::load(&fixture(name)).unwrap();
            jobs::apply(&mut baked, &adapter).unwrap();
            let baked_path = format!("{name}/slot{slot}.baked.onnx");
            baked
                .save(&dir.path().join(&baked_path), &SaveOptions::default())
                .unwrap();
            baked_paths.push(baked_path);
            adapters.push(adapter);
        }
        let mut served = Model::load(&fixture(name)).unwrap();
        let req = GraftRequest {
            adapter_slots: Some(3),
            ..common::request("lora")
        };
        jobs::graft(&mut served, &req).unwrap();
        let served_path = dir.path().join(format!("{name}/slots.onnx"));
        served.save(&served_path, &SaveOptions::default()).unwrap();
        let served = Model::load(&served_path).unwrap();
        let stack = jobs::export::pack(&served, &adapters).unwrap();
        let stack_name = format!("{name}/stack.safetensors");
        let file = AdapterFile {
            metadata: Default::default(),
            tensors: stack.iter().cloned().collect(),
        };
        std::fs::write(dir.path().join(&stack_name), file.to_bytes().unwrap()).unwrap();
        let fp16 = name.ends_with("fp16");
        // fp32: the 1e-5 (another summation order); fp16: a few float16 ulps.
        let tol = if fp16 { 1e-2 } else { 1e-5 };
        if common::TRACT_FIXTURES.contains(name) {
            let mut feeds = rows.clone();
            feeds.push((
                "adapter_index".into(),
                Array::I64(ArrayD::from_shape_vec(IxDyn(&[4]), index.to_vec()).unwrap()),
            ));
            feeds.extend(stack.iter().cloned());
            let got = common::run_tract(&served, &feeds);
            let base = common::run_tract(&Model::load(&fixture(name)).unwrap(), &rows);
            let baked: Vec<Vec<Array>> = baked_paths
                .iter()
                .map(|p| common::run_tract(&Model::load(&dir.path().join(p)).unwrap(), &rows))
                .collect();
            for (row, &slot) in index.iter().enumerate() {
                let want = if slot < 0 {
                    &base
                } else {
                    &baked[slot as usize]
                };
                for (g, w) in got.iter().zip(want) {
                    let (g, w) = (g.to_f32(), w.to_f32());
                    let (g, w) = (
                        g.index_axis(tract_core::ndarray::Axis(0), row),
                        w.index_axis(tract_core::ndarray::Axis(0), row),
                    );
                    let diff = (&g - &w).iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                    assert!(
                        diff as f64 <= tol * scale as f64,
                        "{name} row {row} slot {slot}: {diff} (scale {scale})"
                    );
                }
            }
        }
        manifest.push(serde_json::json!({
            "served": served_path.strip_prefix(dir.path()).unwrap(),
            "base": fixture(name),
            "baked": baked_paths,
            "stack": stack_name,
            "io": io,
            "index": index,
            "tol": tol,
        }));
    }
    run_serving(dir.path(), &manifest);
}

/// onnxruntime-genai loads the int4 genai fixture grafted with `--adapter-inputs` and
/// switches adapters with its `Adapters` API: greedy tokens with no adapter are the base
/// model's, with the exported adapter active those of the model with it baked in, and
/// they differ (`tests/genai.py`).
#[test]
fn onnxruntime_genai_switches_adapters() {
    let dir = tempfile::tempdir().unwrap();
    // The trained adapter: lora_B moved away from zero.
    let adapter_path = dir.path().join("adapter.safetensors");
    let (_, adapter) = common::trained("genai_int4", &common::request("lora"), 7, &adapter_path);
    let mut baked = Model::load(&fixture("genai_int4")).unwrap();
    jobs::apply(&mut baked, &adapter).unwrap();
    common::genai_serves("genai_int4", dir.path(), &adapter, &baked);
}

fn run_serving(dir: &std::path::Path, manifest: &[serde_json::Value]) {
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(manifest).unwrap(),
    )
    .unwrap();
    let out = python(&["check", &dir.display().to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "serving checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{} passed, 0 failed", manifest.len())),
        "{stdout}"
    );
}

fn python(args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::python())
        .arg(common::root().join("tests/serving.py"))
        .args(args)
        .output()
        .unwrap()
}

fn values() -> Vec<(String, Array)> {
    let f32s = |shape: &[usize], k: f32| {
        let n: usize = shape.iter().product();
        ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|i| (i as f32 * k).sin()).collect())
            .unwrap()
    };
    vec![
        ("layer.lora_A".into(), Array::F32(f32s(&[5, 3], 0.7))),
        ("layer.lora_B".into(), Array::F32(f32s(&[3, 7], 1.3))),
        (
            "half.lora_A".into(),
            Array::F16(f32s(&[4, 0], 1.0).mapv(half::f16::from_f32)),
        ),
        ("scalar".into(), Array::F32(f32s(&[], 1.0))),
    ]
}

#[test]
fn onnx_runtime_writes_what_we_read() {
    let dir = tempfile::tempdir().unwrap();
    let values_path = dir.path().join("values.safetensors");
    let want = values();
    let st = AdapterFile {
        metadata: Default::default(),
        tensors: want.iter().cloned().collect(),
    };
    std::fs::write(&values_path, st.to_bytes().unwrap()).unwrap();
    let out_path = dir.path().join("ort.onnx_adapter");
    let out = python(&[
        "write",
        &values_path.display().to_string(),
        &out_path.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = OnnxAdapter::read(&out_path).unwrap();
    assert_eq!((got.adapter_version, got.model_version), (7, 3));
    let mut got = got.parameters;
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want = want;
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, want);
}

#[test]
fn our_files_round_trip_with_aligned_data() {
    let file = OnnxAdapter {
        adapter_version: 2,
        model_version: 5,
        parameters: values(),
    };
    let bytes = file.to_bytes().unwrap();
    let path = std::path::Path::new("x.onnx_adapter");
    assert_eq!(OnnxAdapter::from_bytes(&bytes, path).unwrap(), file);
    // ONNX Runtime memory-maps the file and uses raw_data in place: each tensor's bytes
    // start at a multiple of 8 from the start of the file.
    for (name, a) in &file.parameters {
        let raw = a.to_proto(name).raw_data.unwrap();
        if raw.len() < 8 {
            continue;
        }
        let at = bytes
            .windows(raw.len())
            .position(|w| w == raw.as_slice())
            .unwrap_or_else(|| panic!("{name}'s bytes not found"));
        assert_eq!(at % 8, 0, "{name}'s data starts at {at}");
    }
}

/// Sets the root table's `format_version` in `bytes` (a valid file) to `v`.
fn set_format_version(bytes: &mut [u8], v: i32) {
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    let table = u32_at(bytes, 0);
    let vtable = (table as i64
        - i32::from_le_bytes(bytes[table..table + 4].try_into().unwrap()) as i64)
        as usize;
    let field = u16::from_le_bytes(bytes[vtable + 4..vtable + 6].try_into().unwrap()) as usize;
    assert!(field > 0, "format_version is stored");
    bytes[table + field..table + field + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn bad_onnx_adapter_files_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = OnnxAdapter {
        adapter_version: 1,
        model_version: 1,
        parameters: values(),
    }
    .to_bytes()
    .unwrap();
    let mut v2 = good.clone();
    set_format_version(&mut v2, 2);
    let mut wrong_id = good.clone();
    wrong_id[4..8].copy_from_slice(b"ORTM");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        ("version2", v2, "format version 2"),
        ("empty", Vec::new(), "not an ONNX model"),
    ];
    for (tag, bytes, needle) in cases {
        let p = dir.path().join(format!("{tag}.onnx_adapter"));
        std::fs::write(&p, &bytes).unwrap();
        let e = OnnxAdapter::read(&p).expect_err(tag).to_string();
        if tag != "empty" {
            assert!(e.contains(needle), "{tag}: {e}");
            assert!(e.contains(&p.display().to_string()), "{tag}: {e}");
            let out = cli(&["inspect", p.to_str().unwrap()]);
            assert_one_line_error(&out, tag, needle);
        }
    }
    let p = dir.path().join("wrong.onnx_adapter");
    std::fs::write(&p, &wrong_id).unwrap();
    let e = OnnxAdapter::read(&p).expect_err("wrong id").to_string();
    assert!(e.contains("'TORT' file identifier"), "{e}");
}

#[test]
fn export_refuses_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let d = |f: &str| dir.path().join(f).display().to_string();
    let llama = fixture("llama").display().to_string();
    // A model grafted without --adapter-inputs has no inputs to feed.
    let out = cli(&[&llama, "--variant", "lora", "-o", &d("plain.onnx")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        "export-adapter",
        &d("plain.safetensors"),
        "--model",
        &d("plain.onnx"),
        "-o",
        &d("x.onnx_adapter"),
    ]);
    assert_one_line_error(
        &out,
        "no inputs",
        "graft the base model with --adapter-inputs",
    );
    let served = |base: &str, out: &str| {
        let out = cli(&[base, "--variant", "lora", "--adapter-inputs", "-o", &d(out)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let export = |adapter: &str, model: &str, out: &str| {
        let args = [
            "export-adapter",
            &d(adapter),
            "--model",
            &d(model),
            "-o",
            &d(out),
        ];
        cli(&args)
    };
    // An adapter made for another model.
    std::fs::create_dir(dir.path().join("gpt2")).unwrap();
    served(&fixture("gpt2").display().to_string(), "gpt2/gpt2.onnx");
    let out = export("plain.safetensors", "gpt2/gpt2.onnx", "y.onnx_adapter");
    assert_one_line_error(&out, "other model", "the adapter does not fit this model");
    assert!(!dir.path().join("x.onnx_adapter").exists());
    assert!(!dir.path().join("y.onnx_adapter").exists());
    // An adapter whose names fit but whose shapes do not.
    let mut file = AdapterFile::read(&dir.path().join("plain.safetensors")).unwrap();
    let key = "model.layers.0.self_attn.q_proj.lora_A";
    file.tensors
        .insert(key.into(), Array::F32(ArrayD::zeros(IxDyn(&[8, 63]))));
    std::fs::write(
        dir.path().join("shape.safetensors"),
        file.to_bytes().unwrap(),
    )
    .unwrap();
    served(&llama, "inputs.onnx");
    let out = export("shape.safetensors", "inputs.onnx", "z.onnx_adapter");
    assert_one_line_error(
        &out,
        "shape",
        &format!("{key} is [8, 63], the model's layer needs [8, 64]"),
    );
    assert!(!dir.path().join("z.onnx_adapter").exists());
    // A variant that is not a low-rank update says what serving it would need.
    let out = cli(&[
        &llama,
        "--variant",
        "ia3",
        "--adapter-inputs",
        "-o",
        &d("ia3.onnx"),
    ]);
    assert_one_line_error(&out, "ia3", "per-output gate input");
}
