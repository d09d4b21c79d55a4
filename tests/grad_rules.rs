//! Every gradient rule on a one-node graph against central finite differences, in
//! float64 (tract runs these ops in f64), including broadcasting cases.

use std::collections::HashMap;

use lora_graft::ir::build::{int_attr, ints_attr};
use lora_graft::ir::{Graph, Initializer, ValueId};
use lora_graft::passes::grad;
use lora_graft::proto::{
    attribute_proto::AttributeType, AttributeProto, GraphProto, ModelProto, OperatorSetIdProto,
    ValueInfoProto,
};
use lora_graft::rng::Rng;
use lora_graft::runtime::{value_facts, Runner};
use lora_graft::tensor::Array;
use lora_graft::Model;
use tract_core::ndarray::{ArrayD, IxDyn};

/// An input of the node under test.
enum In {
    /// A differentiated float64 input of this shape (values in [lo, hi)).
    Float(Vec<usize>, f64, f64),
    /// A constant (axes, indices, shapes, conditions).
    Const(Array),
}

fn f(shape: &[usize]) -> In {
    In::Float(shape.to_vec(), -1.0, 1.0)
}

fn pos(shape: &[usize]) -> In {
    In::Float(shape.to_vec(), 0.5, 2.0)
}

fn ints(v: &[i64]) -> In {
    In::Const(Array::I64(
        ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap(),
    ))
}

fn float_attr(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        f: Some(v),
        r#type: Some(AttributeType::Float as i32),
        ..Default::default()
    }
}

const F64: i32 = 11;

thread_local! {
    /// The default-domain opset of the models this thread's checks build (each test runs
    /// on its own thread).
    static OPSET: std::cell::Cell<i64> = const { std::cell::Cell::new(18) };
}

fn model(graph: Graph) -> Model {
    let proto = ModelProto {
        ir_version: Some(10),
        opset_import: vec![
            OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET.with(|o| o.get())),
            },
            OperatorSetIdProto {
                domain: Some("com.microsoft".into()),
                version: Some(1),
            },
        ],
        ..Default::default()
    };
    Model {
        proto,
        graph,
        path: "rule.onnx".into(),
        dir: ".".into(),
    }
}

/// Checks the rule of `op` on one node: L = Σ G ⊙ op(inputs), G random.
fn check(op: &str, attrs: Vec<AttributeProto>, inputs: Vec<In>) {
    check_n(op, attrs, inputs, 1, F64)
}

/// Like [`check`] in float32 (for ops tract runs in f32 only), with a wider step.
fn check_f32(op: &str, attrs: Vec<AttributeProto>, inputs: Vec<In>) {
    check_n(op, attrs, inputs, 1, F32)
}

const F32: i32 = 1;

/// The node has `n_outputs` outputs; the loss reads the first (the others get no
/// gradient, which the rules must handle).
fn check_n(op: &str, attrs: Vec<AttributeProto>, inputs: Vec<In>, n_outputs: usize, dtype: i32) {
    check_outputs(op, attrs, inputs, n_outputs, &[0], dtype)
}

