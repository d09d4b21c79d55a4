//! Gradient rules: one table line per op type, each with its formula. `g` is the
//! gradient of the output, `x` (`a`, `b`) the inputs, `y` the output; `unb` sums a
//! gradient down to its input's shape (undoes broadcasting).

use crate::error::{Error, Result};
use crate::ir::build::{int_attr, string_attr, Builder};
use crate::ir::{Node, ValueId};
use crate::proto::tensor_proto::DataType;

/// The axes a `Softmax` or `LogSoftmax` node of rank `rank` normalizes over: its `axis`
/// (default -1) from opset 13; before, every axis from `axis` (default 1) on, as the
/// op flattened them.
fn softmax_axes(e: &Builder, n: &Node, rank: usize) -> Result<Vec<usize>> {
    if e.opset >= 13 {
        return Ok(vec![norm_axis(n.attr_int("axis", -1), rank)?]);
    }
    Ok((norm_axis(n.attr_int("axis", 1), rank)?..rank).collect())
}

/// `dx = y·(g − Σ_axes g·y)` of a softmax `y` over `axes`, in default ops.
pub(super) fn softmax_grad(
    e: &mut Builder,
    y: ValueId,
    g: ValueId,
    axes: &[usize],
) -> Result<ValueId> {
    let gy = e.bin("Mul", g, y)?;
    let s = e.reduce_sum(gy, axes, true)?;
    let d = e.bin("Sub", g, s)?;
    e.bin("Mul", y, d)
}

/// A rule: the gradients of the inputs (`None` where not wanted or not defined).
pub type Rule =
    fn(&mut Builder, &Node, &[Option<ValueId>], &[bool]) -> Result<Vec<Option<ValueId>>>;

/// Ops whose outputs carry no gradient (integer, boolean or shape results): a path
/// from a trainable tensor stops there.
pub const NO_GRADIENT: &[&str] = &[
    "Shape",
    "Size",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "Not",
    "And",
    "Or",
    "Xor",
    "Range",
    "ConstantOfShape",
    "ArgMax",
    "ArgMin",
    "NonZero",
    "IsNaN",
    "IsInf",
    "Sign",
    "Floor",
    "Ceil",
    "Round",
];

