//! The interpreter (`lora_graft::interp`) checked op by op against tract: every op in
//! its table runs as a one-node ONNX model through tract and through
//! `interp::evaluate`, on seeded random inputs, and the outputs must agree.
//!
//! Integers, bools and shapes must match exactly, and so must most floats: the
//! interpreter computes in f64 and rounds once, which for `+ - *`, `Sqrt`, `Mod`,
//! casts and data movement is the correctly rounded f32 result tract's f32 arithmetic
//! also gives. `Exp`, `Log`, `Sin`, `Cos` and `Pow` (tract's own f32 kernels), `Div`
//! (tract multiplies by the reciprocal) and `CumSum` (order of additions) must match
//! to 1e-6 relative: each side stays within a few f32 ulps (1.2e-7 relative) of the
//! exact value, and 1e-6 leaves room for eight.
//!
//! Where tract refuses a case ONNX allows, or contradicts the ONNX spec, the case
//! states the spec's result and why (see `Case::expect`).

use lora_graft::interp::{self, InterpError};
use lora_graft::ir::Graph;
use lora_graft::proto::attribute_proto::AttributeType;
use lora_graft::proto::tensor_proto::DataType;
use lora_graft::proto::tensor_shape_proto::{dimension, Dimension};
use lora_graft::proto::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use lora_graft::rng::Rng;
use lora_graft::runtime::{from_tract, to_tract};
use lora_graft::tensor::Array;
use prost::Message;
use tract_core::ndarray::{ArrayD, IxDyn};
use tract_onnx::prelude::*;

/// Relative tolerance for the float outputs of [`APPROXIMATE`] ops (see the module doc).
const REL_TOL: f64 = 1e-6;

/// The ops whose float results may differ in the last bits: transcendental functions
/// (tract has its own f32 kernels), sums (the order of additions may differ) and `Div`
/// (tract declutters a float `a / b` into `a * (1 / b)`, rounding twice). Every other
/// op, computed in f64 and rounded once, is correctly rounded like tract's f32
/// arithmetic, and must match exactly.
const APPROXIMATE: &[&str] = &["Exp", "Log", "Sin", "Cos", "Pow", "CumSum", "Div"];

/// One input of the node.
enum In {
    /// A graph input: tract computes the op on it at run time.
    Data(Array),
    /// An initializer: for the inputs tract needs to know when it builds the model
    /// (shapes, axes, scales).
    Const(Array),
    /// An omitted optional input (`""`).
    Omitted,
}

/// A one-node model: `op(inputs) {attrs}` in opset `opset`.
struct Case {
    op: &'static str,
    opset: i64,
    attrs: Vec<AttributeProto>,
    inputs: Vec<In>,
    /// The output by the ONNX spec, with the reason tract is not the reference for
    /// this case (it refuses the case or contradicts the spec).
    expected: Option<(Array, &'static str)>,
}

fn case(op: &'static str, opset: i64) -> Case {
    Case {
        op,
        opset,
        attrs: vec![],
        inputs: vec![],
        expected: None,
    }
}

impl Case {
    fn data(mut self, a: Array) -> Case {
        self.inputs.push(In::Data(a));
        self
    }
    fn konst(mut self, a: Array) -> Case {
        self.inputs.push(In::Const(a));
        self
    }
    fn omitted(mut self) -> Case {
        self.inputs.push(In::Omitted);
        self
    }
    fn attr(mut self, a: AttributeProto) -> Case {
        self.attrs.push(a);
        self
    }
    /// Checks against `a` rather than tract, because of `why`.
    fn expect(mut self, a: Array, why: &'static str) -> Case {
        self.expected = Some((a, why));
        self
    }

    /// `Op-opset(f32[2,3], ...) {attrs}`, for failure messages.
    fn label(&self) -> String {
        let inputs: Vec<String> = self
            .inputs
            .iter()
            .map(|i| match i {
                In::Data(a) => format!("{}{:?}{}", dtype(a), a.shape(), small(a)),
                In::Const(a) => format!("const {}{:?}{}", dtype(a), a.shape(), small(a)),
                In::Omitted => "_".into(),
            })
            .collect();
        let attrs: Vec<String> = self
            .attrs
            .iter()
            .map(|a| match (a.i, a.ints.is_empty(), a.f) {
                (Some(i), _, _) => format!("{}={i}", a.name()),
                (None, false, _) => format!("{}={:?}", a.name(), a.ints),
                (None, true, Some(f)) => format!("{}={f}", a.name()),
                _ => a.name().to_string(),
            })
            .collect();
        format!(
            "{}-{}({}) {{{}}}",
            self.op,
            self.opset,
            inputs.join(", "),
            attrs.join(", ")
        )
    }

    /// The model: inputs `x0`, `x1`, ... (graph inputs or initializers), output `y`.
    fn model(&self) -> ModelProto {
        let mut graph = GraphProto {
            name: Some("case".into()),
            ..Default::default()
        };
        let mut node = NodeProto {
            op_type: Some(self.op.into()),
            name: Some("n".into()),
            attribute: self.attrs.clone(),
            output: vec!["y".into()],
            ..Default::default()
        };
        for (i, input) in self.inputs.iter().enumerate() {
            let name = format!("x{i}");
            match input {
                In::Data(a) => graph.input.push(value_info(&name, Some(a))),
                In::Const(a) => graph.initializer.push(a.to_proto(&name)),
                In::Omitted => {
                    node.input.push(String::new());
                    continue;
                }
            }
            node.input.push(name);
        }
        graph.node.push(node);
        graph.output.push(value_info("y", None));
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(self.opset),
            }],
            graph: Some(graph),
            ..Default::default()
        }
    }

    /// tract's output: the model optimised for the inputs' shapes, then run.
    fn tract(&self) -> Result<Array, String> {
        let bytes = self.model().encode_to_vec();
        let pb = tract_onnx::pb::ModelProto::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
        let parsed = tract_onnx::onnx()
            .parse(&pb, None)
            .map_err(|e| format!("{e:?}"))?;
        let plan = parsed
            .model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| format!("{e:?}"))?;
        let inputs: TVec<TValue> = self
            .inputs
            .iter()
            .filter_map(|i| match i {
                In::Data(a) => Some(to_tract(a.clone()).unwrap().into()),
                _ => None,
            })
            .collect();
        let mut out = plan.run(inputs).map_err(|e| format!("{e:?}"))?;
        let mut t = out.remove(0).into_tensor();
        if t.datum_type() == TDim::datum_type() {
            // tract-onnx computes int64 shapes and casts to int64 as symbolic dims.
            t = t.cast_to::<i64>().map_err(|e| e.to_string())?.into_owned();
        }
        from_tract(t).map_err(|e| e.to_string())
    }

    /// The interpreter's output: every input an initializer, `y` evaluated from them.
    fn interp(&self) -> Result<Array, InterpError> {
        let mut proto = self.model().graph.unwrap();
        for input in std::mem::take(&mut proto.input) {
            let i: usize = input.name()[1..].parse().unwrap();
            let In::Data(a) = &self.inputs[i] else {
                unreachable!()
            };
            proto.initializer.push(a.to_proto(input.name()));
        }
        let graph = Graph::from_proto(proto, |_| Ok(None)).unwrap();
        interp::evaluate(&graph, graph.value_by_name("y").unwrap())
    }

    /// Runs both (or the interpreter and [`Case::expected`]); `Err` says how they
    /// disagree.
    fn check(&self) -> Result<(), String> {
        let want = match &self.expected {
            Some((a, _)) => a.clone(),
            None => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.tract()))
                .map_err(|_| "tract panicked".to_string())?
                .map_err(|e| format!("tract failed: {e}"))?,
        };
        let got = self
            .interp()
            .map_err(|e| format!("interpreter failed: {e}"))?;
        let tol = if APPROXIMATE.contains(&self.op) {
            REL_TOL
        } else {
            0.0
        };
        agree(&got, &want, tol).map_err(|e| {
            let inputs: Vec<String> = self
                .inputs
                .iter()
                .filter_map(|i| match i {
                    In::Data(a) | In::Const(a) => Some(values(a)),
                    In::Omitted => None,
                })
                .collect();
            format!(
                "{e}\n      inputs: {}\n      interp: {}\n      {}:  {}",
                inputs.join(" "),
                values(&got),
                match &self.expected {
                    Some((_, why)) => format!("spec ({why})"),
                    None => "tract".into(),
                },
                values(&want)
            )
        })
    }
}