/// Like [`check_n`], with `op` as `domain:Op` when not in the default domain, and the
/// loss reading the outputs `read` (L = Σ_k Σ G_k ⊙ y_k).
fn check_outputs(
    op: &str,
    attrs: Vec<AttributeProto>,
    inputs: Vec<In>,
    n_outputs: usize,
    read: &[usize],
    dtype: i32,
) {
    let (domain, op) = op.rsplit_once(':').unwrap_or(("", op));
    let mut rng = Rng::new(42);
    let mut g = Graph::from_proto(GraphProto::default(), |_| Ok(None)).unwrap();
    let mut ids = Vec::new();
    let mut trainable = Vec::new();
    let mut values: HashMap<String, Array> = HashMap::new();
    for (i, input) in inputs.iter().enumerate() {
        let name = format!("in{i}");
        let array = match input {
            In::Float(shape, lo, hi) => {
                let a = ArrayD::from_shape_fn(IxDyn(shape), |_| rng.uniform_in(*lo, *hi));
                if dtype == F64 {
                    Array::F64(a)
                } else {
                    Array::F32(a.mapv(|v| v as f32))
                }
            }
            In::Const(a) => a.clone(),
        };
        let id = g.add_initializer(&name, Initializer::new(array.to_proto("")));
        if matches!(input, In::Float(..)) {
            trainable.push(id);
            values.insert(name, array);
        }
        ids.push(id);
    }
    let (node, outs) = g.add_op(op, "node", &ids, attrs, n_outputs).unwrap();
    g.node_mut(node).proto.domain = Some(domain.to_string());
    if !domain.is_empty() {
        // Outputs nobody reads stay unnamed, as exporters leave them (tract refuses
        // some, e.g. SkipSimplifiedLayerNormalization's mean).
        for k in (0..n_outputs).filter(|k| !read.contains(k)) {
            g.node_mut(node).outputs[k] = None;
        }
    }
    let ys: Vec<ValueId> = read.iter().map(|&k| outs[k]).collect();
    let (runner, _) = differentiate(g, &trainable, &ys, dtype, &mut rng, op);
    let run = |values: &HashMap<String, Array>| -> HashMap<String, Array> {
        let feed = runner.inputs.iter().map(|n| values[n].clone()).collect();
        runner
            .outputs
            .iter()
            .cloned()
            .zip(runner.run(feed).unwrap_or_else(|e| panic!("{op}: {e}")))
            .collect()
    };
    let out = run(&values);
    // float64: h = 1e-6 (truncation ~1e-12, rounding ~1e-10), tolerance 1e-6.
    // float32: h = 1e-2 (rounding ~1e-7·|L|/h ~ 1e-5), tolerance 2e-3.
    let (h, tol) = if dtype == F64 {
        (1e-6, 1e-6)
    } else {
        (1e-2, 2e-3)
    };
    for (name, array) in values.clone() {
        let grad = out[&format!("grad.{name}")].to_f64();
        let base = array.to_f64();
        for i in 0..base.len() {
            let mut plus = values.clone();
            let mut minus = values.clone();
            let (mut tp, mut tm) = (base.clone(), base.clone());
            tp.as_slice_mut().unwrap()[i] += h;
            tm.as_slice_mut().unwrap()[i] -= h;
            let typed = |a: ArrayD<f64>| {
                if dtype == F64 {
                    Array::F64(a)
                } else {
                    Array::F32(a.mapv(|v| v as f32))
                }
            };
            plus.insert(name.clone(), typed(tp));
            minus.insert(name.clone(), typed(tm));
            let lp = run(&plus)["loss"].to_f64()[[]];
            let lm = run(&minus)["loss"].to_f64()[[]];
            let fd = (lp - lm) / (2.0 * h);
            let an = grad.as_slice().unwrap()[i];
            assert!(
                (fd - an).abs() <= tol * fd.abs().max(1.0),
                "{op}: d/d{name}[{i}]: finite differences {fd}, gradient {an}"
            );
        }
    }
}

