//! Losses built from basic ops (tract has no SoftmaxCrossEntropyLoss): causal-LM and
//! classification cross-entropy (Softmax, ReduceMax and GatherElements), and mean
//! squared error.
//!
//! Cross-entropy also brings its gradient with respect to the logits in closed form,
//! `(softmax(x) − onehot(label)) · mask / count`, and the gradient pass starts there:
//! in float32 one pass of lora-graft's `SoftmaxCrossEntropyGrad` over the logits, in
//! their own buffer ([`log_softmax_at`] in default ops otherwise, and for other
//! runtimes).

use crate::error::{Error, Result};
use crate::ir::build::{int_attr, tensor_type, Builder};
use crate::ir::{GraphIo, ValueId};
use crate::proto::tensor_proto::DataType;

/// Which loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Loss {
    /// Logits `[B, S, V]`, labels `[B, S]` (int64), shifted by one, label -100 ignored,
    /// mean over counted tokens.
    #[value(name = "causal-lm")]
    CausalLm,
    /// Logits `[B, C]`, labels `[B]` (int64), mean over the batch.
    Class,
    /// Mean squared error against a `target` input of the output's shape.
    Mse,
}

impl Loss {
    /// The name of the input the loss adds (`labels` or `target`).
    pub fn label_name(self) -> &'static str {
        match self {
            Loss::Mse => "target",
            _ => "labels",
        }
    }
}

/// The loss value, and where the gradient pass starts.
#[derive(Debug, Clone, Copy)]
pub struct BuiltLoss {
    /// The scalar loss.
    pub loss: ValueId,
    /// `(x, dloss/dx)` when the loss gives its gradient with respect to its input `x`
    /// in closed form; otherwise the pass differentiates the loss nodes too.
    pub seed: Option<(ValueId, ValueId)>,
}