fn dtype(a: &Array) -> &'static str {
    lora_graft::dtype::name(a.elem_type())
}

/// ` = values` for tensors of at most 4 elements (axes, starts, ...), else nothing.
fn small(a: &Array) -> String {
    if a.len() <= 4 {
        format!(" = {}", values(a))
    } else {
        String::new()
    }
}

fn values(a: &Array) -> String {
    let text = lora_graft::for_each_array!(a, x => format!("{:?}", x.iter().collect::<Vec<_>>()));
    text.chars().take(300).collect()
}

/// Same type, same shape; exact for integers and bools, `tol` relative for floats
/// (NaN matches NaN).
fn agree(got: &Array, want: &Array, tol: f64) -> Result<(), String> {
    if dtype(got) != dtype(want) || got.shape() != want.shape() {
        return Err(format!(
            "interp gives {}{:?}, tract {}{:?}",
            dtype(got),
            got.shape(),
            dtype(want),
            want.shape()
        ));
    }
    let float = matches!(got, Array::F32(_) | Array::F64(_) | Array::F16(_));
    let (g, w) = (got.to_f64(), want.to_f64());
    if !float {
        // Exact, on the values themselves (to_f64 is exact for these types' test values,
        // but compare the arrays to be sure).
        return if got == want {
            Ok(())
        } else {
            Err("values differ".into())
        };
    }
    for (i, (&a, &b)) in g.iter().zip(w.iter()).enumerate() {
        let ok =
            a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol * a.abs().max(b.abs());
        if !ok {
            return Err(format!("element {i}: interp {a:e}, tract {b:e}"));
        }
    }
    Ok(())
}