/// Adds the loss `L = Σ_k Σ G_k ⊙ y_k` (`G_k` random, returned) to `g`, runs the
/// gradient pass with respect to `trainable` (initializers, made inputs) and builds
/// the training graph's runner; `op` labels failures.
fn differentiate(
    mut g: Graph,
    trainable: &[ValueId],
    ys: &[ValueId],
    dtype: i32,
    rng: &mut Rng,
    op: &str,
) -> (Runner, Vec<ArrayD<f64>>) {
    // y's shape, from tract, with the float inputs as graph inputs.
    let mut probe = model(g.clone());
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    for &t in trainable {
        let init = probe.graph.initializer(t).cloned();
        shapes.insert(
            probe.graph.value(t).name.clone(),
            init.as_ref()
                .unwrap()
                .dims()
                .iter()
                .map(|&d| d as usize)
                .collect(),
        );
        grad::make_input(&mut probe.graph, t, init, dtype);
    }
    for &y in ys {
        probe.graph.add_output(lora_graft::ir::GraphIo {
            value: y,
            info: ValueInfoProto {
                name: Some(probe.graph.value(y).name.clone()),
                ..Default::default()
            },
        });
    }
    let facts = value_facts(&probe, &shapes).unwrap_or_else(|e| panic!("{op}: {e}"));
    let mut by_name: grad::Shapes = facts
        .into_iter()
        .filter_map(|(n, f)| {
            f.shape
                .iter()
                .map(|d| d.parse().ok())
                .collect::<Option<Vec<usize>>>()
                .map(|s| (n, s))
        })
        .collect();
    // L = Σ_k ReduceSum(y_k ⊙ G_k)
    let mut terms = Vec::new();
    let mut weights_made = Vec::new();
    for (k, &y) in ys.iter().enumerate() {
        let y_shape = by_name[&g.value(y).name].clone();
        let w = ArrayD::from_shape_fn(IxDyn(&y_shape), |_| rng.uniform_in(-1.0, 1.0));
        let weights = if dtype == F64 {
            Array::F64(w)
        } else {
            Array::F32(w.mapv(|v| v as f32))
        };
        let gw = g.add_initializer(&format!("G{k}"), Initializer::new(weights.to_proto("")));
        weights_made.push(weights.to_f64());
        let (_, p) = g.add_op("Mul", "weigh", &[y, gw], vec![], 1).unwrap();
        // No axes: every axis, at any opset.
        let (_, l) = g
            .add_op(
                "ReduceSum",
                "sum",
                &[p[0]],
                vec![int_attr("keepdims", 0)],
                1,
            )
            .unwrap();
        by_name.insert(g.value(p[0]).name.clone(), y_shape.clone());
        by_name.insert(g.value(l[0]).name.clone(), vec![]);
        terms.push(l[0]);
    }
    let mut l = vec![terms[0]];
    for &t in &terms[1..] {
        l = g.add_op("Add", "total", &[l[0], t], vec![], 1).unwrap().1;
        by_name.insert(g.value(l[0]).name.clone(), vec![]);
    }
    let loss: ValueId = l[0];
    let mut training = model(g);
    let loss = grad::loss::BuiltLoss { loss, seed: None };
    let mut pass = grad::Grad {
        loss,
        trainable,
        shapes: &by_name,
        made: None,
    };
    lora_graft::passes::run_pass(
        &mut training.graph,
        &lora_graft::passes::PassContext {
            opset: OPSET.with(|o| o.get()),
        },
        &mut pass,
    )
    .unwrap_or_else(|e| panic!("{op}: {e}"));
    let runner = Runner::new(&training, &shapes).unwrap_or_else(|e| panic!("{op}: {e}"));
    (runner, weights_made)
}

#[test]
fn elementwise_binary_with_broadcasting() {
    for op in ["Add", "Sub", "Mul"] {
        check(op, vec![], vec![f(&[2, 3, 4]), f(&[3, 1])]);
        check(op, vec![], vec![f(&[4]), f(&[2, 3, 4])]);
    }
    check("Div", vec![], vec![f(&[2, 3]), pos(&[3])]);
    check(
        "Pow",
        vec![],
        vec![
            pos(&[2, 3]),
            In::Const(Array::F64(ArrayD::from_elem(IxDyn(&[]), 2.5))),
        ],
    );
    check("Max", vec![], vec![f(&[2, 3]), f(&[3])]);
    check("Min", vec![], vec![f(&[2, 3]), f(&[2, 1])]);
}

#[test]
fn elementwise_unary() {
    for op in ["Neg", "Exp", "Tanh", "Relu", "Identity", "Sin", "Cos"] {
        check(op, vec![], vec![f(&[2, 5])]);
    }
    // tract has no f64 Sigmoid and Erf.
    check_f32("Sigmoid", vec![], vec![f(&[2, 5])]);
    check_f32("Erf", vec![], vec![f(&[2, 5])]);
    for op in ["Sqrt", "Reciprocal", "Log"] {
        check(op, vec![], vec![pos(&[2, 5])]);
    }
    check("Dropout", vec![], vec![f(&[3, 2])]);
    let lo = In::Const(Array::F64(ArrayD::from_elem(IxDyn(&[]), -0.3)));
    let hi = In::Const(Array::F64(ArrayD::from_elem(IxDyn(&[]), 0.4)));
    check("Clip", vec![], vec![f(&[4, 5]), lo, hi]);
}

