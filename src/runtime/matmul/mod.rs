//! f32 matrix products through faer's kernels instead of tract's.
//!
//! On the machine we measured (AVX-512, one thread), tract's f32 kernels reach 50-90
//! GFLOP/s on the products of a training step, faer's 100-150 (in 512-column blocks).
//! [`use_faer_matmuls`] runs every `EinSum` product of a decluttered f32 model as
//! [`FaerMatMul`], which reads its operands in place through strides. Models with any
//! other product (f16, f64, quantized) keep tract's.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use tract_core::ops::einsum::EinSum;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

mod accumulate;
#[cfg(target_arch = "x86_64")]
mod amx;
mod attention;
mod attention_grad;
mod heads;
mod live;
mod scalars;
mod tiles;

pub use accumulate::accumulate_sums;
pub use attention::fuse_attention;
pub use attention_grad::fuse_attention_gradients;
pub use live::restrict_to_live_outputs;
pub use scalars::fold_scalar_factors;
use tiles::{Live, Operand};

/// An f32 `EinSum` of two plain tensors as a matrix product computed by faer, read in
/// place: every axis, in any order, becomes an element stride of A, B and C, so no
/// operand is moved or reshaped first (tract's own matmul form copies any operand whose
/// axes are not in `[batch.., m, k]` order, and copies shared ones to reshape them).
#[derive(Debug, Clone, PartialEq)]
pub struct FaerMatMul {
    /// Each axis of the sum: its position in A, B and C (absent: `None`).
    axes: TVec<Place>,
    /// C's rank.
    c_rank: usize,
    /// The EinSum's expression, for profiles.
    expr: String,
    /// A factor on the product, `C = alpha·A·B`: a `Mul` by a constant folded in
    /// ([`fold_scalar_factors`]).
    alpha: f32,
    /// Where C is read at all, from a third input shaped like C (or broadcast to it);
    /// elsewhere C is written as zeros ([`restrict_to_live_outputs`]).
    live: Option<Live>,
    /// Whether a third input is added to the product, `C = X + alpha·A·B`, summed in
    /// X's buffer ([`accumulate_sums`]).
    add_to: bool,
}

// Ops compare by value; a folded factor is a model's finite constant.
impl Eq for FaerMatMul {}

/// Where one axis of the sum sits in A, B and C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    a: Option<usize>,
    b: Option<usize>,
    c: Option<usize>,
}

/// One axis (or run of merged axes) at run time: its size and its element strides in A,
/// B, C and the live-output reference (0 where absent or of size 1: broadcast).
#[derive(Debug, Clone, Copy)]
struct Span {
    size: usize,
    a: isize,
    b: isize,
    c: isize,
    r: isize,
}

impl Span {
    /// A unit span: a matrix dimension that is absent.
    const UNIT: Span = Span {
        size: 1,
        a: 0,
        b: 0,
        c: 0,
        r: 0,
    };

    /// Whether `self` (outer) and `inner` are one run of memory in every tensor.
    fn merges_with(&self, inner: &Span) -> bool {
        let n = inner.size as isize;
        self.a == inner.a * n
            && self.b == inner.b * n
            && self.c == inner.c * n
            && self.r == inner.r * n
    }
}

/// Row-major strides of `shape`.
fn natural_strides(shape: &[usize]) -> TVec<isize> {
    let mut strides: TVec<isize> = tvec![0; shape.len()];
    let mut s = 1isize;
    for ix in (0..shape.len()).rev() {
        strides[ix] = s;
        s *= shape[ix] as isize;
    }
    strides
}

/// The axes of one role (m, n, k or batch) merged where they are one run of memory in
/// every tensor, outermost first.
fn merged(mut spans: Vec<Span>, key: impl Fn(&Span) -> isize) -> Vec<Span> {
    spans.sort_by_key(|s| std::cmp::Reverse(key(s)));
    let mut out: Vec<Span> = Vec::new();
    for s in spans {
        match out.last_mut() {
            Some(last) if last.merges_with(&s) => {
                last.size *= s.size;
                last.a = s.a;
                last.b = s.b;
                last.c = s.c;
                last.r = s.r;
            }
            _ => out.push(s),
        }
    }
    out
}

