//! The command line's outputs on every fixture, byte for byte: for each command, its exit
//! code, stdout, stderr and a hash of every file it wrote, in one golden file per fixture
//! (`fixtures/<name>/cli.txt`). A refactor that promises "no behaviour change" leaves
//! them all as they are. `LORA_GRAFT_BLESS=1 cargo test --test cli_outputs` rewrites them.
//!
//! Each command runs in its own empty folder `<tmp>/<step>` (its working directory, and
//! where its outputs go), so every file it writes is listed, stray ones included.
//!
//! `LORA_GRAFT_BIN=/path/to/lora-graft` tests that binary instead of the one cargo built:
//! e.g. a saved copy of the pre-refactor build, or when another checkout sharing the
//! target folder may have rebuilt `target/release/lora-graft` from other sources.
//!
//! Normalised, because they vary between runs or machines and nothing else does:
//! - the temporary folder's path -> `<tmp>`, the repository's path -> `<repo>`;
//! - "cloned external data X (copy-on-write)" and "copied external data X (runtimes need
//!   it in the model's folder)" -> "<cloned|copied> external data X": which one happens
//!   depends on the filesystem supporting reflinks (ext4 copies, btrfs/XFS clone); the
//!   file's bytes are the same either way, and are hashed;
//! - `"tokens_per_s":<number>` (`"examples_per_s"` for class/mse) in train's
//!   `*.metrics.jsonl` -> `"tokens_per_s":<t>`
//!   (wall-clock throughput); that file is shown, sized and hashed normalised;
//! - the calibration's `; loaded in W s, forward X s, statistics Y s (Zx the forward)`
//!   -> `<times>`.

mod common;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{check_golden, fixture, root, FIXTURES};
use lora_graft::passes::variants::VARIANTS;

/// Fixtures whose loss in `grad` is MSE (no `[B, S, V]` logits), as in `tests/grad.rs`;
/// the others are language models (causal-lm).
const MSE_FIXTURES: &[&str] = &["bert", "handmade", "handmade_fp16"];

/// One test per fixture (they run in parallel); `every_fixture_has_a_test` keeps the
/// list equal to `FIXTURES`.
macro_rules! fixture_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_fixture(stringify!($name));
            }
        )*

        #[test]
        fn every_fixture_has_a_test() {
            assert_eq!(&[$(stringify!($name)),*], FIXTURES);
        }
    };
}

fixture_tests!(llama, gpt2, bert, handmade, handmade_fp16, genai_int4);

/// A command argument: literal text, or a path (shown normalised in the golden file).
enum Arg {
    Text(String),
    Path(PathBuf),
}

fn t(s: &str) -> Arg {
    Arg::Text(s.to_string())
}

fn p(path: impl Into<PathBuf>) -> Arg {
    Arg::Path(path.into())
}

/// The runs of one fixture, and the golden text they make.
struct Session {
    tmp: tempfile::TempDir,
    /// `(path, replacement)`, longest path first.
    replacements: Vec<(String, &'static str)>,
    text: String,
}

impl Session {
    fn new() -> Session {
        let tmp = tempfile::tempdir().unwrap();
        let mut replacements = Vec::new();
        let repo = root();
        for (path, with) in [(tmp.path(), "<tmp>"), (repo.as_path(), "<repo>")] {
            replacements.push((path.display().to_string(), with));
            if let Ok(c) = std::fs::canonicalize(path) {
                replacements.push((c.display().to_string(), with));
            }
        }
        // The temporary folder first if it is inside the repository.
        replacements.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        replacements.dedup();
        Session {
            tmp,
            replacements,
            text: String::new(),
        }
    }

    /// `<tmp>/<rel>`.
    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// `text` with the varying paths and filesystem-dependent wording normalised.
    fn normalise(&self, text: &str) -> String {
        let mut s = text.to_string();
        for (path, with) in &self.replacements {
            s = s.replace(path.as_str(), with);
        }
        normalise_calibration_times(&normalise_data_placement(&s))
    }

