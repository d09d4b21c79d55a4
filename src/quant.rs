//! Block-quantized weights (onnxruntime's `MatMulNBits`) back to floats.

use std::ops::Range;

use tract_core::ndarray::Array2;

use crate::ir::{Graph, Node};
use crate::tensor::Array;

/// A `MatMulNBits` weight `[N, K]` as stored: `W[n, k] = (q[n, k] − zp[n, b])·scale[n, b]`
/// for the block `b = k / block_size`, `q` packed low bits first `[N, blocks, blob]`, one
/// scale and one zero point per block. Dequantized whole ([`NbitsMatrix::to_float`]) or a
/// few rows at a time ([`NbitsMatrix::rows_to_float`], what the runtime's kernels do).
#[derive(Debug, Clone, PartialEq)]
pub struct NbitsMatrix {
    /// Rows (output features).
    pub n: usize,
    /// Columns (input features).
    pub k: usize,
    /// Bits per value: 2, 4 or 8.
    pub bits: usize,
    /// Values per block along K.
    pub block: usize,
    packed: Vec<u8>,
    scales: Vec<f32>,
    zero_points: Vec<f32>,
}

/// The zero points of a [`NbitsMatrix`], as `MatMulNBits` takes them.
#[derive(Debug, Clone, PartialEq)]
pub enum ZeroPoints {
    /// None given: `2^(bits−1)`.
    Symmetric,
    /// uint8, packed like `B`, each row `⌈blocks·bits/8⌉` bytes.
    Packed(Vec<u8>),
    /// One float per block.
    Float(Vec<f32>),
}

impl NbitsMatrix {
    /// Checks the sizes of `packed`, `scales` and `zero_points` against `[n, k]` in
    /// blocks of `block` values of `bits` bits.
    pub fn new(
        (n, k): (usize, usize),
        bits: usize,
        block: usize,
        packed: Vec<u8>,
        scales: Vec<f32>,
        zero_points: ZeroPoints,
    ) -> Result<NbitsMatrix, String> {
        if !matches!(bits, 2 | 4 | 8)
            || n == 0
            || k == 0
            || block == 0
            || !(block * bits).is_multiple_of(8)
        {
            return Err(format!(
                "MatMulNBits: unsupported K={k} N={n} bits={bits} block_size={block}"
            ));
        }
        let blocks = k.div_ceil(block);
        let blob = block * bits / 8;
        if packed.len() != n * blocks * blob {
            return Err(format!(
                "MatMulNBits: B has {} bytes, expected [{n}, {blocks}, {blob}] uint8",
                packed.len()
            ));
        }
        if scales.len() != n * blocks {
            return Err(format!(
                "MatMulNBits: scales has {} values, expected {}",
                scales.len(),
                n * blocks
            ));
        }
        let zero_points = match zero_points {
            ZeroPoints::Symmetric => vec![(1u32 << (bits - 1)) as f32; n * blocks],
            ZeroPoints::Packed(bytes) => {
                let row = blocks.div_ceil(8 / bits);
                if bytes.len() != n * row {
                    return Err(format!(
                        "MatMulNBits: zero_points has {} bytes, expected {}",
                        bytes.len(),
                        n * row
                    ));
                }
                (0..n * blocks)
                    .map(|i| f32::from(unpack(&bytes[(i / blocks) * row..], i % blocks, bits)))
                    .collect()
            }
            ZeroPoints::Float(values) if values.len() == n * blocks => values,
            ZeroPoints::Float(values) => {
                return Err(format!(
                    "MatMulNBits: zero_points has {} values, expected {}",
                    values.len(),
                    n * blocks
                ))
            }
        };
        Ok(NbitsMatrix {
            n,
            k,
            bits,
            block,
            packed,
            scales,
            zero_points,
        })
    }

    /// The weight of a `MatMulNBits` node whose `B`, `scales` and `zero_points` are
    /// initializers (or computed from them alone).
    pub fn of_node(graph: &Graph, node: &Node) -> Result<NbitsMatrix, String> {
        let attr = |name: &str| usize::try_from(node.attr_int(name, 0)).unwrap_or(0);
        let bits = usize::try_from(node.attr_int("bits", 4)).unwrap_or(0);
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
        let packed = match input(1)?.ok_or("MatMulNBits: no B input")? {
            Array::U8(a) => a.iter().copied().collect(),
            other => {
                return Err(format!(
                    "MatMulNBits: B is {}, expected uint8",
                    crate::dtype::name(other.elem_type())
                ))
            }
        };
        let scales = input(2)?.ok_or("MatMulNBits: no scales input")?;
        let zero_points = match input(3)? {
            None => ZeroPoints::Symmetric,
            Some(Array::U8(a)) => ZeroPoints::Packed(a.iter().copied().collect()),
            Some(a) => ZeroPoints::Float(a.into_f32().iter().copied().collect()),
        };
        NbitsMatrix::new(
            (attr("N"), attr("K")),
            bits,
            attr("block_size"),
            packed,
            scales.into_f32().iter().copied().collect(),
            zero_points,
        )
    }

