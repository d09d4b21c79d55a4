//! Weight-only int8 models, as deployed: `bert_int8` (`MatMul(x, Mul(Cast(int8 q),
//! scale))`, generic weight names), `llama_int8` (`DequantizeLinear` per output
//! channel) and `llama_nbits8` (onnxruntime's 8-bit `MatMulNBits`). Every variant grafts on them and computes what it computes on the
//! dequantized float model (DeLoRA's norms, PiSSA's SVD, OLoRA's QR and DoRA's in-graph
//! norm read the dequantized weight, which stays quantized); ONNX Runtime runs every
//! grafted model as tract does.

mod common;

use lora_graft::passes::merge::QuantizedWeights;

use common::{fixture, perturb, reference, run_tract};
use lora_graft::jobs;
use lora_graft::passes::graft::effective_weight;
use lora_graft::passes::target::{self, Filters, Layout, Role};
use lora_graft::tensor::Array;
use lora_graft::Model;

const INT8: &[&str] = &["bert_int8", "llama_int8"];

/// Fixtures whose weights onnxruntime's quantizers wrote in QDQ form with zero points or
/// blocks: `llama_qdq4` (`MatMulNBitsQuantizer`'s QDQ format: uint4 `[K, N]` blocked by
/// 32 along K, with zero points), `llama_qdq4_sym` (the same, int4, symmetric) and
/// `bert_qdq_u8` (`quantize_static`: uint8 per channel with zero points; its activations
/// pass through QuantizeLinear/DequantizeLinear too).
const QDQ: &[&str] = &["llama_qdq4", "llama_qdq4_sym", "bert_qdq_u8"];

/// Fixtures whose linears are onnxruntime's `MatMulNBits` (`llama_nbits8`: 8 bits, blocks
/// of 32, zero points, made by onnxruntime's own quantizer).
const NBITS: &[&str] = &["llama_nbits8"];

/// Checks that the adapter moves fixture `name`'s output (`got`, tract's output of the
/// grafted `model`), saves the model and its inputs and output under `dir`, and returns
/// the `tests/interop.py` entry that checks ONNX Runtime gives the same (1e-4 relative:
/// another runtime's kernels and summation order; llama_int8's fused DequantizeLinear +
/// MatMul kept at float accuracy).
fn interop_entry(
    dir: &std::path::Path,
    name: &str,
    variant: &str,
    model: &Model,
    got: Array,
) -> serde_json::Value {
    let base = reference(name).1.remove(0).1;
    let moved = common::max_abs_diff(&got, &base) / common::max_abs(&base);
    assert!(
        moved > 1e-3,
        "{name} {variant}: the adapter moves the output by {moved:e}"
    );
    let stem = format!("{name}/{variant}");
    common::save_case(dir, &stem, model, reference(name).0, got);
    serde_json::json!({
        "model": format!("{stem}.onnx"),
        "base": fixture(name),
        "io": format!("{stem}.io.safetensors"),
        "full_check": true,
        "tol": 1e-4,
        "relative": true,
        "ort_config": {"session.qdq_matmulnbits_accuracy_level": "0"},
    })
}

/// The int8 fixture `name` with every quantized linear weight replaced by its
/// dequantized float32 values (the same graph otherwise).
fn dequantized(name: &str) -> Model {
    let mut model = Model::load(&fixture(name)).unwrap();
    let filters = Filters {
        roles: vec![Role::Reader, Role::Writer, Role::Inner],
        include_heads: true,
        ..Filters::default()
    };
    let targets = target::run(&model.graph, &filters).unwrap().targets;
    let mut replaced = 0;
    for t in targets.iter().filter(|t| t.quantized) {
        let w = effective_weight(&model.graph, t).unwrap(); // [d_out, d_in]
        let onnx = w.t().as_standard_layout().into_owned().into_dyn();
        let init = lora_graft::ir::Initializer::new(Array::F32(onnx).to_proto(""));
        let id = model
            .graph
            .add_initializer(&format!("{}.float_weight", t.module), init);
        model.graph.set_input(t.node, 1, Some(id));
        if model.graph.node(t.node).op() == "MatMulNBits" {
            // MatMul(x, W) in its place: packed weight, scales and zero points dropped.
            assert!(
                model.graph.node(t.node).inputs.len() <= 4,
                "{}: a bias",
                t.module
            );
            for slot in 2..model.graph.node(t.node).inputs.len() {
                model.graph.set_input(t.node, slot, None);
            }
            let node = model.graph.node_mut(t.node);
            node.inputs.truncate(2);
            node.proto.op_type = Some("MatMul".into());
            node.proto.domain = None;
            node.proto.attribute.clear();
        } else {
            assert_eq!(t.layout, Layout::InOut, "{}", t.module);
        }
        replaced += 1;
    }
    assert!(replaced >= 10, "{name}: {replaced} quantized weights");
    model.graph.compact();
    model
}