fn value_info(name: &str, a: Option<&Array>) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: a.map(|a| TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(a.elem_type()),
                shape: Some(TensorShapeProto {
                    dim: a
                        .shape()
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(dimension::Value::DimValue(d as i64)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

// --- attributes ---

fn attr(name: &str, t: AttributeType) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(t as i32),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        i: Some(v),
        ..attr(name, AttributeType::Int)
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        ints: v.to_vec(),
        ..attr(name, AttributeType::Ints)
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        f: Some(v),
        ..attr(name, AttributeType::Float)
    }
}

fn floats(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto {
        floats: v.to_vec(),
        ..attr(name, AttributeType::Floats)
    }
}

fn tensor(name: &str, a: &Array) -> AttributeProto {
    AttributeProto {
        t: Some(a.to_proto("")),
        ..attr(name, AttributeType::Tensor)
    }
}

// --- values ---

fn build<T>(shape: &[usize], f: impl FnMut() -> T) -> ArrayD<T> {
    let n = shape.iter().product();
    ArrayD::from_shape_vec(IxDyn(shape), std::iter::repeat_with(f).take(n).collect()).unwrap()
}

/// Uniform floats in `[lo, hi)`.
fn f32s(r: &mut Rng, shape: &[usize], lo: f64, hi: f64) -> Array {
    Array::F32(build(shape, || r.uniform_in(lo, hi) as f32))
}

/// Uniform floats in `[lo, hi)` as f64.
fn f64s(r: &mut Rng, shape: &[usize], lo: f64, hi: f64) -> Array {
    Array::F64(build(shape, || r.uniform_in(lo, hi)))
}

/// Uniform integers in `[lo, hi]`.
fn int_in(r: &mut Rng, lo: i64, hi: i64) -> i64 {
    lo + (r.next_u64() % (hi - lo + 1) as u64) as i64
}

fn i64s(r: &mut Rng, shape: &[usize], lo: i64, hi: i64) -> Array {
    Array::I64(build(shape, || int_in(r, lo, hi)))
}

fn i32s(r: &mut Rng, shape: &[usize], lo: i64, hi: i64) -> Array {
    Array::I32(build(shape, || int_in(r, lo, hi) as i32))
}

/// Non-zero integers in `[-hi, hi]` (divisors).
fn nonzero_i64s(r: &mut Rng, shape: &[usize], hi: i64) -> Array {
    Array::I64(build(shape, || {
        let v = int_in(r, 1, hi);
        if r.next_u64() >> 63 == 0 {
            v
        } else {
            -v
        }
    }))
}

fn bools(r: &mut Rng, shape: &[usize]) -> Array {
    Array::Bool(build(shape, || r.next_u64() >> 63 == 0))
}

fn vec_i64(v: &[i64]) -> Array {
    Array::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
}

fn vec_i32(v: &[i32]) -> Array {
    Array::I32(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
}

fn vec_f32(v: &[f32]) -> Array {
    Array::F32(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
}

fn scalar_i64(v: i64) -> Array {
    Array::I64(ArrayD::from_elem(IxDyn(&[]), v))
}

fn scalar_i32(v: i32) -> Array {
    Array::I32(ArrayD::from_elem(IxDyn(&[]), v))
}

fn scalar_f32(v: f32) -> Array {
    Array::F32(ArrayD::from_elem(IxDyn(&[]), v))
}

/// The inputs of a Slice case: starts, ends, axes, steps.
type SliceArgs<'a> = (&'a [i64], &'a [i64], Option<&'a [i64]>, Option<&'a [i64]>);

/// Shapes: a scalar, rank 1, rank 3.
const S0: &[usize] = &[];
const S1: &[usize] = &[5];
const S3: &[usize] = &[2, 3, 4];

fn cases() -> Vec<Case> {
    let r = &mut Rng::new(0x1_4e7e);
    let mut c = Vec::with_capacity(400);

    // Identity, Constant, Cast, Shape, Size.
    c.push(case("Identity", 13).data(f32s(r, S3, -4.0, 4.0)));
    c.push(case("Identity", 13).data(i64s(r, S0, -9, 9)));
    c.push(case("Identity", 13).data(bools(r, S1)));
    c.push(case("Constant", 13).attr(tensor("value", &f32s(r, &[2, 3], -4.0, 4.0))));
    c.push(case("Constant", 13).attr(tensor("value", &i64s(r, S0, -9, 9))));
    c.push(case("Constant", 13).attr(tensor("value", &bools(r, S1))));
    c.push(case("Constant", 13).attr(int("value_int", -7)));
    c.push(case("Constant", 13).attr(ints("value_ints", &[3, -1, 0])));
    c.push(case("Constant", 13).attr(float("value_float", 0.25)));
    c.push(case("Constant", 13).attr(floats("value_floats", &[1.5, -2.0])));
    let to = |t: DataType| int("to", t as i64);
    for (x, target) in [
        (f32s(r, S3, -100.0, 100.0), DataType::Int64),
        (f32s(r, S1, -100.0, 100.0), DataType::Int32),
        (f32s(r, S3, -100.0, 100.0), DataType::Int8),
        (f32s(r, S3, 0.0, 255.0), DataType::Uint8),
        (f32s(r, S3, -4.0, 4.0), DataType::Double),
        (f32s(r, S3, -4.0, 4.0), DataType::Float16),
        (f32s(r, S0, -4.0, 4.0), DataType::Float),
        (
            vec_f32(&[0.0, -0.0, 1.5, -2.0, f32::INFINITY]),
            DataType::Bool,
        ),
        (i64s(r, S3, -1000, 1000), DataType::Float),
        (i64s(r, S3, -1000, 1000), DataType::Int32),
        (i64s(r, S1, -1, 1), DataType::Bool),
        (i64s(r, S0, -9, 9), DataType::Double),
        // Above 2^53: i64 -> f64 -> f32 rounds twice, i64 -> f32 once.
        (
            vec_i64(&[
                (1 << 60) + (1 << 36) + 1,
                -(1 << 60) - (1 << 36) - 1,
                1 << 62,
            ]),
            DataType::Float,
        ),
        (i32s(r, S3, -1000, 1000), DataType::Int64),
        (i32s(r, S1, -1000, 1000), DataType::Float),
        (bools(r, S3), DataType::Float),
        (bools(r, S1), DataType::Int64),
        (bools(r, S0), DataType::Int32),
        (
            Array::U8(build(S3, || int_in(r, 0, 255) as u8)),
            DataType::Float,
        ),
        (
            Array::I8(build(S3, || int_in(r, -128, 127) as i8)),
            DataType::Int64,
        ),
        (
            Array::F16(build(S3, || half::f16::from_f64(r.uniform_in(-4.0, 4.0)))),
            DataType::Float,
        ),
    ] {
        c.push(case("Cast", 13).data(x).attr(to(target)));
    }
    c.push(case("Shape", 13).data(f32s(r, S3, -1.0, 1.0)));
    c.push(case("Shape", 13).data(i64s(r, S0, -1, 1)));
    for (start, end) in [
        (1, None),
        (-2, None),
        (0, Some(-1)),
        (-9, Some(9)),
        (2, Some(1)),
    ] {
        let mut k = case("Shape", 15)
            .data(bools(r, &[2, 3, 4, 1]))
            .attr(int("start", start));
        if let Some(e) = end {
            k = k.attr(int("end", e));
        }
        c.push(k);
    }
    c.push(case("Size", 13).data(f32s(r, S3, -1.0, 1.0)));
    c.push(case("Size", 13).data(i64s(r, S0, -1, 1)));
    c.push(case("Size", 13).data(bools(r, &[3, 0])));

    // Binary arithmetic, with numpy broadcasting.
    for op in ["Add", "Sub", "Mul"] {
        c.push(
            case(op, 14)
                .data(f32s(r, &[2, 1, 4], -4.0, 4.0))
                .data(f32s(r, &[3, 1], -4.0, 4.0)),
        );
        c.push(
            case(op, 14)
                .data(f32s(r, S0, -4.0, 4.0))
                .data(f32s(r, S0, -4.0, 4.0)),
        );
        c.push(
            case(op, 14)
                .data(i64s(r, S0, -99, 99))
                .data(i64s(r, S1, -99, 99)),
        );
        c.push(
            case(op, 14)
                .data(i64s(r, S3, -99, 99))
                .data(i64s(r, &[4], -99, 99)),
        );
        c.push(
            case(op, 14)
                .data(i32s(r, &[3, 1], -99, 99))
                .data(i32s(r, &[1, 4], -99, 99)),
        );
        c.push(
            case(op, 14)
                .data(f64s(r, S3, -4.0, 4.0))
                .data(f64s(r, S0, -4.0, 4.0)),
        );
    }
    c.push(
        case("Div", 14)
            .data(f32s(r, S3, -4.0, 4.0))
            .data(f32s(r, &[3, 1], 0.5, 4.0)),
    );
    c.push(
        case("Div", 14)
            .data(f32s(r, S0, -4.0, 4.0))
            .data(f32s(r, S1, -4.0, -0.5)),
    );
    c.push(
        case("Div", 14)
            .data(i64s(r, S3, -99, 99))
            .data(nonzero_i64s(r, &[4], 9)),
    );
    c.push(
        case("Div", 14)
            .data(i64s(r, S0, -99, 99))
            .data(nonzero_i64s(r, S0, 9)),
    );
    c.push(
        case("Div", 14)
            .data(i32s(r, &[2, 5], -99, 99))
            .data(vec_i32(&[3, -3, 7, -7, 1])),
    );
    // Mod: integers follow Python's % (fmod = 0), floats C's fmod (fmod = 1).
    c.push(
        case("Mod", 13)
            .data(i64s(r, S3, -99, 99))
            .data(nonzero_i64s(r, &[4], 9)),
    );
    c.push(
        case("Mod", 13)
            .data(i64s(r, S1, -99, 99))
            .data(nonzero_i64s(r, S0, 9)),
    );
    const SWAP: &str = "tract computes divisor % dividend when the dividend is a broadcast scalar";
    c.push(
        case("Mod", 13)
            .data(scalar_i64(-37))
            .data(vec_i64(&[2, 5, -4, -9, 37]))
            .expect(vec_i64(&[1, 3, -1, -1, 0]), SWAP),
    );
    c.push(
        case("Mod", 13)
            .data(i64s(r, S3, -99, 99))
            .data(nonzero_i64s(r, &[4], 9))
            .attr(int("fmod", 1)),
    );
    c.push(
        case("Mod", 13)
            .data(i32s(r, &[2, 4], -99, 99))
            .data(vec_i32(&[3, -3, 7, -7])),
    );
    c.push(
        case("Mod", 13)
            .data(f32s(r, S3, -9.0, 9.0))
            .data(f32s(r, &[4], 0.5, 3.0))
            .attr(int("fmod", 1)),
    );
    c.push(
        case("Mod", 13)
            .data(f32s(r, S1, -9.0, 9.0))
            .data(f32s(r, S0, -3.0, -0.5))
            .attr(int("fmod", 1)),
    );
    c.push(
        case("Mod", 13)
            .data(scalar_f32(7.5))
            .data(vec_f32(&[2.0, -2.0, 4.0, 0.75]))
            .attr(int("fmod", 1))
            .expect(vec_f32(&[1.5, 1.5, 3.5, 0.0]), SWAP),
    );
    for op in ["Max", "Min"] {
        c.push(
            case(op, 13)
                .data(f32s(r, &[2, 1, 4], -4.0, 4.0))
                .data(f32s(r, &[3, 1], -4.0, 4.0))
                .data(f32s(r, S0, -4.0, 4.0)),
        );
        c.push(
            case(op, 13)
                .data(i64s(r, S1, -9, 9))
                .data(i64s(r, S0, -9, 9)),
        );
        c.push(
            case(op, 13)
                .data(i32s(r, S3, -9, 9))
                .data(i32s(r, &[3, 4], -9, 9)),
        );
        c.push(case(op, 13).data(f32s(r, S3, -4.0, 4.0)));
    }
    c.push(
        case("Pow", 15)
            .data(f32s(r, S3, 0.1, 4.0))
            .data(f32s(r, &[4], -2.0, 2.0)),
    );
    c.push(
        case("Pow", 15)
            .data(f32s(r, S1, -4.0, 4.0))
            .data(i64s(r, S1, 0, 5)),
    );
    c.push(
        case("Pow", 15)
            .data(f32s(r, S0, 0.1, 4.0))
            .data(scalar_f32(0.5)),
    );
    c.push(
        case("Pow", 15)
            .data(f32s(r, S3, -4.0, 4.0))
            .data(i32s(r, &[3, 1], -3, 3)),
    );
    c.push(
        case("Pow", 15)
            .data(f64s(r, S1, -4.0, 4.0))
            .data(i64s(r, S0, -3, 3)),
    );
    c.push(
        case("Pow", 15)
            .data(f64s(r, S1, 0.1, 4.0))
            .data(f64s(r, S1, -2.0, 2.0)),
    );
    c.push(
        case("Pow", 15)
            .data(i64s(r, S3, -9, 9))
            .data(i64s(r, &[4], 0, 5)),
    );

    // Unary ops.
    for op in ["Neg", "Abs"] {
        c.push(case(op, 13).data(f32s(r, S3, -4.0, 4.0)));
        c.push(case(op, 13).data(i64s(r, S1, -99, 99)));
        c.push(case(op, 13).data(i32s(r, S0, -99, 99)));
        c.push(case(op, 13).data(f64s(r, S1, -4.0, 4.0)));
    }
    for (op, lo, hi) in [
        ("Sqrt", 0.0, 100.0),
        ("Reciprocal", 0.25, 4.0),
        ("Exp", -10.0, 10.0),
        ("Log", 0.01, 100.0),
        ("Cos", -10.0, 10.0),
        ("Sin", -10.0, 10.0),
        ("Floor", -10.0, 10.0),
        ("Ceil", -10.0, 10.0),
    ] {
        c.push(case(op, 13).data(f32s(r, S3, lo, hi)));
        c.push(case(op, 13).data(f32s(r, S0, lo, hi)));
        c.push(case(op, 13).data(f64s(r, S1, lo, hi)));
    }
    c.push(case("Reciprocal", 13).data(f32s(r, S1, -4.0, -0.25)));
    // NaN, infinities and signed zeros. Max and Min pick the number over a NaN, like
    // tract (the ONNX reference implementation, numpy's maximum, propagates the NaN).
    let nan = f32::NAN;
    let odd = || vec_f32(&[nan, 1.0, nan, f32::INFINITY, -0.0, 0.0, -1.0]);
    let other = || vec_f32(&[2.0, nan, nan, 1.0, 0.0, -0.0, f32::NEG_INFINITY]);
    for op in [
        "Max",
        "Min",
        "Add",
        "Mul",
        "Equal",
        "Less",
        "GreaterOrEqual",
    ] {
        c.push(case(op, 13).data(odd()).data(other()));
    }
    for op in [
        "Neg",
        "Abs",
        "Sqrt",
        "Floor",
        "Ceil",
        "Reciprocal",
        "Exp",
        "Log",
    ] {
        c.push(case(op, 13).data(odd()));
    }

    // Comparisons (small integer ranges so that equal pairs occur) and logic.
    for op in ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"] {
        c.push(
            case(op, 13)
                .data(i64s(r, S3, -2, 2))
                .data(i64s(r, &[4], -2, 2)),
        );
        c.push(
            case(op, 13)
                .data(i32s(r, S0, -2, 2))
                .data(i32s(r, S1, -2, 2)),
        );
        let x = Array::F32(build(&[3, 4], || int_in(r, -2, 2) as f32 * 0.5));
        let y = Array::F32(build(&[3, 1], || int_in(r, -2, 2) as f32 * 0.5));
        c.push(case(op, 13).data(x).data(y));
        c.push(
            case(op, 13)
                .data(f32s(r, S1, -1.0, 1.0))
                .data(f32s(r, S0, -1.0, 1.0)),
        );
    }
    let b = |v: &[bool], shape: &[usize]| {
        Array::Bool(ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).unwrap())
    };
    c.push(
        case("Equal", 13)
            .data(b(&[true, false, false, true], &[2, 2]))
            .data(b(&[true, false], &[2]))
            .expect(
                b(&[true, true, false, false], &[2, 2]),
                "tract's Equal refuses bool, which ONNX allows since opset 11",
            ),
    );
    c.push(case("Not", 1).data(bools(r, S3)));
    c.push(case("Not", 1).data(bools(r, S0)));
    for op in ["And", "Or", "Xor"] {
        c.push(case(op, 7).data(bools(r, S3)).data(bools(r, &[3, 1])));
        c.push(case(op, 7).data(bools(r, S0)).data(bools(r, S1)));
    }
    c.push(
        case("Where", 16)
            .data(bools(r, &[3, 1]))
            .data(f32s(r, S3, -4.0, 4.0))
            .data(f32s(r, &[4], -4.0, 4.0)),
    );
    c.push(
        case("Where", 16)
            .data(bools(r, S1))
            .data(i64s(r, S0, -9, 9))
            .data(i64s(r, S1, -9, 9)),
    );
    c.push(
        case("Where", 16)
            .data(bools(r, S0))
            .data(bools(r, S3))
            .data(bools(r, S0)),
    );
    c.push(
        case("Where", 16)
            .data(bools(r, &[2, 1, 1]))
            .data(i32s(r, &[3, 1], -9, 9))
            .data(i32s(r, &[4], -9, 9)),
    );

    // Unsqueeze and Squeeze: axes as an attribute (opset 11) or an input (opset 13).
    for axes in [&[0][..], &[-1], &[0, 4], &[-1, 1], &[3, -5]] {
        c.push(
            case("Unsqueeze", 11)
                .data(f32s(r, S3, -1.0, 1.0))
                .attr(ints("axes", axes)),
        );
        c.push(
            case("Unsqueeze", 13)
                .data(i64s(r, S3, -9, 9))
                .konst(vec_i64(axes)),
        );
    }
    c.push(
        case("Unsqueeze", 13)
            .data(f32s(r, S0, -1.0, 1.0))
            .konst(vec_i64(&[0])),
    );
    c.push(
        case("Unsqueeze", 13)
            .data(bools(r, S0))
            .konst(vec_i64(&[-1, 0])),
    );
    c.push(
        case("Unsqueeze", 11)
            .data(i64s(r, S1, -9, 9))
            .attr(ints("axes", &[-2])),
    );
    let ones = &[1, 3, 1, 4, 1];
    for axes in [&[0][..], &[-1], &[0, 2], &[-3, 4]] {
        c.push(
            case("Squeeze", 11)
                .data(f32s(r, ones, -1.0, 1.0))
                .attr(ints("axes", axes)),
        );
        c.push(
            case("Squeeze", 13)
                .data(i64s(r, ones, -9, 9))
                .konst(vec_i64(axes)),
        );
    }
    let x = f32s(r, ones, -1.0, 1.0);
    let Array::F32(squeezed) = &x else {
        unreachable!()
    };
    let squeezed = Array::F32(squeezed.to_shape(IxDyn(&[3, 4])).unwrap().to_owned());
    c.push(case("Squeeze", 11).data(x).expect(
        squeezed,
        "tract's Squeeze-11 requires 'axes', optional in ONNX (all 1-dims)",
    ));
    c.push(case("Squeeze", 13).data(bools(r, ones)));
    c.push(case("Squeeze", 13).data(i64s(r, &[1], -9, 9)));
    c.push(
        case("Squeeze", 13)
            .data(i64s(r, &[1, 1], -9, 9))
            .konst(vec_i64(&[1])),
    );

    // Reshape and Flatten.
    for shape in [
        &[4, 6][..],
        &[-1, 2],
        &[0, -1],
        &[2, 0, 2, 2],
        &[24],
        &[1, -1, 1],
    ] {
        c.push(
            case("Reshape", 14)
                .data(f32s(r, S3, -1.0, 1.0))
                .konst(vec_i64(shape)),
        );
    }
    c.push(
        case("Reshape", 14)
            .data(i64s(r, &[1, 1], -9, 9))
            .konst(vec_i64(&[])),
    );
    c.push(
        case("Reshape", 14)
            .data(bools(r, S0))
            .konst(vec_i64(&[1, 1, 1])),
    );
    c.push(
        case("Reshape", 14)
            .data(f32s(r, &[2, 0, 3], -1.0, 1.0))
            .konst(vec_i64(&[0, 3]))
            .attr(int("allowzero", 1)),
    );
    c.push(
        case("Reshape", 5)
            .data(i64s(r, S3, -9, 9))
            .konst(vec_i64(&[4, 0, -1])),
    );
    c.push(case("Flatten", 13).data(f32s(r, S3, -1.0, 1.0)));
    for axis in [0, 1, 2, 3, -1, -3] {
        c.push(
            case("Flatten", 13)
                .data(i64s(r, S3, -9, 9))
                .attr(int("axis", axis)),
        );
    }
    c.push(case("Flatten", 13).data(bools(r, S1)).attr(int("axis", 0)));
    c.push(case("Flatten", 13).data(f32s(r, &[0, 3], -1.0, 1.0)));
    c.push(
        case("Flatten", 13)
            .data(i64s(r, &[2, 0, 3], -9, 9))
            .attr(int("axis", 2))
            .expect(
                Array::I64(ArrayD::zeros(IxDyn(&[0, 3]))),
                "ONNX gives [d0 * d1, d2]; tract's Flatten fails on the zero-size dim",
            ),
    );

    // Concat, Gather, Slice, Transpose, Expand.
    for axis in [0, 1, 2, -1, -3] {
        let mut shapes = [[2, 3, 4]; 3];
        for (k, s) in shapes.iter_mut().enumerate() {
            let a = if axis < 0 { axis + 3 } else { axis } as usize;
            s[a] = k + 1;
        }
        c.push(
            case("Concat", 13)
                .data(f32s(r, &shapes[0], -1.0, 1.0))
                .data(f32s(r, &shapes[1], -1.0, 1.0))
                .data(f32s(r, &shapes[2], -1.0, 1.0))
                .attr(int("axis", axis)),
        );
    }
    c.push(
        case("Concat", 13)
            .data(i64s(r, &[2], -9, 9))
            .data(i64s(r, &[1], -9, 9))
            .attr(int("axis", 0)),
    );
    c.push(
        case("Concat", 13)
            .data(bools(r, &[2, 3]))
            .attr(int("axis", -1)),
    );
    for (axis, indices) in [
        (0, vec_i64(&[1, 0, -1, 1])),
        (
            1,
            Array::I64(ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![0, -3, 2, 1]).unwrap()),
        ),
        (-1, scalar_i64(-2)),
        (2, vec_i32(&[3, 0])),
        (-2, scalar_i32(1)),
    ] {
        c.push(
            case("Gather", 13)
                .data(f32s(r, S3, -1.0, 1.0))
                .data(indices)
                .attr(int("axis", axis)),
        );
    }
    c.push(
        case("Gather", 13)
            .data(i64s(r, S1, -9, 9))
            .data(scalar_i64(-1)),
    );
    c.push(
        case("Gather", 13)
            .data(bools(r, &[3, 2]))
            .data(vec_i64(&[2, 2, 0])),
    );
    let (max, min) = (i64::MAX, i64::MIN);
    // (starts, ends, axes, steps). A negative step with a start below -dim selects
    // nothing, as in numpy, tract and the ONNX reference implementation (the spec's
    // text clamps such a start to 0).
    let slices: &[SliceArgs] = &[
        (&[0, 1], &[1, 3], None, None),
        (&[1], &[max], Some(&[-1]), None),
        (&[-2, 0], &[max, -1], Some(&[1, 2]), None),
        (&[0], &[max], Some(&[2]), Some(&[2])),
        (&[-1], &[min], Some(&[2]), Some(&[-1])),
        (&[3, -1], &[0, min], Some(&[-1, 0]), Some(&[-2, -1])),
        (&[2], &[-9], Some(&[1]), Some(&[-1])),
        (&[-9], &[min], Some(&[2]), Some(&[-1])),
        (&[9], &[-9], Some(&[2]), Some(&[-3])),
        (&[5], &[9], Some(&[2]), None),
        (&[-5], &[1], Some(&[0]), Some(&[3])),
    ];
    for (starts, ends, axes, steps) in slices {
        let mut k = case("Slice", 13)
            .data(f32s(r, S3, -1.0, 1.0))
            .konst(vec_i64(starts))
            .konst(vec_i64(ends));
        k = match axes {
            Some(a) => k.konst(vec_i64(a)),
            None if steps.is_some() => k.omitted(),
            None => k,
        };
        if let Some(s) = steps {
            k = k.konst(vec_i64(s));
        }
        c.push(k);
    }
    c.push(
        case("Slice", 13)
            .data(i64s(r, &[6], -9, 9))
            .konst(vec_i32(&[-4]))
            .konst(vec_i32(&[-1])),
    );
    c.push(
        case("Slice", 10)
            .data(bools(r, &[4, 3]))
            .konst(vec_i64(&[3]))
            .konst(vec_i64(&[0]))
            .konst(vec_i64(&[0]))
            .konst(vec_i64(&[-1])),
    );
    c.push(case("Transpose", 13).data(f32s(r, S3, -1.0, 1.0)));
    c.push(
        case("Transpose", 13)
            .data(i64s(r, S3, -9, 9))
            .attr(ints("perm", &[1, 2, 0])),
    );
    c.push(case("Transpose", 13).data(bools(r, S1)));
    c.push(
        case("Transpose", 13)
            .data(f32s(r, &[2, 1, 3, 2], -1.0, 1.0))
            .attr(ints("perm", &[3, 0, 2, 1])),
    );
    for (x, shape) in [
        (f32s(r, &[3, 1], -1.0, 1.0), vec_i64(&[2, 1, 4])),
        (f32s(r, &[3, 1], -1.0, 1.0), vec_i64(&[1])),
        (i64s(r, S0, -9, 9), vec_i64(&[2, 3])),
        (bools(r, &[1, 4]), vec_i64(&[3, 1])),
        (i64s(r, S1, -9, 9), vec_i64(&[])),
    ] {
        c.push(case("Expand", 13).data(x).konst(shape));
    }

    // ConstantOfShape, Range, CumSum, Trilu, DequantizeLinear.
    c.push(case("ConstantOfShape", 9).konst(vec_i64(&[2, 3])).expect(
        Array::F32(ArrayD::zeros(IxDyn(&[2, 3]))),
        "without 'value' ONNX says float32 zeros, tract gives float64",
    ));
    c.push(
        case("ConstantOfShape", 9)
            .konst(vec_i64(&[4]))
            .attr(tensor("value", &vec_i64(&[-7]))),
    );
    c.push(
        case("ConstantOfShape", 9)
            .konst(vec_i64(&[2, 0, 3]))
            .attr(tensor("value", &vec_f32(&[1.5]))),
    );
    c.push(
        case("ConstantOfShape", 9)
            .konst(vec_i64(&[]))
            .attr(tensor("value", &vec_i32(&[3]))),
    );
    c.push(
        case("ConstantOfShape", 9)
            .konst(vec_i64(&[3, 1]))
            .attr(tensor(
                "value",
                &Array::Bool(ArrayD::from_elem(IxDyn(&[1]), true)),
            )),
    );
    for (s, l, d) in [(0, 5, 1), (2, 11, 3), (10, -3, -4), (5, 5, 1), (-7, 7, 7)] {
        c.push(
            case("Range", 11)
                .konst(scalar_i64(s))
                .konst(scalar_i64(l))
                .konst(scalar_i64(d)),
        );
    }
    c.push(
        case("Range", 11)
            .konst(scalar_i64(5))
            .konst(scalar_i64(0))
            .konst(scalar_i64(2))
            .expect(
                vec_i64(&[]),
                "ONNX clamps the count max(ceil((limit - start) / delta), 0); tract fails",
            ),
    );
    c.push(
        case("Range", 11)
            .konst(scalar_i32(-3))
            .konst(scalar_i32(8))
            .konst(scalar_i32(2)),
    );
    // Float ranges on dyadic values, so that start + i * delta is exact in f32.
    for (s, l, d) in [(0.0, 2.0, 0.25), (1.5, -2.0, -0.5), (-1.0, 1.0, 0.375)] {
        c.push(
            case("Range", 11)
                .data(scalar_f32(s))
                .data(scalar_f32(l))
                .data(scalar_f32(d)),
        );
    }
    for (exclusive, reverse) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
        for (x, axis) in [
            (f32s(r, S3, -1.0, 1.0), scalar_i64(1)),
            (i64s(r, S3, -9, 9), scalar_i32(-1)),
            (i32s(r, S1, -9, 9), scalar_i64(0)),
        ] {
            c.push(
                case("CumSum", 14)
                    .data(x)
                    .konst(axis)
                    .attr(int("exclusive", exclusive))
                    .attr(int("reverse", reverse)),
            );
        }
    }
    c.push(
        case("CumSum", 14)
            .data(f64s(r, &[3, 4], -1.0, 1.0))
            .konst(scalar_i64(-2)),
    );
    c.push(case("Trilu", 14).data(f32s(r, &[4, 5], -1.0, 1.0)));
    c.push(
        case("Trilu", 14)
            .data(i64s(r, S3, -9, 9))
            .attr(int("upper", 0)),
    );
    for k in [-1, 2, -9, 9] {
        for upper in [0, 1] {
            c.push(
                case("Trilu", 14)
                    .data(f32s(r, &[2, 4, 3], -1.0, 1.0))
                    .konst(scalar_i64(k))
                    .attr(int("upper", upper)),
            );
        }
    }
    c.push(
        case("Trilu", 14)
            .data(bools(r, &[3, 3]))
            .attr(int("upper", 1)),
    );
    let u8s = |r: &mut Rng, shape: &[usize]| Array::U8(build(shape, || int_in(r, 0, 255) as u8));
    let i8s = |r: &mut Rng, shape: &[usize]| Array::I8(build(shape, || int_in(r, -128, 127) as i8));
    c.push(
        case("DequantizeLinear", 13)
            .data(u8s(r, S3))
            .konst(scalar_f32(0.037))
            .konst(Array::U8(ArrayD::from_elem(IxDyn(&[]), 131))),
    );
    c.push(
        case("DequantizeLinear", 13)
            .data(i8s(r, S1))
            .konst(scalar_f32(0.5)),
    );
    c.push(
        case("DequantizeLinear", 13)
            .data(i8s(r, S0))
            .konst(scalar_f32(1.25))
            .konst(Array::I8(ArrayD::from_elem(IxDyn(&[]), -3))),
    );
    c.push(
        case("DequantizeLinear", 13)
            .data(i32s(r, S3, -1000, 1000))
            .konst(scalar_f32(0.001)),
    );
    c.push(
        case("DequantizeLinear", 13)
            .data(u8s(r, S3))
            .konst(f32s(r, &[3], 0.01, 0.1))
            .konst(Array::U8(build(&[3], || int_in(r, 0, 255) as u8))),
    );
    c.push(
        case("DequantizeLinear", 13)
            .data(i8s(r, S3))
            .konst(f32s(r, &[2], 0.01, 0.1))
            .konst(Array::I8(build(&[2], || int_in(r, -9, 9) as i8)))
            .attr(int("axis", 0)),
    );
    c.push(
        case("DequantizeLinear", 13)
            .data(u8s(r, S3))
            .konst(f32s(r, &[4], 0.01, 0.1))
            .konst(Array::U8(build(&[4], || int_in(r, 0, 255) as u8)))
            .attr(int("axis", -1)),
    );
    c
}

