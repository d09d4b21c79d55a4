//! `MatMulNBits` and its input gradient in tract, on the packed weight.
//!
//! tract's own `MatMulNBits` rounds the scales to f16 (its Q4_0 format; 9e-4 relative
//! off onnxruntime on the genai fixture), runs neither 8 bits nor other block layouts
//! without a float copy of the weight, and has no transposed form for the gradient. Here
//! both products keep the weight as stored ([`NbitsMatrix`]: the packed bytes, one f32
//! scale and zero point per block) and dequantize [`ROWS`] rows at a time into a scratch
//! buffer that faer multiplies: the training graph of an int4 model holds its weights
//! at 4 bits, and the products compute exactly what onnxruntime's dequantized weight
//! gives, in faer's f32 kernels.

use std::sync::Arc;

use faer::linalg::matmul::matmul;
use faer::prelude::ReborrowMut;
use faer::{Accum, MatMut, MatRef, Par};
use tract_onnx::model::{optional_inputs, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::math::add;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::logic::wire_with_rank_broadcast;

use crate::quant::{NbitsMatrix, ZeroPoints};

/// The op lora-graft's gradient pass writes for `MatMulNBits`' input gradient:
/// `MatMulNBitsInputGrad(dY [.., N], B, scales, zero_points?)` → `dY · W` `[.., K]`,
/// with `MatMulNBits`' attributes and weight inputs. Runs in tract only; portable
/// graphs get a float `MatMul` instead (`passes::grad::portable`).
pub const INPUT_GRAD_OP: &str = "MatMulNBitsInputGrad";

/// The domain of [`INPUT_GRAD_OP`].
pub const DOMAIN: &str = "ai.lora_graft";

/// Weight rows dequantized per faer call: 512 columns is where faer's kernel runs
/// fastest (see `runtime::matmul`), and the scratch stays at `512·K` floats.
const ROWS: usize = 512;

thread_local! {
    /// Each thread's buffer of dequantized rows, reused by every product it runs (a
    /// fresh megabyte a call fragments the allocator's per-thread arenas).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Which product of the packed weight `W` `[N, K]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// `MatMulNBits`: `A [.., K] · Wᵀ` → `[.., N]`.
    Forward,
    /// Its input gradient: `dY [.., N] · W` → `[.., K]`.
    InputGradient,
}

/// A product of an f32 activation with a packed weight, computed by faer on rows
/// dequantized [`ROWS`] at a time. Two are equal when they share their weight.
#[derive(Debug, Clone)]
pub struct NbitsMatMul {
    /// The weight, shared by the forward and gradient nodes of one layer.
    pub weight: Arc<NbitsMatrix>,
    /// Which product.
    pub product: Product,
}

impl PartialEq for NbitsMatMul {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weight, &other.weight) && self.product == other.product
    }
}

impl Eq for NbitsMatMul {}

impl NbitsMatMul {
    /// The activation's last axis and the output's.
    fn widths(&self) -> (usize, usize) {
        let w = &self.weight;
        match self.product {
            Product::Forward => (w.k, w.n),
            Product::InputGradient => (w.n, w.k),
        }
    }

    /// `a` `[m, inner]` times the weight into `y` `[m, outer]` (both row-major): the
    /// weight's rows dequantized [`ROWS`] at a time into this thread's scratch, the
    /// chunks shared among the threads this worker may use (the forward writes each
    /// chunk's columns of `y`; the input gradient sums each thread's chunks, then adds
    /// the threads' partial sums).
    fn multiply(&self, a: &[f32], y: &mut [f32], m: usize) {
        let w = &self.weight;
        let (inner, outer) = self.widths();
        let rows = ROWS.min(w.n);
        let chunks = w.n.div_ceil(rows);
        let parts = crate::parallel::product_threads().min(chunks);
        let a = MatRef::from_row_major_slice(a, m, inner);
        // Partial sums of the input gradient, one per thread after the first.
        let mut partials = match self.product {
            Product::InputGradient => vec![vec![0f32; m * outer]; parts - 1],
            Product::Forward => Vec::new(),
        };
        let y_at = y.as_mut_ptr() as usize;
        let partial_at: Vec<usize> = partials
            .iter_mut()
            .map(|p| p.as_mut_ptr() as usize)
            .collect();
        crate::parallel::split_range(chunks, parts, |p, part| {
            // SAFETY: the forward's threads write disjoint columns of `y` (their own
            // chunks); the gradient's thread p writes only `y` (p = 0) or its own
            // partial sum, each `m·outer` floats.
            let mut out = unsafe {
                let at = if p == 0 || self.product == Product::Forward {
                    y_at
                } else {
                    partial_at[p - 1]
                };
                MatMut::from_raw_parts_mut(at as *mut f32, m, outer, outer as isize, 1)
            };
            SCRATCH.with_borrow_mut(|scratch| {
                if scratch.len() < rows * w.k {
                    scratch.resize(rows * w.k, 0.0);
                }
                for (c, chunk) in part.enumerate() {
                    let first = chunk * rows;
                    let count = rows.min(w.n - first);
                    let values = &mut scratch[..count * w.k];
                    w.rows_to_float(first..first + count, values);
                    let values = MatRef::from_row_major_slice(values, count, w.k);
                    match self.product {
                        // Y[:, rows] = A · W[rows, :]ᵀ
                        Product::Forward => matmul(
                            out.rb_mut().subcols_mut(first, count),
                            Accum::Replace,
                            a,
                            values.transpose(),
                            1.0f32,
                            Par::Seq,
                        ),
                        // Y += A[:, rows] · W[rows, :]
                        Product::InputGradient => matmul(
                            out.rb_mut(),
                            if c == 0 { Accum::Replace } else { Accum::Add },
                            a.subcols(first, count),
                            values,
                            1.0f32,
                            Par::Seq,
                        ),
                    }
                }
            });
        });
        for partial in &partials {
            for (y, v) in y.iter_mut().zip(partial) {
                *y += v;
            }
        }
    }
}

