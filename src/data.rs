//! Training data: token ids (JSONL) or plain text through a Hugging Face tokenizer,
//! packed into rows of `--seq` tokens; and JSONL examples of a model's named inputs
//! with a label (classification) or a target (regression); and each step's batch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tract_core::ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::passes::grad::loss::Loss;
use crate::proto::tensor_proto::DataType;
use crate::rng::Rng;
use crate::tensor::Array;
use crate::Model;

/// One training example: a value per named input (model inputs, and the loss's
/// `labels` or `target`), without the batch axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Values by input name.
    pub fields: BTreeMap<String, Array>,
}

impl Row {
    /// A causal-LM row: `input_ids` and `labels` (-100: not counted), of equal length.
    pub fn tokens(ids: Vec<i64>, labels: Vec<i64>) -> Row {
        let field = |v: Vec<i64>| Array::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).unwrap());
        Row {
            fields: BTreeMap::from([
                ("input_ids".to_string(), field(ids)),
                ("labels".to_string(), field(labels)),
            ]),
        }
    }

    /// How many loss terms the row adds: its counted next-token labels for the causal-LM
    /// loss, else one.
    pub fn counted(&self, loss: Loss) -> usize {
        match (loss, self.fields.get("labels")) {
            (Loss::CausalLm, Some(Array::I64(l))) => {
                l.iter().skip(1).filter(|&&v| v != -100).count()
            }
            _ => 1,
        }
    }

    /// The row with no causal-LM label counted (a batch's filler).
    pub fn uncounted(mut self) -> Row {
        if let Some(Array::I64(l)) = self.fields.get_mut("labels") {
            l.fill(-100);
        }
        self
    }
}

/// The value of a model input a row does not give, when there is a natural one:
/// an all-ones `attention_mask`, zero `token_type_ids`, `position_ids` counting up, an
/// empty KV cache (`past_*` of length 0 in training).
pub fn default_field(name: &str, elem_type: i32, shape: &[usize]) -> Option<Array> {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = match name {
        _ if n == 0 && name.starts_with("past") => Vec::new(),
        "attention_mask" => vec![1.0; n],
        "token_type_ids" => vec![0.0; n],
        "position_ids" => {
            let last = *shape.last()?;
            (0..n).map(|i| (i % last) as f64).collect()
        }
        _ => return None,
    };
    Array::from_f64(
        ArrayD::from_shape_vec(IxDyn(shape), values).ok()?,
        elem_type,
    )
}

/// What one example holds: each input's element type and shape without the batch axis.
#[derive(Debug, Clone)]
pub struct Fields {
    /// Model inputs, by name.
    pub inputs: Vec<(String, i32, Vec<usize>)>,
    /// The loss's `labels` or `target`.
    pub label: (String, i32, Vec<usize>),
    /// The number of classes (classification).
    pub classes: Option<usize>,
}

/// Where the data comes from and how to read it.
pub struct Source<'a> {
    /// The file.
    pub path: &'a Path,
    /// Sequence length.
    pub seq: usize,
    /// Token ids must be below this.
    pub vocab: Option<usize>,
    /// For plain text, and JSONL lines with `"text"`.
    pub tokenizer: Option<&'a Tokenizer>,
}

/// A Hugging Face `tokenizer.json`.
pub struct Tokenizer {
    path: PathBuf,
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let bytes = crate::files::read_regular(path)?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| {
            Error::Usage(format!(
                "{}: not a Hugging Face tokenizer.json ({e})",
                path.display()
            ))
        })?;
        Ok(Tokenizer {
            path: path.to_path_buf(),
            inner,
        })
    }

    /// The token ids of `text`, with the tokenizer's special tokens (as `encode(text)`
    /// does in Python).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Usage(format!("{}: cannot encode ({e})", self.path.display())))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }
}

fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "json" | "ndjson")
    )
}

fn line_error(path: &Path, line: usize, reason: impl std::fmt::Display) -> Error {
    Error::Usage(format!("{}:{line}: {reason}", path.display()))
}

/// Non-empty lines with their 1-based numbers.
fn lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let text = crate::files::read_regular_text(path)?;
    let lines: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect();
    if lines.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no data (the file is empty)",
            path.display()
        )));
    }
    Ok(lines)
}

