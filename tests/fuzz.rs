//! A structured mutation fuzzer over the fixtures: protobuf fields changed to hostile
//! values (dims, types, external-data ranges and locations, ops, edges, attributes,
//! opsets) plus raw truncations, flips and insertions; each case is loaded, targeted,
//! grafted and saved in-process. It asserts no panic, no case slower than a bound, no
//! file outside the model's folder opened (or tried), and no output file left by a
//! failed save.
//!
//! `cargo test` runs `LORA_GRAFT_FUZZ_CASES` cases (default 2000, seeded by
//! `LORA_GRAFT_FUZZ_SEED`, default 1); `benches/fuzz.sh` runs many more.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lora_graft::jobs::{self, GraftRequest};
use lora_graft::model::SaveOptions;
use lora_graft::passes::target::{self, Filters};
use lora_graft::proto::{
    attribute_proto::AttributeType, AttributeProto, ModelProto, StringStringEntryProto,
};
use lora_graft::rng::Rng;
use lora_graft::Model;
use prost::Message;

/// A case slower than this is a hang (the fixtures load in milliseconds).
const CASE_BOUND: Duration = Duration::from_secs(20);

/// Ops a node may be turned into.
const OPS: &[&str] = &[
    "MatMul",
    "Gemm",
    "Add",
    "Identity",
    "Reshape",
    "Transpose",
    "Gather",
    "Cast",
    "Mul",
    "MatMulNBits",
    "DequantizeLinear",
    "Concat",
    "Slice",
    "NoSuchOp",
];

/// Values a mutated integer takes.
fn hostile_int(rng: &mut Rng) -> i64 {
    const V: &[i64] = &[
        0,
        -1,
        1,
        2,
        3,
        7,
        64,
        1 << 20,
        1 << 31,
        i32::MAX as i64,
        i64::MAX,
        i64::MIN,
        -(1 << 40),
    ];
    V[pick(rng, V.len())]
}