    /// Rows `rows` of the float weight into `out` (row-major, `rows.len()·K` values).
    pub fn rows_to_float(&self, rows: Range<usize>, out: &mut [f32]) {
        let (k, block, bits) = (self.k, self.block, self.bits);
        let blocks = k.div_ceil(block);
        let blob = block * bits / 8;
        assert!(rows.end <= self.n && out.len() == rows.len() * k);
        for (r, row_out) in rows.zip(out.chunks_exact_mut(k)) {
            for (b, values) in row_out.chunks_mut(block).enumerate() {
                let at = r * blocks + b;
                let (scale, zero) = (self.scales[at], self.zero_points[at]);
                let bytes = &self.packed[at * blob..(at + 1) * blob];
                let value = |q: u8| (f32::from(q) - zero) * scale;
                match bits {
                    // Two values a byte, low nibble first: a loop the compiler vectorizes.
                    4 if values.len() == block => {
                        for (pair, &byte) in values.chunks_exact_mut(2).zip(bytes) {
                            pair[0] = value(byte & 0x0f);
                            pair[1] = value(byte >> 4);
                        }
                    }
                    8 => {
                        for (v, &byte) in values.iter_mut().zip(bytes) {
                            *v = value(byte);
                        }
                    }
                    _ => {
                        for (i, v) in values.iter_mut().enumerate() {
                            *v = value(unpack(bytes, i, bits));
                        }
                    }
                }
            }
        }
    }

    /// The whole float weight `[N, K]`.
    pub fn to_float(&self) -> Array2<f32> {
        let mut out = Array2::zeros((self.n, self.k));
        let slice = out.as_slice_mut().expect("standard layout");
        self.rows_to_float(0..self.n, slice);
        out
    }
}

/// Value `i` of `bits` bits packed low bits first in `bytes`.
fn unpack(bytes: &[u8], i: usize, bits: usize) -> u8 {
    let per_byte = 8 / bits;
    let mask = ((1u16 << bits) - 1) as u8;
    (bytes[i / per_byte] >> ((i % per_byte) * bits)) & mask
}

/// The `[N, K]` float weight of a `MatMulNBits` node whose `B`, `scales` and
/// `zero_points` are initializers ([`NbitsMatrix::of_node`], dequantized).
pub fn dequantize_nbits(graph: &Graph, node: &Node) -> Result<Array2<f32>, String> {
    Ok(NbitsMatrix::of_node(graph, node)?.to_float())
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
    let zero_points = match &q.zero_points {
        None => ZeroPoints::Symmetric,
        Some(z) => ZeroPoints::Packed(z.clone()),
    };
    NbitsMatrix::new(
        (n, k),
        bits,
        block,
        q.packed.clone(),
        q.scales.clone(),
        zero_points,
    )
    .expect("quantize_nbits made these sizes")
    .to_float()
}

/// 8-bit values, their scale and zero point, as onnxruntime's quantizer writes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized8 {
    /// The scale, float32.
    pub scale: f32,
    /// The zero point (`0` for symmetric int8, `128` for symmetric uint8).
    pub zero_point: i32,
    /// The values, in the type's range.
    pub values: Vec<i32>,
}

/// `values` quantized to int8 (`signed`) or uint8 as onnxruntime's weight quantizer
/// does (`quant_utils.quantize_data`: `compute_scale_zp`, then `quantize_nparray`):
/// the range `[min(min v, 0), max(max v, 0)]`, made `±max|v|` when `symmetric`
/// (int8's range then is −127..127); `scale = range / (qmax − qmin)` in f64, stored as
/// float32 (below float32's smallest normal: scale 1, zero point 0); the zero point
/// `round_half_even(qmin − min / scale)` (symmetric: the range's middle); then
/// `q = clamp(round_half_even(v / scale) + zp, type's min, type's max)` in float32.
pub fn quantize_data(values: &[f32], signed: bool, symmetric: bool) -> Quantized8 {
    let (qmin, qmax) = match (signed, symmetric) {
        (true, true) => (-127.0, 127.0),
        (true, false) => (-128.0, 127.0),
        (false, _) => (0.0, 255.0),
    };
    let (lo, hi) = values
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if symmetric {
        let m = lo.abs().max(hi.abs());
        (-m, m)
    } else {
        (lo, hi)
    };
    let scale = (hi as f64 - lo as f64) / (qmax - qmin);
    let (scale, zero_point) = if scale < f32::MIN_POSITIVE as f64 {
        (1.0f32, 0.0f32)
    } else if symmetric {
        (scale as f32, ((qmin + qmax) / 2.0).round_ties_even() as f32)
    } else {
        (
            scale as f32,
            (qmin - lo as f64 / scale).round_ties_even() as f32,
        )
    };
    let (full_min, full_max) = if signed {
        (-128.0, 127.0)
    } else {
        (0.0, 255.0)
    };
    let values = values
        .iter()
        .map(|&v| ((v / scale).round_ties_even() + zero_point).clamp(full_min, full_max) as i32)
        .collect();
    Quantized8 {
        scale,
        zero_point: zero_point as i32,
        values,
    }
}