/// The gradient rules.
pub const RULES: &[(&str, Rule)] = &[
    // dx = g
    ("Identity", |_, _, g, _| Ok(vec![g[0]])),
    // dx = g (inference mode: Dropout is the identity)
    ("Dropout", |_, _, g, _| Ok(vec![g[0], None, None])),
    // da = unb(g), db = unb(g)
    ("Add", |e, n, g, w| add_sub(e, n, g[0].unwrap(), w, 1.0)),
    // da = unb(g), db = -unb(g)
    ("Sub", |e, n, g, w| add_sub(e, n, g[0].unwrap(), w, -1.0)),
    // da = unb(g·b), db = unb(g·a)
    ("Mul", mul),
    // da = unb(g / b), db = unb(-g·y / b)
    ("Div", div),
    // dx = -g
    ("Neg", |e, _, g, _| {
        Ok(vec![Some(e.un("Neg", g[0].unwrap())?)])
    }),
    // da = g·p·a^(p-1) (exponent constant)
    ("Pow", pow),
    // dx = g / (2y)
    ("Sqrt", |e, n, g, _| {
        let y = n.outputs[0].unwrap();
        let two = e.scalar("c", 2.0);
        let d = e.bin("Mul", y, two)?;
        Ok(vec![Some(e.bin("Div", g[0].unwrap(), d)?)])
    }),
    // dx = -g·y²
    ("Reciprocal", |e, n, g, _| {
        let y = n.outputs[0].unwrap();
        let y2 = e.bin("Mul", y, y)?;
        let gy2 = e.bin("Mul", g[0].unwrap(), y2)?;
        Ok(vec![Some(e.un("Neg", gy2)?)])
    }),
    // dx = g·y
    ("Exp", |e, n, g, _| {
        Ok(vec![Some(e.bin(
            "Mul",
            g[0].unwrap(),
            n.outputs[0].unwrap(),
        )?)])
    }),
    // dx = g·cos(x)
    ("Sin", |e, n, g, _| {
        let c = e.un("Cos", n.inputs[0].unwrap())?;
        Ok(vec![Some(e.bin("Mul", g[0].unwrap(), c)?)])
    }),
    // dx = -g·sin(x)
    ("Cos", |e, n, g, _| {
        let s = e.un("Sin", n.inputs[0].unwrap())?;
        let gs = e.bin("Mul", g[0].unwrap(), s)?;
        Ok(vec![Some(e.un("Neg", gs)?)])
    }),
    // dx = g / x
    ("Log", |e, n, g, _| {
        Ok(vec![Some(e.bin(
            "Div",
            g[0].unwrap(),
            n.inputs[0].unwrap(),
        )?)])
    }),
    // dx = g·(1 - y²)
    ("Tanh", |e, n, g, _| {
        let y = n.outputs[0].unwrap();
        let y2 = e.bin("Mul", y, y)?;
        let one = e.scalar("c", 1.0);
        let d = e.bin("Sub", one, y2)?;
        Ok(vec![Some(e.bin("Mul", g[0].unwrap(), d)?)])
    }),
    // dx = g·y·(1 - y)
    ("Sigmoid", |e, n, g, _| {
        let y = n.outputs[0].unwrap();
        let one = e.scalar("c", 1.0);
        let d = e.bin("Sub", one, y)?;
        let yd = e.bin("Mul", y, d)?;
        Ok(vec![Some(e.bin("Mul", g[0].unwrap(), yd)?)])
    }),
    // dx = g·(2/√π)·exp(-x²)
    ("Erf", |e, n, g, _| {
        let x = n.inputs[0].unwrap();
        let x2 = e.bin("Mul", x, x)?;
        let nx2 = e.un("Neg", x2)?;
        let ex = e.un("Exp", nx2)?;
        let k = e.scalar("c", 2.0 / std::f64::consts::PI.sqrt());
        let d = e.bin("Mul", ex, k)?;
        Ok(vec![Some(e.bin("Mul", g[0].unwrap(), d)?)])
    }),
    // dx = g·[x > 0]
    ("Relu", |e, n, g, _| {
        let x = n.inputs[0].unwrap();
        let zero = e.scalar("c", 0.0);
        let pos = e.bin("Greater", x, zero)?;
        let m = e.mask(pos)?;
        Ok(vec![Some(e.bin("Mul", g[0].unwrap(), m)?)])
    }),
    // dx = y·(g - Σ_axis g·y): one SoftmaxGrad kernel over a float32 last axis
    ("Softmax", |e, n, g, _| {
        let (y, g) = (n.outputs[0].unwrap(), g[0].unwrap());
        let rank = e.shape(y)?.len();
        let axes = softmax_axes(e, n, rank)?;
        // (g has y's type: gradients take their value's.)
        if axes == [rank - 1] && e.dtypes.get(&y) == Some(&(DataType::Float as i32)) {
            return Ok(vec![Some(super::fused::softmax_grad(e, y, g)?)]);
        }
        Ok(vec![Some(softmax_grad(e, y, g, &axes)?)])
    }),
    // dx = g - exp(y)·Σ_axis g
    ("LogSoftmax", |e, n, g, _| {
        let (y, g) = (n.outputs[0].unwrap(), g[0].unwrap());
        let axes = softmax_axes(e, n, e.shape(y)?.len())?;
        let s = e.reduce_sum(g, &axes, true)?;
        let p = e.un("Exp", y)?;
        let ps = e.bin("Mul", p, s)?;
        Ok(vec![Some(e.bin("Sub", g, ps)?)])
    }),
    // da = g·bᵀ, db = aᵀ·g (last two axes), each summed over broadcast batch axes
    ("MatMul", matmul),
    // Y = α·A'B' + β·C: dA' = α·g·B'ᵀ, dB' = α·A'ᵀ·g, dC = unb(β·g)
    ("Gemm", gemm),
    // dx = Transpose(g, perm⁻¹)
    ("Transpose", |e, n, g, _| {
        let rank = e.shape(n.inputs[0].unwrap())?.len();
        let perm: Vec<usize> = n
            .attr_ints("perm")
            .map(|p| p.iter().map(|&a| a as usize).collect())
            .unwrap_or_else(|| (0..rank).rev().collect());
        let mut inv = vec![0; rank];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i;
        }
        Ok(vec![Some(e.transpose(g[0].unwrap(), &inv)?)])
    }),
    // dx = Reshape(g, shape(x))
    ("Reshape", reshape_back),
    ("Flatten", reshape_back),
    ("Squeeze", reshape_back),
    ("Unsqueeze", reshape_back),
    // dx = unb(g)
    ("Expand", |e, n, g, _| {
        let s = e.shape(n.inputs[0].unwrap())?;
        Ok(vec![Some(e.unbroadcast(g[0].unwrap(), &s)?), None])
    }),
    // dx_i = Slice(g, the i-th input's range on axis)
    ("Concat", concat),
    // dx = Concat(g_i, axis) (zeros for outputs without gradient)
    ("Split", split),
    // dx = Pad(g) with zeros outside the sliced range (steps of 1)
    ("Slice", slice),
    // dx = ScatterElements(0, indices, g, axis)
    ("GatherElements", gather_elements),
    // x [P, N, Q] (N on the axis), idx [M]: dx[p, n, q] = Σ_m [idx_m = n]·g[p, m, q]
    // (a one-hot MatMul, so repeated indices add up)
    ("Gather", gather),
    // dx = Expand(g, shape(x)) (Unsqueezed where keepdims = 0)
    ("ReduceSum", |e, n, g, _| {
        reduce(e, n, g[0].unwrap(), Reduce::Sum)
    }),
    // dx = Expand(g, shape(x)) / N
    ("ReduceMean", |e, n, g, _| {
        reduce(e, n, g[0].unwrap(), Reduce::Mean)
    }),
    // dx = Expand(g)·2x
    ("ReduceSumSquare", |e, n, g, _| {
        reduce(e, n, g[0].unwrap(), Reduce::SumSquare)
    }),
    // dx = Expand(g)·x / Expand(y)
    ("ReduceL2", |e, n, g, _| {
        reduce(e, n, g[0].unwrap(), Reduce::L2)
    }),
    // dx = Expand(g)·[x == Expand(y)]
    ("ReduceMax", |e, n, g, _| {
        reduce(e, n, g[0].unwrap(), Reduce::Max)
    }),
    // da = unb(g·[a >= b]), db = unb(g·[a < b])
    ("Max", |e, n, g, w| min_max(e, n, g[0].unwrap(), w, "Less")),
    // da = unb(g·[a <= b]), db = unb(g·[a > b])
    ("Min", |e, n, g, w| {
        min_max(e, n, g[0].unwrap(), w, "Greater")
    }),
    // dx = g·[min <= x <= max]
    ("Clip", clip),
    // dx = unb(Where(c, g, 0)), dy = unb(Where(c, 0, g))
    ("Where", where_),
    // dx = Cast(g, to = type of x) (float to float)
    ("Cast", |e, n, g, _| {
        let x = n.inputs[0].unwrap();
        let to = e.dtype_of(x);
        let s = e.shape(x)?;
        Ok(vec![Some(e.op_shaped(
            "Cast",
            &[g[0].unwrap()],
            vec![int_attr("to", to as i64)],
            s,
        )?)])
    }),
    // Fake quantization (a QuantizeLinear → DequantizeLinear pair on an activation,
    // per tensor), the straight-through estimator with clipping, as torch's
    // FakeQuantize: dq = g·s (y = (q − zp)·s); dx = g/s·[qmin ≤ round(x/s) + zp ≤ qmax]
    ("DequantizeLinear", dequantize_linear),
    ("QuantizeLinear", quantize_linear),
    // x̂ = (x-μ)·r over the normalised axes: dx = r·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)),
    // ĝ = g·scale; dscale = unb(g·x̂), dbias = unb(g)
    ("LayerNormalization", layer_norm),
    // RMS norm (onnxruntime's, in the default domain): x̂ = x·r, r = 1/√(mean(x²) + ε):
    // dx = r·(ĝ - x̂·mean(ĝ·x̂)), ĝ = g·scale; dscale = unb(g·x̂)
    ("SimplifiedLayerNormalization", simplified_layer_norm),
];

