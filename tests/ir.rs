//! The arena IR: building, splicing, removal with compaction, validation, dumps.

mod common;

use common::{node, vi};
use lora_graft::ir::{Def, Graph};
use lora_graft::proto::GraphProto;

/// x -> Relu -> h -> Neg -> y
fn chain() -> Graph {
    let proto = GraphProto {
        name: Some("g".into()),
        node: vec![
            node("relu", "Relu", &["x"], &["h"]),
            node("neg", "Neg", &["h"], &["y"]),
        ],
        input: vec![vi("x")],
        output: vec![vi("y")],
        ..Default::default()
    };
    Graph::from_proto(proto, |_| Ok(None)).unwrap()
}

#[test]
fn producers_and_users_are_tracked() {
    let g = chain();
    let h = g.value_by_name("h").unwrap();
    let relu = g.producer(h).unwrap();
    assert_eq!(g.node(relu).op(), "Relu");
    assert_eq!(g.value(h).users.len(), 1);
    assert_eq!(g.node(g.value(h).users[0]).op(), "Neg");
    assert_eq!(g.value(g.value_by_name("x").unwrap()).def, Def::Input);
}

#[test]
fn splice_after_a_value_keeps_output_names() {
    let mut g = chain();
    let y = g.value_by_name("y").unwrap();
    // y' = Add(y, y): every reader of y, and the graph output, now see y'.
    let (add, outs) = g.add_op("Add", "splice", &[y, y], vec![], 1).unwrap();
    g.replace_uses(y, outs[0], &[add]);
    g.validate().unwrap();
    let out = g.outputs()[0].value;
    assert_eq!(g.value(out).name, "y", "graph output keeps its name");
    assert_eq!(g.producer(out), Some(add));
    let dump = g.dump().unwrap();
    assert_eq!(
        dump,
        "input x: ?\n%0 = Relu(x)\n%1 = Neg(%0)\n%2 = Add(%1, %1)\noutput y: ? = %2\n"
    );
}

#[test]
fn removal_and_compaction_renumber_the_arena() {
    let mut g = chain();
    let h = g.value_by_name("h").unwrap();
    let y = g.value_by_name("y").unwrap();
    let neg = g.producer(y).unwrap();
    // Bypass Neg: y := Relu output directly is not possible without renaming, so
    // replace Neg by an Identity reading h.
    g.remove_node(neg);
    assert_eq!(g.value(h).users.len(), 0);
    let proto = node("id", "Identity", &[], &[]);
    g.add_node(proto, vec![Some(h)], vec![Some(y)]).unwrap();
    g.compact();
    g.validate().unwrap();
    assert_eq!(g.node_count(), 2);
    let ops: Vec<&str> = g
        .topological_order()
        .unwrap()
        .into_iter()
        .map(|n| g.node(n).op())
        .collect();
    assert_eq!(ops, ["Relu", "Identity"]);
}

#[test]
fn fresh_names_never_collide() {
    let mut g = chain();
    assert_eq!(g.fresh_name("h"), "h_1");
    let v = g.new_value("h");
    assert_eq!(g.value(v).name, "h_1");
    assert_eq!(g.fresh_name("h"), "h_2");
    assert_eq!(g.fresh_node_name("relu"), "relu_1");
}

#[test]
fn validate_names_the_offender() {
    let proto = GraphProto {
        node: vec![
            node("a", "Relu", &["x"], &["y"]),
            node("a", "Relu", &["x"], &["z"]),
        ],
        input: vec![vi("x")],
        output: vec![vi("y")],
        ..Default::default()
    };
    let g = Graph::from_proto(proto, |_| Ok(None)).unwrap();
    assert!(g
        .validate()
        .unwrap_err()
        .to_string()
        .contains("two nodes are named 'a'"));

    let proto = GraphProto {
        node: vec![node("a", "Relu", &["x"], &["y"])],
        input: vec![vi("x")],
        output: vec![vi("nowhere")],
        ..Default::default()
    };
    let g = Graph::from_proto(proto, |_| Ok(None)).unwrap();
    assert!(g
        .validate()
        .unwrap_err()
        .to_string()
        .contains("graph output 'nowhere'"));

    let proto = GraphProto {
        node: vec![
            node("a", "Relu", &["x"], &["y"]),
            node("b", "Relu", &["x"], &["y"]),
        ],
        input: vec![vi("x")],
        output: vec![vi("y")],
        ..Default::default()
    };
    let err = Graph::from_proto(proto, |_| Ok(None)).unwrap_err();
    assert!(err.to_string().contains("'y' is defined twice"), "{err}");
}

#[test]
fn topological_order_sorts_an_unsorted_graph() {
    let proto = GraphProto {
        node: vec![
            node("second", "Neg", &["h"], &["y"]),
            node("first", "Relu", &["x"], &["h"]),
        ],
        input: vec![vi("x")],
        output: vec![vi("y")],
        ..Default::default()
    };
    let g = Graph::from_proto(proto, |_| Ok(None)).unwrap();
    g.validate().unwrap();
    let names: Vec<&str> = g
        .topological_order()
        .unwrap()
        .into_iter()
        .map(|n| g.node(n).name())
        .collect();
    assert_eq!(names, ["first", "second"]);
}