#[test]
fn every_op_agrees_with_tract() {
    let cases = cases();
    let start = std::time::Instant::now();
    let mut failures = Vec::new();
    for k in &cases {
        if let Err(e) = k.check() {
            failures.push(format!("{}\n    {e}", k.label()));
        }
    }
    eprintln!(
        "{} cases over {} ops in {:.2?}",
        cases.len(),
        interp::ops().count(),
        start.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases disagree:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn every_implemented_op_has_a_case() {
    let cases = cases();
    let ops: Vec<&str> = interp::ops().collect();
    let missing: Vec<&str> = ops
        .iter()
        .copied()
        .filter(|op| !cases.iter().any(|k| k.op == *op))
        .collect();
    assert!(missing.is_empty(), "ops without a case: {missing:?}");
    let unknown: Vec<&str> = cases
        .iter()
        .map(|k| k.op)
        .filter(|op| !ops.contains(op))
        .collect();
    assert!(
        unknown.is_empty(),
        "cases for ops the interpreter lacks: {unknown:?}"
    );
}

/// What an error must be.
type ErrorKind = fn(&InterpError) -> bool;

/// Nodes the interpreter must refuse with an error, never a panic (the fold pass runs
/// it on untrusted models), and the kind of error each gets.
#[test]
fn malformed_nodes_are_errors_not_panics() {
    use InterpError as E;
    let r = &mut Rng::new(7);
    let empty = || vec_i64(&[]);
    let cases: Vec<(Case, ErrorKind)> = vec![
        (
            case("Foo", 13).data(scalar_f32(1.0)),
            |e| matches!(e, E::Unsupported { op } if op == "Foo"),
        ),
        (case("Add", 14).data(scalar_f32(1.0)), |e| {
            matches!(e, E::MissingInput { index: 1 })
        }),
        (
            case("Add", 14)
                .data(f32s(r, &[2], -1.0, 1.0))
                .data(f32s(r, &[3], -1.0, 1.0)),
            |e| matches!(e, E::Broadcast { .. }),
        ),
        (
            case("Add", 14).data(scalar_f32(1.0)).data(scalar_i64(1)),
            |e| matches!(e, E::OperandTypes { .. }),
        ),
        (case("Sqrt", 13).data(scalar_i64(4)), |e| {
            matches!(
                e,
                E::DType {
                    expected: "float",
                    got: "int64"
                }
            )
        }),
        (case("Not", 1).data(scalar_i64(1)), |e| {
            matches!(
                e,
                E::DType {
                    expected: "bool",
                    ..
                }
            )
        }),
        (
            case("Where", 16)
                .data(scalar_i64(1))
                .data(scalar_f32(1.0))
                .data(scalar_f32(2.0)),
            |e| {
                matches!(
                    e,
                    E::DType {
                        expected: "bool",
                        ..
                    }
                )
            },
        ),
        (
            case("Cast", 13)
                .data(scalar_f32(1.0))
                .attr(int("to", DataType::String as i64)),
            |e| matches!(e, E::Cast { .. }),
        ),
        (
            case("Cast", 13).data(scalar_f32(1.0)),
            |e| matches!(e, E::BadAttribute { name, .. } if name == "to"),
        ),
        (
            case("Mul", 14).data(scalar_f32(1.0)).data(scalar_i64(1)),
            |e| matches!(e, E::OperandTypes { .. }),
        ),
        (
            case("Max", 13)
                .data(scalar_i64(1))
                .data(scalar_i64(1))
                .data(scalar_f32(1.0)),
            |e| matches!(e, E::OperandTypes { .. }),
        ),
        (
            case("Constant", 13),
            |e| matches!(e, E::BadAttribute { name, .. } if name == "value"),
        ),
        (
            case("Range", 11)
                .konst(empty())
                .konst(scalar_i64(3))
                .konst(scalar_i64(1)),
            |e| matches!(e, E::BadInput { index: 0, .. }),
        ),
        (
            case("Range", 11)
                .konst(vec_f32(&[]))
                .konst(scalar_f32(3.0))
                .konst(scalar_f32(1.0)),
            |e| matches!(e, E::BadInput { index: 0, .. }),
        ),
        (
            case("Range", 11)
                .konst(scalar_i64(0))
                .konst(scalar_i64(3))
                .konst(scalar_i64(0)),
            |e| matches!(e, E::BadInput { index: 2, .. }),
        ),
        (
            case("Range", 11)
                .konst(scalar_f32(0.0))
                .konst(scalar_f32(3.0))
                .konst(scalar_f32(0.0)),
            |e| matches!(e, E::BadInput { index: 2, .. }),
        ),
        (
            case("Range", 11)
                .konst(scalar_f32(0.0))
                .konst(scalar_f32(f32::INFINITY))
                .konst(scalar_f32(1.0)),
            |e| matches!(e, E::BadInput { index: 2, .. }),
        ),
        (
            case("CumSum", 14)
                .data(f32s(r, S1, -1.0, 1.0))
                .konst(empty()),
            |e| matches!(e, E::BadInput { index: 1, .. }),
        ),
        (
            case("CumSum", 14)
                .data(scalar_f32(1.0))
                .konst(scalar_i64(0)),
            |e| matches!(e, E::Axis { axis: 0, rank: 0 }),
        ),
        (
            case("Trilu", 14)
                .data(f32s(r, &[2, 2], -1.0, 1.0))
                .konst(empty()),
            |e| matches!(e, E::BadInput { index: 1, .. }),
        ),
        (case("Trilu", 14).data(f32s(r, S1, -1.0, 1.0)), |e| {
            matches!(e, E::BadInput { index: 0, .. })
        }),
        (
            case("Gather", 13).data(scalar_f32(1.0)).data(scalar_i64(0)),
            |e| matches!(e, E::Axis { .. }),
        ),
        (
            case("Gather", 13)
                .data(f32s(r, S1, -1.0, 1.0))
                .data(vec_i64(&[5])),
            |e| matches!(e, E::Index { index: 5, dim: 5 }),
        ),
        (
            case("Slice", 13)
                .data(f32s(r, S1, -1.0, 1.0))
                .konst(vec_i64(&[0, 1]))
                .konst(vec_i64(&[1])),
            |e| matches!(e, E::BadInput { index: 2, .. }),
        ),
        (
            case("Slice", 13)
                .data(scalar_f32(1.0))
                .konst(vec_i64(&[0]))
                .konst(vec_i64(&[1])),
            |e| matches!(e, E::Axis { .. }),
        ),
        (
            case("Slice", 13)
                .data(f32s(r, S1, -1.0, 1.0))
                .konst(vec_i64(&[0]))
                .konst(vec_i64(&[1]))
                .omitted()
                .konst(vec_i64(&[0])),
            |e| matches!(e, E::BadInput { index: 4, .. }),
        ),
        (
            case("Transpose", 13)
                .data(f32s(r, S3, -1.0, 1.0))
                .attr(ints("perm", &[0, 1])),
            |e| matches!(e, E::BadAttribute { name, .. } if name == "perm"),
        ),
        (
            case("Transpose", 13)
                .data(f32s(r, S3, -1.0, 1.0))
                .attr(ints("perm", &[0, 0, 1])),
            |e| matches!(e, E::BadAttribute { name, .. } if name == "perm"),
        ),
        (
            case("Concat", 13)
                .data(scalar_f32(1.0))
                .data(scalar_f32(2.0)),
            |e| matches!(e, E::Axis { .. }),
        ),
        (
            case("Concat", 13)
                .data(f32s(r, &[2, 3], -1.0, 1.0))
                .data(f32s(r, &[2, 4], -1.0, 1.0)),
            |e| matches!(e, E::Mismatch(_)),
        ),
        (
            case("Reshape", 14)
                .data(f32s(r, S3, -1.0, 1.0))
                .konst(vec_i64(&[5, -1])),
            |e| matches!(e, E::BadInput { index: 1, .. }),
        ),
        (
            case("Reshape", 14)
                .data(f32s(r, S3, -1.0, 1.0))
                .konst(vec_i64(&[5, 5])),
            |e| matches!(e, E::Reshape { .. }),
        ),
        (
            case("Squeeze", 13)
                .data(f32s(r, S3, -1.0, 1.0))
                .konst(vec_i64(&[0])),
            |e| matches!(e, E::Reshape { .. }),
        ),
        (
            case("Unsqueeze", 13)
                .data(f32s(r, S3, -1.0, 1.0))
                .konst(vec_i64(&[4])),
            |e| matches!(e, E::Axis { axis: 4, rank: 4 }),
        ),
    ];
    for (k, kind) in &cases {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| k.interp()));
        match result {
            Err(_) => panic!("{}: the interpreter panicked", k.label()),
            Ok(Ok(a)) => panic!("{}: expected an error, got {}", k.label(), values(&a)),
            Ok(Err(e)) => {
                assert!(
                    matches!(&e, E::Node { node, op, .. } if node == "n" && op == k.op),
                    "{}: the error does not name the node: {e}",
                    k.label()
                );
                assert!(kind(e.cause()), "{}: unexpected error {e:?}", k.label());
            }
        }
    }
}