#[test]
fn variants_on_int8_weights_compute_what_they_do_on_the_dequantized_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = Vec::new();
    for name in INT8.iter().chain(NBITS).chain(QDQ) {
        let (inputs, _) = reference(name);
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        // DoRA needs the dense weight in the graph, which MatMulNBits does not hold.
        let variants = common::variant_names()
            .filter(|v| !(NBITS.contains(name) && common::refused_on_int4(v)));
        for variant in variants {
            let req = common::request_for(name, variant);
            let mut model = Model::load(&fixture(name)).unwrap();
            let mut outcome =
                jobs::graft(&mut model, &req).unwrap_or_else(|e| panic!("{name} {variant}: {e}"));
            perturb(&mut model, &mut outcome, 9);
            let mut float = dequantized(name);
            let mut float_outcome = jobs::graft(&mut float, &req).unwrap();
            perturb(&mut float, &mut float_outcome, 9);
            let modules = |o: &jobs::Outcome| -> Vec<String> {
                o.grafted.modules.iter().map(|m| m.module.clone()).collect()
            };
            assert_eq!(
                modules(&outcome),
                modules(&float_outcome),
                "{name} {variant}"
            );
            // MatMulNBits runs on the packed weight (lora-graft's kernel, any bits).
            let got = run_tract(&model, &inputs).remove(0);
            let want = run_tract(&float, &inputs).remove(0);
            // 1e-5 relative: the same float weights, read through the dequantization
            // chain or stored; products summed in the same order. LoRA-GA's init is the
            // top singular vectors of a calibration gradient, which differs between the
            // two in its last bits (1e-6, MatMulNBits' gradient on the packed weight):
            // the SVD turns that into up to 1/gap of it (2.0e-5 measured), so 5e-5.
            let tol = if variant == "lora_ga" { 5e-5 } else { 1e-5 };
            let d = common::max_abs_diff(&got, &want) / common::max_abs(&want);
            assert!(
                d <= tol,
                "{name} {variant}: {d:e} from the dequantized model"
            );
            manifest.push(interop_entry(dir.path(), name, variant, &model, got));
        }
    }
    common::run_interop(dir.path(), &manifest);
}

/// `merge --dequantize` on the int8 fixtures: every variant's trained adapter folded into
/// float weights in place of the quantized ones gives the adapted int8 model's outputs;
/// without `--dequantize` the merge says why it cannot.
#[test]
fn merge_dequantize_writes_float_weights_that_compute_the_adapted_model() {
    let dir = tempfile::tempdir().unwrap();
    for name in INT8 {
        let (inputs, _) = reference(name);
        for variant in common::variant_names() {
            let path = dir.path().join(format!("{name}.{variant}.safetensors"));
            let (adapted, adapter) =
                common::trained(name, &common::request_for(name, variant), 4, &path);
            let want = run_tract(&adapted, &inputs).remove(0);
            let e = common::merged(name, &adapter, QuantizedWeights::Refuse)
                .expect_err("quantized")
                .to_string();
            assert!(e.contains("--dequantize"), "{name} {variant}: {e}");
            let merged = common::merged(name, &adapter, QuantizedWeights::Dequantize)
                .unwrap_or_else(|e| panic!("{name} {variant}: {e}"));
            // Every linear of these fixtures is a target: no int8 weight is left.
            let int8 = lora_graft::proto::tensor_proto::DataType::Int8 as i32;
            let left = merged
                .graph
                .initializers()
                .filter(|(_, i)| i.elem_type() == int8)
                .count();
            assert_eq!(left, 0, "{name} {variant}: int8 weights left");
            let got = run_tract(&merged, &inputs).remove(0);
            // 1e-4 relative, as every merge test: W + ΔW summed before the product.
            let d = common::max_abs_diff(&got, &want) / common::max_abs(&want);
            assert!(
                d <= 1e-4,
                "{name} {variant}: merged {d:e} from the adapted model"
            );
        }
    }
}

