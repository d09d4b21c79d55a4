//! Helpers shared by the integration tests: fixtures, references, golden files.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lora_graft::tensor::Array;
use tract_core::ndarray::{ArrayD, IxDyn};

/// Every fixture model, by folder name under `fixtures/`.
pub const FIXTURES: &[&str] = &[
    "llama",
    "gpt2",
    "bert",
    "handmade",
    "handmade_fp16",
    "genai_int4",
];

/// Fixtures tract can run (genai int4 uses GroupQueryAttention, which tract refuses).
pub const TRACT_FIXTURES: &[&str] = &["llama", "gpt2", "bert", "handmade", "handmade_fp16"];

/// Fixtures with quantized weights: variants that read the weight refuse them.
pub const QUANTIZED_FIXTURES: &[&str] = &["genai_int4"];

/// Every golden file a test compares with [`check_golden`], relative to `fixtures/`, one
/// line per test that calls it. `tests/golden.rs` fails on a golden file this table does
/// not list (an orphan) and on a listed one that is missing: a new `check_golden` call
/// adds its files here.
pub fn goldens() -> Vec<String> {
    let mut goldens = Vec::new();
    for f in FIXTURES {
        // golden.rs, canonical_dump_of_every_fixture.
        goldens.push(format!("{f}/graph.txt"));
        // targets.rs, golden_target_lists.
        goldens.push(format!("{f}/targets.txt"));
        // cli_outputs.rs, one test per fixture.
        goldens.push(format!("{f}/cli.txt"));
        // graft.rs, golden_grafted_graphs: every variant but those reading a quantized weight.
        for v in lora_graft::passes::variants::VARIANTS {
            if !(QUANTIZED_FIXTURES.contains(f) && refused_on_int4(v.name())) {
                goldens.push(format!("{f}/graft.{}.txt", v.name()));
            }
        }
    }
    // fold.rs, fold_golden_dump_of_every_tract_fixture.
    for f in TRACT_FIXTURES {
        goldens.push(format!("{f}/fold.txt"));
    }
    // grad.rs, golden_training_graph_of_the_hand_built_fixture.
    goldens.push("handmade/train.lora.txt".into());
    // golden.rs, per_pass_diffs.
    goldens.push("handmade/graft.lora.diff".into());
    goldens
}

/// Whether `variant` refuses the int4 `MatMulNBits` weights of `genai_int4`: it rewrites
/// the weight (PiSSA, OLoRA) or reads the dense weight in the graph (DoRA).
pub fn refused_on_int4(variant: &str) -> bool {
    let v = lora_graft::passes::variants::variant(variant).unwrap();
    v.weight_in_graph()
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `fixtures/<name>/model.onnx`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures").join(name).join("model.onnx")
}

/// Named tensors, in a stable order.
pub type Named = Vec<(String, Array)>;

/// The reference inputs and outputs stored by `fixtures/make.py`:
/// `(inputs by name, outputs by name)`.
pub fn reference(name: &str) -> (Named, Named) {
    let path = root()
        .join("fixtures")
        .join(name)
        .join("reference.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference file");
    let mut inputs = Vec::new();
    let mut outputs = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for key in names {
        let view = st.tensor(&key).unwrap();
        let array = safetensor_to_array(&view);
        if let Some(n) = key.strip_prefix("input.") {
            inputs.push((n.to_string(), array));
        } else if let Some(n) = key.strip_prefix("output.") {
            outputs.push((n.to_string(), array));
        }
    }
    (inputs, outputs)
}