/// Adds the label input and the loss nodes over `output`; the loss is computed in
/// float32 (float64 for a float64 output; a float16 or bfloat16 output is cast up
/// first).
pub fn build(e: &mut Builder, loss: Loss, output: ValueId) -> Result<BuiltLoss> {
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
        let cast = e.op_shaped(
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
    e.graph.add_input(GraphIo {
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
            let inv = e.scalar("c", 1.0 / shape.iter().product::<usize>() as f64);
            let loss = e.bin("Mul", total, inv)?;
            Ok(BuiltLoss { loss, seed: None })
        }
        Loss::Class => cross_entropy(e, output, labels),
        Loss::CausalLm => {
            let (b, s) = (shape[0], shape[1]);
            if s < 2 {
                return Err(Error::Usage(
                    "the causal-LM loss needs sequences of at least 2 tokens".into(),
                ));
            }
            // Position t predicts token t + 1; the last position predicts nothing.
            // Shifting the labels rather than slicing the logits spares a copy of the
            // logits (and a Pad in the gradient).
            let (one, end, axis1) = (
                e.ints("i", &[1]),
                e.ints("i", &[s as i64]),
                e.ints("i", &[1]),
            );
            let next = e.op_shaped("Slice", &[labels, one, end, axis1], vec![], vec![b, s - 1])?;
            let none = e.ints("i", &vec![IGNORED; b]);
            let none = e.reshape(none, &[b, 1])?;
            let targets = e.op_shaped(
                "Concat",
                &[next, none],
                vec![int_attr("axis", 1)],
                vec![b, s],
            )?;
            cross_entropy(e, output, targets)
        }
    }
}

/// The label that counts for nothing (PyTorch's `ignore_index`).
const IGNORED: i64 = -100;

/// Mean cross-entropy of logits `x` (`[N.., V]`) against `targets` (`[N..]`, int64,
/// [`IGNORED`] not counted), with its gradient with respect to `x`:
///
/// `loss = −Σ mask·log_softmax(x)[target] / max(Σ mask, 1)`;
/// `dloss/dx = (softmax(x) − onehot(target)) · w`, `w = mask / max(Σ mask, 1)`.
fn cross_entropy(e: &mut Builder, x: ValueId, targets: ValueId) -> Result<BuiltLoss> {
    let shape = e.shape(x)?;
    let rows = shape[..shape.len() - 1].to_vec();
    let mut column = rows.clone();
    column.push(1);
    let all: Vec<usize> = (0..rows.len()).collect();
    let ignored_label = e.ints("i", &[IGNORED]);
    let ignored = e.op_shaped("Equal", &[targets, ignored_label], vec![], rows.clone())?;
    let counted = e.op_shaped("Not", &[ignored], vec![], rows.clone())?;
    let zero = e.ints("i", &[0]);
    let safe = e.op_shaped("Where", &[ignored, zero, targets], vec![], rows.clone())?;
    let idx = e.reshape(safe, &column)?;
    let mask = e.mask(counted)?;
    let count = e.reduce_sum(mask, &all, false)?;
    let one = e.scalar("c", 1.0);
    let count = e.bin("Max", count, one)?;
    let w = e.bin("Div", mask, count)?;
    let w = e.reshape(w, &column)?;
    let (log_p, dx) = if e.dtype == DataType::Float as i32 {
        fused_log_softmax_at(e, x, idx, w)?
    } else {
        log_softmax_at(e, x, idx, w)?
    };
    let picked = e.reshape(log_p, &rows)?;
    let kept = e.bin("Mul", picked, mask)?;
    let total = e.reduce_sum(kept, &all, false)?;
    let mean = e.bin("Div", total, count)?;
    let loss = e.un("Neg", mean)?;
    Ok(BuiltLoss {
        loss,
        seed: Some((x, dx)),
    })
}

/// `(log_softmax(x)[idx] [N.., 1], (softmax(x) − onehot(idx))·w [N.., V])` as lora-graft's
/// one-pass `SoftmaxCrossEntropyGrad` (`runtime::cross_entropy`; float32), which
/// overwrites the logits with the gradient; its attribute `logits_shape` lets
/// [`super::portable`] write [`log_softmax_at`] instead for other runtimes.
fn fused_log_softmax_at(
    e: &mut Builder,
    x: ValueId,
    idx: ValueId,
    w: ValueId,
) -> Result<(ValueId, ValueId)> {
    use crate::runtime::cross_entropy::CROSS_ENTROPY_GRAD_OP;
    let shape = e.shape(x)?;
    let column = e.shape(idx)?;
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let attrs = vec![crate::ir::build::ints_attr("logits_shape", &dims)];
    let op = CROSS_ENTROPY_GRAD_OP;
    let outs = super::fused::kernel(e, op, &[x, idx, w], attrs, vec![column, shape])?;
    Ok((outs[0], outs[1]))
}

/// [`fused_log_softmax_at`] in default ops: `log_softmax(x)[t] = x[t] − max x −
/// log Σ exp(x − max x)`, and the softmax at the argmax is `exp(0) / Σ exp(x − max x)`,
/// so `log_softmax(x)[t] = x[t] − max x + log max softmax(x)`: no log over the whole
/// row (max softmax ≥ 1/V never underflows), and the softmax is the one the gradient
/// needs. The gradient is `ScatterElements(p·w, t, (p·w)[t] − w)`: one Softmax, one Mul
/// and a scatter, where differentiating LogSoftmax and GatherElements op by op costs
/// five passes and a scatter into a fresh zero tensor.
pub(super) fn log_softmax_at(
    e: &mut Builder,
    x: ValueId,
    idx: ValueId,
    w: ValueId,
) -> Result<(ValueId, ValueId)> {
    let shape = e.shape(x)?;
    let column = e.shape(idx)?;
    let axis = shape.len() - 1;
    let on_axis = || int_attr("axis", axis as i64);
    let p = e.op_shaped("Softmax", &[x], vec![on_axis()], shape.clone())?;
    let x_max = e.reduce("ReduceMax", x, &[axis], true)?;
    let p_max = e.reduce("ReduceMax", p, &[axis], true)?;
    let log_sum = e.un("Log", p_max)?;
    let x_at = e.op_shaped("GatherElements", &[x, idx], vec![on_axis()], column.clone())?;
    let shifted = e.bin("Sub", x_at, x_max)?;
    let log_p = e.bin("Add", shifted, log_sum)?;
    let pw = e.bin("Mul", p, w)?;
    let at_target = e.op_shaped("GatherElements", &[pw, idx], vec![on_axis()], column)?;
    let update = e.bin("Sub", at_target, w)?;
    let dx = e.op_shaped(
        "ScatterElements",
        &[pw, idx, update],
        vec![on_axis()],
        shape,
    )?;
    Ok((log_p, dx))
}