/// Removes and returns the largest span of `spans` (the matrix's own dimension; the rest
/// are looped over), or a unit span.
fn take_largest(spans: &mut Vec<Span>) -> Span {
    match (0..spans.len()).max_by_key(|&i| spans[i].size) {
        Some(i) => spans.remove(i),
        None => Span::UNIT,
    }
}

/// How one product runs: the matrix dimensions, the axes looped over (their outputs
/// replace) and the summed axes looped over (their outputs add up).
struct Plan {
    m: Span,
    k: Span,
    n: Span,
    loops: Vec<Span>,
    k_loops: Vec<Span>,
}

impl FaerMatMul {
    /// The product `op` computes on inputs of shapes `a` and `b`, when it is one this
    /// kernel runs: two inputs, no axis twice in a tensor, and every axis of size other
    /// than 1 either in C and an input, or summed over both inputs.
    fn of(op: &EinSum, a: &ShapeFact, b: &ShapeFact) -> Option<FaerMatMul> {
        let axes = &op.axes;
        if axes.input_count() != 2 || axes.output_count() != 1 {
            return None;
        }
        let mut places = TVec::new();
        for axis in axes.iter_all_axes() {
            let one = |p: &TVec<usize>| -> Option<Option<usize>> {
                match p.len() {
                    0 => Some(None),
                    1 => Some(Some(p[0])),
                    _ => None,
                }
            };
            let place = Place {
                a: one(&axis.inputs[0])?,
                b: one(&axis.inputs[1])?,
                c: one(&axis.outputs[0])?,
            };
            let matrix_axis = match place.c {
                Some(_) => place.a.is_some() || place.b.is_some(),
                None => place.a.is_some() && place.b.is_some(),
            };
            let unit =
                |pos: Option<usize>, shape: &ShapeFact| pos.is_none_or(|i| shape[i].is_one());
            if !(matrix_axis || unit(place.a, a) && unit(place.b, b)) {
                return None;
            }
            // A summed axis broadcast from one side is left to tract.
            if let (None, Some(i), Some(j)) = (place.c, place.a, place.b) {
                if a[i] != b[j] {
                    return None;
                }
            }
            places.push(place);
        }
        Some(FaerMatMul {
            axes: places,
            c_rank: axes.rank(InOut::Out(0)),
            expr: axes.to_string(),
            alpha: 1.0,
            live: None,
            add_to: false,
        })
    }

    /// C's shape for inputs of shapes `a` and `b` (unit axes broadcast; an axis of C in
    /// neither input has size 1).
    fn output_shape<D: DimLike>(&self, a: &[D], b: &[D]) -> TractResult<TVec<D>> {
        let mut out: TVec<D> = tvec![D::one(); self.c_rank];
        for p in &self.axes {
            let Some(c) = p.c else { continue };
            let (da, db) = (p.a.map(|i| &a[i]), p.b.map(|i| &b[i]));
            out[c] = match (da, db) {
                (Some(x), Some(y)) if x.is_one() => y.clone(),
                (Some(x), _) => x.clone(),
                (None, Some(y)) => y.clone(),
                (None, None) => D::one(),
            };
        }
        Ok(out)
    }