fn safetensor_to_array(view: &safetensors::tensor::TensorView) -> Array {
    use safetensors::Dtype;
    let shape = IxDyn(view.shape());
    let data = view.data();
    macro_rules! arr {
        ($ty:ty, $size:expr, $variant:ident) => {
            Array::$variant(
                ArrayD::from_shape_vec(
                    shape,
                    data.chunks_exact($size)
                        .map(|b| <$ty>::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                )
                .unwrap(),
            )
        };
    }
    match view.dtype() {
        Dtype::F32 => arr!(f32, 4, F32),
        Dtype::F64 => arr!(f64, 8, F64),
        Dtype::F16 => arr!(half::f16, 2, F16),
        Dtype::I64 => arr!(i64, 8, I64),
        Dtype::I32 => arr!(i32, 4, I32),
        Dtype::BOOL => Array::Bool(
            ArrayD::from_shape_vec(shape, data.iter().map(|&b| b != 0).collect()).unwrap(),
        ),
        other => panic!("reference dtype {other:?} not handled"),
    }
}

/// `‖got − want‖ / ‖want‖` in the Frobenius norm (arrays of the same shape).
pub fn relative_frobenius(got: &Array, want: &Array) -> f64 {
    assert_eq!(got.shape(), want.shape(), "shapes differ");
    let (got, want) = (got.to_f64(), want.to_f64());
    let diff = (&got - &want).mapv(|v| v * v).sum().sqrt();
    diff / want.mapv(|v| v * v).sum().sqrt()
}

/// The larger of `a` and `b`, NaN when either is (`f64::max` drops a NaN, so a fold
/// with it would let a NaN result pass a tolerance check).
pub fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Largest absolute value (NaN if any element is NaN).
pub fn max_abs(a: &Array) -> f64 {
    a.to_f64().iter().fold(0.0, |m, v| nan_max(m, v.abs()))
}

/// Largest absolute difference between two arrays of the same shape (NaN if any
/// element is NaN).
pub fn max_abs_diff(a: &Array, b: &Array) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let (a, b) = (a.to_f64(), b.to_f64());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, nan_max)
}

/// Input shapes of a reference input set, by name.
pub fn shapes(inputs: &[(String, Array)]) -> HashMap<String, Vec<usize>> {
    inputs
        .iter()
        .map(|(n, a)| (n.clone(), a.shape().to_vec()))
        .collect()
}

/// Compares `actual` with the golden file `fixtures/<rel>`; with `LORA_GRAFT_BLESS=1`
/// rewrites it instead. Fails with a line diff.
pub fn check_golden(rel: &str, actual: &str) {
    let path = root().join("fixtures").join(rel);
    if std::env::var("LORA_GRAFT_BLESS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "golden file {} is missing; run `LORA_GRAFT_BLESS=1 cargo test` and review it",
            path.display()
        )
    });
    if expected != actual {
        panic!(
            "golden file {} differs (run `LORA_GRAFT_BLESS=1 cargo test` to accept, after review):\n{}",
            path.display(),
            line_diff(&expected, actual)
        );
    }
}

/// The golden-diff text: the library's line diff.
pub use lora_graft::ir::dump::line_diff;