fn pick(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// One structured mutation of `m`; returns what it did.
fn mutate(m: &mut ModelProto, rng: &mut Rng) -> String {
    let g = m.graph.get_or_insert_with(Default::default);
    match pick(rng, 12) {
        0 if !g.node.is_empty() => {
            let i = pick(rng, g.node.len());
            let op = OPS[pick(rng, OPS.len())];
            g.node[i].op_type = Some(op.into());
            format!("node {i} op -> {op}")
        }
        1 if !g.node.is_empty() => {
            let i = pick(rng, g.node.len());
            let n = &mut g.node[i];
            match pick(rng, 3) {
                0 => {
                    n.input.pop();
                    format!("node {i} drops an input")
                }
                1 => {
                    let first = n.input.first().cloned().unwrap_or_default();
                    n.input.push(first);
                    format!("node {i} reads its first input twice")
                }
                _ => {
                    n.input.push("no_such_value".into());
                    format!("node {i} reads an undefined value")
                }
            }
        }
        2 if !g.node.is_empty() => {
            let (i, j) = (pick(rng, g.node.len()), pick(rng, g.node.len()));
            if let Some(out) = g.node[j].output.first().cloned() {
                let slot = pick(rng, g.node[i].input.len().max(1));
                if slot < g.node[i].input.len() {
                    g.node[i].input[slot] = out;
                }
            }
            format!("node {i} reads node {j}'s output (maybe a cycle)")
        }
        3 if !g.node.is_empty() => {
            let i = pick(rng, g.node.len());
            let v = hostile_int(rng);
            let n = &mut g.node[i];
            if let Some(a) = n.attribute.first_mut() {
                a.i = Some(v);
                a.ints = vec![v, v];
                format!("node {i} attribute {} -> {v}", a.name())
            } else {
                n.attribute.push(AttributeProto {
                    name: Some("axis".into()),
                    i: Some(v),
                    r#type: Some(AttributeType::Int as i32),
                    ..Default::default()
                });
                format!("node {i} gets axis {v}")
            }
        }
        4 if !g.node.is_empty() => {
            let i = pick(rng, g.node.len());
            if pick(rng, 2) == 0 {
                g.node.remove(i);
                format!("node {i} removed")
            } else {
                let n = g.node[i].clone();
                g.node.push(n);
                format!("node {i} duplicated")
            }
        }
        5 | 6 if !g.initializer.is_empty() => {
            let i = pick(rng, g.initializer.len());
            let t = &mut g.initializer[i];
            match pick(rng, 4) {
                0 => {
                    let d = pick(rng, t.dims.len().max(1));
                    let v = hostile_int(rng);
                    if d < t.dims.len() {
                        t.dims[d] = v;
                    } else {
                        t.dims.push(v);
                    }
                    format!("initializer {i} dim {d} -> {v}")
                }
                1 => {
                    let v = pick(rng, 24) as i32;
                    t.data_type = Some(v);
                    format!("initializer {i} type -> {v}")
                }
                2 => {
                    if let Some(raw) = &mut t.raw_data {
                        let keep = pick(rng, raw.len() + 1);
                        raw.truncate(keep);
                    }
                    t.float_data.truncate(pick(rng, t.float_data.len() + 1));
                    format!("initializer {i} data truncated")
                }
                _ => {
                    t.dims.reverse();
                    t.dims.push(1);
                    format!("initializer {i} dims reversed and extended")
                }
            }
        }
        7 if !g.initializer.is_empty() => {
            let i = pick(rng, g.initializer.len());
            let t = &mut g.initializer[i];
            const LOCATIONS: &[&str] = &[
                "../outside.data",
                "/etc/passwd",
                "model.onnx",
                "missing.data",
                "",
                "model.onnx.data",
                "./model.onnx.data",
                "sub/../../x",
            ];
            let key = ["location", "offset", "length"][pick(rng, 3)];
            let value = if key == "location" {
                LOCATIONS[pick(rng, LOCATIONS.len())].to_string()
            } else {
                hostile_int(rng).to_string()
            };
            t.data_location = Some(1);
            let entry = StringStringEntryProto {
                key: Some(key.into()),
                value: Some(value.clone()),
            };
            match t.external_data.iter_mut().find(|e| e.key() == key) {
                Some(e) if pick(rng, 4) != 0 => *e = entry,
                _ => t.external_data.push(entry),
            }
            format!("initializer {i} external {key} -> {value:?}")
        }
        8 => {
            match pick(rng, 3) {
                0 => g.output.clear(),
                1 => g.input.clear(),
                _ => {
                    let dup = g.output.first().cloned();
                    g.output.extend(dup);
                }
            }
            "graph inputs or outputs changed".into()
        }
        9 => {
            let v = hostile_int(rng);
            for o in &mut m.opset_import {
                o.version = Some(v);
            }
            format!("opsets -> {v}")
        }
        10 => {
            m.ir_version = Some(hostile_int(rng));
            "ir version changed".into()
        }
        _ => {
            if let Some(n) = g.node.first_mut() {
                n.domain = Some("com.microsoft".into());
            }
            "first node in com.microsoft".into()
        }
    }
}

/// Raw byte damage to an encoded model.
fn damage(bytes: &mut Vec<u8>, rng: &mut Rng) -> String {
    match pick(rng, 3) {
        0 => {
            let keep = pick(rng, bytes.len());
            bytes.truncate(keep);
            format!("truncated to {keep} bytes")
        }
        1 => {
            let n = 1 + pick(rng, 8);
            for _ in 0..n {
                let i = pick(rng, bytes.len());
                bytes[i] ^= 1 << pick(rng, 8);
            }
            format!("{n} bits flipped")
        }
        _ => {
            let i = pick(rng, bytes.len());
            let junk: Vec<u8> = (0..1 + pick(rng, 16))
                .map(|_| rng.next_u64() as u8)
                .collect();
            bytes.splice(i..i, junk);
            format!("bytes inserted at {i}")
        }
    }
}

/// Loads, targets, grafts and saves `dir/model.onnx` as the CLI would.
fn exercise(dir: &Path, variant: &'static str) {
    let Ok(mut model) = Model::load(&dir.join("model.onnx")) else {
        return;
    };
    let _ = model.graph.dump();
    if target::run(&model.graph, &Filters::default()).is_err() {
        return;
    }
    let mut req = GraftRequest::new(lora_graft::passes::variants::variant(variant).unwrap());
    req.cfg.r = 2;
    if jobs::graft(&mut model, &req).is_err() {
        return;
    }
    let out = dir.join("out.onnx");
    if model.save(&out, &SaveOptions::default()).is_err() {
        assert!(!out.exists(), "a failed save left {}", out.display());
    }
    for f in ["out.onnx", "out.onnx.data"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// `path` with links and `..` resolved as far as it exists.
fn resolve(path: &Path) -> std::path::PathBuf {
    match path.canonicalize() {
        Ok(p) => p,
        Err(_) => match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => resolve(dir).join(name),
            _ => path.to_path_buf(),
        },
    }
}

#[test]
fn fuzz_models_in_suite() {
    let cases: usize = std::env::var("LORA_GRAFT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed: u64 = std::env::var("LORA_GRAFT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // Each fixture's folder, copied once; cases overwrite only model.onnx.
    let fixtures: Vec<(tempfile::TempDir, ModelProto)> = common::FIXTURES
        .iter()
        .map(|name| {
            let (dir, path) = common::copy_fixture(name);
            let proto = ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
            (dir, proto)
        })
        .collect();
    // A watchdog: a case that never ends cannot fail a test, so it ends the process.
    let current = Arc::new(std::sync::Mutex::new((Instant::now(), String::new())));
    let done = Arc::new(AtomicBool::new(false));
    {
        let (current, done) = (current.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                let (began, what) = current.lock().unwrap().clone();
                if began.elapsed() > CASE_BOUND * 3 {
                    eprintln!("fuzz case hangs: {what}");
                    std::process::abort();
                }
            }
        });
    }
    let began = Instant::now();
    let (mut loaded, mut panics, mut escapes) = (0usize, Vec::new(), Vec::new());
    lora_graft::files::take_opened(); // recording on from here
    let outside = common::fixture("handmade");
    let _ = Model::load(&outside);
    assert!(
        lora_graft::files::take_opened().contains(&outside),
        "the record of opened files missed a load"
    );
    for case in 0..cases {
        let mut rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(case as u64));
        let f = pick(&mut rng, fixtures.len());
        let (dir, proto) = &fixtures[f];
        let mut m = proto.clone();
        let mut what = vec![common::FIXTURES[f].to_string()];
        for _ in 0..1 + pick(&mut rng, 3) {
            what.push(mutate(&mut m, &mut rng));
        }
        let mut bytes = m.encode_to_vec();
        if pick(&mut rng, 4) == 0 {
            what.push(damage(&mut bytes, &mut rng));
        }
        std::fs::write(dir.path().join("model.onnx"), &bytes).unwrap();
        let what = format!("case {case} (seed {seed}): {}", what.join("; "));
        *current.lock().unwrap() = (Instant::now(), what.clone());
        let variant = ["lora", "pissa", "delora"][pick(&mut rng, 3)];
        let t = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| exercise(dir.path(), variant)));
        if result.is_err() {
            panics.push(what.clone());
        }
        assert!(t.elapsed() < CASE_BOUND, "{what}: took {:?}", t.elapsed());
        if Model::load(&dir.path().join("model.onnx")).is_ok() {
            loaded += 1;
        }
        let folder = dir.path().canonicalize().unwrap();
        for opened in lora_graft::files::take_opened() {
            if !resolve(&opened).starts_with(&folder) {
                escapes.push(format!("{what}: opened {}", opened.display()));
            }
        }
    }
    done.store(true, Ordering::SeqCst);
    eprintln!(
        "fuzz: {cases} cases in {:.1} s, {loaded} still loadable, {} panics, {} escapes",
        began.elapsed().as_secs_f64(),
        panics.len(),
        escapes.len()
    );
    assert!(panics.is_empty(), "panics:\n{}", panics.join("\n"));
    assert!(
        escapes.is_empty(),
        "files outside the folder:\n{}",
        escapes.join("\n")
    );
    // The mutations must leave some cases valid enough to reach the passes.
    assert!(loaded > cases / 20, "only {loaded} of {cases} cases loaded");
}
