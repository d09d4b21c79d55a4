//! f32 matrix products through faer's kernels instead of tract's.
//!
//! On the machine we measured (AVX-512, one thread), tract's f32 kernels reach 50-90
//! GFLOP/s on the products of a training step, faer's 100-150 (in 512-column blocks). [`use_faer_matmuls`] turns
//! every matrix product of a decluttered f32 model into tract's `PrefixMatMul` form
//! (batch prefix, then rows and columns, with transpose flags) and runs it as
//! [`FaerMatMul`]. Models with any other product (f16, f64, quantized) keep tract's.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use tract_core::ops::einsum::prefix_matmul::{rewrite_einsum_to_prefix_matmul, PrefixMatMul};
use tract_core::ops::einsum::EinSum;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// Columns of C per faer call.
const COLUMN_BLOCK: usize = 512;

/// `PrefixMatMul` on plain f32 tensors, computed by faer, one thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaerMatMul {
    /// A is stored `[.., k, m]`.
    pub transpose_a: bool,
    /// B is stored `[.., n, k]`.
    pub transpose_b: bool,
    /// C is stored `[.., n, m]`.
    pub transpose_c: bool,
}

/// A matrix stored in the last two axes of a row-major tensor: its size and strides.
#[derive(Clone, Copy)]
struct Layout {
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl Layout {
    /// The last two axes of `shape`, swapped when `transposed`.
    fn of(shape: &[usize], transposed: bool) -> Layout {
        let (d0, d1) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let (rows, cols, row_stride, col_stride) = if transposed {
            (d1, d0, 1, d1 as isize)
        } else {
            (d0, d1, d1 as isize, 1)
        };
        Layout {
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// Columns `first..first + cols` of the matrix starting at `start`.
    ///
    /// # Safety
    /// The layout must describe a matrix starting at `start` inside one allocation, and
    /// `first + cols` must not exceed `self.cols`.
    unsafe fn columns<'a>(&self, start: *const f32, first: usize, cols: usize) -> MatRef<'a, f32> {
        let ptr = start.offset(first as isize * self.col_stride);
        MatRef::from_raw_parts(ptr, self.rows, cols, self.row_stride, self.col_stride)
    }

    /// [`Layout::columns`], writable.
    ///
    /// # Safety
    /// As for [`Layout::columns`], and nothing else may access those elements meanwhile.
    unsafe fn columns_mut<'a>(
        &self,
        start: *mut f32,
        first: usize,
        cols: usize,
    ) -> MatMut<'a, f32> {
        let ptr = start.offset(first as isize * self.col_stride);
        MatMut::from_raw_parts_mut(ptr, self.rows, cols, self.row_stride, self.col_stride)
    }
}

/// Element offset of batch index `ix` in a row-major tensor of `shape`, broadcasting
/// its unit batch axes.
fn batch_offset(shape: &[usize], ix: &[usize]) -> usize {
    let mut stride = shape[shape.len() - 2] * shape[shape.len() - 1];
    let mut offset = 0;
    for axis in (0..ix.len()).rev() {
        if shape[axis] != 1 {
            offset += ix[axis] * stride;
        }
        stride *= shape[axis];
    }
    offset
}

impl FaerMatMul {
    fn output_shape<D: DimLike>(&self, a: &[D], b: &[D]) -> TractResult<TVec<D>> {
        let rank = a.len();
        ensure!(
            rank >= 2 && b.len() == rank,
            "FaerMatMul wants two inputs of one rank >= 2"
        );
        let mut out: TVec<D> = (0..rank - 2)
            .map(|ix| {
                if a[ix].is_one() {
                    b[ix].clone()
                } else {
                    a[ix].clone()
                }
            })
            .collect();
        out.push(a[rank - 2 + self.transpose_a as usize].clone());
        out.push(b[rank - 2 + !self.transpose_b as usize].clone());
        if self.transpose_c {
            out.swap(rank - 2, rank - 1);
        }
        Ok(out)
    }
}

impl Op for FaerMatMul {
    fn name(&self) -> StaticName {
        "FaerMatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "transpose_a: {} transpose_b: {} transpose_c: {}",
            self.transpose_a, self.transpose_b, self.transpose_c
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for FaerMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = args_2!(inputs);
        let (a_shape, b_shape) = (a.shape(), b.shape());
        let c_shape = self.output_shape(a_shape, b_shape)?;
        let rank = c_shape.len();
        let la = Layout::of(a_shape, self.transpose_a);
        let lb = Layout::of(b_shape, self.transpose_b);
        let lc = Layout::of(&c_shape, self.transpose_c);
        ensure!(
            la.cols == lb.rows
                && la.rows == lc.rows
                && lb.cols == lc.cols
                && (0..rank - 2)
                    .all(|i| a_shape[i] == b_shape[i] || a_shape[i] == 1 || b_shape[i] == 1),
            "FaerMatMul: shapes {a_shape:?} and {b_shape:?} do not multiply"
        );
        let (a_plain, b_plain) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
        let (a_data, b_data) = (a_plain.as_slice::<f32>()?, b_plain.as_slice::<f32>()?);
        let mut c = if la.cols == 0 {
            Tensor::zero::<f32>(&c_shape)?
        } else {
            // SAFETY: f32 has no invalid bit patterns, and every element is written
            // below (Accum::Replace over a non-empty sum).
            unsafe { Tensor::uninitialized::<f32>(&c_shape)? }
        };
        {
            let mut c_plain = c.try_as_plain_ram_mut()?;
            let c_data = c_plain.as_slice_mut::<f32>()?;
            for ix in tract_ndarray::indices(&c_shape[..rank - 2]) {
                let ix = tract_ndarray::Dimension::slice(&ix);
                let (oa, ob, oc) = (
                    batch_offset(a_shape, ix),
                    batch_offset(b_shape, ix),
                    batch_offset(&c_shape, ix),
                );
                // faer runs wide products faster in column blocks (at 512 columns:
                // 150 GFLOP/s where the whole 512 x 512 x 1376 product gets 120); the
                // blocks are shared among the threads this worker may use.
                let blocks = lc.cols.div_ceil(COLUMN_BLOCK);
                let (a_at, b_at) = (a_data.as_ptr() as usize, b_data.as_ptr() as usize);
                let c_at = c_data.as_mut_ptr() as usize;
                crate::parallel::split_range(
                    blocks,
                    crate::parallel::product_threads(),
                    |_, part| {
                        for block in part {
                            let j = block * COLUMN_BLOCK;
                            let w = COLUMN_BLOCK.min(lc.cols - j);
                            // SAFETY: each layout describes a matrix inside its tensor's
                            // contiguous row-major buffer at that batch offset (shapes and
                            // batch broadcasting checked above), the block lies within it,
                            // `c` does not alias the inputs, and each thread writes its own
                            // column blocks of `c`.
                            unsafe {
                                let am = la.columns((a_at as *const f32).add(oa), 0, la.cols);
                                let bm = lb.columns((b_at as *const f32).add(ob), j, w);
                                let cm = lc.columns_mut((c_at as *mut f32).add(oc), j, w);
                                matmul(cm, Accum::Replace, am, bm, 1.0f32, Par::Seq);
                            }
                        }
                    },
                );
            }
        }
        Ok(tvec!(c.into_tvalue()))
    }
}

impl TypedOp for FaerMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [a, b] = inputs else {
            bail!("FaerMatMul expects 2 inputs");
        };
        ensure!(a.datum_type == f32::datum_type() && b.datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(self.output_shape(&a.shape, &b.shape)?)))
    }

    as_op!();
}

