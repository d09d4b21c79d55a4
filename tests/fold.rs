//! The fold pass: shape and mask subgraphs become initializers for concrete shapes;
//! weights and the real computation stay.

mod common;

use common::{check_golden, fixture, reference, shapes, TRACT_FIXTURES};
use lora_graft::passes::fold::{Fold, FoldReport};
use lora_graft::passes::{run_pass, PassContext};
use lora_graft::Model;

/// Runs the fold pass through the pass runner.
fn fold(
    graph: &mut lora_graft::ir::Graph,
    shapes: &std::collections::HashMap<String, Vec<usize>>,
) -> FoldReport {
    let mut pass = Fold::new(shapes);
    run_pass(graph, &PassContext::default(), &mut pass).unwrap();
    pass.report
}

#[test]
fn fold_golden_dump_of_every_tract_fixture() {
    for name in TRACT_FIXTURES {
        let mut model = Model::load(&fixture(name)).unwrap();
        let (inputs, _) = reference(name);
        fold(&mut model.graph, &shapes(&inputs));
        check_golden(&format!("{name}/fold.txt"), &model.graph.dump().unwrap());
    }
}

#[test]
fn fold_removes_the_dynamo_shape_subgraph() {
    let mut model = Model::load(&fixture("llama")).unwrap();
    let before = model.graph.node_count();
    let matmuls_before = count(&model, "MatMul");
    let (inputs, _) = reference("llama");
    let report = fold(&mut model.graph, &shapes(&inputs));
    assert!(report.folded >= 30, "{report:?}");
    assert_eq!(model.graph.node_count(), before - report.folded);
    for op in ["Shape", "CumSum", "Range"] {
        assert_eq!(count(&model, op), 0, "{op} left after fold");
    }
    assert_eq!(
        count(&model, "MatMul"),
        matmuls_before,
        "linear layers stay"
    );
    // Weights are not rewritten: every initializer read by a MatMul is the input's.
    for id in model.graph.node_ids() {
        let node = model.graph.node(id);
        if node.op() == "MatMul" {
            if let Some(init) = node.inputs[1].and_then(|w| model.graph.initializer(w)) {
                assert!(!init.new, "weight {} was refolded", init.proto.name());
            }
        }
    }
}

#[test]
fn fold_without_shapes_only_folds_constants() {
    let mut model = Model::load(&fixture("handmade")).unwrap();
    let report = fold(&mut model.graph, &Default::default());
    // The Transpose of a weight is foldable (an initializer chain), nothing else.
    assert_eq!(report.folded, 1, "{report:?}");
    assert_eq!(count(&model, "Transpose"), 0);
}

fn count(model: &Model, op: &str) -> usize {
    model
        .graph
        .node_ids()
        .filter(|&id| model.graph.node(id).op() == op)
        .count()
}