#[test]
fn softmax_family() {
    check("Softmax", vec![int_attr("axis", -1)], vec![f(&[2, 3, 5])]);
    check("Softmax", vec![int_attr("axis", 1)], vec![f(&[2, 3, 5])]);
    check("LogSoftmax", vec![int_attr("axis", -1)], vec![f(&[2, 6])]);
    // float32 over the last axis: lora-graft's one-pass SoftmaxGrad kernel.
    check_f32("Softmax", vec![int_attr("axis", -1)], vec![f(&[2, 3, 5])]);
    check_f32("Softmax", vec![int_attr("axis", 2)], vec![f(&[2, 3, 5])]);
}

#[test]
fn softmax_family_before_opset_13() {
    // The op flattened every axis from `axis` (default 1) into one.
    OPSET.with(|o| o.set(11));
    check("Softmax", vec![], vec![f(&[2, 3, 5])]);
    check("Softmax", vec![int_attr("axis", 1)], vec![f(&[2, 3, 5])]);
    check("LogSoftmax", vec![int_attr("axis", 1)], vec![f(&[2, 3, 4])]);
    check_f32("Softmax", vec![int_attr("axis", 2)], vec![f(&[2, 3, 5])]);
    check_f32("Softmax", vec![], vec![f(&[2, 3, 5])]);
}

#[test]
fn matmul_and_gemm() {
    check("MatMul", vec![], vec![f(&[2, 3, 4]), f(&[4, 5])]);
    check("MatMul", vec![], vec![f(&[2, 2, 3, 4]), f(&[4, 5])]);
    check("MatMul", vec![], vec![f(&[2, 3, 4]), f(&[2, 4, 2])]);
    check("MatMul", vec![], vec![f(&[2, 2, 3, 4]), f(&[1, 4, 2])]);
    check(
        "Gemm",
        vec![
            float_attr("alpha", 0.5),
            float_attr("beta", 2.0),
            int_attr("transB", 1),
        ],
        vec![f(&[3, 4]), f(&[5, 4]), f(&[5])],
    );
    check(
        "Gemm",
        vec![int_attr("transA", 1)],
        vec![f(&[4, 3]), f(&[4, 2]), f(&[3, 2])],
    );
}

#[test]
fn layout_ops() {
    check(
        "Transpose",
        vec![ints_attr("perm", &[2, 0, 1])],
        vec![f(&[2, 3, 4])],
    );
    check("Reshape", vec![], vec![f(&[2, 3, 4]), ints(&[6, -1])]);
    check("Flatten", vec![int_attr("axis", 2)], vec![f(&[2, 3, 4])]);
    check("Squeeze", vec![], vec![f(&[2, 1, 4]), ints(&[1])]);
    check("Unsqueeze", vec![], vec![f(&[2, 4]), ints(&[0, 2])]);
    check("Expand", vec![], vec![f(&[3, 1]), ints(&[2, 3, 4])]);
    check(
        "Concat",
        vec![int_attr("axis", 1)],
        vec![f(&[2, 3]), f(&[2, 2])],
    );
    check_n(
        "Split",
        vec![int_attr("axis", 1)],
        vec![f(&[2, 6]), ints(&[2, 4])],
        2,
        F64,
    );
    check(
        "Slice",
        vec![],
        vec![f(&[4, 6]), ints(&[1, 0]), ints(&[3, -1]), ints(&[0, 1])],
    );
    let idx = In::Const(Array::I64(
        ArrayD::from_shape_vec(IxDyn(&[2, 1]), vec![2, 0]).unwrap(),
    ));
    check(
        "GatherElements",
        vec![int_attr("axis", 1)],
        vec![f(&[2, 4]), idx],
    );
}

#[test]
fn reductions() {
    for op in ["ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceMax"] {
        check(
            op,
            vec![int_attr("keepdims", 1)],
            vec![f(&[2, 3, 4]), ints(&[1])],
        );
        check(
            op,
            vec![int_attr("keepdims", 0)],
            vec![f(&[2, 3, 4]), ints(&[0, 2])],
        );
    }
    check(
        "ReduceL2",
        vec![int_attr("keepdims", 0)],
        vec![f(&[3, 4]), ints(&[1])],
    );
}