/// Whether every matrix product of `model` multiplies plain f32 tensors in f32.
fn all_products_are_f32(model: &TypedModel) -> TractResult<bool> {
    for node in &model.nodes {
        if let Some(op) = node.op_as::<EinSum>() {
            let facts = model.node_input_facts(node.id)?;
            let plain_f32 = facts
                .iter()
                .all(|f| f.datum_type == f32::datum_type() && f.is_plain());
            if op.q_params.is_some() || op.operating_dt != f32::datum_type() || !plain_f32 {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Runs every matrix product of decluttered `model` on faer's kernels, when all of
/// them are plain f32 (otherwise leaves the model alone). Returns whether it did.
pub fn use_faer_matmuls(model: &mut TypedModel) -> TractResult<bool> {
    if !all_products_are_f32(model)? {
        return Ok(false);
    }
    rewrite_einsum_to_prefix_matmul(model, false)?;
    for id in 0..model.nodes.len() {
        let Some(op) = model.nodes[id].op_as::<PrefixMatMul>().copied() else {
            continue;
        };
        ensure!(
            op.quantize_output.is_none(),
            "quantized product in an f32 model"
        );
        model.nodes[id].op = Box::new(FaerMatMul {
            transpose_a: op.transpose_a,
            transpose_b: op.transpose_b,
            transpose_c: op.transpose_c,
        });
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::einsum::EinSum;

    /// Runs `expr` on `a` and `b`, through tract's kernels and through faer's.
    fn both(expr: &str, a: &Tensor, b: &Tensor) -> (Tensor, Tensor, bool) {
        let mut model = TypedModel::default();
        let sa = model.add_source("a", f32::fact(a.shape())).unwrap();
        let sb = model.add_source("b", f32::fact(b.shape())).unwrap();
        let op = EinSum::new(expr.parse().unwrap(), f32::datum_type());
        let c = model.wire_node("c", op, &[sa, sb]).unwrap();
        model.select_output_outlets(&c).unwrap();
        let model = model.into_decluttered().unwrap();
        let inputs = tvec!(a.clone().into_tvalue(), b.clone().into_tvalue());
        let run = |m: TypedModel| {
            let plan = m.into_optimized().unwrap().into_runnable().unwrap();
            plan.run(inputs.clone()).unwrap().remove(0).into_tensor()
        };
        let mut faer = model.clone();
        let used = use_faer_matmuls(&mut faer).unwrap();
        // faer first: its output is uninitialised memory, which must not be a buffer
        // that already held the answer.
        let got = run(faer);
        (run(model), got, used)
    }

    fn tensor(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        tract_ndarray::ArrayD::from_shape_vec(shape, v)
            .unwrap()
            .into_tensor()
    }

    #[test]
    fn faer_products_equal_tracts() {
        // Plain, transposed operands and output, batch prefixes (broadcast too), and a
        // product wide enough to take several column blocks.
        let cases: &[(&str, &[usize], &[usize])] = &[
            ("mk,kn->mn", &[5, 7], &[7, 3]),
            ("km,kn->mn", &[7, 5], &[7, 3]),
            ("mk,nk->mn", &[5, 7], &[3, 7]),
            ("mk,kn->nm", &[5, 7], &[7, 3]),
            ("bmk,kn->bmn", &[2, 5, 7], &[7, 3]),
            ("bmk,bkn->bmn", &[2, 5, 7], &[2, 7, 3]),
            ("bmk,bnk->bnm", &[2, 5, 7], &[2, 3, 7]),
            ("abmk,abkn->abmn", &[1, 2, 5, 7], &[3, 1, 7, 4]),
            ("mk,kn->mn", &[9, 33], &[33, 1100]),
            ("mk,kn->nm", &[9, 33], &[33, 1100]),
        ];
        for (i, (expr, sa, sb)) in cases.iter().enumerate() {
            let (a, b) = (tensor(sa, i), tensor(sb, i + 100));
            let (want, got, used) = both(expr, &a, &b);
            assert!(used, "{expr}: faer was not used");
            assert_eq!(want.shape(), got.shape(), "{expr}");
            // f32 sums of at most 33 terms of size <= 1: the two kernels' orders of
            // summation differ by far less than 1e-4.
            let (w, g) = (
                want.to_plain_array_view::<f32>().unwrap(),
                got.to_plain_array_view::<f32>().unwrap(),
            );
            let bad = w
                .iter()
                .zip(g.iter())
                .position(|(x, y)| (x - y).abs().is_nan() || (x - y).abs() >= 1e-4);
            assert!(bad.is_none(), "{expr}: element {bad:?} differs");
        }
    }

    #[test]
    fn models_with_other_products_keep_tracts_kernels() {
        let mut model = TypedModel::default();
        let sa = model.add_source("a", f64::fact([2, 3])).unwrap();
        let sb = model.add_source("b", f64::fact([3, 4])).unwrap();
        let op = EinSum::new("mk,kn->mn".parse().unwrap(), f64::datum_type());
        let c = model.wire_node("c", op, &[sa, sb]).unwrap();
        model.select_output_outlets(&c).unwrap();
        let mut model = model.into_decluttered().unwrap();
        assert!(!use_faer_matmuls(&mut model).unwrap());
        assert!(model.nodes.iter().any(|n| n.op_is::<EinSum>()));
    }
}