/// The driver: `supports`, `evaluate`'s own errors and their messages (printed to
/// users through the passes), `eval_shape_op`, `broadcast_shape`.
#[test]
fn driver_api_and_messages() {
    use lora_graft::ir::Node;
    let node = |op: &str, domain: &str| Node {
        proto: NodeProto {
            op_type: Some(op.into()),
            domain: Some(domain.into()),
            name: Some("n".into()),
            ..Default::default()
        },
        inputs: vec![],
        outputs: vec![],
        captures: vec![],
    };
    assert!(interp::supports(&node("Add", "")));
    assert!(interp::supports(&node("Add", "ai.onnx")));
    assert!(!interp::supports(&node("Add", "com.microsoft")));
    assert!(!interp::supports(&node("MatMul", "")));
    for op in interp::ops() {
        assert!(interp::supports(&node(op, "")), "{op}");
    }

    let e = interp::eval(&node("MatMul", ""), &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "node 'n' (MatMul): the evaluator has no rule for MatMul"
    );
    let e = case("Cast", 13).data(scalar_f32(1.0)).interp().unwrap_err();
    assert_eq!(e.to_string(), "node 'n' (Cast): attribute 'to': missing");
    let e = case("Cast", 13)
        .data(scalar_f32(1.0))
        .attr(int("to", 999))
        .interp()
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "node 'n' (Cast): attribute 'to': 999 is not an ONNX element type"
    );

    // A value no initializer chain computes.
    let mut proto = case("Neg", 13).data(scalar_f32(1.0)).model().graph.unwrap();
    let graph = Graph::from_proto(proto.clone(), |_| Ok(None)).unwrap();
    let e = interp::evaluate(&graph, graph.value_by_name("y").unwrap()).unwrap_err();
    assert_eq!(e.to_string(), "'x0' is not computed from initializers");
    // An initializer whose bytes disagree with its dims.
    let mut bad = scalar_f32(1.0).to_proto("x0");
    bad.dims = vec![2];
    proto.input.clear();
    proto.initializer.push(bad);
    let graph = Graph::from_proto(proto, |_| Ok(None)).unwrap();
    let e = interp::evaluate(&graph, graph.value_by_name("y").unwrap()).unwrap_err();
    assert!(
        matches!(&e, InterpError::Tensor { name, .. } if name == "x0"),
        "{e:?}"
    );
    assert!(e.to_string().starts_with("tensor 'x0': "), "{e}");

    let shape = interp::eval_shape_op(&node("Size", ""), &[2, 3]).unwrap();
    assert_eq!(shape, scalar_i64(6));
    let shape = interp::eval_shape_op(&node("Shape", ""), &[2, 3]).unwrap();
    assert_eq!(shape, vec_i64(&[2, 3]));
    let e = interp::eval_shape_op(&node("Add", ""), &[2]).unwrap_err();
    assert!(matches!(e.cause(), InterpError::NotAShapeOp { op } if op == "Add"));

    assert_eq!(
        interp::broadcast_shape(&[2, 1, 4], &[3, 1]).unwrap(),
        vec![2, 3, 4]
    );
    assert_eq!(interp::broadcast_shape(&[], &[0, 1]).unwrap(), vec![0, 1]);
    let e = interp::broadcast_shape(&[2], &[3]).unwrap_err();
    assert_eq!(e.to_string(), "shapes [2] and [3] do not broadcast");
}