#[test]
fn where_cast_and_layer_norm() {
    let cond = In::Const(Array::Bool(
        ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![true, false, true, false, false, true])
            .unwrap(),
    ));
    check("Where", vec![], vec![cond, f(&[2, 3]), f(&[3])]);
    check("Cast", vec![int_attr("to", F64 as i64)], vec![f(&[2, 3])]);
    // tract computes LayerNormalization in f32 whatever the input type (stash_type).
    check_f32(
        "LayerNormalization",
        vec![int_attr("axis", -1), float_attr("epsilon", 1e-5)],
        vec![f(&[2, 3, 5]), f(&[5]), f(&[5])],
    );
}

#[test]
fn gather_with_repeated_and_negative_indices() {
    let idx = |shape: &[usize], v: Vec<i64>| {
        In::Const(Array::I64(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()))
    };
    // Rows 1 and -1 (= 3) twice: their gradients add up.
    check(
        "Gather",
        vec![int_attr("axis", 0)],
        vec![f(&[4, 3]), idx(&[2, 2], vec![1, -1, 3, 1])],
    );
    check(
        "Gather",
        vec![int_attr("axis", 1)],
        vec![f(&[2, 5, 3]), idx(&[3], vec![4, 0, 4])],
    );
    // A scalar index (BERT's [CLS] pick): the axis goes away.
    check(
        "Gather",
        vec![int_attr("axis", 1)],
        vec![f(&[2, 4, 3]), idx(&[], vec![0])],
    );
}

#[test]
fn onnxruntime_rms_norms_and_matmul_nbits() {
    // tract computes these in f32 (RMS norms whatever the type; MatMulNBits f32 only).
    check_f32(
        "SimplifiedLayerNormalization",
        vec![int_attr("axis", -1), float_attr("epsilon", 1e-6)],
        vec![f(&[2, 3, 8]), f(&[8])],
    );
    // The fused residual sum (output 3) is read too, as the genai exporter's next layer does.
    check_outputs(
        "com.microsoft:SkipSimplifiedLayerNormalization",
        vec![float_attr("epsilon", 1e-6)],
        vec![f(&[2, 3, 8]), f(&[2, 3, 8]), f(&[8])],
        4,
        &[0, 3],
        F32,
    );
    // 4-bit weights, K = 16 in blocks of 8, N = 3, with packed zero points.
    let mut rng = Rng::new(7);
    let q: Vec<u8> = (0..3 * 2 * 4)
        .map(|_| (rng.next_u64() % 256) as u8)
        .collect();
    let scales: Vec<f32> = (0..6).map(|i| 0.05 + 0.01 * i as f32).collect();
    check_f32(
        "com.microsoft:MatMulNBits",
        vec![
            int_attr("K", 16),
            int_attr("N", 3),
            int_attr("bits", 4),
            int_attr("block_size", 8),
        ],
        vec![
            f(&[2, 5, 16]),
            In::Const(Array::U8(
                ArrayD::from_shape_vec(IxDyn(&[3, 2, 4]), q).unwrap(),
            )),
            In::Const(Array::F32(
                ArrayD::from_shape_vec(IxDyn(&[6]), scales).unwrap(),
            )),
            In::Const(Array::U8(
                ArrayD::from_shape_vec(IxDyn(&[3]), vec![0x97, 0x88, 0x3c]).unwrap(),
            )),
        ],
    );
    // 8-bit weights, K = 64 in blocks of 32, N = 24, with zero points (one byte a
    // block), as onnxruntime's 8-bit quantizer writes them.
    let q8: Vec<u8> = (0..24 * 2 * 32)
        .map(|_| (rng.next_u64() % 256) as u8)
        .collect();
    let zp8: Vec<u8> = (0..24 * 2)
        .map(|_| 100 + (rng.next_u64() % 56) as u8)
        .collect();
    // Scales keep W within ±0.3, so the f32 loss is small enough for the finite
    // differences' rounding (~1e-7·|L|/h).
    let scales8: Vec<f32> = (0..48).map(|i| 0.001 + 0.0001 * (i % 9) as f32).collect();
    check_f32(
        "com.microsoft:MatMulNBits",
        vec![
            int_attr("K", 64),
            int_attr("N", 24),
            int_attr("bits", 8),
            int_attr("block_size", 32),
        ],
        vec![
            f(&[2, 5, 64]),
            In::Const(Array::U8(
                ArrayD::from_shape_vec(IxDyn(&[24, 2, 32]), q8).unwrap(),
            )),
            In::Const(Array::F32(
                ArrayD::from_shape_vec(IxDyn(&[48]), scales8).unwrap(),
            )),
            In::Const(Array::U8(
                ArrayD::from_shape_vec(IxDyn(&[48]), zp8).unwrap(),
            )),
        ],
    );
    // 2-bit weights (four to a byte), default zero point (2).
    let q2: Vec<u8> = (0..3 * 2 * 2)
        .map(|_| (rng.next_u64() % 256) as u8)
        .collect();
    check_f32(
        "com.microsoft:MatMulNBits",
        vec![
            int_attr("K", 16),
            int_attr("N", 3),
            int_attr("bits", 2),
            int_attr("block_size", 8),
        ],
        vec![
            f(&[2, 16]),
            In::Const(Array::U8(
                ArrayD::from_shape_vec(IxDyn(&[3, 2, 2]), q2).unwrap(),
            )),
            In::Const(Array::F32(
                ArrayD::from_shape_vec(IxDyn(&[6]), vec![0.01; 6]).unwrap(),
            )),
        ],
    );
}