impl Op for NbitsMatMul {
    fn name(&self) -> StaticName {
        "NbitsMatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let w = &self.weight;
        Ok(vec![format!(
            "{:?} N={} K={} bits={} block_size={}",
            self.product, w.n, w.k, w.bits, w.block
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for NbitsMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let a = args_1!(inputs);
        let (inner, outer) = self.widths();
        let shape = a.shape();
        ensure!(
            shape.last() == Some(&inner),
            "NbitsMatMul: input of shape {shape:?}, expected [.., {inner}]"
        );
        let m = a.len() / inner.max(1);
        let mut out_shape: TVec<usize> = shape.into();
        *out_shape.last_mut().expect("rank >= 1") = outer;
        let a_plain = a.try_as_plain_ram()?;
        let mut y = Tensor::zero::<f32>(&out_shape)?;
        if m > 0 {
            let mut y_plain = y.try_as_plain_ram_mut()?;
            self.multiply(
                a_plain.as_slice::<f32>()?,
                y_plain.as_slice_mut::<f32>()?,
                m,
            );
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for NbitsMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [a] = inputs else {
            bail!("NbitsMatMul expects 1 input");
        };
        ensure!(a.datum_type == f32::datum_type() && a.rank() >= 1);
        let mut shape = a.shape.to_tvec();
        *shape.last_mut().expect("rank >= 1") = self.widths().1.to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// The ONNX node, parsed: attributes and which inputs are present.
#[derive(Debug, Clone)]
struct NbitsNode {
    product: Product,
    n: usize,
    k: usize,
    bits: usize,
    block: usize,
    /// Positions among the node's present inputs.
    zero_points: Option<usize>,
    bias: Option<usize>,
}

/// `com.microsoft:MatMulNBits`, for tract's ONNX op register.
pub fn parse_forward(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    parse(node, Product::Forward)
}

/// [`INPUT_GRAD_OP`], for tract's ONNX op register.
pub fn parse_input_grad(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    parse(node, Product::InputGradient)
}

fn parse(node: &NodeProto, product: Product) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let slots: Vec<Option<usize>> = optional_inputs(node).take(6).collect();
    ensure!(
        slots[4].is_none(),
        "MatMulNBits: g_idx (act-order) is not supported"
    );
    let parsed = NbitsNode {
        product,
        n: node.get_attr("N")?,
        k: node.get_attr("K")?,
        bits: node.get_attr_opt("bits")?.unwrap_or(4),
        block: node.get_attr("block_size")?,
        zero_points: slots[3],
        bias: slots[5].filter(|_| product == Product::Forward),
    };
    Ok((expand(parsed), vec![]))
}

impl Expansion for NbitsNode {
    fn name(&self) -> StaticName {
        "NbitsMatMul".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        let width = match self.product {
            Product::Forward => self.n,
            Product::InputGradient => self.k,
        }
        .to_dim();
        s.given(&inputs[0].rank, move |s, rank| {
            let rank = rank as usize;
            s.equals(&outputs[0].rank, rank as i64)?;
            for ax in 0..rank - 1 {
                s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
            }
            s.equals(&outputs[0].shape[rank - 1], width.clone())
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let konst = |i: usize, what: &str| -> TractResult<Arc<Tensor>> {
            model
                .outlet_fact(inputs[i])?
                .konst
                .clone()
                .with_context(|| format!("MatMulNBits: {what} must be a constant"))
        };
        let packed = konst(1, "the quantized weight B")?;
        let packed = packed.try_as_plain_ram()?.as_slice::<u8>()?.to_vec();
        let scales = konst(2, "scales")?.cast_to::<f32>()?.into_owned();
        let scales = scales.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let zero_points = match self.zero_points {
            None => ZeroPoints::Symmetric,
            Some(i) => {
                let z = konst(i, "zero_points")?;
                if z.datum_type() == u8::datum_type() {
                    ZeroPoints::Packed(z.try_as_plain_ram()?.as_slice::<u8>()?.to_vec())
                } else {
                    let z = z.cast_to::<f32>()?.into_owned();
                    ZeroPoints::Float(z.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
                }
            }
        };
        let weight = NbitsMatrix::new(
            (self.n, self.k),
            self.bits,
            self.block,
            packed,
            scales,
            zero_points,
        )
        .map_err(|e| format_err!("{prefix}: {e}"))?;
        let dt = model.outlet_fact(inputs[0])?.datum_type;
        let mut a = inputs[0];
        if dt != f32::datum_type() {
            a = model.wire_node(format!("{prefix}.cast_a"), cast(f32::datum_type()), &[a])?[0];
        }
        let op = NbitsMatMul {
            weight: Arc::new(weight),
            product: self.product,
        };
        let mut y = model.wire_node(format!("{prefix}.product"), op, &[a])?[0];
        if dt != f32::datum_type() {
            y = model.wire_node(format!("{prefix}.cast_y"), cast(dt), &[y])?[0];
        }
        if let Some(i) = self.bias {
            y = wire_with_rank_broadcast(format!("{prefix}.bias"), model, add(), &[y, inputs[i]])?
                [0];
        }
        Ok(tvec!(y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// A random weight `[n, k]` of `bits` bits in blocks of `block`, with packed zero
    /// points when `asymmetric`.
    fn weight(n: usize, k: usize, bits: usize, block: usize, asymmetric: bool) -> NbitsMatrix {
        let mut rng = Rng::new((n * k + bits) as u64);
        let blocks = k.div_ceil(block);
        let mut byte = || (rng.next_u64() % 256) as u8;
        let packed = (0..n * blocks * block * bits / 8).map(|_| byte()).collect();
        let zero_points = if asymmetric {
            ZeroPoints::Packed((0..n * blocks.div_ceil(8 / bits)).map(|_| byte()).collect())
        } else {
            ZeroPoints::Symmetric
        };
        let scales = (0..n * blocks)
            .map(|i| 0.01 + (i % 7) as f32 * 0.003)
            .collect();
        NbitsMatrix::new((n, k), bits, block, packed, scales, zero_points).unwrap()
    }

    /// Both products equal the float weight's, in f64, within f32 rounding: the
    /// forward and the input gradient, on 2, 4 and 8 bits, with and without zero
    /// points, a partial last block, and more rows than one dequantized chunk; on one
    /// thread and with the chunks shared among three.
    #[test]
    fn packed_products_equal_the_float_weights() {
        for threads in [1, 3] {
            crate::parallel::set_product_threads(threads);
            packed_products_on_this_thread();
        }
        crate::parallel::set_product_threads(1);
    }

    fn packed_products_on_this_thread() {
        let cases = [
            (3, 16, 4, 8, true),
            (600, 72, 4, 32, false),
            (40, 50, 8, 16, true),
            (530, 64, 2, 16, true),
            (1500, 40, 4, 8, false),
        ];
        for (n, k, bits, block, asymmetric) in cases {
            let w = Arc::new(weight(n, k, bits, block, asymmetric));
            let float = w.to_float();
            let m = 5;
            for product in [Product::Forward, Product::InputGradient] {
                let op = NbitsMatMul {
                    weight: w.clone(),
                    product,
                };
                let (inner, outer) = op.widths();
                let mut rng = Rng::new(9);
                let a: Vec<f32> = (0..m * inner).map(|_| rng.normal() as f32).collect();
                let mut y = vec![f32::NAN; m * outer];
                op.multiply(&a, &mut y, m);
                for i in 0..m {
                    for j in 0..outer {
                        let want: f64 = (0..inner)
                            .map(|t| {
                                let wv = match product {
                                    Product::Forward => float[(j, t)],
                                    Product::InputGradient => float[(t, j)],
                                };
                                a[i * inner + t] as f64 * wv as f64
                            })
                            .sum();
                        let scale: f64 = (0..inner)
                            .map(|t| (a[i * inner + t] as f64).abs())
                            .sum::<f64>()
                            * 0.05
                            * 255.0;
                        // f32 sums of `inner` terms: well within 1e-6 of their magnitude.
                        let got = y[i * outer + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * scale,
                            "{product:?} n={n} k={k} bits={bits}: [{i}, {j}] {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sizes_that_do_not_match_are_refused() {
        let bad = NbitsMatrix::new(
            (2, 16),
            4,
            16,
            vec![0; 15],
            vec![1.0; 2],
            ZeroPoints::Symmetric,
        );
        assert!(bad.unwrap_err().contains("B has 15 bytes"));
        let bad = NbitsMatrix::new(
            (2, 16),
            3,
            16,
            vec![0; 12],
            vec![1.0; 2],
            ZeroPoints::Symmetric,
        );
        assert!(bad.unwrap_err().contains("bits=3"));
    }
}