/// Gradient rules of com.microsoft ops (their gradient code is default-domain ops).
pub const MICROSOFT_RULES: &[(&str, Rule)] = &[
    // s = x + skip (+ bias), y = RMSNorm(s)·γ, output 3 = s:
    // ds = RMSNorm'(g_y) + g_s; dx = unb(ds), dskip = unb(ds), dγ = unb(g_y·ŝ), dbias = unb(ds)
    (
        "SkipSimplifiedLayerNormalization",
        skip_simplified_layer_norm,
    ),
    // Y = A·Wᵀ (+ bias), W [N, K] = (q - zero point)·scale per block of K:
    // dA = g·W on the packed weight (lora-graft's MatMulNBitsInputGrad)
    ("MatMulNBits", matmul_nbits),
    ("SimplifiedLayerNormalization", simplified_layer_norm),
];

/// The rule of `node`'s op (default or com.microsoft domain).
pub fn rule(node: &Node) -> Option<Rule> {
    let table = match node.domain() {
        "" | "ai.onnx" => RULES,
        "com.microsoft" => MICROSOFT_RULES,
        _ => return None,
    };
    table
        .iter()
        .find(|(op, _)| *op == node.op())
        .map(|(_, r)| *r)
}

/// `axis` in `0..rank` (negative counts from the end), checked: the interpreter's rule.
fn norm_axis(axis: i64, rank: usize) -> Result<usize> {
    crate::interp::norm_axis(axis, rank).map_err(|e| Error::Graph(e.to_string()))
}

/// The int64 values of a constant input.
fn const_ints(e: &Builder, v: ValueId) -> Result<Vec<i64>> {
    let a = crate::interp::evaluate(e.graph, v).map_err(|e| Error::Graph(e.to_string()))?;
    Ok(a.to_f64().iter().map(|&x| x as i64).collect())
}

fn add_sub(
    e: &mut Builder,
    n: &Node,
    g: ValueId,
    w: &[bool],
    sign: f64,
) -> Result<Vec<Option<ValueId>>> {
    let mut out = vec![None, None];
    for i in 0..2 {
        if w[i] {
            let s = e.shape(n.inputs[i].unwrap())?;
            let mut gi = e.unbroadcast(g, &s)?;
            if i == 1 && sign < 0.0 {
                gi = e.un("Neg", gi)?;
            }
            out[i] = Some(gi);
        }
    }
    Ok(out)
}

fn mul(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let (a, b, g) = (n.inputs[0].unwrap(), n.inputs[1].unwrap(), g[0].unwrap());
    let mut out = vec![None, None];
    for (i, (me, other)) in [(a, b), (b, a)].into_iter().enumerate() {
        if w[i] {
            let go = e.bin("Mul", g, other)?;
            let s = e.shape(me)?;
            out[i] = Some(e.unbroadcast(go, &s)?);
        }
    }
    Ok(out)
}

fn div(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let (a, b, y, g) = (
        n.inputs[0].unwrap(),
        n.inputs[1].unwrap(),
        n.outputs[0].unwrap(),
        g[0].unwrap(),
    );
    let mut out = vec![None, None];
    if w[0] {
        let d = e.bin("Div", g, b)?;
        let s = e.shape(a)?;
        out[0] = Some(e.unbroadcast(d, &s)?);
    }
    if w[1] {
        let gy = e.bin("Mul", g, y)?;
        let d = e.bin("Div", gy, b)?;
        let nd = e.un("Neg", d)?;
        let s = e.shape(b)?;
        out[1] = Some(e.unbroadcast(nd, &s)?);
    }
    Ok(out)
}