    /// Runs `lora-graft args` in a new folder `<tmp>/<step>` and appends its section to
    /// the golden text. Returns whether it exited with 0.
    fn run(&mut self, step: &str, args: &[Arg]) -> bool {
        let dir = self.path(step);
        assert!(!dir.exists(), "step name {step} used twice");
        std::fs::create_dir_all(&dir).unwrap();
        let mut shown = vec!["lora-graft".to_string()];
        let mut argv: Vec<OsString> = Vec::new();
        for a in args {
            match a {
                Arg::Text(s) => {
                    shown.push(s.clone());
                    argv.push(s.into());
                }
                Arg::Path(path) => {
                    shown.push(self.normalise(&path.display().to_string()));
                    argv.push(path.into());
                }
            }
        }
        let out = Command::new(binary())
            .args(&argv)
            .current_dir(&dir)
            .env_remove("LORA_GRAFT_PROFILE")
            .output()
            .unwrap();
        let code = match out.status.code() {
            Some(c) => c.to_string(),
            None => format!("none ({})", out.status),
        };
        let stdout = self.normalise(&String::from_utf8_lossy(&out.stdout));
        let stderr = self.normalise(&String::from_utf8_lossy(&out.stderr));
        let mut files = Vec::new();
        list_files(&dir, &dir, &mut files);
        let mut text = String::new();
        writeln!(text, "=== {step}").unwrap();
        writeln!(text, "$ {}", shown.join(" ")).unwrap();
        writeln!(text, "exit code: {code}").unwrap();
        write_stream(&mut text, "stdout", &stdout);
        write_stream(&mut text, "stderr", &stderr);
        writeln!(
            text,
            "files in <tmp>/{step}:{}",
            if files.is_empty() { " none" } else { "" }
        )
        .unwrap();
        for rel in &files {
            let bytes = std::fs::read(dir.join(rel)).unwrap();
            if rel.ends_with(".metrics.jsonl") {
                let normalised = normalise_throughput(&String::from_utf8_lossy(&bytes));
                writeln!(
                    text,
                    "  {rel}  {} bytes  fnv1a64 {:016x} (throughput normalised)",
                    normalised.len(),
                    fnv1a64(normalised.as_bytes())
                )
                .unwrap();
                for line in normalised.lines() {
                    writeln!(text, "    | {line}").unwrap();
                }
            } else {
                writeln!(
                    text,
                    "  {rel}  {} bytes  fnv1a64 {:016x}",
                    bytes.len(),
                    fnv1a64(&bytes)
                )
                .unwrap();
            }
        }
        text.push('\n');
        self.text.push_str(&text);
        out.status.success()
    }

    /// Notes a step not run.
    fn skip(&mut self, step: &str, why: &str) {
        writeln!(self.text, "=== {step}\nskipped: {why}\n").unwrap();
    }
}

/// The binary under test: `LORA_GRAFT_BIN`, else the one cargo built.
fn binary() -> PathBuf {
    std::env::var_os("LORA_GRAFT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_lora-graft")))
}

/// `stream` as `| `-prefixed lines, marking a missing final newline.
fn write_stream(text: &mut String, name: &str, stream: &str) {
    if stream.is_empty() {
        writeln!(text, "{name}: empty").unwrap();
        return;
    }
    writeln!(text, "{name}:").unwrap();
    for line in stream.split_inclusive('\n') {
        match line.strip_suffix('\n') {
            Some(l) => writeln!(text, "| {l}").unwrap(),
            None => writeln!(text, "| {line}\n(no newline at the end)").unwrap(),
        }
    }
}

/// Files under `dir`, relative to `base`, sorted.
fn list_files(base: &Path, dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            list_files(base, &path, out);
        } else {
            let rel = path.strip_prefix(base).unwrap();
            out.push(rel.display().to_string());
        }
    }
}

/// 64-bit FNV-1a: a stable hash without a dependency.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Whether the save cloned (copy-on-write) or copied an external data file depends on
/// the filesystem: both lines become `<cloned|copied> external data X`.
fn normalise_data_placement(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, end) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        let placed = [
            ("  cloned external data ", " (copy-on-write)"),
            (
                "  copied external data ",
                " (runtimes need it in the model's folder)",
            ),
        ]
        .iter()
        .find_map(|(pre, post)| body.strip_prefix(pre)?.strip_suffix(post));
        match placed {
            Some(path) => {
                out.push_str("  <cloned|copied> external data ");
                out.push_str(path);
            }
            None => out.push_str(body),
        }
        out.push_str(end);
    }
    out
}

