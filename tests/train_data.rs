//! Training data formats: plain text through a tokenizer, and JSONL examples of named
//! inputs with a class label or a regression target (classification and MSE training).

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::fixture;
use lora_graft::data::{self, Source, Tokenizer};
use lora_graft::jobs::TrainingRequest;
use lora_graft::passes::grad::loss::Loss;
use lora_graft::rng::Rng;
use lora_graft::tensor::Array;
use lora_graft::train::{self, Engine, TrainOptions};
use lora_graft::Model;

fn request(variant: &str, loss: Loss, batch: usize, seq: usize) -> TrainingRequest {
    TrainingRequest::new(common::request(variant), loss, batch, seq)
}

fn source<'a>(path: &'a std::path::Path, tok: Option<&'a Tokenizer>) -> Source<'a> {
    source_seq(path, 32, tok)
}

/// A source of sequences of `seq` tokens from a 512-token vocabulary.
fn source_seq<'a>(path: &'a std::path::Path, seq: usize, tok: Option<&'a Tokenizer>) -> Source<'a> {
    Source {
        path,
        seq,
        vocab: Some(512),
        tokenizer: tok,
    }
}

#[test]
fn text_through_the_tokenizer_gives_the_rows_of_its_token_ids() {
    // corpus.jsonl is corpus.txt encoded a paragraph a line by Python's `tokenizers`.
    let root = common::root().join("fixtures");
    let tok = Tokenizer::load(&root.join("tokenizer.json")).unwrap();
    let from_text = data::read_tokens(&source(&root.join("corpus.txt"), Some(&tok))).unwrap();
    let from_ids = data::read_tokens(&source(&root.join("corpus.jsonl"), None)).unwrap();
    assert!(from_ids.len() > 10);
    assert_eq!(from_text, from_ids);
    // JSONL {"text": ...} lines too.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("corpus.txt")).unwrap();
    let jsonl: String = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::json!({ "text": l.trim() }).to_string() + "\n")
        .collect();
    let p = dir.path().join("text.jsonl");
    std::fs::write(&p, jsonl).unwrap();
    assert_eq!(
        data::read_tokens(&source(&p, Some(&tok))).unwrap(),
        from_ids
    );
    // Without a tokenizer, text is a clear error.
    let err = data::read_tokens(&source(&root.join("corpus.txt"), None))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("corpus.txt: plain text needs --tokenizer"),
        "{err}"
    );
    let err = data::read_tokens(&source(&p, None))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("text.jsonl:1: 'text' needs --tokenizer"),
        "{err}"
    );
}

/// `n` examples for the hand-built model (x [16] -> y [16]): x standard normal, the
/// class the argmax of a fixed permutation of x, the target 0.5·x reversed.
fn handmade_examples(n: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let x: Vec<f64> = (0..16).map(|_| rng.normal()).collect();
            let perm = |i: usize| (i * 5 + 3) % 16;
            let label = (0..16)
                .max_by(|&a, &b| x[perm(a)].total_cmp(&x[perm(b)]))
                .unwrap();
            let target: Vec<f64> = (0..16).map(|i| 0.5 * x[15 - i]).collect();
            serde_json::json!({ "x": x, "label": label, "target": target }).to_string() + "\n"
        })
        .collect()
}

fn options(loss: Loss, data: std::path::PathBuf, out: std::path::PathBuf) -> TrainOptions {
    TrainOptions {
        steps: 150,
        lr: 2e-2,
        weight_decay: 0.0,
        threads: 2,
        quiet: true,
        ..TrainOptions::new(request("lora", loss, 8, 1), data, out)
    }
}

#[test]
fn classification_and_regression_examples_train() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    std::fs::write(&data, handmade_examples(64, 1)).unwrap();
    for loss in [Loss::Class, Loss::Mse] {
        let out = dir.path().join(format!("{loss:?}.safetensors"));
        let report = train::run(
            &fixture("handmade"),
            &options(loss, data.clone(), out.clone()),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        // Mean of the first and last 8 steps (an epoch: 64 examples, batch 8).
        let first: f64 = report.losses[..8].iter().sum::<f64>() / 8.0;
        let last: f64 = report.losses[report.losses.len() - 8..].iter().sum::<f64>() / 8.0;
        assert!(
            last <= 0.7 * first,
            "{loss:?}: loss {first:.4} -> {last:.4}"
        );
        assert!(out.exists());
    }
}

#[test]
fn a_short_eval_batch_is_counted_exactly() {
    // Evaluating 3 examples with batch 2 equals the mean of their own losses.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("eval.jsonl");
    std::fs::write(&data, handmade_examples(3, 2)).unwrap();
    for loss in [Loss::Class, Loss::Mse] {
        let engine = Engine::new(
            Model::load(&fixture("handmade")).unwrap(),
            &request("lora", loss, 2, 1),
            1,
        )
        .unwrap();
        let rows = data::read_examples(&source(&data, None), engine.fields()).unwrap();
        assert_eq!(rows.len(), 3);
        let params = engine.initial_params();
        let got = train::evaluate(&engine, &rows, &params, 2).unwrap();
        let own: Vec<f64> = rows
            .iter()
            .map(|r| engine.step(&[r.clone(), r.clone()], &params).unwrap().loss)
            .collect();
        let want = own.iter().sum::<f64>() / 3.0;
        // 1e-6 relative: f32 losses summed in a different order.
        assert!(
            (got - want).abs() <= 1e-6 * want.abs(),
            "{loss:?}: {got} vs {want}"
        );
    }
}