fn pow(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    if w[1] {
        return Err(Error::Graph(
            "a gradient through a Pow exponent is not supported".into(),
        ));
    }
    let (a, p, g) = (n.inputs[0].unwrap(), n.inputs[1].unwrap(), g[0].unwrap());
    let one = e.scalar("c", 1.0);
    let pf = if e.dtype_of(p) == e.dtype {
        p
    } else {
        let s = e.shape(p)?;
        e.op_shaped("Cast", &[p], vec![int_attr("to", e.dtype as i64)], s)?
    };
    let pm1 = e.bin("Sub", pf, one)?;
    let ap = e.bin("Pow", a, pm1)?;
    let d = e.bin("Mul", ap, pf)?;
    let gd = e.bin("Mul", g, d)?;
    let s = e.shape(a)?;
    Ok(vec![Some(e.unbroadcast(gd, &s)?), None])
}

/// Swaps the last two axes.
fn t_last(e: &mut Builder, x: ValueId) -> Result<ValueId> {
    let r = e.shape(x)?.len();
    let mut perm: Vec<usize> = (0..r).collect();
    perm.swap(r - 2, r - 1);
    e.transpose(x, &perm)
}

fn matmul(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let (a, b, g) = (n.inputs[0].unwrap(), n.inputs[1].unwrap(), g[0].unwrap());
    let (sa, sb, sg) = (e.shape(a)?, e.shape(b)?, e.shape(g)?);
    if sa.len() < 2 || sb.len() < 2 {
        return Err(Error::Graph(
            "MatMul with a 1-D operand is not supported".into(),
        ));
    }
    let mut out = vec![None, None];
    if w[0] {
        let bt = t_last(e, b)?;
        let mut shape = sg.clone();
        *shape.last_mut().unwrap() = sa[sa.len() - 1];
        let ga = e.op_shaped(
            "MatMul",
            &[g, bt],
            vec![],
            crate::ir::build::broadcast(&shape, &shape),
        )?;
        out[0] = Some(e.unbroadcast(ga, &sa)?);
    }
    if w[1] {
        let lead = sa.len() - 1;
        // (ONNX Runtime's CPU Einsum takes float and double.)
        let einsum_type =
            [DataType::Float as i32, DataType::Double as i32].contains(&e.dtype_of(a));
        let gb = if sb.len() == 2 && lead > 1 && lead <= 24 && e.opset >= 12 && einsum_type {
            // Σ over every leading axis as one Einsum (`aby,abz->yz`): runtimes read a
            // and g in place. Flattened by Reshape, aᵀ needed a Transpose after it that
            // tract copies every step (the activations, for LoRA's A).
            let axes: String = ('a'..='x').take(lead).collect();
            let equation = format!("{axes}y,{axes}z->yz");
            let shape = vec![sa[lead], sg[sg.len() - 1]];
            e.op_shaped(
                "Einsum",
                &[a, g],
                vec![string_attr("equation", &equation)],
                shape,
            )?
        } else if sb.len() == 2 {
            // Σ over every leading axis: flatten tokens, then aᵀ·g.
            let k = sa[sa.len() - 1];
            let m = sg[sg.len() - 1];
            let rows: usize = sa[..sa.len() - 1].iter().product();
            let a2 = e.reshape(a, &[rows, k])?;
            let g2 = e.reshape(g, &[rows, m])?;
            let a2t = e.transpose(a2, &[1, 0])?;
            e.op_shaped("MatMul", &[a2t, g2], vec![], vec![k, m])?
        } else {
            let at = t_last(e, a)?;
            let mut shape = sg.clone();
            let r = shape.len();
            shape[r - 2] = sb[sb.len() - 2];
            let gb = e.op_shaped("MatMul", &[at, g], vec![], shape)?;
            e.unbroadcast(gb, &sb)?
        };
        out[1] = Some(gb);
    }
    Ok(out)
}

fn gemm(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let (a, b, g) = (n.inputs[0].unwrap(), n.inputs[1].unwrap(), g[0].unwrap());
    let (alpha, beta) = (
        n.attr_float("alpha", 1.0) as f64,
        n.attr_float("beta", 1.0) as f64,
    );
    let (ta, tb) = (n.attr_int("transA", 0) != 0, n.attr_int("transB", 0) != 0);
    let scaled = |e: &mut Builder, x: ValueId, k: f64| -> Result<ValueId> {
        if k == 1.0 {
            Ok(x)
        } else {
            let c = e.scalar("c", k);
            e.bin("Mul", x, c)
        }
    };
    let mut out = vec![None, None, None];
    let (sa, sb) = (e.shape(a)?, e.shape(b)?);
    if w[0] {
        // dA' = g·B'ᵀ; dA = dA'ᵀ when transA.
        let gs = e.shape(g)?;
        let k = if ta { sa[0] } else { sa[1] };
        let bt = if tb { b } else { e.transpose(b, &[1, 0])? };
        let d = e.op_shaped("MatMul", &[g, bt], vec![], vec![gs[0], k])?;
        let d = if ta { e.transpose(d, &[1, 0])? } else { d };
        out[0] = Some(scaled(e, d, alpha)?);
    }
    if w[1] {
        // dB' = A'ᵀ·g; dB = dB'ᵀ when transB.
        let gs = e.shape(g)?;
        let k = if tb { sb[1] } else { sb[0] };
        let at = if ta { a } else { e.transpose(a, &[1, 0])? };
        let d = e.op_shaped("MatMul", &[at, g], vec![], vec![k, gs[1]])?;
        let d = if tb { e.transpose(d, &[1, 0])? } else { d };
        out[1] = Some(scaled(e, d, alpha)?);
    }
    if w.get(2).copied().unwrap_or(false) {
        let c = n.inputs[2].unwrap();
        let s = e.shape(c)?;
        let gc = e.unbroadcast(g, &s)?;
        out[2] = Some(scaled(e, gc, beta)?);
    }
    Ok(out)
}