fn parse_line(path: &Path, n: usize, line: &str) -> Result<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| line_error(path, n, format!("not JSON ({e})")))?;
    if !v.is_object() {
        return Err(line_error(path, n, "not a JSON object"));
    }
    Ok(v)
}

/// Every number of a (nested) JSON list, or of one number.
fn numbers(path: &Path, n: usize, key: &str, v: &serde_json::Value) -> Result<Vec<f64>> {
    fn walk(v: &serde_json::Value, out: &mut Vec<f64>) -> bool {
        match v {
            serde_json::Value::Array(items) => items.iter().all(|x| walk(x, out)),
            serde_json::Value::Number(x) => x.as_f64().map(|x| out.push(x)).is_some(),
            serde_json::Value::Bool(b) => {
                out.push(f64::from(u8::from(*b)));
                true
            }
            _ => false,
        }
    }
    let mut out = Vec::new();
    if !walk(v, &mut out) {
        return Err(line_error(path, n, format!("'{key}' holds a non-number")));
    }
    Ok(out)
}

fn integers(path: &Path, n: usize, key: &str, v: &serde_json::Value) -> Result<Vec<i64>> {
    let list = v
        .as_array()
        .ok_or_else(|| line_error(path, n, format!("'{key}' is not a list")))?;
    list.iter()
        .map(|x| {
            x.as_i64()
                .ok_or_else(|| line_error(path, n, format!("'{key}' holds a non-integer {x}")))
        })
        .collect()
}

/// The label of a token that the loss does not count (PyTorch's `ignore_index`).
const IGNORED_LABEL: i64 = -100;

fn check_ids(path: &Path, n: usize, ids: &[i64], vocab: Option<usize>) -> Result<()> {
    match ids
        .iter()
        .find(|&&t| t < 0 || vocab.is_some_and(|v| t as usize >= v))
    {
        Some(t) => Err(line_error(
            path,
            n,
            format!(
                "token id {t} is outside the model's vocabulary (0..{})",
                vocab.unwrap_or(0)
            ),
        )),
        None => Ok(()),
    }
}

/// Causal-LM rows: JSONL lines `{"input_ids": [...], "labels": [...]?}` (or `{"text":
/// "..."}` with a tokenizer), or plain text with a tokenizer (one document a line), all
/// concatenated and packed into rows of `seq` tokens; the last row is padded with token
/// 0 and label -100.
pub fn read_tokens(src: &Source) -> Result<Vec<Row>> {
    let path = src.path;
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    let jsonl = is_jsonl(path);
    if !jsonl && src.tokenizer.is_none() {
        return Err(Error::Usage(format!(
            "{}: plain text needs --tokenizer tokenizer.json (or give JSONL token ids in a .jsonl file)",
            path.display()
        )));
    }
    for (n, line) in lines(path)? {
        let (line_ids, line_labels) = if jsonl {
            let v = parse_line(path, n, &line)?;
            let line_ids = match (v.get("input_ids"), v.get("text"), src.tokenizer) {
                (Some(ids), _, _) => integers(path, n, "input_ids", ids)?,
                (None, Some(serde_json::Value::String(t)), Some(tok)) => tok.encode(t)?,
                (None, Some(_), None) => {
                    return Err(line_error(
                        path,
                        n,
                        "'text' needs --tokenizer tokenizer.json",
                    ))
                }
                _ => return Err(line_error(path, n, "no 'input_ids' (or 'text')")),
            };
            let line_labels = match v.get("labels") {
                Some(l) => integers(path, n, "labels", l)?,
                None => line_ids.clone(),
            };
            (line_ids, line_labels)
        } else {
            let t = src.tokenizer.expect("checked").encode(line.trim())?;
            (t.clone(), t)
        };
        check_ids(path, n, &line_ids, src.vocab)?;
        if line_labels.len() != line_ids.len() {
            return Err(line_error(
                path,
                n,
                "'labels' and 'input_ids' differ in length",
            ));
        }
        if let Some(l) = line_labels
            .iter()
            .find(|&&l| l != IGNORED_LABEL && (l < 0 || src.vocab.is_some_and(|v| l as usize >= v)))
        {
            return Err(line_error(
                path,
                n,
                format!(
                    "label {l} is neither -100 (not counted) nor a token id of the model's vocabulary (0..{})",
                    src.vocab.unwrap_or(0)
                ),
            ));
        }
        ids.extend(line_ids);
        labels.extend(line_labels);
    }
    if ids.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no training tokens",
            path.display()
        )));
    }
    let seq = src.seq.max(1);
    Ok(ids
        .chunks(seq)
        .zip(labels.chunks(seq))
        .map(|(i, l)| {
            let (mut i, mut l) = (i.to_vec(), l.to_vec());
            i.resize(seq, 0);
            l.resize(seq, -100);
            Row::tokens(i, l)
        })
        .collect())
}

