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
    Ok(Array2::from_shape_fn((n, k), |(r, c)| {
        let b = c / block;
        let row = &q[(r * blocks + b) * blob..];
        let v = f32::from(unpack(row, c % block));
        (v - zero_points[r * blocks + b]) * scales[r * blocks + b]
    }))
}