/// A `NodeProto` of `op` named `name`, reading and writing values by name.
pub fn node(
    name: &str,
    op: &str,
    inputs: &[&str],
    outputs: &[&str],
) -> lora_graft::proto::NodeProto {
    lora_graft::proto::NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A `ValueInfoProto` named `n` with no type.
pub fn vi(n: &str) -> lora_graft::proto::ValueInfoProto {
    lora_graft::proto::ValueInfoProto {
        name: Some(n.into()),
        ..Default::default()
    }
}

/// Moves every module's trainable tensors away from their init, in the graph and in
/// `outcome`'s torch-layout copies, so an adapter visibly acts: `lora_B` uniform in
/// ±0.2, DeLoRA's lambda 3, `lora_A` kept, any other by ±20 % of its RMS (at least 0.5).
pub fn perturb(model: &mut lora_graft::Model, outcome: &mut lora_graft::jobs::Outcome, seed: u64) {
    use lora_graft::ir::Initializer;
    use lora_graft::passes::graft::onnx_layout;
    let mut rng = lora_graft::rng::Rng::new(seed);
    for m in &mut outcome.grafted.modules {
        for name in m.trainable.clone() {
            let v = m.params.get_mut(name).unwrap();
            match name {
                "lora_A" => {}
                "lora_B" | "vera_lambda_b" => v.mapv_inplace(|_| rng.uniform_in(-0.2, 0.2) as f32),
                "lora_lambda" => v.fill(3.0),
                _ => {
                    let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
                    let step = 0.2 * rms.max(0.5) as f64;
                    v.mapv_inplace(|x| x + rng.uniform_in(-step, step) as f32);
                }
            }
        }
        for (name, values) in &m.params {
            let key = format!("{}.{name}", m.module);
            let v = model.graph.value_by_name(&key).unwrap();
            let dtype = model.graph.initializer(v).unwrap().elem_type();
            let a = Array::from_f32(onnx_layout(values), dtype).unwrap();
            model
                .graph
                .replace_initializer(v, Initializer::new(a.to_proto("")));
        }
    }
}

/// Fixture `name` grafted with `req`, its trainable tensors moved away from their init
/// ([`perturb`] with `seed`): the adapted model, and its adapter file, written to `path`
/// and read back.
pub fn trained(
    name: &str,
    req: &lora_graft::jobs::GraftRequest,
    seed: u64,
    path: &std::path::Path,
) -> (lora_graft::Model, lora_graft::adapter::LoadedAdapter) {
    let mut model = lora_graft::Model::load(&fixture(name)).unwrap();
    let mut outcome = lora_graft::jobs::graft(&mut model, req).unwrap();
    perturb(&mut model, &mut outcome, seed);
    std::fs::write(path, outcome.adapter_file(req).to_bytes().unwrap()).unwrap();
    let adapter = lora_graft::adapter::LoadedAdapter::read(path, &Default::default()).unwrap();
    (model, adapter)
}

/// onnxruntime-genai serves `adapter` on the genai int4 fixture `name` (`tests/genai.py`):
/// the fixture grafted with `--adapter-inputs` and the adapter's `.onnx_adapter` active give
/// the greedy tokens of `baked` (the fixture with the adapter baked in), which differ
/// from the base model's; with no adapter active, the base model's.
pub fn genai_serves(
    name: &str,
    dir: &std::path::Path,
    adapter: &lora_graft::adapter::LoadedAdapter,
    baked: &lora_graft::Model,
) {
    let fx = fixture(name);
    let folder = |n: &str| {
        let d = dir.join(n);
        std::fs::create_dir_all(&d).unwrap();
        let config = "genai_config.json";
        std::fs::copy(fx.with_file_name(config), d.join(config)).unwrap();
        d
    };
    let (served_dir, baked_dir) = (folder("genai_served"), folder("genai_baked"));
    baked
        .save(&baked_dir.join("model.onnx"), &Default::default())
        .unwrap();
    let mut served = lora_graft::Model::load(&fx).unwrap();
    let req = lora_graft::jobs::GraftRequest {
        adapter_inputs: Some(lora_graft::passes::graft::inputs::InputBase::Trained),
        ..adapter.req.clone()
    };
    lora_graft::jobs::graft(&mut served, &req).unwrap();
    served
        .save(&served_dir.join("model.onnx"), &Default::default())
        .unwrap();
    let served = lora_graft::Model::load(&served_dir.join("model.onnx")).unwrap();
    let file = lora_graft::jobs::export::onnx_adapter(&served, adapter, 1, 1).unwrap();
    let onnx_adapter = dir.join("genai.onnx_adapter");
    std::fs::write(&onnx_adapter, file.to_bytes().unwrap()).unwrap();
    let out = std::process::Command::new(python())
        .arg(root().join("tests/genai.py"))
        .args([fx.parent().unwrap(), &served_dir, &baked_dir, &onnx_adapter])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("genai: ok"),
        "onnxruntime-genai check failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets every `accuracy_level` attribute of `model` to 0. onnxruntime-genai's builder
/// writes 4, with which ONNX Runtime rounds the activations to int8 inside
/// `MatMulNBits` (2.7e-2 away from float); 0 computes in float, as tract does.
pub fn float_accuracy(model: &mut lora_graft::Model) {
    let ids: Vec<_> = model.graph.node_ids().collect();
    for id in ids {
        let node = model.graph.node_mut(id);
        for a in node
            .proto
            .attribute
            .iter_mut()
            .filter(|a| a.name() == "accuracy_level")
        {
            a.i = Some(0);
        }
    }
}

/// Saves `model` as `dir/<stem>.onnx`, and `inputs` with `output` (the value its first
/// output should have) as `dir/<stem>.io.safetensors`: a case for `tests/interop.py`.
pub fn save_case(
    dir: &std::path::Path,
    stem: &str,
    model: &lora_graft::Model,
    inputs: Named,
    output: Array,
) {
    model
        .save(&dir.join(format!("{stem}.onnx")), &Default::default())
        .unwrap();
    let name = model
        .graph
        .value(model.graph.outputs()[0].value)
        .name
        .clone();
    write_io(
        &dir.join(format!("{stem}.io.safetensors")),
        inputs,
        [(name, output)],
    );
}

/// Runs `model` in tract (optimised) on named inputs.
pub fn run_tract(model: &lora_graft::Model, inputs: &Named) -> Vec<Array> {
    let runner = lora_graft::runtime::Runner::new(model, &shapes(inputs)).unwrap();
    let ordered = runner
        .inputs
        .iter()
        .map(|n| inputs.iter().find(|(k, _)| k == n).unwrap().1.clone())
        .collect();
    runner.run(ordered).unwrap()
}

/// Writes named inputs and outputs as `path` (keys `input.<name>`, `output.<name>`), the
/// expectations `tests/interop.py` checks ONNX Runtime against.
pub fn write_io(
    path: &std::path::Path,
    inputs: impl IntoIterator<Item = (String, Array)>,
    outputs: impl IntoIterator<Item = (String, Array)>,
) {
    let mut tensors = std::collections::BTreeMap::new();
    for (n, a) in inputs {
        tensors.insert(format!("input.{n}"), a);
    }
    for (n, a) in outputs {
        tensors.insert(format!("output.{n}"), a);
    }
    let io = lora_graft::adapter::AdapterFile {
        metadata: Default::default(),
        tensors,
    };
    std::fs::write(path, io.to_bytes().unwrap()).unwrap();
}

/// Runs `tests/interop.py` on `dir` with `manifest`; fails unless every entry passes.
pub fn run_interop(dir: &std::path::Path, manifest: &[serde_json::Value]) {
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(manifest).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new(python())
        .arg(root().join("tests/interop.py"))
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python().display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "interop failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{} passed, 0 failed", manifest.len())),
        "{stdout}"
    );
}