/// BERT quantized by onnxruntime's own `quantize_dynamic` (`bert_qdyn`: activations
/// quantized on the fly by `DynamicQuantizeLinear`, `MatMulInteger` on int8 weights, the
/// int32 product cast and scaled back): each adapter reads the layer's float input and
/// adds to its float output; DeLoRA's norms are those of the dequantized weight
/// `q·scale`; ONNX Runtime runs every grafted model as tract does; DoRA (the dense
/// weight at every step) and merging say why they cannot.
#[test]
fn variants_on_dynamically_quantized_bert() {
    let name = "bert_qdyn";
    let (inputs, _) = reference(name);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join(name)).unwrap();
    let mut manifest = Vec::new();
    for variant in common::variant_names() {
        let req = common::request_for(name, variant);
        let mut model = Model::load(&fixture(name)).unwrap();
        let mut outcome = match jobs::graft(&mut model, &req) {
            Ok(o) => o,
            Err(e) => {
                let why = e.to_string();
                let said = why.contains("quantized") || why.contains("MatMulInteger");
                // LoRA-GA's calibration needs the loss's gradient through every
                // layer, which has no rule through MatMulInteger.
                assert!(
                    ["dora", "ia3_ff", "hra", "lora_ga"].contains(&variant) && said,
                    "{variant}: {e}"
                );
                continue;
            }
        };
        // The branch reads the float activation the quantizer reads.
        let g = &model.graph;
        let a = g.value_by_name("encoder.layer.0.attention.self.query.lora_A");
        if let Some(a) = a.filter(|_| variant == "lora") {
            let reader = g.node(g.value(a).users[0]);
            let x = reader.inputs[0].unwrap();
            assert!(
                g.value(x)
                    .users
                    .iter()
                    .any(|&u| g.node(u).op() == "DynamicQuantizeLinear"),
                "the LoRA branch does not read the float input"
            );
        }
        if variant == "delora" {
            let m = &outcome.grafted.modules[0];
            let q = g.value_by_name("onnx::MatMul_312_quantized").unwrap();
            let q = lora_graft::interp::evaluate(g, q).unwrap().to_f64(); // [d_in, d_out]
            let s = g.value_by_name("onnx::MatMul_312_scale").unwrap();
            let s = lora_graft::interp::evaluate(g, s).unwrap().to_f64();
            let scale = *s.iter().next().unwrap();
            let want: Vec<f64> = q
                .outer_iter()
                .map(|row| row.iter().map(|v| (v * scale).powi(2)).sum::<f64>().sqrt())
                .collect();
            let got = m.params["lora_wnorm"].to_owned();
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() <= 1e-5 * w, "wnorm {g} vs {w}");
            }
        }
        perturb(&mut model, &mut outcome, 6);
        let got = run_tract(&model, &inputs).remove(0);
        manifest.push(interop_entry(dir.path(), name, variant, &model, got));
        if variant == "lora" {
            let path = dir.path().join("lora.safetensors");
            std::fs::write(&path, outcome.adapter_file(&req).to_bytes().unwrap()).unwrap();
            let adapter =
                lora_graft::adapter::LoadedAdapter::read(&path, &Default::default()).unwrap();
            let e = common::merged(name, &adapter, QuantizedWeights::Dequantize)
                .expect_err("MatMulInteger")
                .to_string();
            assert!(e.contains("MatMulInteger"), "{e}");
        }
    }
    common::run_interop(dir.path(), &manifest);
}