fn reshape_back(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    _: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let s = e.shape(n.inputs[0].unwrap())?;
    Ok(vec![Some(e.reshape(g[0].unwrap(), &s)?), None])
}

fn concat(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let g = g[0].unwrap();
    let gs = e.shape(g)?;
    let axis = norm_axis(n.attr_int("axis", 0), gs.len())?;
    let mut start = 0usize;
    let mut out = Vec::new();
    for (i, input) in n.inputs.iter().enumerate() {
        let s = e.shape(input.unwrap())?;
        let len = s[axis];
        if w[i] {
            out.push(Some(slice_axis(e, g, axis, start, start + len)?));
        } else {
            out.push(None);
        }
        start += len;
    }
    Ok(out)
}

/// `g[..., start:end, ...]` on `axis`.
fn slice_axis(
    e: &mut Builder,
    g: ValueId,
    axis: usize,
    start: usize,
    end: usize,
) -> Result<ValueId> {
    let mut shape = e.shape(g)?;
    shape[axis] = end - start;
    let (s, t, a) = (
        e.ints("i", &[start as i64]),
        e.ints("i", &[end as i64]),
        e.ints("i", &[axis as i64]),
    );
    e.op_shaped("Slice", &[g, s, t, a], vec![], shape)
}

fn split(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    _: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let x = n.inputs[0].unwrap();
    let xs = e.shape(x)?;
    let axis = norm_axis(n.attr_int("axis", 0), xs.len())?;
    let mut parts = Vec::new();
    for (slot, out) in n.outputs.iter().enumerate() {
        let shape = e.shape(out.unwrap())?;
        parts.push(match g[slot] {
            Some(gi) => gi,
            None => e.zeros(&shape)?,
        });
    }
    let cat = e.op_shaped("Concat", &parts, vec![int_attr("axis", axis as i64)], xs)?;
    Ok(vec![Some(cat), None])
}

fn slice(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    _: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let x = n.inputs[0].unwrap();
    let xs = e.shape(x)?;
    let rank = xs.len();
    let starts = const_ints(e, n.inputs[1].unwrap())?;
    let ends = const_ints(e, n.inputs[2].unwrap())?;
    let axes = match n.inputs.get(3).copied().flatten() {
        Some(a) => const_ints(e, a)?,
        None => (0..starts.len() as i64).collect(),
    };
    if let Some(steps) = n.inputs.get(4).copied().flatten() {
        if const_ints(e, steps)?.iter().any(|&s| s != 1) {
            return Err(Error::Graph(
                "a gradient through a Slice with steps other than 1 is not supported".into(),
            ));
        }
    }
    let mut pads = vec![0i64; 2 * rank];
    for (k, &axis) in axes.iter().enumerate() {
        let axis = norm_axis(axis, rank)?;
        let dim = xs[axis] as i64;
        let fix = |v: i64| (if v < 0 { v + dim } else { v }).clamp(0, dim);
        let (s, t) = (fix(starts[k]), fix(ends[k]));
        pads[axis] = s;
        pads[rank + axis] = dim - t.max(s);
    }
    let p = e.ints("i", &pads);
    Ok(vec![
        Some(e.op_shaped("Pad", &[g[0].unwrap(), p], vec![], xs)?),
        None,
        None,
        None,
        None,
    ])
}

fn gather_elements(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    _: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let (x, idx) = (n.inputs[0].unwrap(), n.inputs[1].unwrap());
    let xs = e.shape(x)?;
    let axis = n.attr_int("axis", 0);
    let z = e.zeros(&xs)?;
    let d = e.op_shaped(
        "ScatterElements",
        &[z, idx, g[0].unwrap()],
        vec![int_attr("axis", axis)],
        xs,
    )?;
    Ok(vec![Some(d), None])
}

enum Reduce {
    Sum,
    Mean,
    SumSquare,
    L2,
    Max,
}

/// The axes a Reduce node `n` names (an input from opset 13 or 18, else its attribute),
/// in `0..rank`; empty when it names none.
pub(super) fn reduce_axes(e: &Builder, n: &Node, rank: usize) -> Result<Vec<usize>> {
    match n.inputs.get(1).copied().flatten() {
        Some(a) => const_ints(e, a)?,
        None => n.attr_ints("axes").map(<[i64]>::to_vec).unwrap_or_default(),
    }
    .into_iter()
    .map(|a| norm_axis(a, rank))
    .collect()
}