/// The calibration report's wall-clock times -> `; <times>`.
fn normalise_calibration_times(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        match line
            .find("; loaded in ")
            .filter(|_| line.starts_with("calibration: "))
        {
            Some(at) => {
                out.push_str(&line[..at]);
                out.push_str("; <times>");
                if line.ends_with('\n') {
                    out.push('\n');
                }
            }
            None => out.push_str(line),
        }
    }
    out
}

/// `"tokens_per_s":<number>` -> `"tokens_per_s":<t>`, and the same for
/// `examples_per_s` (wall-clock throughput).
fn normalise_throughput(text: &str) -> String {
    let tokens = normalise_key(text, "\"tokens_per_s\":");
    normalise_key(&tokens, "\"examples_per_s\":")
}

/// Replaces the number after every `key` with `<t>`.
fn normalise_key(text: &str, key: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(key) {
        let (head, tail) = rest.split_at(at + key.len());
        out.push_str(head);
        out.push_str("<t>");
        let end = tail
            .find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Classification and regression examples for the hand-built model (x [16] -> y [16]),
/// exact in decimal: x on a grid of quarters, the class the argmax of a fixed
/// permutation of x, the target 0.5·x reversed.
fn handmade_examples() -> String {
    (0..12)
        .map(|i: i64| {
            let x: Vec<f64> = (0..16)
                .map(|j: i64| ((i * 7 + j * 3) % 11 - 5) as f64 / 4.0)
                .collect();
            let perm = |j: usize| (j * 5 + 3) % 16;
            let label = (0..16)
                .max_by(|&a, &b| x[perm(a)].total_cmp(&x[perm(b)]).then(b.cmp(&a)))
                .unwrap();
            let target: Vec<f64> = (0..16).map(|j| 0.5 * x[15 - j]).collect();
            serde_json::json!({ "x": x, "label": label, "target": target }).to_string() + "\n"
        })
        .collect()
}

fn check_fixture(name: &str) {
    let model = fixture(name);
    let mut s = Session::new();

    s.run("inspect", &[t("inspect"), p(&model)]);
    s.run("inspect.json", &[t("inspect"), p(&model), t("--json")]);
    s.run("targets", &[t("targets"), p(&model)]);
    s.run("targets.json", &[t("targets"), p(&model), t("--json")]);

    for v in VARIANTS.iter().map(|v| v.name()) {
        let graft = format!("graft.{v}");
        let out = s.path(&graft).join("out.onnx");
        let adapter = s.path(&graft).join("out.safetensors");
        let mut args = vec![
            p(&model),
            t("--variant"),
            t(v),
            t("-r"),
            t("4"),
            t("--alpha"),
            t("8"),
        ];
        if calibrated(v) {
            let data = root().join("fixtures").join(name).join("calibration.jsonl");
            args.extend([t("--calibration"), p(&data)]);
            args.extend([
                t("--calibration-batch"),
                t("2"),
                t("--calibration-seq"),
                t("8"),
            ]);
        }
        args.extend(variant_options(v));
        args.extend([t("-o"), p(&out)]);
        let ok = s.run(&graft, &args);
        let (apply, merge) = (format!("apply.{v}"), format!("merge.{v}"));
        if !ok {
            s.skip(&apply, &format!("{graft} wrote no adapter"));
            s.skip(&merge, &format!("{graft} wrote no adapter"));
            continue;
        }
        let applied = s.path(&apply).join("out.onnx");
        s.run(
            &apply,
            &[
                p(&model),
                t("--adapter-in"),
                p(&adapter),
                t("-o"),
                p(&applied),
            ],
        );
        let merged = s.path(&merge).join("merged.onnx");
        s.run(
            &merge,
            &[t("merge"), p(&model), p(&adapter), t("-o"), p(&merged)],
        );
    }

    let loss = if MSE_FIXTURES.contains(&name) {
        "mse"
    } else {
        "causal-lm"
    };
    let grad = s.path("grad.lora").join("train.onnx");
    s.run(
        "grad.lora",
        &[
            t("grad"),
            p(&model),
            t("--variant"),
            t("lora"),
            t("--loss"),
            t(loss),
            t("--batch"),
            t("2"),
            t("--seq"),
            t("7"),
            t("-o"),
            p(&grad),
        ],
    );

    // Short training runs, on one thread so that the numbers are deterministic.
    let train = |s: &mut Session, step: &str, variant: &str, args: Vec<Arg>| {
        let mut all = vec![
            t("train"),
            p(&model),
            t("--variant"),
            t(variant),
            t("-r"),
            t("4"),
            t("--alpha"),
            t("8"),
            t("--steps"),
            t("3"),
            t("--batch"),
            t("2"),
            t("--threads"),
            t("1"),
            t("--quiet"),
        ];
        all.extend(variant_options(variant));
        all.extend(args);
        all.extend([
            t("-o"),
            p(s.path(step).join("adapter.safetensors")),
            t("--emit-model"),
            p(s.path(step).join("model.onnx")),
        ]);
        s.run(step, &all);
    };
    match name {
        "llama" => {
            let corpus = root().join("fixtures/corpus.jsonl");
            for v in VARIANTS.iter().map(|v| v.name()) {
                let mut args = vec![t("--seq"), t("8"), t("--data"), p(&corpus)];
                if calibrated(v) {
                    args.extend([
                        t("--calibration"),
                        p(&corpus),
                        t("--calibration-batches"),
                        t("2"),
                    ]);
                }
                train(&mut s, &format!("train.{v}"), v, args);
            }
            // Evaluation and a checkpoint mid-run.
            let args = vec![
                t("--seq"),
                t("8"),
                t("--data"),
                p(&corpus),
                t("--eval"),
                p(&corpus),
                t("--save-every"),
                t("2"),
            ];
            train(&mut s, "train.lora.eval", "lora", args);
        }
        "handmade" | "handmade_fp16" => {
            let data = s.path("data/examples.jsonl");
            std::fs::create_dir_all(data.parent().unwrap()).unwrap();
            std::fs::write(&data, handmade_examples()).unwrap();
            for loss in ["class", "mse"] {
                let args = vec![t("--loss"), t(loss), t("--data"), p(&data)];
                train(&mut s, &format!("train.lora.{loss}"), "lora", args);
            }
        }
        _ => {}
    }

    check_golden(&format!("{name}/cli.txt"), &s.text);
}

/// Options a variant needs on every fixture: ROAD's groups must divide the layers'
/// outputs (lora-lite's default 64 does not divide llama's 32-wide k_proj).
fn variant_options(variant: &str) -> Vec<Arg> {
    match variant {
        "road" => vec![t("--road-group-size"), t("8")],
        _ => vec![],
    }
}

/// Whether variant `v` initialises from calibration data.
fn calibrated(v: &str) -> bool {
    let variant = lora_graft::passes::variants::variant(v).unwrap();
    variant.calibration(&Default::default()).is_some()
}

#[test]
fn normalisations() {
    assert_eq!(
        normalise_throughput(
            "{\"loss\":1.5,\"tokens_per_s\":8596.11345,\"x\":1}\n{\"tokens_per_s\":1e3}"
        ),
        "{\"loss\":1.5,\"tokens_per_s\":<t>,\"x\":1}\n{\"tokens_per_s\":<t>}"
    );
    assert_eq!(
        normalise_throughput("{\"examples_per_s\":12.5}"),
        "{\"examples_per_s\":<t>}"
    );
    assert_eq!(
        normalise_data_placement(
            "wrote a\n  cloned external data b/m.data (copy-on-write)\n  copied external data c (runtimes need it in the model's folder)\n  new tensors in d"
        ),
        "wrote a\n  <cloned|copied> external data b/m.data\n  <cloned|copied> external data c\n  new tensors in d"
    );
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
}