/// The Python packages `tests/interop.py` needs, pinned to the versions
/// `fixtures/make.py` made the fixtures with.
pub const PYTHON_REQUIREMENTS: &[&str] = &[
    "onnx==1.23.2",
    "onnxruntime==1.32.0",
    "numpy==2.4.6",
    "safetensors==0.8.0",
    "onnxruntime-genai==0.18.0",
];

/// Cargo's target directory: `CARGO_TARGET_DIR` when absolute, else the one this test
/// binary runs from (`<target>/<profile>/deps/`), else `<repository>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return dir;
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(target) = exe
            .parent()
            .filter(|deps| deps.ends_with("deps"))
            .and_then(Path::parent)
            .and_then(Path::parent)
        {
            return target.to_path_buf();
        }
    }
    root().join("target")
}

/// A Python interpreter with [`PYTHON_REQUIREMENTS`], for `tests/interop.py`:
/// `LORA_GRAFT_PYTHON` if set, else a virtual environment `<target>/py-venv` that the
/// first caller makes (`python3 -m venv`, `pip install`) and later ones reuse while its
/// stamp file lists the same requirements. Threads share one answer; processes take a
/// file lock. Panics, saying what to do, when it cannot.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PYTHON.get_or_init(provision_python) {
        Ok(python) => python,
        Err(e) => panic!("{e}"),
    }
}

