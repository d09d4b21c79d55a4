//! tract runs every fixture (after the fold pass) and matches the stored PyTorch outputs.

mod common;

use common::{fixture, max_abs_diff, reference, shapes, TRACT_FIXTURES};
use lora_graft::runtime::Runner;
use lora_graft::Model;

#[test]
fn tract_matches_pytorch_on_every_fixture() {
    for name in TRACT_FIXTURES {
        let model = Model::load(&fixture(name)).unwrap();
        let (inputs, outputs) = reference(name);
        let runner =
            Runner::new(&model, &shapes(&inputs)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ordered: Vec<_> = runner
            .inputs
            .iter()
            .map(|n| {
                inputs
                    .iter()
                    .find(|(k, _)| k == n)
                    .unwrap_or_else(|| panic!("{name}: no reference input {n}"))
                    .1
                    .clone()
            })
            .collect();
        let got = runner
            .run(ordered)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (out_name, expected) in &outputs {
            let i = runner.outputs.iter().position(|o| o == out_name).unwrap();
            let diff = max_abs_diff(&got[i], expected);
            // fp32 models: 1e-4 absolute (the bound; different summation orders
            // give ~1e-6 here). The fp16 model: 1e-2, fp16 has ~3 significant digits.
            let tol = if name.ends_with("fp16") { 1e-2 } else { 1e-4 };
            assert!(
                diff < tol,
                "{name}: output {out_name} differs by {diff} (tolerance {tol})"
            );
        }
    }
}

#[test]
fn value_facts_cover_every_output() {
    let model = Model::load(&fixture("handmade")).unwrap();
    let (inputs, _) = reference("handmade");
    let facts = lora_graft::runtime::value_facts(&model, &shapes(&inputs)).unwrap();
    let y = facts.get("y").expect("fact for the output y");
    assert_eq!(y.dtype, "F32");
    assert_eq!(y.shape, ["2", "16"]);
}
