//! Block-quantized weights (onnxruntime's `MatMulNBits`) back to floats.

use tract_core::ndarray::Array2;

use crate::ir::{Graph, Node};
use crate::tensor::Array;

/// The `[N, K]` float weight of a `MatMulNBits` node whose `B`, `scales` and
/// `zero_points` are initializers: `W[n, k] = (q[n, k] - zp[n, b])·scale[n, b]` for the
/// block `b = k / block_size`; `q` packed low bits first, `zp` packed the same way
/// (or float), `2^(bits-1)` when absent.
pub fn dequantize_nbits(graph: &Graph, node: &Node) -> Result<Array2<f32>, String> {
    let attr = |name: &str| node.attr_int(name, 0);
    let (k, n, bits, block) = (
        attr("K"),
        attr("N"),
        node.attr_int("bits", 4),
        attr("block_size"),
    );
    if !(bits == 2 || bits == 4 || bits == 8) || k <= 0 || n <= 0 || block <= 0 {
        return Err(format!(
            "MatMulNBits: unsupported K={k} N={n} bits={bits} block_size={block}"
        ));
    }
    let (k, n, bits, block) = (k as usize, n as usize, bits as usize, block as usize);
    let input = |i: usize| -> Result<Option<Array>, String> {
        let Some(v) = node.inputs.get(i).copied().flatten() else {
            return Ok(None);
        };
        crate::interp::evaluate(graph, v)
            .map(Some)
            .map_err(|e| e.to_string())
    };
    if input(4)?.is_some() {
        return Err("MatMulNBits: g_idx (act-order) is not supported".into());
    }
    let blocks = k.div_ceil(block);
    let blob = block * bits / 8;
    let per_byte = 8 / bits;
    let mask = ((1u16 << bits) - 1) as u8;
    let unpack = |bytes: &[u8], i: usize| (bytes[i / per_byte] >> ((i % per_byte) * bits)) & mask;
    let q = match input(1)?.ok_or("MatMulNBits: no B input")? {
        Array::U8(a) if a.len() == n * blocks * blob => a.iter().copied().collect::<Vec<u8>>(),
        other => {
            return Err(format!(
                "MatMulNBits: B has shape {:?}, expected [{n}, {blocks}, {blob}] uint8",
                other.shape()
            ))
        }
    };
    let scales: Vec<f32> = match input(2)?.ok_or("MatMulNBits: no scales input")? {
        a if a.len() == n * blocks => a.into_f32().iter().copied().collect(),
        a => {
            return Err(format!(
                "MatMulNBits: scales has {} values, expected {}",
                a.len(),
                n * blocks
            ))
        }
    };
    let default_zp = (1u32 << (bits - 1)) as f32;
    let zero_points: Vec<f32> = match input(3)? {
        None => vec![default_zp; n * blocks],
        Some(Array::U8(a)) => {
            let bytes: Vec<u8> = a.iter().copied().collect();
            let row = blocks.div_ceil(per_byte);
            if bytes.len() != n * row {
                return Err(format!(
                    "MatMulNBits: zero_points has {} bytes, expected {}",
                    bytes.len(),
                    n * row
                ));
            }
            (0..n * blocks)
                .map(|i| f32::from(unpack(&bytes[(i / blocks) * row..], i % blocks)))
                .collect()
        }
        Some(a) if a.len() == n * blocks => a.into_f32().iter().copied().collect(),
        Some(a) => {
            return Err(format!(
                "MatMulNBits: zero_points has {} values, expected {}",
                a.len(),
                n * blocks
            ))
        }
    };
    Ok(blocks_to_float(
        &q,
        &scales,
        &zero_points,
        n,
        k,
        bits,
        block,
    ))
}

/// `W[n, k] = (q[n, k] − zp[n, b])·scale[n, b]` for the block `b = k / block_size`, `q`
/// packed low bits first `[N, blocks, blob]`, one scale and one zero point per block.
fn blocks_to_float(
    q: &[u8],
    scales: &[f32],
    zero_points: &[f32],
    n: usize,
    k: usize,
    bits: usize,
    block: usize,
) -> Array2<f32> {
    let blocks = k.div_ceil(block);
    let (blob, per_byte) = (block * bits / 8, 8 / bits);
    let mask = ((1u16 << bits) - 1) as u8;
    Array2::from_shape_fn((n, k), |(r, c)| {
        let b = c / block;
        let i = c % block;
        let byte = q[(r * blocks + b) * blob + i / per_byte];
        let v = f32::from((byte >> ((i % per_byte) * bits)) & mask);
        (v - zero_points[r * blocks + b]) * scales[r * blocks + b]
    })
}

