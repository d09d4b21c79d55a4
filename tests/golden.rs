//! Golden canonical dumps of every fixture (`fixtures/<name>/graph.txt`).
//! `LORA_GRAFT_BLESS=1 cargo test` rewrites them.

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
