//! Losses built from basic ops (tract has no SoftmaxCrossEntropyLoss): causal-LM and
//! classification cross-entropy (LogSoftmax + GatherElements), and mean squared error.

use super::{int_attr, tensor_type, Emit};
use crate::error::{Error, Result};
use crate::ir::{GraphIo, ValueId};
use crate::proto::tensor_proto::DataType;

/// Which loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Logits `[B, S, V]`, labels `[B, S]` (int64), shifted by one, label -100 ignored,
    /// mean over counted tokens.
    CausalLm,
    /// Logits `[B, C]`, labels `[B]` (int64), mean over the batch.
    Class,
    /// Mean squared error against a `target` input of the output's shape.
    Mse,
}

impl Loss {
    /// Parses `causal-lm`, `class` or `mse`.
    pub fn parse(s: &str) -> Result<Loss> {
        match s {
            "causal-lm" => Ok(Loss::CausalLm),
            "class" => Ok(Loss::Class),
            "mse" => Ok(Loss::Mse),
            other => Err(Error::Usage(format!(
                "unknown loss '{other}'; use causal-lm, class or mse"
            ))),
        }
    }

    /// The name of the input the loss adds (`labels` or `target`).
    pub fn label_name(self) -> &'static str {
        match self {
            Loss::Mse => "target",
            _ => "labels",
        }
    }
}

/// Adds the label input and the loss nodes over `output`; returns the scalar loss,
/// computed in float32 (float64 for a float64 output; a float16 or bfloat16 output is
/// cast up first).
pub fn build(e: &mut Emit, loss: Loss, output: ValueId) -> Result<ValueId> {
    let shape = e.shape(output)?;
    e.prefix = "loss".into();
    let double = DataType::Double as i32;
    let out_type = e.dtypes.get(&output).copied().unwrap_or(e.dtype);
    e.dtype = if out_type == double {
        double
    } else {
        DataType::Float as i32
    };
    let output = if out_type != e.dtype && e.dtypes.contains_key(&output) {
        let cast = e.op(
            "Cast",
            &[output],
            vec![int_attr("to", e.dtype as i64)],
            shape.clone(),
        )?;
        e.dtypes.insert(cast, e.dtype);
        cast
    } else {
        output
    };
    let label_shape: Vec<usize> = match loss {
        Loss::CausalLm if shape.len() == 3 => shape[..2].to_vec(),
        Loss::Class if shape.len() == 2 => shape[..1].to_vec(),
        Loss::Mse => shape.clone(),
        _ => {
            return Err(Error::Usage(format!(
                "output '{}' has shape {shape:?}, which does not fit the {loss:?} loss",
                e.graph.value(output).name
            )))
        }
    };
    let label_type = if loss == Loss::Mse {
        e.dtype
    } else {
        DataType::Int64 as i32
    };
    let name = loss.label_name();
    let labels = e.graph.new_value(name);
    if e.graph.value(labels).name != name {
        return Err(Error::Usage(format!(
            "the model already has a value named '{name}'"
        )));
    }
    e.graph.set_input_def(labels);
    e.graph.inputs.push(GraphIo {
        value: labels,
        info: crate::proto::ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(tensor_type(label_type, &label_shape)),
            ..Default::default()
        },
    });
    e.shapes.insert(labels, label_shape.clone());
    match loss {
        Loss::Mse => {
            let d = e.bin("Sub", output, labels)?;
            let d2 = e.bin("Mul", d, d)?;
            let all: Vec<usize> = (0..shape.len()).collect();
            let total = e.reduce_sum(d2, &all, false)?;
            let inv = e.scalar(1.0 / shape.iter().product::<usize>() as f64);
            e.bin("Mul", total, inv)
        }
        Loss::Class => {
            let b = shape[0];
            let lsm = e.op(
                "LogSoftmax",
                &[output],
                vec![int_attr("axis", 1)],
                shape.clone(),
            )?;
            let idx = e.reshape(labels, &[b, 1])?;
            let picked = e.op(
                "GatherElements",
                &[lsm, idx],
                vec![int_attr("axis", 1)],
                vec![b, 1],
            )?;
            let total = e.reduce_sum(picked, &[0, 1], false)?;
            let inv = e.scalar(-1.0 / b as f64);
            e.bin("Mul", total, inv)
        }
        Loss::CausalLm => {
            let (b, s, v) = (shape[0], shape[1], shape[2]);
            if s < 2 {
                return Err(Error::Usage(
                    "the causal-LM loss needs sequences of at least 2 tokens".into(),
                ));
            }
            let (zero, last, one, axis1) = (
                e.ints(&[0]),
                e.ints(&[s as i64 - 1]),
                e.ints(&[1]),
                e.ints(&[1]),
            );
            let end = e.ints(&[s as i64]);
            let logits = e.op(
                "Slice",
                &[output, zero, last, axis1],
                vec![],
                vec![b, s - 1, v],
            )?;
            let targets = e.op("Slice", &[labels, one, end, axis1], vec![], vec![b, s - 1])?;
            let minus100 = e.ints(&[-100]);
            let ignored = e.op("Equal", &[targets, minus100], vec![], vec![b, s - 1])?;
            let counted = e.op("Not", &[ignored], vec![], vec![b, s - 1])?;
            let zero_id = e.ints(&[0]);
            let safe = e.op(
                "Where",
                &[ignored, zero_id, targets],
                vec![],
                vec![b, s - 1],
            )?;
            let idx = e.reshape(safe, &[b, s - 1, 1])?;
            let lsm = e.op(
                "LogSoftmax",
                &[logits],
                vec![int_attr("axis", 2)],
                vec![b, s - 1, v],
            )?;
            let picked = e.op(
                "GatherElements",
                &[lsm, idx],
                vec![int_attr("axis", 2)],
                vec![b, s - 1, 1],
            )?;
            let picked = e.reshape(picked, &[b, s - 1])?;
            let mask = e.mask(counted)?;
            let kept = e.bin("Mul", picked, mask)?;
            let total = e.reduce_sum(kept, &[0, 1], false)?;
            let count = e.reduce_sum(mask, &[0, 1], false)?;
            let one_f = e.scalar(1.0);
            let count = e.bin("Max", count, one_f)?;
            let mean = e.bin("Div", total, count)?;
            e.un("Neg", mean)
        }
    }
}