/// `tests/quantizer.py` on `cases` (written under `dir` as `<label>.safetensors`):
/// onnxruntime's own quantizer gives lora-graft's requantized values.
fn onnxruntime_quantizer_agrees(
    dir: &std::path::Path,
    label: &str,
    cases: &lora_graft::adapter::AdapterFile,
) {
    let path = dir.join(format!("{label}.safetensors"));
    std::fs::write(&path, cases.to_bytes().unwrap()).unwrap();
    let out = std::process::Command::new(common::python())
        .arg(common::root().join("tests/quantizer.py"))
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("quantizer: ok"),
        "{label}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `merge --requantize` on `MatMulNBits` weights (`genai_int4`: 4 bits, symmetric, as
/// onnxruntime-genai's builder writes them; `llama_nbits8`: 8 bits with zero points, from
/// onnxruntime's quantizer): each merged weight is written back in its node's format
/// exactly as onnxruntime's own quantizer writes the float merged weight (the same merge
/// on the dequantized model) — packed values, scales and zero points equal — and the
/// requantization error is reported; without `--requantize` the merge says to use it.
#[test]
fn merge_requantize_writes_matmulnbits_weights_as_onnxruntimes_quantizer_does() {
    use lora_graft::adapter::AdapterFile;
    use lora_graft::passes::merge::PissaBase;
    let dir = tempfile::tempdir().unwrap();
    let cases = [("genai_int4", 4, "1", 0.2), ("llama_nbits8", 8, "0", 0.02)];
    for (name, bits, symmetric, worst) in cases {
        for variant in ["lora", "pissa"] {
            let path = dir.path().join(format!("{name}.{variant}.safetensors"));
            let (_, adapter) = common::trained(name, &common::request_for(name, variant), 4, &path);
            let e = common::merged(name, &adapter, QuantizedWeights::Refuse)
                .expect_err("packed")
                .to_string();
            assert!(e.contains("--requantize"), "{name} {variant}: {e}");
            let mut merged = Model::load(&fixture(name)).unwrap();
            let done = jobs::merge(
                &mut merged,
                &adapter,
                PissaBase::Original,
                QuantizedWeights::Requantize,
            )
            .unwrap_or_else(|e| panic!("{name} {variant}: {e}"));
            assert!(done.modules >= 10, "{name} {variant}: {}", done.modules);
            assert_eq!(done.requantized.len(), done.modules, "{name} {variant}");
            for (module, e) in &done.requantized {
                // Measured: 4 bits 0.08-0.10, 8 bits 0.004-0.005 of ‖W‖ on these random
                // weights (a block's range over 15 or 255 steps).
                assert!(
                    e.is_finite() && *e > 0.0 && *e < worst,
                    "{name} {variant} {module}: requantization error {e}"
                );
            }
            // The float merge, on the dequantized model.
            let mut float = dequantized(name);
            jobs::merge(
                &mut float,
                &adapter,
                PissaBase::Original,
                QuantizedWeights::Refuse,
            )
            .unwrap();
            let filters = adapter.req.filters.clone();
            let ours = target::run(&merged.graph, &filters).unwrap().targets;
            let theirs = target::run(&float.graph, &filters).unwrap().targets;
            let mut file = AdapterFile {
                metadata: [
                    ("bits".to_string(), bits.to_string()),
                    ("block_size".to_string(), "32".to_string()),
                    ("symmetric".to_string(), symmetric.to_string()),
                ]
                .into(),
                tensors: Default::default(),
            };
            for t in &ours {
                let Some(f) = theirs.iter().find(|f| f.module == t.module) else {
                    continue;
                };
                let w = effective_weight(&float.graph, f).unwrap(); // [N, K]
                let w = w.t().as_standard_layout().into_owned().into_dyn();
                let node = merged.graph.node(t.node);
                assert_eq!(node.attr_int("block_size", 0), 32, "{}", t.module);
                // As float32 (exact for bytes): the adapter file format holds no uint8.
                let input = |i: usize| {
                    let v = node.inputs[i].unwrap();
                    let a = lora_graft::interp::evaluate(&merged.graph, v).unwrap();
                    Array::F32(a.to_f32())
                };
                let m = &t.module;
                file.tensors.insert(format!("w.{m}"), Array::F32(w));
                file.tensors.insert(format!("b.{m}"), input(1));
                file.tensors.insert(format!("scales.{m}"), input(2));
                if symmetric == "0" {
                    file.tensors.insert(format!("zp.{m}"), input(3));
                }
            }
            assert!(
                file.tensors.len() >= 30,
                "{name} {variant}: {}",
                file.tensors.len()
            );
            onnxruntime_quantizer_agrees(dir.path(), &format!("{name}.{variant}"), &file);
        }
    }
}

/// `merge --requantize` on weights that `DequantizeLinear` or `Mul(Cast(int8), scale)`
/// dequantize: `bert_int8` (`Mul(Cast(int8), scale)`, per tensor or per channel),
/// `llama_int8` (symmetric int8 per channel), `bert_qdq_u8` (uint8 per channel with zero
/// points) and `llama_qdq4`/`llama_qdq4_sym` (uint4 with zero points / int4, blocked by
/// 32 along K). Each merged weight is written back in the same type, granularity and
/// zero-point scheme exactly as onnxruntime's quantizer writes the float merged weight
/// (`quant_utils.quantize_data`; MLAS's QDQ block quantizer): equal values, scales and
/// zero points.
#[test]
fn merge_requantize_writes_qdq_weights_as_onnxruntimes_quantizer_does() {
    use lora_graft::adapter::AdapterFile;
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("bert_int8", 0.01),
        ("llama_int8", 0.01),
        ("bert_qdq_u8", 0.01),
        ("llama_qdq4", 0.2),
        ("llama_qdq4_sym", 0.2),
    ];
    for (name, bound) in cases {
        let (inputs, _) = reference(name);
        for variant in ["lora", "pissa"] {
            let path = dir.path().join(format!("{name}.{variant}.safetensors"));
            let (_, adapter) = common::trained(name, &common::request_for(name, variant), 4, &path);
            let float = common::merged(name, &adapter, QuantizedWeights::Dequantize).unwrap();
            let mut merged = Model::load(&fixture(name)).unwrap();
            let done = jobs::merge(
                &mut merged,
                &adapter,
                lora_graft::passes::merge::PissaBase::Original,
                QuantizedWeights::Requantize,
            )
            .unwrap_or_else(|e| panic!("{name} {variant}: {e}"));
            assert_eq!(done.requantized.len(), done.modules, "{name} {variant}");
            // Measured 0.004-0.005 of ‖W‖ at 8 bits (255 or 254 steps a channel), 0.08 at
            // 4 bits in blocks of 32.
            assert!(
                done.requantized.iter().all(|(_, e)| *e > 0.0 && *e < bound),
                "{name} {variant}: {:?}",
                done.requantized
            );
            let filters = adapter.req.filters.clone();
            let ours = target::run(&merged.graph, &filters).unwrap().targets;
            let theirs = target::run(&float.graph, &filters).unwrap().targets;
            let blocked = name.starts_with("llama_qdq4");
            let mut file = AdapterFile {
                metadata: [(
                    "kind".to_string(),
                    if blocked { "qdq4" } else { "int8" }.to_string(),
                )]
                .into(),
                tensors: Default::default(),
            };
            let value = |m: &Model, v| {
                Array::F32(lora_graft::interp::evaluate(&m.graph, v).unwrap().to_f32())
            };
            for t in &ours {
                let f = theirs.iter().find(|f| f.module == t.module).unwrap();
                let float_node = float.graph.node(f.node);
                let dq = merged
                    .graph
                    .producer(merged.graph.node(t.node).inputs[1].unwrap());
                let dq = merged.graph.node(dq.unwrap());
                let (q, scale, zero, axis) = match dq.op() {
                    "DequantizeLinear" => (
                        dq.inputs[0].unwrap(),
                        dq.inputs[1].unwrap(),
                        dq.inputs.get(2).copied().flatten(),
                        dq.attr_int("axis", 1),
                    ),
                    _ => {
                        // Mul(Cast(q), scale [1, C] or [C, 1]).
                        let cast = merged.graph.producer(dq.inputs[0].unwrap()).unwrap();
                        let q = merged.graph.node(cast).inputs[0].unwrap();
                        let s = dq.inputs[1].unwrap();
                        let dims = merged.graph.initializer(s).unwrap().dims().to_vec();
                        let axis = dims.iter().position(|&d| d > 1).map_or(-1, |a| a as i64);
                        (q, s, None, axis)
                    }
                };
                if blocked {
                    assert_eq!(dq.attr_int("block_size", 0), 32, "{}", t.module);
                    file.metadata.insert("block_size".into(), "32".into());
                    file.metadata
                        .insert("symmetric".into(), (zero.is_none() as u8).to_string());
                }
                let m = &t.module;
                file.tensors.insert(
                    format!("w.{m}"),
                    value(&float, float_node.inputs[1].unwrap()),
                );
                file.tensors.insert(format!("q.{m}"), value(&merged, q));
                file.tensors
                    .insert(format!("scale.{m}"), value(&merged, scale));
                if let Some(z) = zero {
                    file.tensors.insert(format!("zp.{m}"), value(&merged, z));
                }
                let q_type = merged.graph.initializer(q).unwrap().elem_type();
                let signed = q_type == lora_graft::proto::tensor_proto::DataType::Int8 as i32;
                let tensor =
                    |v: f32| Array::F32(tract_core::ndarray::ArrayD::from_elem(vec![1], v));
                file.tensors
                    .insert(format!("axis.{m}"), tensor(axis as f32));
                file.tensors
                    .insert(format!("signed.{m}"), tensor(signed as u8 as f32));
            }
            assert!(
                file.tensors.len() >= 60,
                "{name} {variant}: {}",
                file.tensors.len()
            );
            onnxruntime_quantizer_agrees(dir.path(), &format!("{name}.{variant}.qdq"), &file);
            // The requantized model against the float merge: within the format's rounding
            // of every weight (measured at 8 bits: 5e-4-1e-3 on bert, 9e-3 on bert_qdq_u8,
            // 3.4e-2-3.7e-2 on llama, whose random logits move that much under int8
            // rounding anyway). At 4 bits (0.43-0.73) only a sanity bound: the fixture's own
            // quantization already moves random llama's logits by 0.3-0.5 rms relative.
            let got = run_tract(&merged, &inputs).remove(0);
            let want = run_tract(&float, &inputs).remove(0);
            let d = common::max_abs_diff(&got, &want) / common::max_abs(&want);
            assert!(
                d <= if blocked { 1.0 } else { 1e-1 },
                "{name} {variant}: {d:e} from the float merge"
            );
        }
    }
}