/// Classification or regression examples: JSONL lines holding the model's inputs by
/// name (nested lists; sequences shorter than `--seq` are padded with 0, and a missing
/// `attention_mask` marks the real tokens), `input_ids` or `"text"` with a tokenizer,
/// and `label` (class index) or `target` (the output's values), unless the label's name
/// in `fields` is empty.
pub fn read_examples(src: &Source, fields: &Fields) -> Result<Vec<Row>> {
    let path = src.path;
    let mut rows = Vec::new();
    for (n, line) in lines(path)? {
        let v = parse_line(path, n, &line)?;
        let mut row = BTreeMap::new();
        let ids_from_text = match (v.get("input_ids"), v.get("text"), src.tokenizer) {
            (None, Some(serde_json::Value::String(t)), Some(tok)) => Some(tok.encode(t)?),
            _ => None,
        };
        // How many of the (padded) sequence positions are real tokens.
        let real_tokens = v
            .get("input_ids")
            .and_then(|x| x.as_array().map(Vec::len))
            .or(ids_from_text.as_ref().map(Vec::len));
        for (name, elem_type, shape) in &fields.inputs {
            let values: Vec<f64> = match (v.get(name.as_str()), name.as_str()) {
                (Some(x), _) => numbers(path, n, name, x)?,
                (None, "input_ids") if ids_from_text.is_some() => {
                    ids_from_text.iter().flatten().map(|&i| i as f64).collect()
                }
                (None, "attention_mask") if real_tokens.is_some() => {
                    let real = real_tokens.unwrap_or(0);
                    (0..shape.iter().product())
                        .map(|i| f64::from(u8::from(i < real)))
                        .collect()
                }
                (None, _) => match default_field(name, *elem_type, shape) {
                    Some(a) => {
                        row.insert(name.clone(), a);
                        continue;
                    }
                    None => {
                        return Err(line_error(
                            path,
                            n,
                            format!("no '{name}' (an input of the model)"),
                        ))
                    }
                },
            };
            let want: usize = shape.iter().product();
            let mut values = values;
            let is_sequence = shape.len() == 1 && shape[0] == src.seq;
            if is_sequence && values.len() < want {
                values.resize(want, 0.0);
            }
            if values.len() != want {
                return Err(line_error(
                    path,
                    n,
                    format!(
                        "'{name}' has {} values; the model takes {shape:?} per example{}",
                        values.len(),
                        if is_sequence { " (--seq)" } else { "" }
                    ),
                ));
            }
            if name == "input_ids" {
                let ids: Vec<i64> = values.iter().map(|&x| x as i64).collect();
                check_ids(path, n, &ids, src.vocab)?;
            }
            let array = ArrayD::from_shape_vec(IxDyn(shape), values).expect("sized");
            let array = Array::from_f64(array, *elem_type).ok_or_else(|| {
                line_error(
                    path,
                    n,
                    format!("input '{name}' has a type lora-graft cannot feed"),
                )
            })?;
            row.insert(name.clone(), array);
        }
        let (label, elem_type, shape) = &fields.label;
        if label.is_empty() {
            // Model inputs only (calibration).
            rows.push(Row { fields: row });
            continue;
        }
        let keys: &[&str] = if label == "target" {
            &["target"]
        } else {
            &["label", "labels"]
        };
        let key = keys
            .iter()
            .find(|k| v.get(**k).is_some())
            .ok_or_else(|| line_error(path, n, format!("no '{}' (the loss's {label})", keys[0])))?;
        let values = numbers(path, n, key, &v[key])?;
        let want: usize = shape.iter().product();
        if values.len() != want {
            return Err(line_error(
                path,
                n,
                format!(
                    "'{key}' has {} values; the loss takes {shape:?}",
                    values.len()
                ),
            ));
        }
        if *elem_type == DataType::Int64 as i32 {
            if let Some(bad) = values.iter().find(|&&c| {
                c.fract() != 0.0 || c < 0.0 || fields.classes.is_some_and(|k| c >= k as f64)
            }) {
                return Err(line_error(
                    path,
                    n,
                    format!(
                        "label {bad} is not a class index (0..{})",
                        fields.classes.unwrap_or(0)
                    ),
                ));
            }
        }
        let array = ArrayD::from_shape_vec(IxDyn(shape), values).expect("sized");
        row.insert(
            label.clone(),
            Array::from_f64(array, *elem_type).expect("label type"),
        );
        rows.push(Row { fields: row });
    }
    Ok(rows)
}