fn provision_python() -> Result<PathBuf, String> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let requirements = PYTHON_REQUIREMENTS.join(" ");
    let fix =
        format!("or set LORA_GRAFT_PYTHON=/path/to/python, an interpreter with {requirements}");
    if let Some(python) = std::env::var_os("LORA_GRAFT_PYTHON").map(PathBuf::from) {
        if let Err(e) = check_python(&python) {
            let shown = python.display();
            return Err(format!(
                "LORA_GRAFT_PYTHON={shown}: {e}\nInstall them into it \
                 (`{shown} -m pip install {requirements}`), or unset LORA_GRAFT_PYTHON to let \
                 the tests make a venv"
            ));
        }
        return Ok(python);
    }
    let target = target_dir();
    let venv = target.join("py-venv");
    let python = venv.join("bin").join("python");
    let stamp = venv.join("lora-graft-requirements.txt");
    let wanted = PYTHON_REQUIREMENTS.join("\n") + "\n";
    let ready = || python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted);
    // Other test binaries may be here at the same time: one makes the venv, the rest wait.
    std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    let lock_path = target.join("py-venv.lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    // SAFETY: flock on a file descriptor `lock` owns; the lock goes when it is closed.
    while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("locking {}: {e}", lock_path.display()));
        }
    }
    if ready() {
        return Ok(python);
    }
    // Straight to stderr, past the test harness's capture: this takes a while, once.
    let start = std::time::Instant::now();
    let _ = writeln!(
        std::io::stderr(),
        "provisioning a Python venv for the ONNX Runtime interop tests under {}: \
         python3 -m venv + pip install {requirements}",
        venv.display()
    );
    let run = |what: &str, cmd: &mut std::process::Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    run(
        "python3 -m venv",
        std::process::Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )
    .map_err(|e| {
        format!(
            "making the interop tests' Python venv {}: {e}\nInstall python3 (3.11 or \
             later) with its venv module (Debian: python3-venv), {fix}",
            venv.display()
        )
    })?;
    run(
        "pip install",
        std::process::Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--no-input"])
            .args(["--disable-pip-version-check"])
            .args(PYTHON_REQUIREMENTS),
    )
    .map_err(|e| {
        format!(
            "installing the interop tests' Python packages into {}: {e}\nPyPI must be \
             reachable for pip (or its proxy set up: PIP_INDEX_URL), {fix}",
            venv.display()
        )
    })?;
    check_python(&python).map_err(|e| format!("{}: {e}", python.display()))?;
    // Last: the stamp says the venv is complete.
    std::fs::write(&stamp, &wanted).map_err(|e| format!("{}: {e}", stamp.display()))?;
    let _ = writeln!(
        std::io::stderr(),
        "Python venv ready in {:.0?}; reused while {} lists the same packages",
        start.elapsed(),
        stamp.display()
    );
    Ok(python)
}

/// Ok when `python` imports every package `tests/interop.py` needs.
fn check_python(python: &Path) -> Result<(), String> {
    let out = std::process::Command::new(python)
        .args(["-c", "import numpy, onnx, onnxruntime, safetensors.numpy"])
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "it lacks a package the interop tests need:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The request the graft tests use: r = 4, alpha = 8 (s = 2).
pub fn request(variant: &str) -> lora_graft::jobs::GraftRequest {
    request_r(variant, 4, 8.0)
}

/// A graft request of rank `r` and `alpha`.
pub fn request_r(variant: &str, r: usize, alpha: f64) -> lora_graft::jobs::GraftRequest {
    lora_graft::jobs::GraftRequest {
        variant: lora_graft::passes::variants::variant(variant).unwrap(),
        cfg: lora_graft::passes::variants::Config {
            r,
            alpha: alpha.into(),
            // ROAD's groups must divide every layer's outputs (16 in handmade, 32 in llama).
            road_group_size: 8,
            // AntiPaSTO's rotation blocks must divide r.
            antipasto: lora_graft::passes::variants::antipasto::AntipastoOptions {
                block_size: if r.is_multiple_of(4) { 4 } else { 2 },
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

/// `req` with the calibration a data-calibrated variant (eva, lora_ga) needs on fixture
/// `name`: `fixtures/<name>/calibration.jsonl`, 2 batches of 2 × 8 tokens.
pub fn calibrated(
    mut req: lora_graft::jobs::GraftRequest,
    name: &str,
) -> lora_graft::jobs::GraftRequest {
    if req.variant.calibration(&req.cfg).is_some() {
        req.calibration = Some(lora_graft::calibrate::CalibrationRequest {
            data: root().join("fixtures").join(name).join("calibration.jsonl"),
            tokenizer: None,
            batches: 2,
            batch: 2,
            seq: 8,
            loss: None,
            threads: 2,
            memory: lora_graft::calibrate::GRAM_MEMORY,
            segment: lora_graft::calibrate::SEGMENT_BYTES,
        });
    }
    req
}

/// The calibration `fixtures/make.py eva` ran PyTorch on (the oracles of the calibrated
/// inits): the 8 rows of `fixtures/eva/<name>.calib.jsonl` as 2 batches of 4 × 16
/// tokens, the causal-LM loss.
pub fn oracle_calibration(name: &str) -> lora_graft::calibrate::CalibrationRequest {
    lora_graft::calibrate::CalibrationRequest {
        data: root().join(format!("fixtures/eva/{name}.calib.jsonl")),
        tokenizer: None,
        batches: 2,
        batch: 4,
        seq: 16,
        loss: Some(lora_graft::passes::grad::loss::Loss::CausalLm),
        threads: 2,
        memory: lora_graft::calibrate::GRAM_MEMORY,
        segment: lora_graft::calibrate::SEGMENT_BYTES,
    }
}

/// [`request`] of `variant` for fixture `name` ([`calibrated`]).
pub fn request_for(name: &str, variant: &str) -> lora_graft::jobs::GraftRequest {
    calibrated(request(variant), name)
}

/// The name of every registered variant: tests that cover "every variant" loop over
/// the registry, so a variant added with one line in `VARIANTS` is tested at once.
pub fn variant_names() -> impl Iterator<Item = &'static str> {
    lora_graft::passes::variants::VARIANTS
        .iter()
        .map(|v| v.name())
}

/// Runs the `lora-graft` binary with `args`.
pub fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lora-graft"))
        .args(args)
        .output()
        .unwrap()
}

/// A copy of fixture `name`'s folder in a temporary folder; the copied model's path.
pub fn copy_fixture(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name).parent().unwrap()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let path = dir.path().join("model.onnx");
    (dir, path)
}

/// Every file of `dir` with its bytes.
pub fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    listing(dir)
        .into_iter()
        .filter(|n| dir.join(n).is_file())
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

/// The inputs a training graph of the fixture `name` needs besides the adapter: the
/// reference inputs, and `labels` = `input_ids` (causal LM) or a zero `target` (mse:
/// `fixtures/make.py`'s loss `mean(output²)`).
pub fn loss_feeds(name: &str, t: &lora_graft::jobs::Training) -> HashMap<String, Array> {
    let (inputs, _) = reference(name);
    let mut feeds: HashMap<String, Array> = inputs.into_iter().collect();
    if t.input_shapes.contains_key("labels") {
        feeds.insert("labels".into(), feeds["input_ids"].clone());
    }
    if let Some(shape) = t.input_shapes.get("target") {
        feeds.insert("target".into(), Array::F32(ArrayD::zeros(IxDyn(shape))));
    }
    feeds
}

/// The sorted file names in `dir`.
pub fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Asserts that a run of `what` failed as a usage error: exit code 1 and one line on
/// stderr holding `needle`.
pub fn assert_one_line_error(out: &std::process::Output, what: &str, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{what}: expected {needle:?} in {stderr}"
    );
}

/// The first initializer of `proto` stored as external data.
pub fn first_external(
    proto: &mut lora_graft::proto::ModelProto,
) -> &mut lora_graft::proto::TensorProto {
    proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| !t.external_data.is_empty())
        .unwrap()
}