fn reduce(e: &mut Builder, n: &Node, g: ValueId, kind: Reduce) -> Result<Vec<Option<ValueId>>> {
    let x = n.inputs[0].unwrap();
    let y = n.outputs[0].unwrap();
    let xs = e.shape(x)?;
    let rank = xs.len();
    let axes = reduce_axes(e, n, rank)?;
    let axes: Vec<usize> = if axes.is_empty() {
        if n.attr_int("noop_with_empty_axes", 0) != 0 {
            return Ok(vec![Some(g), None]);
        }
        (0..rank).collect()
    } else {
        axes
    };
    let kept: Vec<usize> = xs
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect();
    let keep = |e: &mut Builder, v: ValueId| e.reshape(v, &kept);
    let gk = keep(e, g)?;
    let ge = e.expand(gk, &xs)?;
    let d = match kind {
        Reduce::Sum => ge,
        Reduce::Mean => {
            let count: usize = axes.iter().map(|&a| xs[a]).product();
            let c = e.scalar("c", count as f64);
            e.bin("Div", ge, c)?
        }
        Reduce::SumSquare => {
            let two = e.scalar("c", 2.0);
            let x2 = e.bin("Mul", x, two)?;
            e.bin("Mul", ge, x2)?
        }
        Reduce::L2 => {
            let yk = keep(e, y)?;
            let gx = e.bin("Mul", ge, x)?;
            e.bin("Div", gx, yk)?
        }
        Reduce::Max => {
            let yk = keep(e, y)?;
            let eq = e.bin("Equal", x, yk)?;
            let m = e.mask(eq)?;
            e.bin("Mul", ge, m)?
        }
    };
    Ok(vec![Some(d), None])
}

/// `first_loses` is the comparison under which b wins (`Less` for Max): a gets the
/// gradient where it does not hold. (tract evaluates Less and Greater, not the
/// OrEqual forms.)
fn min_max(
    e: &mut Builder,
    n: &Node,
    g: ValueId,
    w: &[bool],
    first_loses: &str,
) -> Result<Vec<Option<ValueId>>> {
    if n.inputs.len() != 2 {
        return Err(Error::Graph(format!(
            "{} with {} inputs is not supported",
            n.op(),
            n.inputs.len()
        )));
    }
    let (a, b) = (n.inputs[0].unwrap(), n.inputs[1].unwrap());
    let loses = e.bin(first_loses, a, b)?;
    let wins = e.un("Not", loses)?;
    let ma = e.mask(wins)?;
    let mut out = vec![None, None];
    if w[0] {
        let d = e.bin("Mul", g, ma)?;
        let s = e.shape(a)?;
        out[0] = Some(e.unbroadcast(d, &s)?);
    }
    if w[1] {
        let one = e.scalar("c", 1.0);
        let mb = e.bin("Sub", one, ma)?;
        let d = e.bin("Mul", g, mb)?;
        let s = e.shape(b)?;
        out[1] = Some(e.unbroadcast(d, &s)?);
    }
    Ok(out)
}

fn clip(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    _: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let x = n.inputs[0].unwrap();
    let bound = |slot: usize| n.inputs.get(slot).copied().flatten();
    let d = keep_inside(e, g[0].unwrap(), x, bound(1), bound(2))?;
    Ok(vec![Some(d), None, None])
}

/// `d·[lo ≤ x]·[x ≤ hi]` (an absent bound: no factor), the masks as
/// `[x >= lo] = ¬[x < lo]`, `[x <= hi] = ¬[x > hi]`.
fn keep_inside(
    e: &mut Builder,
    mut d: ValueId,
    x: ValueId,
    lo: Option<ValueId>,
    hi: Option<ValueId>,
) -> Result<ValueId> {
    for (op, bound) in [("Less", lo), ("Greater", hi)] {
        if let Some(bound) = bound {
            let out = e.bin(op, x, bound)?;
            let inside = e.un("Not", out)?;
            let m = e.mask(inside)?;
            d = e.bin("Mul", d, m)?;
        }
    }
    Ok(d)
}

fn where_(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let (c, g) = (n.inputs[0].unwrap(), g[0].unwrap());
    let zero = e.scalar("c", 0.0);
    let mut out = vec![None, None, None];
    for (slot, (t, f)) in [(1, (g, zero)), (2, (zero, g))] {
        if w[slot] {
            let gs = e.shape(g)?;
            let d = e.op_shaped("Where", &[c, t, f], vec![], gs)?;
            let s = e.shape(n.inputs[slot].unwrap())?;
            out[slot] = Some(e.unbroadcast(d, &s)?);
        }
    }
    Ok(out)
}

fn layer_norm(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let (x, g) = (n.inputs[0].unwrap(), g[0].unwrap());
    let scale = n.inputs[1].unwrap();
    let eps = n.attr_float("epsilon", 1e-5) as f64;
    let axis = n.attr_int("axis", -1);
    let (dx, xh) = norm_back(e, x, g, scale, axis, eps, Norm::Layer, w[0])?;
    let mut out = vec![dx, None, None];
    if w.get(1).copied().unwrap_or(false) {
        let gx = e.bin("Mul", g, xh)?;
        let s = e.shape(scale)?;
        out[1] = Some(e.unbroadcast(gx, &s)?);
    }
    if w.get(2).copied().unwrap_or(false) {
        let s = e.shape(n.inputs[2].unwrap())?;
        out[2] = Some(e.unbroadcast(g, &s)?);
    }
    Ok(out)
}

/// Which normalisation [`norm_back`] undoes.
#[derive(Clone, Copy, PartialEq)]
enum Norm {
    /// LayerNormalization: centred, `x̂ = (x - μ)·r`, `r = 1/√(var + ε)`.
    Layer,
    /// RMS norm: `x̂ = x·r`, `r = 1/√(mean(x²) + ε)`.
    Rms,
}

