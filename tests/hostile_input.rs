//! Files and options that used to hang, overflow or crash: each is now a one-line error
//! with exit code 1, quickly, and nothing is written.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{copy_fixture, listing};
use lora_graft::adapter::{AdapterFile, GRAFT_KEY};
use lora_graft::proto::tensor_proto::DataType;
use lora_graft::proto::{ModelProto, TensorProto};
use lora_graft::tensor::Array;
use prost::Message;

/// Runs the binary with `args`; fails unless it exits 1 within 20 s with one line on
/// stderr holding `needle`.
fn fails_fast(args: &[&str], needle: &str) {
    let began = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora-graft"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if began.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("{args:?} hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    common::assert_one_line_error(&out, &format!("{args:?}"), needle);
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn fifos_are_refused_not_waited_on() {
    let (dir, model) = copy_fixture("llama");
    let fifo = dir.path().join("pipe.onnx");
    mkfifo(&fifo);
    let fifo_data = dir.path().join("pipe.jsonl");
    mkfifo(&fifo_data);
    let not_regular = "not a regular file";
    fails_fast(&["inspect", s(&fifo)], not_regular);
    fails_fast(
        &[
            "merge",
            s(&model),
            s(&fifo),
            "-o",
            s(&dir.path().join("m.onnx")),
        ],
        not_regular,
    );
    fails_fast(
        &[
            "train",
            s(&model),
            "--variant",
            "lora",
            "--steps",
            "1",
            "--data",
            s(&fifo_data),
            "-o",
            s(&dir.path().join("a.safetensors")),
        ],
        not_regular,
    );
    // The external data file itself.
    std::fs::remove_file(dir.path().join("model.onnx.data")).unwrap();
    mkfifo(&dir.path().join("model.onnx.data"));
    fails_fast(&["inspect", s(&model)], "model.onnx.data");
}

/// A LoRA adapter of the llama fixture, written to `dir/a.safetensors`, changed by `edit`.
fn adapter(dir: &Path, variant: &str, edit: impl FnOnce(&mut AdapterFile)) -> String {
    let out = common::cli(&[
        s(&common::fixture("llama")),
        "--variant",
        variant,
        "-o",
        s(&dir.join("g.onnx")),
        "--adapter",
        s(&dir.join("a.safetensors")),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join("a.safetensors");
    let mut file = AdapterFile::read(&path).unwrap();
    edit(&mut file);
    std::fs::write(&path, file.to_bytes().unwrap()).unwrap();
    s(&path).to_string()
}

/// A change made to an adapter file.
type Edit<'a> = Box<dyn FnOnce(&mut AdapterFile) + 'a>;

#[test]
fn adapter_contents_cannot_drive_bad_numbers_or_unbounded_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = common::fixture("llama");
    let out = d.join("out.onnx");
    let first_key = |f: &AdapterFile| f.tensors.keys().next().unwrap().clone();
    let cases: Vec<(&str, Edit<'_>, &str)> = vec![
        (
            "lora",
            Box::new(|f: &mut AdapterFile| {
                let k = first_key(f);
                let mut a = f.tensors[&k].to_f32();
                *a.iter_mut().next().unwrap() = f32::NAN;
                f.tensors.insert(k, Array::F32(a));
            }),
            "NaN or infinite",
        ),
        (
            "lora",
            Box::new(|f: &mut AdapterFile| {
                let k = first_key(f);
                let a = f.tensors[&k].to_f32().mapv(|v| v as i64);
                f.tensors.insert(k, Array::I64(a));
            }),
            "not a float tensor",
        ),
        (
            "lora",
            Box::new(|f: &mut AdapterFile| {
                let cfg = f.metadata["cfg"].replace("\"alpha\": 16.0", "\"alpha\": 1e308");
                f.metadata.insert("cfg".into(), cfg);
            }),
            "float32 cannot hold",
        ),
        (
            "pissa",
            Box::new(|f: &mut AdapterFile| {
                let meta = f.metadata[GRAFT_KEY]
                    .replace("\"pissa_niter\":null", "\"pissa_niter\":1000000000");
                f.metadata.insert(GRAFT_KEY.into(), meta);
            }),
            "pissa_niter 1000000000",
        ),
        (
            // Settings that cannot be read are not guessed.
            "lora",
            Box::new(|f: &mut AdapterFile| {
                f.metadata.insert(GRAFT_KEY.into(), "[".into());
            }),
            "metadata 'lora_graft' is not lora-graft's settings",
        ),
    ];
    for (variant, edit, needle) in cases {
        let a = adapter(d, variant, edit);
        let before = listing(d);
        fails_fast(&["merge", s(&model), &a, "-o", s(&out)], needle);
        fails_fast(&[s(&model), "--adapter-in", &a, "-o", s(&out)], needle);
        assert_eq!(listing(d), before, "{needle}: nothing written");
    }
    // Finite values whose merge overflows float32.
    let a = adapter(d, "lora", |f| {
        for a in f.tensors.values_mut() {
            *a = Array::F32(a.to_f32().mapv(|_| 3e38));
        }
    });
    fails_fast(
        &["merge", s(&model), &a, "-o", s(&out)],
        "NaN or infinite values",
    );
}

#[test]
fn options_out_of_range_are_refused_before_any_work() {
    let (dir, model) = copy_fixture("llama");
    let d = dir.path();
    let data = common::root().join("fixtures/corpus.jsonl");
    let adapter_out = d.join("a.safetensors");
    let base = [
        "train",
        s(&model),
        "--variant",
        "lora",
        "--data",
        s(&data),
        "-o",
        s(&adapter_out),
    ];
    let with = |extra: &[&'static str]| [base.as_slice(), extra].concat();
    let before = listing(d);
    fails_fast(&with(&["--steps", "0"]), "--steps");
    fails_fast(&with(&["--steps", "1", "--batch", "0"]), "--batch");
    fails_fast(&with(&["--steps", "1", "--seq", "0"]), "--seq");
    fails_fast(
        &with(&["--steps", "1", "--grad-clip", "nan"]),
        "--grad-clip",
    );
    fails_fast(&with(&["--steps", "1", "--lr", "inf"]), "--lr");
    fails_fast(
        &with(&["--steps", "1", "--seq", "1000000", "--batch", "1000000"]),
        "lower --batch or --seq",
    );
    fails_fast(
        &[s(&model), "--variant", "pissa", "--pissa-niter", "1000000"],
        "pissa_niter",
    );
    fails_fast(
        &[s(&model), "--variant", "lora", "--alpha", "1e308"],
        "float32 cannot hold",
    );
    fails_fast(
        &[s(&model), "--variant", "delora", "--lambda0", "nan"],
        "--lambda0",
    );
    fails_fast(
        &[s(&model), "--variant", "lora", "--d-model", "0"],
        "--d-model",
    );
    // regex's own message spans four lines.
    fails_fast(
        &[s(&model), "--variant", "lora", "--target-names", "("],
        "is not a valid regex: unclosed group",
    );
    // Refused before the batch is built (it would need 61 TB).
    fails_fast(
        &[
            s(&model),
            "--variant",
            "eva",
            "--calibration",
            s(&data),
            "--calibration-batch",
            "1000000000",
        ],
        "lower them",
    );
    // Before VeRA's shared projections are allocated for the widest layer.
    fails_fast(
        &[s(&model), "--variant", "vera", "-r", "100000000"],
        "r must be between 1 and",
    );
    assert_eq!(listing(d), before, "nothing written");
    // A plain adapter (no optimizer state beside it) to resume from.
    let elsewhere = tempfile::tempdir().unwrap();
    let plain = adapter(elsewhere.path(), "lora", |_| {});
    let before = listing(d);
    let resume = [base.as_slice(), &["--steps", "2", "--resume", &plain]].concat();
    fails_fast(&resume, "no optimizer state");
    assert_eq!(listing(d), before, "nothing written");
}

#[test]
fn a_killed_runs_temporary_files_are_removed_by_the_next_run() {
    let (dir, model) = copy_fixture("llama");
    // A process that has ended: its pid names a stale temporary file.
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let stale = dir.path().join(format!("x.onnx.{pid}.tmp"));
    std::fs::write(&stale, vec![0u8; 1000]).unwrap();
    let live = dir
        .path()
        .join(format!("x.onnx.{}.tmp", std::process::id()));
    std::fs::write(&live, b"a live run's").unwrap();
    let out = common::cli(&[
        s(&model),
        "--variant",
        "lora",
        "-o",
        s(&dir.path().join("x.onnx")),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stale.exists(), "the stale temporary file is removed");
    assert!(live.exists(), "a running process's temporary file is kept");
}

#[test]
fn duplicate_external_data_keys_and_stray_labels_are_refused() {
    use lora_graft::proto::{ModelProto, StringStringEntryProto};
    use prost::Message;
    let (dir, model) = copy_fixture("llama");
    let mut proto = ModelProto::decode(std::fs::read(&model).unwrap().as_slice()).unwrap();
    common::first_external(&mut proto)
        .external_data
        .push(StringStringEntryProto {
            key: Some("location".into()),
            value: Some("model.onnx.data".into()),
        });
    std::fs::write(&model, proto.encode_to_vec()).unwrap();
    fails_fast(
        &["inspect", s(&model)],
        "external data key 'location' appears twice",
    );
    // A causal-LM label that is neither -100 nor a token id.
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"input_ids\": [1, 2, 3], \"labels\": [1, -7, 3]}\n",
    )
    .unwrap();
    let fresh = copy_fixture("llama");
    fails_fast(
        &[
            "train",
            s(&fresh.1),
            "--variant",
            "lora",
            "--steps",
            "1",
            "--data",
            s(&data),
            "-o",
            s(&dir.path().join("a.safetensors")),
        ],
        "data.jsonl:1: label -7 is neither -100",
    );
}

/// The handmade fixture's model with its first stored MatMul weight changed by `edit`
/// (a new name renames its uses too), written to `dir/m.onnx`.
fn handmade_with(dir: &Path, edit: impl FnOnce(&mut TensorProto)) -> String {
    let mut proto = ModelProto::decode(
        std::fs::read(common::fixture("handmade"))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let stored = |name: &str| graph.initializer.iter().position(|t| t.name() == name);
    let w = graph
        .node
        .iter()
        .filter(|n| n.op_type() == "MatMul")
        .find_map(|n| stored(&n.input[1]))
        .unwrap();
    let old = graph.initializer[w].name().to_string();
    edit(&mut graph.initializer[w]);
    let new = graph.initializer[w].name().to_string();
    for input in graph.node.iter_mut().flat_map(|n| n.input.iter_mut()) {
        if *input == old {
            *input = new.clone();
        }
    }
    let path = dir.join("m.onnx");
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    s(&path).to_string()
}

#[test]
fn hostile_weights_get_one_line_errors_and_long_names_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A weight of strings: named, not grafted into an invalid model.
    let m = handmade_with(d, |w| w.data_type = Some(DataType::String as i32));
    fails_fast(&["targets", &m], "not a number");
    fails_fast(
        &[&m, "--variant", "lora", "-o", s(&d.join("o.onnx"))],
        "not a number",
    );
    // A bfloat16 weight grafts, but the gradient pass runs on tract, which has none.
    let m = handmade_with(d, |w| {
        let values: Vec<f32> = match w.raw_data.as_deref() {
            Some(raw) if !raw.is_empty() => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            _ => w.float_data.clone(),
        };
        let bits: Vec<u8> = values
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        w.float_data.clear();
        w.raw_data = Some(bits);
        w.data_type = Some(DataType::Bfloat16 as i32);
    });
    fails_fast(
        &[
            "grad",
            &m,
            "--variant",
            "lora",
            "--loss",
            "mse",
            "--batch",
            "2",
            "-o",
            s(&d.join("g.onnx")),
        ],
        "training runs on tract, which has no bfloat16",
    );
    // A module name longer than a format width may be (u16::MAX) is printed in full.
    let long = "w".repeat(70_000);
    let m = handmade_with(d, |w| w.name = Some(long.clone()));
    let out = common::cli(&["targets", &m]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&long));
}
