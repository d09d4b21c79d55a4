//! No command overwrites one of its inputs, or writes two outputs to one file: each is
//! refused before any work with one line naming both, and the folder is left
//! byte-identical. An output named like the input in another folder stays valid.

mod common;

use std::path::Path;

use common::{cli, copy_fixture, fixture, listing, reference, run_tract, snapshot};
use lora_graft::Model;

/// Runs `args` (paths relative to `dir`) and checks it is refused with `needle` in a
/// one-line error, leaving every file of `dir` as it was and adding none.
fn refused(dir: &Path, args: &[&str], needle: &str) {
    let before = snapshot(dir);
    let full: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with('-') || !a.contains('.') {
                a.to_string()
            } else {
                dir.join(a).to_string_lossy().into_owned()
            }
        })
        .collect();
    let out = cli(&full.iter().map(String::as_str).collect::<Vec<_>>());
    common::assert_one_line_error(&out, &format!("{args:?}"), needle);
    assert!(snapshot(dir) == before, "{args:?} changed the folder");
}

/// One short training run of the llama fixture's copy on `data.jsonl`, output not given.
const TRAIN: [&str; 12] = [
    "train",
    "model.onnx",
    "--variant",
    "lora",
    "--data",
    "data.jsonl",
    "--steps",
    "1",
    "--batch",
    "2",
    "--seq",
    "8",
];

