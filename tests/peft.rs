//! HF PEFT adapter folders in (`--adapter-in folder/`) and out (`export-adapter --format
//! peft`): PEFT's own folders (`fixtures/peft/`, made in PyTorch by `fixtures/make.py`)
//! give PEFT's PyTorch outputs; exported folders read back to the same model; bad
//! configs are one-line errors naming the key.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_one_line_error, cli, fixture, reference, root, run_tract};
use lora_graft::adapter::peft::{CONFIG_NAME, WEIGHTS_NAME};
use lora_graft::adapter::{AdapterFile, AdapterOverrides, LoadedAdapter};
use lora_graft::jobs;
use lora_graft::tensor::Array;
use lora_graft::Model;

fn peft_dir(stem: &str) -> PathBuf {
    root().join("fixtures/peft").join(stem)
}

/// `max |got − want| / max |want|`.
fn rel(got: &Array, want: &Array) -> f64 {
    common::max_abs_diff(got, want) / common::max_abs(want).max(1e-30)
}

/// The model's first output with `adapter` applied to fixture `name`, in tract.
fn applied_output(name: &str, adapter: &LoadedAdapter) -> Array {
    let (inputs, _) = reference(name);
    let mut model = Model::load(&fixture(name)).unwrap();
    jobs::apply(&mut model, adapter).unwrap_or_else(|e| panic!("{name}: {e}"));
    run_tract(&model, &inputs).remove(0)
}

/// PEFT's PyTorch output for `<name>.<tag>`.
fn peft_output(name: &str, tag: &str) -> Array {
    let out = AdapterFile::read(&peft_dir(&format!("{name}.{tag}.out.safetensors"))).unwrap();
    out.tensors.into_values().next().unwrap()
}

const CASES: &[(&str, &str)] = &[
    ("llama", "lora"),
    ("llama", "rslora"),
    ("llama", "pattern"),
    ("gpt2", "lora"),
    ("gpt2", "rslora"),
    ("gpt2", "pattern"),
    ("bert", "lora"),
    ("bert", "rslora"),
    ("bert", "pattern"),
];

/// The issue's bound: PEFT's PyTorch outputs within 1e-4 relative (float32, another
/// summation order in another runtime).
const TOL: f64 = 1e-4;

#[test]
fn peft_folders_give_peft_outputs() {
    for (name, tag) in CASES {
        let folder = peft_dir(&format!("{name}.{tag}"));
        let adapter = LoadedAdapter::read(&folder, &AdapterOverrides::default())
            .unwrap_or_else(|e| panic!("{name}.{tag}: {e}"));
        let want = peft_output(name, tag);
        let base = reference(name).1.remove(0).1;
        assert!(
            rel(&base, &want) > 1e-2,
            "{name}.{tag}: the adapter barely acts"
        );
        let got = applied_output(name, &adapter);
        let d = rel(&got, &want);
        assert!(d <= TOL, "{name}.{tag}: {d:e} from PEFT's output");
        if *tag == "pattern" {
            assert!(!adapter.req.cfg.modules.is_empty(), "{name}: patterns read");
        }
    }
}

#[test]
fn a_tensor_file_reads_the_config_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let folder = peft_dir("gpt2.pattern");
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        std::fs::copy(folder.join(f), dir.path().join(f)).unwrap();
    }
    let adapter =
        LoadedAdapter::read(&dir.path().join(WEIGHTS_NAME), &AdapterOverrides::default()).unwrap();
    let d = rel(
        &applied_output("gpt2", &adapter),
        &peft_output("gpt2", "pattern"),
    );
    assert!(d <= TOL, "{d:e}");
}

