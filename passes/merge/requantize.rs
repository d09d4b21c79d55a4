//! `merge --requantize`: the merged weight written back in the weight's own quantized
//! format, exactly as onnxruntime's quantizers write a float weight, with the error
//! `‖W_q − W‖ / ‖W‖` against the float merge.
//!
//! - `MatMulNBits` (2, 4, 8 bits): MLAS's block quantizer ([`crate::quant::quantize_nbits`]).
//! - `DequantizeLinear` int8/uint8, per tensor or per channel, symmetric or with zero
//!   points, `Mul(Cast(int8), scale)` and `quantize_dynamic`'s `MatMulInteger` weight:
//!   `quant_utils.quantize_data`
//!   ([`crate::quant::quantize_data`]).
//! - Blocked `DequantizeLinear` int4/uint4 (`MatMulNBitsQuantizer`'s QDQ format):
//!   MLAS's QDQ block quantizer, which is the `MatMulNBits` one transposed, signed values
//!   shifted by 8 (checked against onnxruntime's own in `tests/quantizer.py`).

use tract_core::ndarray::{Array2, ArrayD, Axis, IxDyn};

use super::WeightPatch;
use crate::error::{Error, Result};
use crate::ir::{Def, Graph, Initializer, ValueId};
use crate::passes::target::{Layout, Target};
use crate::proto::tensor_proto::DataType;
use crate::tensor::Array;

/// `‖a − b‖ / ‖b‖`.
fn relative_error(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    let norm = |x: &Array2<f32>| {
        x.iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt()
    };
    norm(&(a - b)) / norm(b).max(f64::MIN_POSITIVE)
}

/// `array` as an initializer named as `old`.
fn named(array: &Array, old: &Initializer) -> Result<Initializer> {
    let mut init = Initializer::from_array(array)?;
    init.proto.name = old.proto.name.clone();
    Ok(init)
}