/// The vocabulary size: the rows of the embedding table that the token ids index
/// (`input_ids`, else the first integer input), read through a dequantization chain
/// (Cast, DequantizeLinear, a scale's Mul) to its initializer; else the rows of the
/// first 2-D initializer a Gather reads with computed indices.
pub fn vocab_size(model: &Model) -> Option<usize> {
    use crate::proto::tensor_proto::DataType as D;
    let g = &model.graph;
    let ids = g
        .inputs()
        .iter()
        .find(|io| g.value(io.value).name == "input_ids")
        .or_else(|| {
            g.inputs().iter().find(|io| {
                matches!(
                    crate::ir::infer::declared_type(g, io.value).and_then(|t| D::try_from(t).ok()),
                    Some(D::Int64 | D::Int32)
                ) && g.initializer(io.value).is_none()
            })
        })
        .map(|io| io.value);
    // A value, seen through ops that keep the token ids as they are.
    let from_ids = |mut v: crate::ir::ValueId| {
        for _ in 0..4 {
            if Some(v) == ids {
                return true;
            }
            match g.producer(v).map(|n| g.node(n)) {
                Some(n)
                    if matches!(
                        n.op(),
                        "Cast" | "Identity" | "Reshape" | "Flatten" | "Unsqueeze"
                    ) =>
                {
                    match n.inputs.first().copied().flatten() {
                        Some(x) => v = x,
                        None => return false,
                    }
                }
                _ => return false,
            }
        }
        false
    };
    // The rows of the 2-D table behind `v` (through its dequantization).
    let rows = |mut v: crate::ir::ValueId| {
        for _ in 0..6 {
            if let Some(init) = g.initializer(v) {
                return (init.dims().len() == 2).then(|| init.dims()[0] as usize);
            }
            let n = g.node(g.producer(v)?);
            v = match n.op() {
                "Cast" | "Identity" | "DequantizeLinear" => n.inputs.first().copied().flatten()?,
                // Mul/Div by a scale: the operand that is not a scalar or a row of scales.
                "Mul" | "Div" => n.inputs.iter().flatten().copied().find(|&x| {
                    g.initializer(x)
                        .is_none_or(|i| i.dims().len() == 2 && i.dims()[0] > 1)
                })?,
                _ => return None,
            };
        }
        None
    };
    let gathers = || {
        g.node_ids()
            .map(|id| g.node(id))
            .filter(|n| n.op() == "Gather")
    };
    gathers()
        .find_map(|n| {
            let idx = n.inputs.get(1).copied().flatten()?;
            from_ids(idx)
                .then(|| rows(n.inputs.first().copied().flatten()?))
                .flatten()
        })
        .or_else(|| {
            gathers().find_map(|n| {
                let data = n.inputs.first().copied().flatten()?;
                let idx = n.inputs.get(1).copied().flatten()?;
                let init = g.initializer(data)?;
                (init.dims().len() == 2 && g.initializer(idx).is_none())
                    .then(|| init.dims()[0] as usize)
            })
        })
}

/// The batch of step `step` (0-based): rows shuffled per epoch by `seed`.
pub fn batch_rows(rows: &[Row], batch: usize, step: usize, seed: u64) -> Vec<Row> {
    let per_epoch = (rows.len() / batch).max(1);
    let (epoch, k) = (step / per_epoch, step % per_epoch);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let mut rng = Rng::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    (0..batch)
        .map(|b| rows[order[(k * batch + b) % rows.len()]].clone())
        .collect()
}