/// A `MatMulNBits` weight: the packed values `[N, blocks, blob]`, the scales
/// `[N·blocks]` and, when asymmetric, the packed zero points `[N, ⌈blocks·bits/8⌉]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Nbits {
    /// `B`, uint8.
    pub packed: Vec<u8>,
    /// One scale per block, row by row.
    pub scales: Vec<f32>,
    /// The zero points, packed like `B` (`None`: symmetric, `2^(bits−1)` implied).
    pub zero_points: Option<Vec<u8>>,
}

/// Quantizes `w` `[N, K]` as onnxruntime's block quantizer (MLAS, what
/// `MatMulNBitsQuantizer` and onnxruntime-genai's builder call) does, block by block
/// along K (the last block padded with zeros): symmetric, `scale = m / −2^(bits−1)` for
/// the entry `m` of largest magnitude and the zero point `2^(bits−1)`; else
/// `scale = (max(max, 0) − min(min, 0)) / (2^bits − 1)` and the zero point
/// `round(−min/scale)`; then `q = clamp(round(v·(1/scale) + zp), 0, 2^bits − 1)`, rounding
/// half away from zero, in float32. `round_scale` rounds each scale to the scales'
/// storage type first (float16 models), as the quantizer reads them back.
pub fn quantize_nbits(
    w: &Array2<f32>,
    bits: usize,
    block: usize,
    symmetric: bool,
    round_scale: impl Fn(f32) -> f32,
) -> Nbits {
    let (n, k) = w.dim();
    let blocks = k.div_ceil(block);
    let blob = block * bits / 8;
    let per_byte = 8 / bits;
    let (max_q, mid) = (((1u32 << bits) - 1) as f32, (1u32 << (bits - 1)) as f32);
    let zp_row = blocks.div_ceil(per_byte);
    let mut packed = vec![0u8; n * blocks * blob];
    let mut scales = vec![0f32; n * blocks];
    let mut zero_points = (!symmetric).then(|| vec![0u8; n * zp_row]);
    let mut values = vec![0f32; block];
    for r in 0..n {
        for b in 0..blocks {
            values.fill(0.0);
            for (i, v) in values.iter_mut().enumerate() {
                if let Some(&x) = w.get((r, b * block + i)) {
                    *v = x;
                }
            }
            let (min, max) = values
                .iter()
                .fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let (scale, zp) = if symmetric {
                let m = if max.abs() > min.abs() { max } else { min };
                (round_scale(m / -mid), mid)
            } else {
                let (lo, hi) = (min.min(0.0), max.max(0.0));
                let scale = (hi - lo) / max_q;
                let zp = if scale != 0.0 { -lo / scale } else { lo };
                (round_scale(scale), zp.clamp(0.0, max_q).round())
            };
            scales[r * blocks + b] = scale;
            if let Some(zps) = &mut zero_points {
                let i = b * bits;
                zps[r * zp_row + i / 8] |= (zp as u8) << (i % 8);
            }
            let recip = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            let out = &mut packed[(r * blocks + b) * blob..(r * blocks + b + 1) * blob];
            for (i, &v) in values.iter().enumerate() {
                let q = (v * recip + zp).round().clamp(0.0, max_q) as u8;
                out[i / per_byte] |= q << ((i % per_byte) * bits);
            }
        }
    }
    Nbits {
        packed,
        scales,
        zero_points,
    }
}

/// The float weight `[N, K]` an [`Nbits`] holds (for the requantization error).
pub fn dequantized_nbits(q: &Nbits, n: usize, k: usize, bits: usize, block: usize) -> Array2<f32> {
    let blocks = k.div_ceil(block);
    let mask = ((1u16 << bits) - 1) as u8;
    let zp_row = blocks.div_ceil(8 / bits);
    let zero_points: Vec<f32> = (0..n * blocks)
        .map(|i| match &q.zero_points {
            None => (1u32 << (bits - 1)) as f32,
            Some(z) => {
                let at = (i % blocks) * bits;
                f32::from((z[(i / blocks) * zp_row + at / 8] >> (at % 8)) & mask)
            }
        })
        .collect();
    blocks_to_float(&q.packed, &q.scales, &zero_points, n, k, bits, block)
}

/// `values` quantized to symmetric int8 as onnxruntime's weight quantizer
/// (`quant_utils.quantize_data(…, INT8, symmetric=True)`) does: `scale = 2·max|v| / 254`
/// (in f64, stored as float32; 1 when that is below float32's smallest normal), then
/// `q = clamp(round_half_even(v / scale), −128, 127)` with a float32 division.
pub fn quantize_int8_symmetric(values: &[f32]) -> (f32, Vec<i8>) {
    let absmax = values.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let scale = ((2.0 * absmax as f64) / 254.0) as f32;
    let scale = if scale < f32::MIN_POSITIVE {
        1.0
    } else {
        scale
    };
    let q = values
        .iter()
        .map(|&v| (v / scale).round_ties_even().clamp(-128.0, 127.0) as i8)
        .collect();
    (scale, q)
}