/// A tract session of a training graph, fed and read by name.
pub struct Session {
    runner: lora_graft::runtime::Runner,
}

impl Session {
    /// The session of `t` at its input shapes.
    pub fn new(t: &lora_graft::jobs::Training) -> Session {
        Session {
            runner: lora_graft::runtime::Runner::new(&t.model, &t.input_shapes).unwrap(),
        }
    }
    /// Runs with `feeds` (every input by name); the outputs by name.
    pub fn run(&self, feeds: &HashMap<String, Array>) -> HashMap<String, Array> {
        let inputs = self
            .runner
            .inputs
            .iter()
            .map(|n| {
                feeds
                    .get(n)
                    .unwrap_or_else(|| panic!("no feed {n}"))
                    .clone()
            })
            .collect();
        self.runner
            .outputs
            .iter()
            .cloned()
            .zip(self.runner.run(inputs).unwrap())
            .collect()
    }
}

/// The value of a one-element tensor.
pub fn scalar(a: &Array) -> f64 {
    a.to_f64().iter().next().copied().unwrap()
}

/// Fixture `name` with `adapter` merged into its weights (the original base; `quantized`
/// says what becomes of quantized weights).
pub fn merged(
    name: &str,
    adapter: &lora_graft::adapter::LoadedAdapter,
    quantized: lora_graft::passes::merge::QuantizedWeights,
) -> lora_graft::Result<lora_graft::Model> {
    let mut model = lora_graft::Model::load(&fixture(name)).unwrap();
    lora_graft::jobs::merge(
        &mut model,
        adapter,
        lora_graft::passes::merge::PissaBase::Original,
        quantized,
    )?;
    Ok(model)
}