    /// The spans of a product of `a` by `b` into `c` (row-major shapes), by role, with
    /// the strides of the live-output reference of shape `r` (C's rank) if any.
    fn plan(
        &self,
        a: &[usize],
        b: &[usize],
        c: &[usize],
        r: Option<&[usize]>,
    ) -> TractResult<Plan> {
        let (sa, sb, sc) = (natural_strides(a), natural_strides(b), natural_strides(c));
        let sr = r.map(natural_strides);
        let (mut m, mut n, mut k, mut batch) = (vec![], vec![], vec![], vec![]);
        for p in &self.axes {
            let (da, db) = (p.a.map(|i| a[i]), p.b.map(|i| b[i]));
            let size = match (da, db) {
                (Some(x), Some(y)) if x == y || y == 1 => x,
                (Some(1), Some(y)) => y,
                (Some(x), None) => x,
                (None, Some(y)) => y,
                (None, None) => 1,
                _ => bail!(
                    "FaerMatMul {}: shapes {a:?} and {b:?} do not multiply",
                    self.expr
                ),
            };
            if size == 1 {
                continue;
            }
            let stride =
                |pos: Option<usize>, dim: Option<usize>, strides: &[isize]| match (pos, dim) {
                    (Some(ix), Some(d)) if d != 1 => strides[ix],
                    _ => 0,
                };
            let span = Span {
                size,
                a: stride(p.a, da, &sa),
                b: stride(p.b, db, &sb),
                c: p.c.map_or(0, |ix| sc[ix]),
                r: match (p.c, r, &sr) {
                    (Some(ix), Some(r), Some(sr)) if r[ix] != 1 => sr[ix],
                    _ => 0,
                },
            };
            match (span.a != 0, span.b != 0, span.c != 0) {
                (true, false, true) => m.push(span),
                (false, true, true) => n.push(span),
                (true, true, false) => k.push(span),
                (true, true, true) => batch.push(span),
                _ => bail!(
                    "FaerMatMul {}: an axis of size {size} is read by one side only",
                    self.expr
                ),
            }
        }
        let (mut m, mut n) = (merged(m, |s| s.c), merged(n, |s| s.c));
        let mut k = merged(k, |s| s.a.max(s.b));
        let mut loops = merged(batch, |s| s.c);
        let (m0, n0, k0) = (
            take_largest(&mut m),
            take_largest(&mut n),
            take_largest(&mut k),
        );
        loops.extend(m);
        loops.extend(n);
        Ok(Plan {
            m: m0,
            k: k0,
            n: n0,
            loops,
            k_loops: k,
        })
    }
}

/// Every combination of indices of `spans`, as offsets in A, B, C and the reference.
fn offsets(spans: &[Span]) -> Vec<[isize; 4]> {
    let mut out = vec![[0isize; 4]];
    for s in spans {
        out = out
            .iter()
            .flat_map(|&[a, b, c, r]| {
                (0..s.size as isize)
                    .map(move |i| [a + i * s.a, b + i * s.b, c + i * s.c, r + i * s.r])
            })
            .collect();
    }
    out
}

impl Op for FaerMatMul {
    fn name(&self) -> StaticName {
        "FaerMatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        if self.alpha == 1.0 {
            return Ok(vec![self.expr.clone()]);
        }
        Ok(vec![format!("{} x{}", self.expr, self.alpha)])
    }

    op_as_typed_op!();
}