/// Fake quantization of an activation (`QuantizeLinear` → `DequantizeLinear`, per
/// tensor, uint8 and int8): the gradient is the straight-through estimator with
/// clipping, as torch's `FakeQuantize` has it: `dx = g·[qmin ≤ round(x/s) + zp ≤ qmax]`
/// (a staircase has no useful finite differences). x spans twice the representable
/// range, so both sides of the clip are hit.
#[test]
fn fake_quantization_is_straight_through() {
    for (zero, qmin, qmax) in [
        (Array::U8(ArrayD::from_elem(IxDyn(&[]), 128)), 0.0, 255.0),
        (Array::I8(ArrayD::from_elem(IxDyn(&[]), -10)), -128.0, 127.0),
    ] {
        let scale = 0.02f32;
        let mut rng = Rng::new(5);
        let x = ArrayD::from_shape_fn(IxDyn(&[4, 50]), |_| rng.uniform_in(-5.2, 5.2) as f32);
        let mut g = Graph::from_proto(GraphProto::default(), |_| Ok(None)).unwrap();
        let xv = g.add_initializer("x", Initializer::new(Array::F32(x.clone()).to_proto("")));
        let s = Array::F32(ArrayD::from_elem(IxDyn(&[]), scale));
        let sv = g.add_initializer("s", Initializer::new(s.to_proto("")));
        let zv = g.add_initializer("zp", Initializer::new(zero.to_proto("")));
        let (_, q) = g
            .add_op("QuantizeLinear", "q", &[xv, sv, zv], vec![], 1)
            .unwrap();
        let (_, y) = g
            .add_op("DequantizeLinear", "dq", &[q[0], sv, zv], vec![], 1)
            .unwrap();
        let (runner, weights) = differentiate(g, &[xv], &y, 1, &mut rng, "fake quantization");
        let out = runner.run(vec![Array::F32(x.clone())]).unwrap();
        let at = runner.outputs.iter().position(|o| o == "grad.x").unwrap();
        let grad = out[at].to_f64();
        let z = zero.to_f64()[[]];
        let mut clipped = 0;
        for ((&xi, &gi), &wi) in x.iter().zip(grad.iter()).zip(weights[0].iter()) {
            let t = (xi / scale).round_ties_even() as f64 + z;
            let inside = (qmin..=qmax).contains(&t);
            clipped += !inside as usize;
            let want = if inside { wi } else { 0.0 };
            // G·s/s in f32: a rounding of G.
            assert!(
                (gi - want).abs() <= 1e-6,
                "x = {xi}: gradient {gi}, want {want}"
            );
        }
        assert!(clipped > 50 && clipped < 150, "{clipped} of 200 clipped");
    }
}