#[test]
fn outputs_never_overwrite_inputs_or_each_other() {
    let (dir, _) = copy_fixture("llama");
    let d = dir.path();
    // A trained adapter and training data to name as inputs.
    std::fs::copy(
        common::root().join("fixtures/corpus.jsonl"),
        d.join("data.jsonl"),
    )
    .unwrap();
    std::fs::copy(
        common::root().join("fixtures/tokenizer.json"),
        d.join("tok.json"),
    )
    .unwrap();
    let out = cli(&[
        d.join("model.onnx").to_str().unwrap(),
        "--variant",
        "lora",
        "-o",
        d.join("a.onnx").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (over, same) = ("would overwrite the", "would be the same file");
    let graft = ["model.onnx", "--variant", "lora"];
    let with = |extra: &[&'static str]| [graft.as_slice(), extra].concat();
    // The main job.
    refused(d, &with(&["-o", "model.onnx"]), over);
    refused(d, &with(&["-o", "model.onnx.data"]), over);
    refused(d, &with(&["--adapter", "model.onnx.data"]), over);
    refused(d, &with(&["--adapter", "model.onnx"]), over);
    refused(d, &with(&["-o", "x.onnx", "--adapter", "x.onnx"]), same);
    refused(
        d,
        &with(&["-o", "x.onnx", "--adapter", "x.onnx.data"]),
        same,
    );
    // Applying and merging an adapter.
    let apply = ["model.onnx", "--adapter-in", "a.safetensors"];
    refused(
        d,
        &[apply.as_slice(), &["-o", "a.safetensors"]].concat(),
        over,
    );
    refused(
        d,
        &[apply.as_slice(), &["-o", "model.onnx.data"]].concat(),
        over,
    );
    refused(
        d,
        &[
            "merge",
            "model.onnx",
            "a.safetensors",
            "-o",
            "model.onnx.data",
        ],
        over,
    );
    refused(
        d,
        &[
            "merge",
            "model.onnx",
            "a.safetensors",
            "-o",
            "a.safetensors",
        ],
        over,
    );
    refused(
        d,
        &["merge", "model.onnx", "a.safetensors", "-o", "model.onnx"],
        over,
    );
    // The training graph.
    let grad = [
        "grad",
        "model.onnx",
        "--variant",
        "lora",
        "--batch",
        "2",
        "--seq",
        "4",
    ];
    refused(
        d,
        &[grad.as_slice(), &["-o", "model.onnx.data"]].concat(),
        over,
    );
    // Training.
    let t = |extra: &[&'static str]| [TRAIN.as_slice(), extra].concat();
    refused(d, &t(&["-o", "model.onnx"]), over);
    refused(d, &t(&["-o", "data.jsonl"]), over);
    refused(d, &t(&["-o", "tok.json", "--tokenizer", "tok.json"]), over);
    refused(
        d,
        &t(&["-o", "x.safetensors", "--emit-model", "model.onnx.data"]),
        over,
    );
    refused(
        d,
        &t(&["-o", "x.safetensors", "--emit-model", "x.safetensors"]),
        same,
    );
    refused(
        d,
        &t(&["-o", "x.safetensors", "--emit-model", "x.metrics.jsonl"]),
        same,
    );
}

#[test]
fn links_do_not_fool_the_check() {
    let (dir, _) = copy_fixture("llama");
    let d = dir.path();
    std::os::unix::fs::symlink(d.join("model.onnx.data"), d.join("sym.onnx")).unwrap();
    std::fs::hard_link(d.join("model.onnx.data"), d.join("hard.onnx")).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    for out in ["sym.onnx", "hard.onnx", "sub/../model.onnx.data"] {
        refused(
            d,
            &["model.onnx", "--variant", "lora", "-o", out],
            "would overwrite the input model's data file",
        );
    }
}

#[test]
fn an_output_named_like_the_input_in_another_folder_is_valid() {
    // `-o other/model.onnx`: the base data is copied as `model.onnx.data`, so the new
    // tensors go to `model.onnx.1.data` instead of overwriting the copy.
    let other = tempfile::tempdir().unwrap();
    let out_path = other.path().join("model.onnx");
    for variant in ["lora", "delora"] {
        let _ = std::fs::remove_dir_all(other.path());
        std::fs::create_dir(other.path()).unwrap();
        let out = cli(&[
            fixture("llama").to_str().unwrap(),
            "--variant",
            variant,
            "-o",
            out_path.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let files = listing(other.path());
        for want in ["model.onnx", "model.onnx.data", "model.safetensors"] {
            assert!(files.iter().any(|f| f == want), "{variant}: {files:?}");
        }
        assert!(
            files.len() == 3 || (files.len() == 4 && files.contains(&"model.onnx.1.data".into())),
            "{variant}: {files:?}"
        );
        let inspect = cli(&["inspect", out_path.to_str().unwrap()]);
        assert!(
            inspect.status.success(),
            "{}",
            String::from_utf8_lossy(&inspect.stderr)
        );
        // At init the adapter is the identity: the output's logits are the input's
        // (1e-5 of the largest logit: the same fp32 ops; B = 0 adds exact zeros, and
        // W_res + ΔW₀ is W up to rounding).
        let (inputs, _) = reference("llama");
        let base = run_tract(&Model::load(&fixture("llama")).unwrap(), &inputs);
        let grafted = run_tract(&Model::load(&out_path).unwrap(), &inputs);
        let diff = common::max_abs_diff(&base[0], &grafted[0]) / common::max_abs(&base[0]);
        assert!(diff <= 1e-5, "{variant}: {diff}");
    }
}

/// An output path that is a folder (given, or made from another output's name: the
/// model's data file, train's optimizer state) is refused before any work, leaving no
/// temporary file, journal or other output behind.
#[test]
fn an_output_that_is_a_folder_is_refused_before_any_work() {
    let (dir, _) = copy_fixture("llama");
    let d = dir.path();
    std::fs::copy(
        common::root().join("fixtures/corpus.jsonl"),
        d.join("data.jsonl"),
    )
    .unwrap();
    for folder in [
        "out.onnx",
        "ad.safetensors",
        "o.onnx.data",
        "t.optim.safetensors",
    ] {
        std::fs::create_dir(d.join(folder)).unwrap();
    }
    let folder = "would be written over a folder";
    let graft = ["model.onnx", "--variant", "lora"];
    let with = |extra: &[&'static str]| [graft.as_slice(), extra].concat();
    refused(d, &with(&["-o", "out.onnx"]), folder);
    refused(
        d,
        &with(&["-o", "x.onnx", "--adapter", "ad.safetensors"]),
        folder,
    );
    refused(d, &with(&["-o", "o.onnx"]), folder);
    refused(
        d,
        &[TRAIN.as_slice(), &["-o", "t.safetensors"]].concat(),
        folder,
    );
}
