//! Golden canonical dumps of every fixture (`fixtures/<name>/graph.txt`), and no golden
//! file that no test reads. `LORA_GRAFT_BLESS=1 cargo test` rewrites them.

mod common;

use common::{check_golden, fixture, FIXTURES};
use lora_graft::Model;

#[test]
fn canonical_dump_of_every_fixture() {
    for name in FIXTURES {
        let model = Model::load(&fixture(name)).unwrap();
        check_golden(&format!("{name}/graph.txt"), &model.graph.dump().unwrap());
    }
}

#[test]
fn golden_diff_names_the_changed_lines() {
    let d = common::line_diff("a\nb\nc\n", "a\nx\nc\n");
    assert_eq!(d, "+x\n-b\n");
}

/// Per-pass goldens where a pass's effect is local (rustc's `mir-opt` diffs): the line
/// diff of the canonical dump across one run of the pass, through the pass runner.
#[test]
fn per_pass_diffs() {
    use lora_graft::ir::dump::line_diff;
    // The graft pass (LoRA, r 4) on the hand-built model: one branch per module.
    let mut model = Model::load(&fixture("handmade")).unwrap();
    let before = model.graph.dump().unwrap();
    lora_graft::jobs::graft(&mut model, &common::request("lora")).unwrap();
    let after = model.graph.dump().unwrap();
    check_golden("handmade/graft.lora.diff", &line_diff(&before, &after));
}

/// Every `*.txt` and `*.diff` directly in a fixture folder is a golden file some test compares with
/// (`common::goldens`), and every golden file listed there exists.
#[test]
fn every_golden_file_is_read_by_a_test() {
    let fixtures = common::root().join("fixtures");
    let expected: std::collections::BTreeSet<String> = common::goldens().into_iter().collect();
    let mut folders: std::collections::BTreeSet<String> =
        FIXTURES.iter().map(|f| f.to_string()).collect();
    folders.extend(
        expected
            .iter()
            .filter_map(|g| g.rsplit_once('/').map(|(dir, _)| dir.to_string())),
    );
    let mut found = std::collections::BTreeSet::new();
    for folder in &folders {
        let dir = fixtures.join(folder);
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".txt") || name.ends_with(".diff") {
                found.insert(format!("{folder}/{name}"));
            }
        }
    }
    let orphans: Vec<&String> = found.difference(&expected).collect();
    assert!(
        orphans.is_empty(),
        "golden files no test reads (delete them, or list the test that reads them in \
         tests/common/mod.rs `goldens`): {orphans:?}"
    );
    // While blessing, the test that owns a missing golden writes it.
    if std::env::var("LORA_GRAFT_BLESS").is_ok_and(|v| v == "1") {
        return;
    }
    let missing: Vec<&String> = expected.difference(&found).collect();
    assert!(
        missing.is_empty(),
        "golden files listed in tests/common/mod.rs `goldens` are missing (run \
         `LORA_GRAFT_BLESS=1 cargo test --release` and review them): {missing:?}"
    );
}
