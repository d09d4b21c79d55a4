//! A command's output files appear as one set. Killed at every step of its commit (the
//! test hook `LORA_GRAFT_TEST_KILL_AT`), a graft over an earlier output leaves the old
//! set or the new one once lora-graft next reads the folder, never a mix; a training run
//! killed while checkpointing resumes from a whole checkpoint; two concurrent writers
//! leave one writer's whole set.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{cli, fixture, listing, python, root, snapshot};

/// Runs the binary with `args`, killing itself at commit step `kill_at`.
fn run_killed(args: &[String], kill_at: usize) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-graft"))
        .args(args)
        .env("LORA_GRAFT_TEST_KILL_AT", kill_at.to_string())
        .output()
        .unwrap()
}

/// The graft command writing `dir/x.onnx` and `dir/x.safetensors`.
fn graft(variant: &str, dir: &Path) -> Vec<String> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    vec![
        s(&fixture("llama")),
        "--variant".into(),
        variant.into(),
        "-o".into(),
        s(&dir.join("x.onnx")),
        "--adapter".into(),
        s(&dir.join("x.safetensors")),
    ]
}

fn copy_into(files: &BTreeMap<String, Vec<u8>>, dir: &Path) {
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// `onnx.checker` (full check) passes on the model and safetensors loads the adapter.
fn valid_set(dir: &Path) {
    let script = "import sys, onnx; from safetensors.numpy import load_file\n\
                  onnx.checker.check_model(sys.argv[1], full_check=True); load_file(sys.argv[2])";
    let out = Command::new(python())
        .args(["-c", script])
        .arg(dir.join("x.onnx"))
        .arg(dir.join("x.safetensors"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_graft_killed_at_every_commit_step_leaves_one_whole_set() {
    // The old set (LoRA) and the new set (PiSSA, which also rewrites the weights).
    let old_dir = tempfile::tempdir().unwrap();
    assert!(cli(&graft("lora", old_dir.path())
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())
    .status
    .success());
    let old = snapshot(old_dir.path());
    let new_dir = tempfile::tempdir().unwrap();
    copy_into(&old, new_dir.path());
    assert!(cli(&graft("pissa", new_dir.path())
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())
    .status
    .success());
    let new = snapshot(new_dir.path());
    assert_ne!(old, new);
    valid_set(old_dir.path());
    valid_set(new_dir.path());

    let (mut kept_old, mut got_new) = (0, 0);
    for step in 1.. {
        let dir = tempfile::tempdir().unwrap();
        copy_into(&old, dir.path());
        let out = run_killed(&graft("pissa", dir.path()), step);
        if out.status.success() {
            assert_eq!(snapshot(dir.path()), new, "step {step}: an unkilled run");
            assert!(step > 3, "only {step} commit steps");
            break;
        }
        assert_eq!(out.status.signal(), Some(9), "step {step}: {out:?}");
        // The next lora-graft run reading the folder completes or drops the set.
        let inspect = cli(&["inspect", &dir.path().join("x.onnx").to_string_lossy()]);
        assert!(inspect.status.success(), "step {step}: {inspect:?}");
        let after = snapshot(dir.path());
        if after == old {
            kept_old += 1;
        } else if after == new {
            got_new += 1;
        } else {
            panic!(
                "step {step}: a mix of two runs: {:?}",
                after.keys().collect::<Vec<_>>()
            );
        }
    }
    // Killed before its journal, a run leaves the old set; after, the new one.
    assert!(
        kept_old >= 1 && got_new >= 3,
        "old {kept_old}, new {got_new}"
    );
}

#[test]
fn a_training_run_killed_while_checkpointing_resumes_from_a_whole_checkpoint() {
    let corpus = root().join("fixtures/corpus.jsonl");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let train = |dir: &Path, steps: &str, extra: &[String]| -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            &s(&fixture("llama")),
            "--variant",
            "lora",
            "-r",
            "4",
            "--steps",
            steps,
            "--save-every",
            "1",
            "--batch",
            "2",
            "--seq",
            "8",
            "--threads",
            "1",
            "--quiet",
            "--data",
            &s(&corpus),
            "-o",
            &s(&dir.join("a.safetensors")),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().cloned());
        args
    };
    let (mut fresh, mut resumed) = (0, 0);
    for step in 1.. {
        let dir = tempfile::tempdir().unwrap();
        let out = run_killed(&train(dir.path(), "2", &[]), step);
        if out.status.success() {
            assert!(step > 8, "only {step} commit steps in two checkpoints");
            break;
        }
        assert_eq!(out.status.signal(), Some(9), "step {step}: {out:?}");
        let adapter = dir.path().join("a.safetensors");
        let resume = cli(&train(dir.path(), "3", &["--resume".into(), s(&adapter)])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>());
        if resume.status.success() {
            resumed += 1;
        } else {
            // Killed before the first checkpoint was committed: nothing to resume from,
            // and nothing left behind.
            let stderr = String::from_utf8_lossy(&resume.stderr);
            assert!(stderr.contains("a.safetensors"), "step {step}: {stderr}");
            assert!(
                listing(dir.path()).is_empty(),
                "step {step}: {:?}",
                listing(dir.path())
            );
            fresh += 1;
        }
    }
    assert!(
        fresh >= 1 && resumed >= 4,
        "fresh {fresh}, resumed {resumed}"
    );
}

#[test]
fn two_concurrent_writers_leave_one_whole_set() {
    let solo = |variant: &str| {
        let dir = tempfile::tempdir().unwrap();
        assert!(cli(&graft(variant, dir.path())
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>())
        .status
        .success());
        snapshot(dir.path())
    };
    let (lora, pissa) = (solo("lora"), solo("pissa"));
    for round in 0..6 {
        let dir = tempfile::tempdir().unwrap();
        let spawn = |variant: &str| {
            Command::new(env!("CARGO_BIN_EXE_lora-graft"))
                .args(graft(variant, dir.path()))
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let (mut a, mut b) = (spawn("lora"), spawn("pissa"));
        assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
        let after = snapshot(dir.path());
        assert!(
            after == lora || after == pissa,
            "round {round}: a mix of two writers: {:?}",
            after.keys().collect::<Vec<_>>()
        );
    }
}

/// A target that became a folder after it was staged (a race the command's own check
/// cannot see) fails the commit before its journal: the error names it, the staged
/// files are removed, and no journal or other target is written.
#[test]
fn a_target_turned_folder_fails_the_commit_and_leaves_nothing() {
    use lora_graft::commit::Commit;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut commit = Commit::new();
    commit.write(&d.join("a.safetensors"), b"adapter").unwrap();
    commit.write(&d.join("m.onnx"), b"model").unwrap();
    std::fs::create_dir(d.join("m.onnx")).unwrap();
    let err = commit.commit().unwrap_err().to_string();
    assert!(
        err.contains("m.onnx") && err.contains("is a folder"),
        "{err}"
    );
    assert_eq!(
        listing(d),
        vec!["m.onnx".to_string()],
        "only the folder is left"
    );
}