impl EvalOp for FaerMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut inputs = inputs.into_iter();
        let (Some(a), Some(b), third) = (inputs.next(), inputs.next(), inputs.next()) else {
            bail!("FaerMatMul takes 2 inputs, and a live-output reference or an addend");
        };
        let (addend, reference) = if self.add_to {
            (third, None)
        } else {
            (None, third)
        };
        let (a_shape, b_shape) = (a.shape(), b.shape());
        let c_shape = self.output_shape(a_shape, b_shape)?;
        if let Some(x) = &addend {
            ensure!(
                x.shape() == &c_shape[..],
                "FaerMatMul: addend {:?} for C {c_shape:?}",
                x.shape()
            );
        }
        if a.len() == 0 || b.len() == 0 || c_shape.contains(&0) {
            // An empty sum (zeros) or an empty output; row-major strides of a tensor
            // with a zero dim would not tell its axes apart.
            return Ok(tvec!(match addend {
                Some(x) => x,
                None => Tensor::zero::<f32>(&c_shape)?.into_tvalue(),
            }));
        }
        let live = match (self.live, &reference) {
            (Some(live), Some(r)) => {
                let fits = super::pattern::broadcasts_to(r.shape(), &c_shape);
                ensure!(
                    fits,
                    "FaerMatMul: reference {:?} for C {c_shape:?}",
                    r.shape()
                );
                Some((live, r.try_as_plain_ram()?))
            }
            _ => None,
        };
        let r_data = match &live {
            Some((_, r)) => Some(r.as_slice::<f32>()?),
            None => None,
        };
        let plan = self.plan(
            a_shape,
            b_shape,
            &c_shape,
            reference.as_ref().map(|r| r.shape()),
        )?;
        let (a_plain, b_plain) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
        let (a_data, b_data) = (a_plain.as_slice::<f32>()?, b_plain.as_slice::<f32>()?);
        let mut c = match addend {
            // X's buffer when this is its last reader (else a copy), summed into.
            Some(x) => x.into_tensor(),
            // SAFETY: f32 has no invalid bit patterns, and every element is written
            // below (the first summed block replaces, over a non-empty sum: no size is
            // 0 here).
            None => unsafe { Tensor::uninitialized::<f32>(&c_shape)? },
        };
        let add_to = self.add_to;
        {
            let mut c_plain = c.try_as_plain_ram_mut()?;
            let c_data = c_plain.as_slice_mut::<f32>()?;
            let (a_at, b_at) = (a_data.as_ptr() as usize, b_data.as_ptr() as usize);
            let c_at = c_data.as_mut_ptr() as usize;
            let sums = offsets(&plan.k_loops);
            let Plan { m, k, n, .. } = plan;
            let alpha = self.alpha;
            let loops = offsets(&plan.loops);
            let threads = crate::parallel::product_threads();
            // Threads a product is worth: only a large one pays for their start.
            let work = loops.len() * sums.len() * m.size * n.size * k.size;
            let threads = if work >= tiles::PARALLEL_WORK {
                threads
            } else {
                1
            };
            // Column (or row) blocks enough for every thread when the loops are not.
            let split = if loops.len() >= threads { 1 } else { threads };
            let mut tiles = Vec::new();
            // The live tiles of the last reference offset (heads share a mask).
            let mut last_live: Option<(isize, Vec<tiles::Tile>)> = None;
            for &[oa, ob, oc, or] in &loops {
                let cut = if let (Some((live, _)), Some(r)) = (&live, r_data) {
                    match &last_live {
                        Some((at, cut)) if *at == or => cut.clone(),
                        _ => {
                            let r = Operand {
                                at: r.as_ptr().wrapping_offset(or),
                                outer: m.r,
                                k: n.r,
                            };
                            // SAFETY: the reference's strides come from its shape, C's
                            // or broadcast to it (checked above): its m × n lie in it.
                            let cut = unsafe { tiles::cut_live(m.size, n.size, k.size, r, *live) };
                            last_live = Some((or, cut.clone()));
                            cut
                        }
                    }
                } else if sums.len() == 1 {
                    let [sa, sb, _, _] = sums[0];
                    let a = Operand {
                        at: (a_at as *const f32).wrapping_offset(oa + sa),
                        outer: m.a,
                        k: k.a,
                    };
                    let b = Operand {
                        at: (b_at as *const f32).wrapping_offset(ob + sb),
                        outer: n.b,
                        k: k.b,
                    };
                    // SAFETY: the spans come from the tensors' own shapes and row-major
                    // strides, so A's m × k and B's k × n lie in their buffers.
                    unsafe { tiles::cut(m.size, n.size, k.size, a, b, split) }
                } else {
                    tiles::dense(m.size, n.size, k.size, split)
                };
                tiles.extend(cut.into_iter().map(|tile| ((oa, ob, oc), tile)));
            }
            // Claimed in order by whichever thread is free, so that the blocks of a
            // triangle (cut by its zero ends) are shared evenly.
            crate::parallel::for_each_part(tiles.len(), threads, |t| {
                let ((oa, ob, oc), tile) = &tiles[t];
                let (i, j) = (tile.m.start as isize, tile.n.start as isize);
                let l = tile.k.start as isize;
                // SAFETY: as above, every element addressed lies in its buffer; `c`
                // does not alias the inputs, and each thread writes its own tiles.
                let mut cm = unsafe {
                    MatMut::<f32>::from_raw_parts_mut(
                        (c_at as *mut f32).offset(oc + i * m.c + j * n.c),
                        tile.m.len(),
                        tile.n.len(),
                        m.c,
                        n.c,
                    )
                };
                if tile.k.is_empty() {
                    if !add_to {
                        cm.fill(0.0); // a block of A or B all zero, or of C not read
                    }
                    return;
                }
                for (ix, &[sa, sb, _, _]) in sums.iter().enumerate() {
                    let accum = if ix == 0 && !add_to {
                        Accum::Replace
                    } else {
                        Accum::Add
                    };
                    // SAFETY: as above.
                    let (am, bm) = unsafe {
                        (
                            MatRef::<f32>::from_raw_parts(
                                (a_at as *const f32).offset(oa + sa + i * m.a + l * k.a),
                                tile.m.len(),
                                tile.k.len(),
                                m.a,
                                k.a,
                            ),
                            MatRef::<f32>::from_raw_parts(
                                (b_at as *const f32).offset(ob + sb + l * k.b + j * n.b),
                                tile.k.len(),
                                tile.n.len(),
                                k.b,
                                n.b,
                            ),
                        )
                    };
                    product(cm.as_mut(), accum, am, bm, alpha);
                }
            });
        }
        Ok(tvec!(c.into_tvalue()))
    }
}

