//! Files and options that used to hang, overflow or crash: each is now a one-line error
//! with exit code 1, quickly, and nothing is written.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{copy_fixture, listing};
use lora_graft::adapter::{AdapterFile, GRAFT_KEY};
use lora_graft::tensor::Array;

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
