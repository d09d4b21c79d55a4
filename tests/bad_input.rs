//! Bad input gets a clear one-line error and exit code 1 from `lora-graft inspect`,
//! never a panic. One test per case.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture, node, vi};
use lora_graft::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
use prost::Message;

/// Runs `lora-graft inspect path`; asserts failure with one line on stderr that
/// contains every `needle`; returns that line.
fn inspect_fails(path: &Path, needles: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lora-graft"))
        .arg("inspect")
        .arg(path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code 1 (not a panic); stderr: {stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "error should mention {n:?}: {stderr}");
    }
    stderr
}

/// A copy of the llama fixture (model + data) in a fresh folder, with its proto.
fn llama_copy() -> (tempfile::TempDir, PathBuf, ModelProto) {
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.onnx", "model.onnx.data"] {
        std::fs::copy(fixture("llama").with_file_name(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("model.onnx");
    let proto = ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    (dir, path, proto)
}

/// Sets `key` of the external-data entries of the first external initializer; returns its name.
fn set_external(proto: &mut ModelProto, key: &str, value: &str) -> String {
    let t = common::first_external(proto);
    let entry = t.external_data.iter_mut().find(|e| e.key() == key);
    match entry {
        Some(e) => e.value = Some(value.into()),
        None => t
            .external_data
            .push(lora_graft::proto::StringStringEntryProto {
                key: Some(key.into()),
                value: Some(value.into()),
            }),
    }
    t.name().to_string()
}

fn write(path: &Path, proto: &ModelProto) {
    std::fs::write(path, proto.encode_to_vec()).unwrap();
}

#[test]
fn not_protobuf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.onnx");
    std::fs::write(&path, b"\xff\xff\xff\xff\xff this is not an ONNX model").unwrap();
    inspect_fails(&path, &["notes.onnx", "not a readable ONNX model"]);
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.onnx");
    let bytes = std::fs::read(fixture("handmade")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    inspect_fails(&path, &["cut.onnx"]);
}

#[test]
fn external_location_absolute() {
    let (_dir, path, mut proto) = llama_copy();
    let tensor = set_external(&mut proto, "location", "/etc/passwd");
    write(&path, &proto);
    inspect_fails(&path, &[&tensor, "absolute", "model.onnx"]);
}

#[test]
fn external_location_with_parent_dir() {
    let (_dir, path, mut proto) = llama_copy();
    let tensor = set_external(&mut proto, "location", "../model.onnx.data");
    write(&path, &proto);
    inspect_fails(&path, &[&tensor, "'..'"]);
}

#[cfg(unix)]
#[test]
fn external_location_symlink_out_of_folder() {
    let (dir, path, mut proto) = llama_copy();
    let outside = tempfile::tempdir().unwrap();
    let real = outside.path().join("weights.data");
    std::fs::rename(dir.path().join("model.onnx.data"), &real).unwrap();
    std::os::unix::fs::symlink(&real, dir.path().join("model.onnx.data")).unwrap();
    let tensor = set_external(&mut proto, "location", "model.onnx.data");
    write(&path, &proto);
    inspect_fails(&path, &[&tensor, "symlink"]);
}

#[test]
fn external_range_past_end_of_file() {
    let (dir, path, mut proto) = llama_copy();
    let size = std::fs::metadata(dir.path().join("model.onnx.data"))
        .unwrap()
        .len();
    let tensor = set_external(&mut proto, "offset", &size.to_string());
    write(&path, &proto);
    inspect_fails(&path, &[&tensor, "past the end"]);
}

#[test]
fn raw_data_length_disagrees_with_dims() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    let mut proto =
        ModelProto::decode(std::fs::read(fixture("handmade")).unwrap().as_slice()).unwrap();
    let t = proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.raw_data.as_ref().is_some_and(|r| r.len() > 4))
        .unwrap();
    t.raw_data.as_mut().unwrap().truncate(4);
    let name = t.name().to_string();
    write(&path, &proto);
    inspect_fails(&path, &[&name, "raw data holds 4 bytes"]);
}

fn tiny_model(nodes: Vec<NodeProto>) -> ModelProto {
    ModelProto {
        ir_version: Some(10),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(18),
        }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: vec![vi("x")],
            output: vec![vi("y")],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn graph_with_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cycle.onnx");
    write(
        &path,
        &tiny_model(vec![
            node("a", "Add", &["x", "b_out"], &["a_out"]),
            node("b", "Relu", &["a_out"], &["b_out"]),
            node("c", "Relu", &["b_out"], &["y"]),
        ]),
    );
    inspect_fails(&path, &["cycle", "'a' (Add)", "'b' (Relu)"]);
}

#[test]
fn node_input_nothing_defines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dangling.onnx");
    write(
        &path,
        &tiny_model(vec![node("mm", "MatMul", &["x", "missing_weight"], &["y"])]),
    );
    inspect_fails(&path, &["'mm' (MatMul)", "missing_weight"]);
}

#[test]
fn missing_file() {
    inspect_fails(
        Path::new("/nonexistent/model.onnx"),
        &["/nonexistent/model.onnx"],
    );
}

#[test]
fn inspect_summarises_a_fixture() {
    let out = Command::new(env!("CARGO_BIN_EXE_lora-graft"))
        .args(["inspect", "--json"])
        .arg(fixture("llama"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["inputs"][0][0], "input_ids");
    assert_eq!(report["outputs"][0][0], "logits");
    assert!(report["ops"]["MatMul"].as_u64().unwrap() >= 14);
    assert!(
        report["external_data"]["model.onnx.data"][0]
            .as_u64()
            .unwrap()
            > 0
    );
}