/// `C = A·B` in f32 on one thread, on the kernel a training graph's products use (for
/// benchmarks: `benches/fma_peak.rs`).
pub fn product_f32(c: MatMut<f32>, a: MatRef<f32>, b: MatRef<f32>) {
    product(c, Accum::Replace, a, b, 1.0);
}

/// `C = alpha·A·B` (or `C += alpha·A·B`) on one thread: on AMX tiles at f32 accuracy
/// when asked for (`LORA_GRAFT_MATMUL=amx`, a CPU that has them, a product large enough),
/// else on faer's kernels.
fn product(c: MatMut<f32>, accum: Accum, a: MatRef<f32>, b: MatRef<f32>, alpha: f32) {
    #[cfg(target_arch = "x86_64")]
    if amx::worth(a.nrows(), b.ncols(), a.ncols()) {
        // SAFETY: `worth` checked the tiles are available; C is an output of its own.
        return unsafe { amx::matmul(c, accum, a, b, alpha) };
    }
    matmul(c, accum, a, b, alpha, Par::Seq);
}

impl TypedOp for FaerMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (a, b) = match (inputs, self.live.is_some() || self.add_to) {
            ([a, b], false) | ([a, b, _], true) => (a, b),
            _ => bail!("FaerMatMul takes 2 inputs, and a live-output reference or an addend"),
        };
        ensure!(a.datum_type == f32::datum_type() && b.datum_type == f32::datum_type());
        let shape = self.output_shape(&a.shape, &b.shape)?;
        if self.add_to {
            ensure!(
                inputs[2].shape.to_tvec() == shape,
                "FaerMatMul: the addend is not C's shape"
            );
        }
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// Replaces the product at `product` by `op` on its inputs and `third` (a live-output
/// reference or an addend), the result taking the place of `replaced` (the product's
/// own output, or the `Add` it now computes).
fn rewire_with_third_input(
    model: &mut TypedModel,
    product: OutletId,
    op: FaerMatMul,
    third: OutletId,
    replaced: OutletId,
) -> TractResult<()> {
    let node = &model.nodes[product.node];
    let inputs: TVec<OutletId> = node.inputs.iter().copied().chain([third]).collect();
    super::pattern::replace_with(model, node.name.clone(), op, &inputs, replaced)
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
    for id in 0..model.nodes.len() {
        let node = &model.nodes[id];
        let Some(op) = node.op_as::<EinSum>() else {
            continue;
        };
        if node.inputs.len() != 2 {
            continue;
        }
        let faer = {
            let facts = model.node_input_facts(id)?;
            FaerMatMul::of(op, &facts[0].shape, &facts[1].shape)
        };
        if let Some(faer) = faer {
            model.nodes[id].op = Box::new(faer);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests;