/// Writes a copy of PEFT's llama.lora folder into `dir/<tag>/` with its config changed
/// by `edit`.
fn edited(
    dir: &Path,
    tag: &str,
    edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>),
) -> PathBuf {
    let src = peft_dir("llama.lora");
    let out = dir.join(tag);
    std::fs::create_dir(&out).unwrap();
    std::fs::copy(src.join(WEIGHTS_NAME), out.join(WEIGHTS_NAME)).unwrap();
    let mut config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(src.join(CONFIG_NAME)).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(
        out.join(CONFIG_NAME),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    out
}

#[test]
fn bad_peft_inputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let llama = fixture("llama").display().to_string();
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            edited(dir.path(), "unknown", |c| {
                c.insert("lora_magic".into(), 3.into());
            }),
            "unknown key 'lora_magic'",
        ),
        (
            edited(dir.path(), "rank", |c| {
                c.insert("r".into(), 8.into());
            }),
            "lora_A has rank 4, but",
        ),
        (
            edited(dir.path(), "dora", |c| {
                c.insert("use_dora".into(), true.into());
            }),
            "'use_dora' is true",
        ),
        (
            edited(dir.path(), "vera", |c| {
                c.insert("peft_type".into(), "VERA".into());
            }),
            "peft_type 'VERA' is not LORA",
        ),
        (
            edited(dir.path(), "alpha", |c| {
                c.insert("lora_alpha".into(), "eight".into());
            }),
            "'lora_alpha' is not a number",
        ),
    ];
    for (folder, needle) in cases {
        let out_path = dir.path().join("out.onnx");
        let out = cli(&[
            &llama,
            "--adapter-in",
            folder.to_str().unwrap(),
            "-o",
            out_path.to_str().unwrap(),
        ]);
        assert_one_line_error(&out, needle, needle);
        assert!(!out_path.exists(), "{needle}: an output was written");
    }
    // A bare tensor file says nothing of its alpha: refused unless --alpha says it.
    let bare = dir.path().join("bare.safetensors");
    std::fs::copy(peft_dir("llama.lora").join(WEIGHTS_NAME), &bare).unwrap();
    let out_path = dir.path().join("bare.onnx");
    let args = [
        llama.as_str(),
        "--adapter-in",
        bare.to_str().unwrap(),
        "-o",
        out_path.to_str().unwrap(),
    ];
    assert_one_line_error(&cli(&args), "bare", "give it with --alpha");
    let out = cli(&[&args[..], &["--alpha", "8"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Our PEFT folders read back to the model they came from: PEFT's own folder (patterns
/// kept), and lora-graft adapters of the other low-rank variants as plain LoRA.
#[test]
fn exported_peft_folders_read_back() {
    let dir = tempfile::tempdir().unwrap();
    // PEFT's folder through our writer: same keys, same outputs.
    let peft =
        LoadedAdapter::read(&peft_dir("llama.pattern"), &AdapterOverrides::default()).unwrap();
    let (config, tensors) = jobs::export::peft_folder(&peft, None).unwrap();
    let ours = write_folder(dir.path(), "ours", &config, tensors);
    let theirs = AdapterFile::read(&peft_dir("llama.pattern").join(WEIGHTS_NAME)).unwrap();
    let mine = AdapterFile::read(&ours.join(WEIGHTS_NAME)).unwrap();
    assert_eq!(
        theirs.tensors.keys().collect::<Vec<_>>(),
        mine.tensors.keys().collect::<Vec<_>>(),
        "PEFT's key names"
    );
    let back = LoadedAdapter::read(&ours, &AdapterOverrides::default()).unwrap();
    let d = rel(
        &applied_output("llama", &back),
        &peft_output("llama", "pattern"),
    );
    assert!(d <= TOL, "{d:e}");
    // lora-graft adapters of every low-rank variant, as plain LoRA.
    for (name, variant) in [
        ("llama", "delora"),
        ("llama", "pissa"),
        ("gpt2", "olora"),
        ("bert", "vera"),
        ("llama", "lora"),
    ] {
        let path = dir.path().join(format!("{name}.{variant}.safetensors"));
        let (model, adapter) = common::trained(name, &common::request(variant), 3, &path);
        let (inputs, _) = reference(name);
        let want = run_tract(&model, &inputs).remove(0);
        let base = Model::load(&fixture(name)).unwrap();
        let (config, tensors) = jobs::export::peft_folder(&adapter, Some(&base)).unwrap();
        let folder = write_folder(dir.path(), &format!("{name}.{variant}"), &config, tensors);
        let back = LoadedAdapter::read(&folder, &AdapterOverrides::default()).unwrap();
        assert_eq!(back.req.variant.name(), "lora");
        // 1e-5: the same update as one product instead of the variant's graph.
        let d = rel(&applied_output(name, &back), &want);
        assert!(d <= 1e-5, "{name} {variant}: {d:e}");
    }
}

fn write_folder(dir: &Path, tag: &str, config: &str, tensors: Vec<(String, Array)>) -> PathBuf {
    let out = dir.join(tag);
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join(CONFIG_NAME), config).unwrap();
    let file = AdapterFile {
        metadata: Default::default(),
        tensors: tensors.into_iter().collect(),
    };
    std::fs::write(out.join(WEIGHTS_NAME), file.to_bytes().unwrap()).unwrap();
    out
}

/// lora-graft adapters exported as PEFT folders, byte for byte the folders committed in
/// `fixtures/peft_export/` (`LORA_GRAFT_BLESS=1` rewrites them), with the adapted ONNX
/// model's output beside each (`<case>.onnx_out.safetensors`). `fixtures/make.py --only
/// peft_export` loads each committed folder with `PeftModel.from_pretrained` on the
/// fixture's PyTorch model and checks that it gives that output (1e-4 relative): so the
/// files this test pins are ones PEFT was seen to load to the ONNX model's outputs.
#[test]
fn exported_peft_folders_are_the_ones_peft_loaded() {
    let bless = std::env::var_os("LORA_GRAFT_BLESS").is_some();
    let golden = root().join("fixtures/peft_export");
    let dir = tempfile::tempdir().unwrap();
    for (name, variant, rslora) in [
        ("llama", "lora", true),
        ("gpt2", "lora", false),
        ("llama", "delora", false),
        ("bert", "pissa", false),
    ] {
        let case = format!("{name}.{variant}");
        let mut req = common::request(variant);
        req.cfg.rslora = rslora;
        let path = dir.path().join(format!("{case}.safetensors"));
        let (model, adapter) = common::trained(name, &req, 5, &path);
        let (inputs, _) = reference(name);
        let output_name = model
            .graph
            .value(model.graph.outputs()[0].value)
            .name
            .clone();
        let output = run_tract(&model, &inputs).remove(0);
        let base = Model::load(&fixture(name)).unwrap();
        let (config, tensors) = jobs::export::peft_folder(&adapter, Some(&base)).unwrap();
        let folder = write_folder(dir.path(), &case, &config, tensors);
        let out = AdapterFile {
            metadata: Default::default(),
            tensors: [(format!("output.{output_name}"), output)].into(),
        };
        let files = [
            (
                format!("{case}/{CONFIG_NAME}"),
                std::fs::read(folder.join(CONFIG_NAME)).unwrap(),
            ),
            (
                format!("{case}/{WEIGHTS_NAME}"),
                std::fs::read(folder.join(WEIGHTS_NAME)).unwrap(),
            ),
            (
                format!("{case}.onnx_out.safetensors"),
                out.to_bytes().unwrap(),
            ),
        ];
        for (rel_path, bytes) in files {
            let want = golden.join(&rel_path);
            if bless {
                std::fs::create_dir_all(want.parent().unwrap()).unwrap();
                std::fs::write(&want, &bytes).unwrap();
                continue;
            }
            let committed = std::fs::read(&want).unwrap_or_else(|e| {
                panic!("{}: {e} (LORA_GRAFT_BLESS=1 writes it)", want.display())
            });
            assert!(
                committed == bytes,
                "{} differs from what lora-graft writes now: rerun `fixtures/make.py --only peft_export` \
                 in the fixture venv after LORA_GRAFT_BLESS=1, so PEFT checks the new files",
                want.display()
            );
        }
    }
}

/// PEFT's adapters on query, key and value apply by name to the same models optimized
/// by onnxruntime's transformer optimizer (`bert_fused`, `gpt2_fused`), whose fused
/// `Attention` holds those projections: they come out as `MatMul`s feeding
/// `MultiHeadAttention` (BERT: `…attention.self.{query,key,value}`; GPT-2: its one
/// `attn.c_attn`), and the adapted model gives PEFT's PyTorch output in tract (lowered)
/// and in ONNX Runtime (fused), within the PEFT bound.
#[test]
fn peft_adapters_apply_by_name_to_attention_fused_exports() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = Vec::new();
    for (fused, base, modules) in [
        ("bert_fused", "bert", ["query", "key", "value"].as_slice()),
        ("gpt2_fused", "gpt2", ["c_attn"].as_slice()),
    ] {
        let adapter = LoadedAdapter::read(
            &peft_dir(&format!("{base}.lora")),
            &AdapterOverrides::default(),
        )
        .unwrap();
        let mut model = Model::load(&fixture(fused)).unwrap();
        let mut outcome =
            jobs::apply(&mut model, &adapter).unwrap_or_else(|e| panic!("{fused}: {e}"));
        let ops: Vec<&str> = model
            .graph
            .node_ids()
            .map(|id| model.graph.node(id).op())
            .collect();
        assert!(
            !ops.contains(&"Attention") && ops.contains(&"MultiHeadAttention"),
            "{fused}: {ops:?}"
        );
        for m in modules {
            assert!(
                outcome
                    .grafted
                    .modules
                    .iter()
                    .any(|g| g.module.ends_with(&format!("attn.{m}"))
                        || g.module.ends_with(&format!("self.{m}"))),
                "{fused}: no adapter on {m}"
            );
        }
        let want = peft_output(base, "lora");
        let (inputs, _) = reference(base);
        // ONNX Runtime runs the model as written (MultiHeadAttention, fused kernels).
        std::fs::create_dir_all(dir.path().join(fused)).unwrap();
        let stem = format!("{fused}/lora");
        common::save_case(dir.path(), &stem, &model, inputs.clone(), want.clone());
        manifest.push(serde_json::json!({
            "model": format!("{stem}.onnx"), "base": fixture(fused), "io": format!("{stem}.io.safetensors"),
            "full_check": true, "tol": TOL, "relative": true,
        }));
        // tract runs it lowered.
        jobs::lower(&mut model, &mut outcome).unwrap();
        let got = run_tract(&model, &inputs).remove(0);
        let d = rel(&got, &want);
        assert!(d <= TOL, "{fused}: {d:e} from PEFT's output");
    }
    common::run_interop(dir.path(), &manifest);
}