/// `merge --requantize` on `quantize_dynamic`'s `MatMulInteger` weights (`bert_qdyn`:
/// int8, symmetric, one scale a weight, in the product's rescaling): each LoRA-merged
/// weight `W + s·BA` is written back as onnxruntime's `quant_utils.quantize_data` writes
/// it (values and scale equal, `tests/quantizer.py`), and the requantized model gives the
/// adapted model's outputs within int8 rounding.
#[test]
fn merge_requantize_writes_dynamic_quantized_weights_as_onnxruntimes_quantizer_does() {
    use lora_graft::adapter::AdapterFile;
    use tract_core::ndarray::{Array2, Ix2};
    let name = "bert_qdyn";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lora.safetensors");
    let (adapted, adapter) = common::trained(name, &common::request_for(name, "lora"), 4, &path);
    let original = Model::load(&fixture(name)).unwrap();
    let targets = target::run(&original.graph, &adapter.req.filters)
        .unwrap()
        .targets;
    let mut merged = Model::load(&fixture(name)).unwrap();
    let done = jobs::merge(
        &mut merged,
        &adapter,
        lora_graft::passes::merge::PissaBase::Original,
        QuantizedWeights::Requantize,
    )
    .unwrap();
    assert_eq!(done.requantized.len(), done.modules);
    assert!(done.modules >= 6, "{} modules", done.modules);
    // Measured about 0.005 of ‖W‖ (254 steps a weight).
    assert!(
        done.requantized.iter().all(|(_, e)| *e > 0.0 && *e < 0.01),
        "{:?}",
        done.requantized
    );
    let mut file = AdapterFile {
        metadata: [("kind".to_string(), "int8".to_string())].into(),
        tensors: Default::default(),
    };
    let scale = adapter.req.cfg.scale() as f32;
    let value = |v| {
        Array::F32(
            lora_graft::interp::evaluate(&merged.graph, v)
                .unwrap()
                .to_f32(),
        )
    };
    let tensor = |v: f32| Array::F32(tract_core::ndarray::ArrayD::from_elem(vec![1], v));
    for t in &targets {
        let m = &t.module;
        let params = &adapter.tensors[m];
        let a = params["lora_A"]
            .clone()
            .into_dimensionality::<Ix2>()
            .unwrap(); // [r, K]
        let b = params["lora_B"]
            .clone()
            .into_dimensionality::<Ix2>()
            .unwrap(); // [N, r]
        let w: Array2<f32> = effective_weight(&original.graph, t).unwrap() + b.dot(&a) * scale;
        file.tensors.insert(
            format!("w.{m}"),
            Array::F32(w.t().as_standard_layout().into_owned().into_dyn()),
        );
        let node = merged.graph.node(t.node);
        let (_, _, w_scale) = target::dynamic_quantized(&merged.graph, t.node).unwrap();
        file.tensors
            .insert(format!("q.{m}"), value(node.inputs[1].unwrap()));
        file.tensors.insert(format!("scale.{m}"), value(w_scale));
        file.tensors
            .insert(format!("zp.{m}"), value(node.inputs[3].unwrap()));
        file.tensors.insert(format!("axis.{m}"), tensor(-1.0));
        file.tensors.insert(format!("signed.{m}"), tensor(1.0));
    }
    onnxruntime_quantizer_agrees(dir.path(), "bert_qdyn.lora.int8", &file);
    let (inputs, _) = reference(name);
    let got = run_tract(&merged, &inputs).remove(0);
    let want = run_tract(&adapted, &inputs).remove(0);
    // int8 rounding of every merged weight, as on bert_int8 (5e-4-1e-3 there).
    let d = common::max_abs_diff(&got, &want) / common::max_abs(&want);
    assert!(d <= 1e-2, "{d:e} from the adapted model");
}