/// 4-bit values (row-major, each in `0..16` or `-8..8`) as a packed INT4/UINT4
/// initializer of `dims` named as `old`: two a byte, the first in the low nibble.
fn packed_4bit(
    values: &[i32],
    dims: &[usize],
    elem_type: DataType,
    old: &Initializer,
) -> Initializer {
    let mut bytes = vec![0u8; values.len().div_ceil(2)];
    for (i, &v) in values.iter().enumerate() {
        bytes[i / 2] |= ((v as u8) & 0x0f) << (4 * (i % 2));
    }
    Initializer::new(crate::proto::TensorProto {
        name: old.proto.name.clone(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(elem_type as i32),
        raw_data: Some(bytes),
        ..Default::default()
    })
}

/// `merged` (torch layout `[N, K]`) written back into the quantized weight that
/// `DequantizeLinear(q, scale[, zero point], axis[, block_size])` or
/// `Mul(Cast(q), scale)` makes, in the same type, granularity and zero-point scheme;
/// and `‖W_q − W‖ / ‖W‖`.
pub(super) fn dequantized(
    graph: &Graph,
    module: &str,
    group: &[&Target],
    merged: &Array2<f32>,
) -> Result<(WeightPatch, f64)> {
    let t0 = group[0];
    let cannot = |why: &str| {
        Error::Usage(format!(
            "cannot requantize '{module}': {why}; use --dequantize"
        ))
    };
    let node = graph.node(t0.node);
    let producer = |v: ValueId| match graph.value(v).def {
        Def::Node(n, _) => Some(graph.node(n)),
        _ => None,
    };
    let weight = node.inputs[1].ok_or_else(|| cannot("no weight input"))?;
    let constant = |v: Option<ValueId>| v.filter(|&v| graph.initializer(v).is_some());
    // quantize_dynamic's MatMulInteger: the stored int8 weight, its zero point, and its
    // scale in the product's rescaling.
    let dynamic = (node.op() == "MatMulInteger")
        .then(|| crate::passes::target::dynamic_quantized(graph, t0.node))
        .flatten();
    let dq = match dynamic {
        Some(_) => node,
        None => producer(weight).ok_or_else(|| cannot("its weight is stored, not dequantized"))?,
    };
    // The quantized values, the scale, the zero point, the axis the scale runs along
    // (None: Mul's broadcast) and the block size.
    let (q, scale, zero, axis_attr, block) = match dq.op() {
        "MatMulInteger" => {
            let (_, _, w_scale) = dynamic.expect("matched");
            (
                constant(Some(weight)),
                Some(w_scale),
                dq.inputs.get(3).copied().flatten(),
                None,
                0,
            )
        }
        "DequantizeLinear" => {
            let zp = dq.inputs.get(2).copied().flatten();
            if zp.is_some() && constant(zp).is_none() {
                return Err(cannot("its zero points are computed"));
            }
            (
                constant(dq.inputs[0]),
                constant(dq.inputs.get(1).copied().flatten()),
                zp,
                Some(dq.attr_int("axis", 1)),
                dq.attr_int("block_size", 0).max(0) as usize,
            )
        }
        "Mul" => {
            let (a, b) = (dq.inputs[0], dq.inputs.get(1).copied().flatten());
            let cast_of = |v: Option<ValueId>| {
                let n = producer(v?)?;
                (n.op() == "Cast").then(|| constant(n.inputs[0])).flatten()
            };
            match (cast_of(a), cast_of(b)) {
                (Some(q), None) => (Some(q), constant(b), None, None, 0),
                (None, Some(q)) => (Some(q), constant(a), None, None, 0),
                _ => return Err(cannot("its Mul is not Cast(int8) times a scale")),
            }
        }
        _ => {
            return Err(cannot(
                "its dequantization is neither DequantizeLinear nor Mul(Cast)",
            ))
        }
    };
    let (q, scale) = (
        q.ok_or_else(|| cannot("its quantized values are computed"))?,
        scale.ok_or_else(|| cannot("its scale is computed"))?,
    );
    let init = |v: ValueId| graph.initializer(v).expect("stored");
    let (q_init, s_init) = (init(q), init(scale));
    let shared = [Some(q), Some(scale), zero]
        .into_iter()
        .flatten()
        .any(|v| graph.value(v).users.len() > 1);
    if group.len() > 1 || shared {
        return Err(cannot("its quantized weight is shared with other nodes"));
    }
    let scale_type = s_init.elem_type();
    if !matches!(
        DataType::try_from(scale_type),
        Ok(DataType::Float | DataType::Float16)
    ) {
        return Err(cannot("its scale is not float32 or float16"));
    }
    // What the node reads: [d_in, d_out] (MatMul; Gemm transB=0) or [d_out, d_in].
    let out_in = t0.op == "Gemm" && t0.layout == Layout::OutIn;
    let seen: Array2<f32> = if out_in {
        merged.clone()
    } else {
        merged.t().to_owned()
    };
    let dims: Vec<usize> = q_init.dims().iter().map(|&d| d as usize).collect();
    if dims != seen.shape() {
        return Err(cannot("its quantized values are not the weight's shape"));
    }
    let q_type = DataType::try_from(q_init.elem_type()).ok();
    let zero_points = match zero {
        None => None,
        Some(z) => Some(
            crate::interp::evaluate(graph, z)
                .map_err(|e| cannot(&e.to_string()))?
                .to_f64(),
        ),
    };
    let s_dims: Vec<usize> = s_init.dims().iter().map(|&d| d as usize).collect();
    let axis = axis_attr.map(|a| if a < 0 { a + 2 } else { a } as usize);
    if block > 0 {
        let signed = match q_type {
            Some(DataType::Int4) => true,
            Some(DataType::Uint4) => false,
            _ => return Err(cannot("it is blocked, and not int4 or uint4")),
        };
        // MatMulNBitsQuantizer's QDQ: [K, N] blocked along K (axis 0), INT4 without zero
        // points (symmetric) or UINT4 with them.
        if out_in || axis != Some(0) || signed != zero.is_none() {
            return Err(cannot(
                "it is blocked other than as onnxruntime's QDQ 4-bit weights (int4 symmetric or uint4 with zero points, blocked along K)",
            ));
        }
        return blocked_4bit(
            merged,
            block,
            signed,
            (q, q_init),
            (scale, s_init),
            zero.map(|z| (z, init(z))),
        )
        .map_err(|e| match e {
            Error::Usage(why) => cannot(&why),
            e => e,
        });
    }
    let signed = match q_type {
        Some(DataType::Int8) => true,
        Some(DataType::Uint8) => false,
        _ => return Err(cannot("its quantized values are not int8 or uint8")),
    };
    let channels: usize = s_dims.iter().product();
    // The axis of `seen` the scale runs along.
    let axis = if channels <= 1 {
        None
    } else {
        let axis = axis.or_else(|| {
            (s_dims.len() == 2)
                .then(|| (0..2).find(|&i| s_dims[i] > 1))
                .flatten()
        });
        match axis {
            Some(a) if a < 2 && seen.shape()[a] == channels => Some(a),
            _ => return Err(cannot("its scale is neither one value nor one per channel")),
        }
    };
    // Symmetric when every zero point is the type's middle (onnxruntime's symmetric
    // quantizer writes 0 for int8, 128 for uint8); uint8 always has its zero points.
    let middle = if signed { 0.0 } else { 128.0 };
    let symmetric = match &zero_points {
        None if signed => true,
        None => return Err(cannot("it is uint8 without zero points")),
        Some(z) => z.iter().all(|&z| z == middle),
    };
    let lanes: Vec<Vec<f32>> = match axis {
        None => vec![seen.iter().copied().collect()],
        Some(a) => seen
            .axis_iter(Axis(a))
            .map(|lane| lane.iter().copied().collect())
            .collect(),
    };
    let quantized: Vec<crate::quant::Quantized8> = lanes
        .iter()
        .map(|lane| crate::quant::quantize_data(lane, signed, symmetric))
        .collect();
    let mut q_new = Array2::<i32>::zeros(seen.dim());
    let mut back = Array2::<f32>::zeros(seen.dim());
    for (c, lane) in quantized.iter().enumerate() {
        let dequantize = |v: i32| (v - lane.zero_point) as f32 * lane.scale;
        match axis {
            None => {
                q_new = Array2::from_shape_vec(seen.dim(), lane.values.clone()).expect("same size");
                back = q_new.mapv(dequantize);
            }
            Some(a) => {
                let mut q_lane = q_new.index_axis_mut(Axis(a), c);
                for (dst, &v) in q_lane.iter_mut().zip(&lane.values) {
                    *dst = v;
                }
                back.index_axis_mut(Axis(a), c)
                    .assign(&q_new.index_axis(Axis(a), c).mapv(dequantize));
            }
        }
    }
    let error = relative_error(&back, &seen);
    let ints = |values: Vec<i32>, dims: &[usize]| -> Array {
        let dims = IxDyn(dims);
        if signed {
            Array::I8(
                ArrayD::from_shape_vec(dims, values.iter().map(|&v| v as i8).collect())
                    .expect("sized"),
            )
        } else {
            Array::U8(
                ArrayD::from_shape_vec(dims, values.iter().map(|&v| v as u8).collect())
                    .expect("sized"),
            )
        }
    };
    let scales =
        ArrayD::from_shape_vec(IxDyn(&s_dims), quantized.iter().map(|l| l.scale).collect())
            .expect("one per channel");
    let scales = Array::from_f32(scales, scale_type).expect("float scale type");
    let mut patch = vec![
        (q, named(&ints(q_new.into_iter().collect(), &dims), q_init)?),
        (scale, named(&scales, s_init)?),
    ];
    if let Some(z) = zero {
        let z_init = init(z);
        let z_dims: Vec<usize> = z_init.dims().iter().map(|&d| d as usize).collect();
        let zps = quantized.iter().map(|l| l.zero_point).collect();
        patch.push((z, named(&ints(zps, &z_dims), z_init)?));
    }
    Ok((WeightPatch::Requantized(patch), error))
}

/// `merged` `[N, K]` as MatMulNBitsQuantizer's QDQ 4-bit weight `[K, N]` blocked along
/// K: MLAS's block quantizer on `[N, K]` ([`crate::quant::quantize_nbits`]), the values
/// transposed (symmetric: INT4, shifted by −8), scales and zero points `[K/block, N]`.
fn blocked_4bit(
    merged: &Array2<f32>,
    block: usize,
    signed: bool,
    (q, q_init): (ValueId, &Initializer),
    (scale, s_init): (ValueId, &Initializer),
    zero: Option<(ValueId, &Initializer)>,
) -> Result<(WeightPatch, f64)> {
    let (n, k) = merged.dim();
    let blocks = k.div_ceil(block);
    let s_dims: Vec<usize> = s_init.dims().iter().map(|&d| d as usize).collect();
    if s_dims != [blocks, n] {
        return Err(Error::Usage(format!(
            "its scales are {s_dims:?}, not [{blocks}, {n}]"
        )));
    }
    let fp16 = s_init.elem_type() == DataType::Float16 as i32;
    let nbits = crate::quant::quantize_nbits(merged, 4, block, signed, |x| {
        if fp16 {
            half::f16::from_f32(x).to_f32()
        } else {
            x
        }
    });
    let error = relative_error(
        &crate::quant::dequantized_nbits(&nbits, n, k, 4, block),
        merged,
    );
    let nibble = |bytes: &[u8], i: usize| i32::from((bytes[i / 2] >> (4 * (i % 2))) & 0x0f);
    let blob = block / 2;
    let shift = if signed { 8 } else { 0 };
    let mut values = vec![0i32; k * n];
    for r in 0..n {
        let row = &nbits.packed[r * blocks * blob..(r + 1) * blocks * blob];
        for c in 0..k {
            let (b, i) = (c / block, c % block);
            values[c * n + r] = nibble(&row[b * blob..], i) - shift;
        }
    }
    let transposed = |per_row: &[f32]| -> Vec<f32> {
        (0..blocks * n)
            .map(|i| per_row[(i % n) * blocks + i / n])
            .collect()
    };
    let scales = ArrayD::from_shape_vec(IxDyn(&s_dims), transposed(&nbits.scales)).expect("sized");
    let scales = Array::from_f32(scales, s_init.elem_type()).expect("float scale type");
    let (q_type, z_type) = if signed {
        (DataType::Int4, DataType::Int4)
    } else {
        (DataType::Uint4, DataType::Uint4)
    };
    let mut patch = vec![
        (q, packed_4bit(&values, &[k, n], q_type, q_init)),
        (scale, named(&scales, s_init)?),
    ];
    if let (Some((z, z_init)), Some(zps)) = (zero, &nbits.zero_points) {
        let row = blocks.div_ceil(2);
        let zps: Vec<i32> = (0..blocks * n)
            .map(|i| nibble(&zps[(i % n) * row..], i / n))
            .collect();
        patch.push((z, packed_4bit(&zps, &[blocks, n], z_type, z_init)));
    }
    Ok((WeightPatch::Requantized(patch), error))
}

/// `merged` `[N, K]` written back into the `MatMulNBits` node's own initializers (its
/// bits, block size, zero-point scheme and scale type), and `‖W_q − W‖ / ‖W‖`.
pub(super) fn matmul_nbits(
    graph: &Graph,
    module: &str,
    group: &[&Target],
    merged: &Array2<f32>,
) -> Result<(WeightPatch, f64)> {
    let node = graph.node(group[0].node);
    let bits = node.attr_int("bits", 4) as usize;
    let block = node.attr_int("block_size", 0) as usize;
    let cannot = |why: String| Error::Usage(format!("cannot requantize '{module}': {why}"));
    // B, scales and zero points must be this module's own initializers.
    let slot = |i: usize| -> Result<Option<(crate::ir::ValueId, &crate::ir::Initializer)>> {
        let Some(v) = node.inputs.get(i).copied().flatten() else {
            return Ok(None);
        };
        let init = graph
            .initializer(v)
            .ok_or_else(|| cannot(format!("its input {i} is computed, not stored")))?;
        let users: std::collections::HashSet<_> = graph.value(v).users.iter().collect();
        if users.len() > 1 || group.len() > 1 {
            return Err(cannot(format!("its input {i} is shared with other nodes")));
        }
        Ok(Some((v, init)))
    };
    let (b, scales, zp) = (slot(1)?, slot(2)?, slot(3)?);
    let ((b, b_init), (s, s_init)) = (
        b.ok_or_else(|| cannot("no B".into()))?,
        scales.ok_or_else(|| cannot("no scales".into()))?,
    );
    if zp.is_some_and(|(_, z)| z.elem_type() != crate::proto::tensor_proto::DataType::Uint8 as i32)
    {
        return Err(cannot("its zero points are not packed uint8".into()));
    }
    let scale_type = s_init.elem_type();
    let fp16 = scale_type == crate::proto::tensor_proto::DataType::Float16 as i32;
    let q = crate::quant::quantize_nbits(merged, bits, block, zp.is_none(), |x| {
        if fp16 {
            half::f16::from_f32(x).to_f32()
        } else {
            x
        }
    });
    let (n, k) = merged.dim();
    let back = crate::quant::dequantized_nbits(&q, n, k, bits, block);
    let error = relative_error(&back, merged);
    let shaped = |values: Array, old: &crate::ir::Initializer| -> Result<crate::ir::Initializer> {
        let dims: Vec<usize> = old.dims().iter().map(|&d| d as usize).collect();
        let values = match values {
            Array::U8(a) => Array::U8(
                a.into_shape_with_order(dims)
                    .map_err(|e| cannot(e.to_string()))?,
            ),
            Array::F32(a) => Array::F32(
                a.into_shape_with_order(dims)
                    .map_err(|e| cannot(e.to_string()))?,
            ),
            other => other,
        };
        let mut init = crate::ir::Initializer::from_array(&values)?;
        init.proto.name = old.proto.name.clone();
        Ok(init)
    };
    let dyn1 = |v: Vec<u8>| {
        Array::U8(tract_core::ndarray::ArrayD::from_shape_vec(vec![v.len()], v).expect("1-D"))
    };
    let scale_values =
        tract_core::ndarray::ArrayD::from_shape_vec(vec![q.scales.len()], q.scales.clone())
            .expect("1-D");
    let scale_values = Array::from_f32(scale_values, scale_type)
        .ok_or_else(|| cannot("its scales are not float".into()))?;
    let mut inits = vec![
        (b, shaped(dyn1(q.packed), b_init)?),
        (s, shaped(scale_values, s_init)?),
    ];
    if let (Some((z, z_init)), Some(zps)) = (zp, q.zero_points) {
        inits.push((z, shaped(dyn1(zps), z_init)?));
    }
    Ok((WeightPatch::Requantized(inits), error))
}