#[test]
fn examples_are_padded_masked_and_checked() {
    // BERT takes input_ids, attention_mask and token_type_ids; a line may give only the
    // ids: they are padded to --seq, the mask marks the real ones, token types are 0.
    let engine = Engine::new(
        Model::load(&fixture("bert")).unwrap(),
        &request("lora", Loss::Mse, 2, 8),
        1,
    )
    .unwrap();
    let fields = engine.fields();
    let dir = tempfile::tempdir().unwrap();
    let line = |ids: &str, target: usize| {
        format!(
            "{{\"input_ids\": {ids}, \"target\": {}}}\n",
            serde_json::to_string(&vec![0.5; target]).unwrap()
        )
    };
    let src = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let p = src("ok.jsonl", line("[5, 6, 7]", 8 * 64));
    let s = source_seq(&p, 8, None);
    let rows = data::read_examples(&s, fields).unwrap();
    let f = &rows[0].fields;
    let ints = |a: &Array| a.to_f64().iter().map(|&v| v as i64).collect::<Vec<_>>();
    assert_eq!(ints(&f["input_ids"]), [5, 6, 7, 0, 0, 0, 0, 0]);
    assert_eq!(ints(&f["attention_mask"]), [1, 1, 1, 0, 0, 0, 0, 0]);
    assert_eq!(ints(&f["token_type_ids"]), [0; 8]);
    assert_eq!(f["target"].shape(), [8, 64]);
    // The engine takes them.
    let res = engine
        .step(
            &[rows[0].clone(), rows[0].clone()],
            &engine.initial_params(),
        )
        .unwrap();
    assert!(res.loss.is_finite());
    let cases = [
        (
            line("[1, 2, 3, 4, 5, 6, 7, 8, 9]", 512),
            "long.jsonl:1: 'input_ids' has 9 values; the model takes [8] per example (--seq)",
        ),
        (
            line("[1, 2, 600]", 512),
            "vocab.jsonl:1: token id 600 is outside the model's vocabulary (0..512)",
        ),
        (
            line("[1, 2]", 3),
            "target.jsonl:1: 'target' has 3 values; the loss takes [8, 64]",
        ),
        (
            "{\"input_ids\": [1]}\n".into(),
            "nolabel.jsonl:1: no 'target'",
        ),
        (
            "{\"target\": [1]}\n".into(),
            "noids.jsonl:1: no 'input_ids' (an input of the model)",
        ),
        (
            format!("{}[1, 2]\n", line("[1]", 512)),
            "array.jsonl:2: not a JSON object",
        ),
    ];
    for (text, want) in cases {
        let name = want.split(':').next().unwrap();
        let p = src(name, text);
        let s = source_seq(&p, 8, None);
        let err = data::read_examples(&s, fields).unwrap_err().to_string();
        assert!(err.contains(want), "expected {want:?} in: {err}");
    }
}

#[test]
fn a_class_label_outside_the_classes_is_an_error() {
    let engine = Engine::new(
        Model::load(&fixture("handmade")).unwrap(),
        &request("lora", Loss::Class, 2, 1),
        1,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.jsonl");
    let x = serde_json::to_string(&vec![0.0; 16]).unwrap();
    std::fs::write(&p, format!("{{\"x\": {x}, \"label\": 16}}\n")).unwrap();
    let err = data::read_examples(&source(&p, None), engine.fields())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("c.jsonl:1: label 16 is not a class index (0..16)"),
        "{err}"
    );
}

#[test]
fn the_vocabulary_is_the_table_the_token_ids_index_even_when_quantized() {
    // A weight-only int8 embedding (Mul(Cast(q), scale)) read by input_ids, after a
    // float token-type table of 2 rows read by token_type_ids: the vocabulary is 100.
    use lora_graft::ir::build::int_attr;
    use lora_graft::proto::{GraphProto, ModelProto, OperatorSetIdProto, TensorProto};
    use prost::Message;
    let tensor = |name: &str, dims: Vec<i64>, data_type: i32, raw: Vec<u8>| TensorProto {
        name: Some(name.into()),
        dims,
        data_type: Some(data_type),
        raw_data: Some(raw),
        ..Default::default()
    };
    let mut cast = common::node("cast", "Cast", &["tok_q"], &["tok_f"]);
    cast.attribute.push(int_attr("to", 1));
    let graph = GraphProto {
        name: Some("g".into()),
        node: vec![
            common::node("type", "Gather", &["type_table", "token_type_ids"], &["t"]),
            cast,
            common::node("scale", "Mul", &["tok_f", "tok_scale"], &["tok_w"]),
            common::node("embed", "Gather", &["tok_w", "input_ids"], &["e"]),
            common::node("sum", "Add", &["e", "t"], &["y"]),
        ],
        initializer: vec![
            tensor("tok_q", vec![100, 8], 3, vec![1; 800]),
            tensor("tok_scale", vec![], 1, 0.5f32.to_le_bytes().to_vec()),
            tensor("type_table", vec![2, 8], 1, vec![0; 64]),
        ],
        input: vec![common::vi("input_ids"), common::vi("token_type_ids")],
        output: vec![common::vi("y")],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(graph),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("int8.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    let model = lora_graft::Model::load(&path).unwrap();
    assert_eq!(data::vocab_size(&model), Some(100));
    // The fixtures keep their float tables.
    let llama = lora_graft::Model::load(&fixture("llama")).unwrap();
    assert_eq!(data::vocab_size(&llama), Some(512));
}