/// The backward pass of a normalisation over the axes from `axis` on, scaled by
/// `scale`: `(dx, x̂)`, dx only when `want_dx`.
#[allow(clippy::too_many_arguments)]
fn norm_back(
    e: &mut Builder,
    x: ValueId,
    g: ValueId,
    scale: ValueId,
    axis: i64,
    eps: f64,
    norm: Norm,
    want_dx: bool,
) -> Result<(Option<ValueId>, ValueId)> {
    let xs = e.shape(x)?;
    let rank = xs.len();
    let axes: Vec<usize> = (norm_axis(axis, rank)?..rank).collect();
    let count: usize = axes.iter().map(|&a| xs[a]).product();
    let inv_n = e.scalar("c", 1.0 / count as f64);
    // μ (layer norm), the variance or mean square, and r, recomputed.
    let xc = match norm {
        Norm::Layer => {
            let sum = e.reduce_sum(x, &axes, true)?;
            let mu = e.bin("Mul", sum, inv_n)?;
            e.bin("Sub", x, mu)?
        }
        Norm::Rms => x,
    };
    let sq = e.bin("Mul", xc, xc)?;
    let var_sum = e.reduce_sum(sq, &axes, true)?;
    let var = e.bin("Mul", var_sum, inv_n)?;
    let epsv = e.scalar("c", eps);
    let ve = e.bin("Add", var, epsv)?;
    let sd = e.un("Sqrt", ve)?;
    let r = e.un("Reciprocal", sd)?;
    let xh = e.bin("Mul", xc, r)?;
    if !want_dx {
        return Ok((None, xh));
    }
    // dx = r·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)), ĝ = g·scale (no mean(ĝ) term for RMS)
    let gh = e.bin("Mul", g, scale)?;
    let m1 = match norm {
        Norm::Layer => {
            let m1s = e.reduce_sum(gh, &axes, true)?;
            Some(e.bin("Mul", m1s, inv_n)?)
        }
        Norm::Rms => None,
    };
    let ghx = e.bin("Mul", gh, xh)?;
    let m2s = e.reduce_sum(ghx, &axes, true)?;
    let m2 = e.bin("Mul", m2s, inv_n)?;
    let a = match m1 {
        Some(m1) => e.bin("Sub", gh, m1)?,
        None => gh,
    };
    let b = e.bin("Mul", xh, m2)?;
    let ab = e.bin("Sub", a, b)?;
    Ok((Some(e.bin("Mul", ab, r)?), xh))
}

fn gather(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    _: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let (x, idx, g) = (n.inputs[0].unwrap(), n.inputs[1].unwrap(), g[0].unwrap());
    let xs = e.shape(x)?;
    let axis = norm_axis(n.attr_int("axis", 0), xs.len())?;
    let count: usize = e.shape(idx)?.iter().product();
    let (p, len, q): (usize, usize, usize) = (
        xs[..axis].iter().product(),
        xs[axis],
        xs[axis + 1..].iter().product(),
    );
    // Indices as int64 [1, M], negative ones wrapped.
    let flat = e.reshape(idx, &[1, count])?;
    let flat = e.op_shaped(
        "Cast",
        &[flat],
        vec![int_attr("to", DataType::Int64 as i64)],
        vec![1, count],
    )?;
    let zero = e.ints("i", &[0]);
    let negative = e.op_shaped("Less", &[flat, zero], vec![], vec![1, count])?;
    let size = e.ints("i", &[len as i64]);
    let wrapped = e.op_shaped("Add", &[flat, size], vec![], vec![1, count])?;
    let flat = e.op_shaped("Where", &[negative, wrapped, flat], vec![], vec![1, count])?;
    // One-hot [N, M]: row n marks the positions that read x[.., n, ..].
    let rows: Vec<i64> = (0..len as i64).collect();
    let rows = e.ints("i", &rows);
    let rows = e.reshape(rows, &[len, 1])?;
    let hit = e.op_shaped("Equal", &[rows, flat], vec![], vec![len, count])?;
    let one_hot = e.mask(hit)?;
    let g3 = e.reshape(g, &[p, count, q])?;
    let d = e.op_shaped("MatMul", &[one_hot, g3], vec![], vec![p, len, q])?;
    Ok(vec![Some(e.reshape(d, &xs)?), None])
}

fn simplified_layer_norm(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let (x, scale) = (n.inputs[0].unwrap(), n.inputs[1].unwrap());
    let eps = n.attr_float("epsilon", 1e-5) as f64;
    let axis = n.attr_int("axis", -1);
    let (dx, xh) = norm_back(e, x, g[0].unwrap(), scale, axis, eps, Norm::Rms, w[0])?;
    let mut out = vec![dx, None];
    if w.get(1).copied().unwrap_or(false) {
        let gx = e.bin("Mul", g[0].unwrap(), xh)?;
        let s = e.shape(scale)?;
        out[1] = Some(e.unbroadcast(gx, &s)?);
    }
    Ok(out)
}

fn skip_simplified_layer_norm(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    let input = |i: usize| n.inputs.get(i).copied().flatten();
    let (x, skip, gamma) = (input(0).unwrap(), input(1).unwrap(), input(2).unwrap());
    let eps = n.attr_float("epsilon", 1e-5) as f64;
    // s = x + skip (+ bias), recomputed.
    let mut s = e.bin("Add", x, skip)?;
    if let Some(bias) = input(3) {
        s = e.bin("Add", s, bias)?;
    }
    let mut out = vec![None; n.inputs.len()];
    let (mut ds, mut xh) = (None, None);
    if let Some(gy) = g.first().copied().flatten() {
        let (d, h) = norm_back(e, s, gy, gamma, -1, eps, Norm::Rms, true)?;
        (ds, xh) = (d, Some(h));
    }
    if let Some(gs) = g.get(3).copied().flatten() {
        ds = Some(match ds {
            Some(d) => e.bin("Add", d, gs)?,
            None => gs,
        });
    }
    for (slot, v) in [(0, Some(x)), (1, Some(skip)), (3, input(3))] {
        if let (Some(v), Some(ds), true) = (v, ds, w.get(slot).copied().unwrap_or(false)) {
            let shape = e.shape(v)?;
            out[slot] = Some(e.unbroadcast(ds, &shape)?);
        }
    }
    if let (Some(xh), Some(gy), true) = (xh, g[0], w[2]) {
        let gx = e.bin("Mul", gy, xh)?;
        let shape = e.shape(gamma)?;
        out[2] = Some(e.unbroadcast(gx, &shape)?);
    }
    Ok(out)
}

/// An error unless only `n`'s first input wants a gradient (`why` the others do not).
fn first_input_only(n: &Node, w: &[bool], why: &str) -> Result<()> {
    if w.iter().skip(1).any(|&w| w) {
        return Err(Error::Graph(format!(
            "only the first input of {} gets a gradient ({why})",
            n.op()
        )));
    }
    Ok(())
}

/// The scale of a per-tensor (De)QuantizeLinear, or why it has no rule.
fn per_tensor_scale(e: &Builder, n: &Node) -> Result<ValueId> {
    let scale = n.inputs[1].unwrap();
    if e.shape(scale)?.iter().product::<usize>() != 1 {
        return Err(Error::Graph(format!(
            "{} with a scale per axis or block has no gradient rule (only per-tensor fake quantization of activations)",
            n.op()
        )));
    }
    Ok(scale)
}

fn dequantize_linear(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    first_input_only(n, w, "its scale and zero point are frozen")?;
    let scale = per_tensor_scale(e, n)?;
    Ok(vec![Some(e.bin("Mul", g[0].unwrap(), scale)?)])
}

fn quantize_linear(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    use crate::proto::tensor_proto::DataType;
    first_input_only(n, w, "its scale and zero point are frozen")?;
    let (x, scale) = (n.inputs[0].unwrap(), per_tensor_scale(e, n)?);
    let zero = n.inputs.get(2).copied().flatten();
    // The output type: the zero point's, uint8 without one.
    let (qmin, qmax) = match zero.map(|z| DataType::try_from(e.dtype_of(z))) {
        None | Some(Ok(DataType::Uint8)) => (0.0, 255.0),
        Some(Ok(DataType::Int8)) => (-128.0, 127.0),
        Some(Ok(DataType::Uint16)) => (0.0, 65535.0),
        Some(Ok(DataType::Int16)) => (-32768.0, 32767.0),
        Some(other) => {
            return Err(Error::Graph(format!(
                "QuantizeLinear to {other:?} has no gradient rule"
            )))
        }
    };
    let scaled = e.bin("Div", x, scale)?;
    let mut t = e.un("Round", scaled)?;
    if let Some(z) = zero {
        let shape = e.shape(z)?;
        let to = vec![int_attr("to", e.dtype as i64)];
        let z = e.op_shaped("Cast", &[z], to, shape)?;
        t = e.bin("Add", t, z)?;
    }
    let d = e.bin("Div", g[0].unwrap(), scale)?;
    let (lo, hi) = (e.scalar("c", qmin), e.scalar("c", qmax));
    let d = keep_inside(e, d, t, Some(lo), Some(hi))?;
    Ok(vec![Some(d), None, None])
}

fn matmul_nbits(
    e: &mut Builder,
    n: &Node,
    g: &[Option<ValueId>],
    w: &[bool],
) -> Result<Vec<Option<ValueId>>> {
    first_input_only(n, w, "its weight is frozen")?;
    // dA = dY · W on the packed weight (its attributes and weight inputs, shared with
    // the forward node): the training graph keeps the weight quantized. `portable`
    // turns it into a float MatMul for other runtimes.
    crate::quant::NbitsMatrix::of_node(e.graph, n).map_err(Error::Graph)?;
    let attributes = ["K", "N", "bits", "block_size"]
        .into_iter()
        .filter_map(|name| n.attr(name).cloned())
        .collect();
    // dY, B, scales and (when present) zero_points.
    let weight_inputs = n.inputs.iter().take(4).skip(1).map_while(|v| *v);
    let inputs: Vec<ValueId> = std::iter::once(g[0].unwrap())
        .chain(weight_inputs)
        .collect();
    let mut shape = e.shape(n.inputs[0].unwrap())?;
    *shape.last_mut().expect("rank >= 1") = n.attr_int("K", 0) as usize;
    let d = e.op_shaped(
        crate::runtime::nbits::INPUT_GRAD_OP,
        &inputs,
        attributes,
        shape,
    )?;
    let crate::ir::Def::Node(id, _) = e.graph.value(d).def else {
        unreachable!("op_shaped defines its output")
    };
    e.graph.node_mut(id).proto.domain = Some(crate::runtime::nbits::DOMAIN.into());
    Ok(vec![Some(d)])
}
