//! Dense host tensors (`Array`) and their conversion from and to ONNX `TensorProto`.

use half::{bf16, f16};
use tract_core::ndarray::{ArrayD, IxDyn};

use crate::dtype;
use crate::proto::{tensor_proto::DataType, TensorProto};

/// A dense tensor of one of the element types lora-graft computes with.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// float32
    F32(ArrayD<f32>),
    /// float64
    F64(ArrayD<f64>),
    /// float16
    F16(ArrayD<f16>),
    /// bfloat16
    BF16(ArrayD<bf16>),
    /// int64
    I64(ArrayD<i64>),
    /// int32
    I32(ArrayD<i32>),
    /// int8
    I8(ArrayD<i8>),
    /// uint8
    U8(ArrayD<u8>),
    /// bool
    Bool(ArrayD<bool>),
}

/// Applies `$body` to the inner `ArrayD` of any [`Array`] variant.
#[macro_export]
macro_rules! for_each_array {
    ($value:expr, $a:ident => $body:expr) => {
        match $value {
            $crate::tensor::Array::F32($a) => $body,
            $crate::tensor::Array::F64($a) => $body,
            $crate::tensor::Array::F16($a) => $body,
            $crate::tensor::Array::BF16($a) => $body,
            $crate::tensor::Array::I64($a) => $body,
            $crate::tensor::Array::I32($a) => $body,
            $crate::tensor::Array::I8($a) => $body,
            $crate::tensor::Array::U8($a) => $body,
            $crate::tensor::Array::Bool($a) => $body,
        }
    };
}

/// Applies `$body` to the inner `ArrayD` of any [`Array`] variant and wraps the result
/// back into an [`Array`] (of the variant its element type makes).
#[macro_export]
macro_rules! map_array {
    ($value:expr, $a:ident => $body:expr) => {
        $crate::for_each_array!($value, $a => $crate::tensor::Array::from($body))
    };
}

macro_rules! array_from {
    ($($ty:ty => $variant:ident),*) => {$(
        impl From<ArrayD<$ty>> for Array {
            fn from(a: ArrayD<$ty>) -> Array {
                Array::$variant(a)
            }
        }
    )*};
}

array_from!(f32 => F32, f64 => F64, f16 => F16, bf16 => BF16, i64 => I64, i32 => I32,
    i8 => I8, u8 => U8, bool => Bool);

/// The 4-bit values of `t` (packed in `raw`, or a byte per `int32_data` entry), each
/// nibble through `widen`.
fn unpack_nibbles<T>(
    t: &TensorProto,
    raw: Option<&[u8]>,
    shape: &[usize],
    widen: impl Fn(u8) -> T,
) -> Result<ArrayD<T>, DecodeError> {
    let n: usize = shape.iter().product();
    let bytes: Vec<u8> = match raw {
        Some(bytes) => bytes.to_vec(),
        None => t.int32_data.iter().map(|&v| v as u8).collect(),
    };
    if bytes.len() != n.div_ceil(2) {
        return Err(DecodeError::Inconsistent(format!(
            "{} bytes of data for {n} elements of {}",
            bytes.len(),
            dtype::name(t.data_type())
        )));
    }
    let values = (0..n).map(|i| widen((bytes[i / 2] >> (4 * (i % 2))) & 0x0f));
    Ok(ArrayD::from_shape_vec(IxDyn(shape), values.collect()).expect("length checked"))
}

/// Why a tensor proto could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// The element type is not one [`Array`] holds.
    Unsupported(&'static str),
    /// The stored bytes or values disagree with the dims.
    Inconsistent(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Unsupported(what) => write!(f, "element type {what} is not supported"),
            DecodeError::Inconsistent(why) => f.write_str(why),
        }
    }
}

impl Array {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        for_each_array!(self, a => a.shape())
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        for_each_array!(self, a => a.len())
    }

    /// Whether it has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ONNX element type.
    pub fn elem_type(&self) -> i32 {
        (match self {
            Array::F32(_) => DataType::Float,
            Array::F64(_) => DataType::Double,
            Array::F16(_) => DataType::Float16,
            Array::BF16(_) => DataType::Bfloat16,
            Array::I64(_) => DataType::Int64,
            Array::I32(_) => DataType::Int32,
            Array::I8(_) => DataType::Int8,
            Array::U8(_) => DataType::Uint8,
            Array::Bool(_) => DataType::Bool,
        }) as i32
    }

    /// Decodes a tensor proto whose bytes, if stored raw or externally, are `raw`.
    pub fn from_proto(t: &TensorProto, raw: Option<&[u8]>) -> Result<Array, DecodeError> {
        let shape: Vec<usize> = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| DecodeError::Inconsistent(format!("negative dim in {:?}", t.dims)))?;
        let n: usize = shape.iter().product();
        let raw = raw.or(t.raw_data.as_deref());
        let ty = t.data_type();
        macro_rules! build {
            ($variant:ident, $ty:ty, $size:expr, $from_le:expr, $typed:expr) => {{
                let values: Vec<$ty> = match raw {
                    Some(bytes) => {
                        if bytes.len() != n * $size {
                            return Err(DecodeError::Inconsistent(format!(
                                "{} bytes of data for {} elements of {}",
                                bytes.len(),
                                n,
                                dtype::name(ty)
                            )));
                        }
                        bytes.chunks_exact($size).map($from_le).collect()
                    }
                    None => $typed,
                };
                if values.len() != n {
                    return Err(DecodeError::Inconsistent(format!(
                        "{} values for dims {:?}",
                        values.len(),
                        t.dims
                    )));
                }
                Array::$variant(
                    ArrayD::from_shape_vec(IxDyn(&shape), values).expect("length checked"),
                )
            }};
        }
        Ok(match DataType::try_from(ty) {
            Ok(DataType::Float) => build!(
                F32,
                f32,
                4,
                |b| f32::from_le_bytes(b.try_into().unwrap()),
                t.float_data.clone()
            ),
            Ok(DataType::Double) => build!(
                F64,
                f64,
                8,
                |b| f64::from_le_bytes(b.try_into().unwrap()),
                t.double_data.clone()
            ),
            Ok(DataType::Float16) => build!(
                F16,
                f16,
                2,
                |b| f16::from_le_bytes(b.try_into().unwrap()),
                t.int32_data
                    .iter()
                    .map(|&v| f16::from_bits(v as u16))
                    .collect()
            ),
            Ok(DataType::Int64) => build!(
                I64,
                i64,
                8,
                |b| i64::from_le_bytes(b.try_into().unwrap()),
                t.int64_data.clone()
            ),
            Ok(DataType::Int32) => build!(
                I32,
                i32,
                4,
                |b| i32::from_le_bytes(b.try_into().unwrap()),
                t.int32_data.clone()
            ),
            Ok(DataType::Int8) => build!(
                I8,
                i8,
                1,
                |b| b[0] as i8,
                t.int32_data.iter().map(|&v| v as i8).collect()
            ),
            Ok(DataType::Uint8) => build!(
                U8,
                u8,
                1,
                |b| b[0],
                t.int32_data.iter().map(|&v| v as u8).collect()
            ),
            Ok(DataType::Bool) => build!(
                Bool,
                bool,
                1,
                |b| b[0] != 0,
                t.int32_data.iter().map(|&v| v != 0).collect()
            ),
            // Two values a byte, the first in the low nibble (the ONNX spec), widened
            // to 8 bits: INT4 sign-extended into I8, UINT4 into U8.
            Ok(DataType::Int4) => {
                Array::I8(unpack_nibbles(t, raw, &shape, |v| ((v << 4) as i8) >> 4)?)
            }
            Ok(DataType::Uint4) => Array::U8(unpack_nibbles(t, raw, &shape, |v| v)?),
            _ => return Err(DecodeError::Unsupported(dtype::name(ty))),
        })
    }

    /// Encodes as a tensor proto called `name` with little-endian `raw_data`.
    pub fn to_proto(&self, name: &str) -> TensorProto {
        let raw: Vec<u8> = match self {
            Array::F32(a) => le_bytes(a, f32::to_le_bytes),
            Array::F64(a) => le_bytes(a, f64::to_le_bytes),
            Array::F16(a) => le_bytes(a, f16::to_le_bytes),
            Array::BF16(a) => le_bytes(a, bf16::to_le_bytes),
            Array::I64(a) => le_bytes(a, i64::to_le_bytes),
            Array::I32(a) => le_bytes(a, i32::to_le_bytes),
            Array::I8(a) => le_bytes(a, i8::to_le_bytes),
            Array::U8(a) => le_bytes(a, u8::to_le_bytes),
            Array::Bool(a) => le_bytes(a, |v| [v as u8]),
        };
        TensorProto {
            name: Some(name.to_string()),
            dims: self.shape().iter().map(|&d| d as i64).collect(),
            data_type: Some(self.elem_type()),
            raw_data: Some(raw),
            ..Default::default()
        }
    }

    /// The values as f64 (for printing and comparisons).
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            Array::F32(a) => a.mapv(f64::from),
            Array::F64(a) => a.clone(),
            Array::F16(a) => a.mapv(f64::from),
            Array::BF16(a) => a.mapv(f64::from),
            Array::I64(a) => a.mapv(|v| v as f64),
            Array::I32(a) => a.mapv(f64::from),
            Array::I8(a) => a.mapv(f64::from),
            Array::U8(a) => a.mapv(f64::from),
            Array::Bool(a) => a.mapv(|v| v as u8 as f64),
        }
    }
}

/// The little-endian bytes of `a`'s elements in logical (row-major) order.
fn le_bytes<T: Plain, const N: usize>(a: &ArrayD<T>, bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    if let Some(values) = a.as_slice().filter(|_| cfg!(target_endian = "little")) {
        if std::mem::size_of::<T>() == N {
            // SAFETY: `T` is a plain number type (no padding, every byte initialized) whose
            // memory on a little-endian machine is its little-endian bytes.
            let raw = unsafe {
                std::slice::from_raw_parts(
                    values.as_ptr().cast::<u8>(),
                    std::mem::size_of_val(values),
                )
            };
            return raw.to_vec();
        }
    }
    let mut out = Vec::with_capacity(a.len() * N);
    for &v in a.iter() {
        out.extend_from_slice(&bytes(v));
    }
    out
}

/// Element types whose memory is their value's bytes: no padding, no pointers (a
/// row-major array of them is written as one copy of its memory).
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for f64 {}
impl Plain for f16 {}
impl Plain for bf16 {}
impl Plain for i64 {}
impl Plain for i32 {}
impl Plain for i8 {}
impl Plain for u8 {}
impl Plain for bool {}

/// The values of a small embedded tensor as text (`[1, 2, 3]`), or `None` when it has
/// more than `max` elements or cannot be decoded.
pub fn small_values_text(t: &TensorProto, max: u64) -> Option<String> {
    if dtype::numel(&t.dims)? > max {
        return None;
    }
    let a = Array::from_proto(t, None).ok()?;
    Some(for_each_array!(&a, x => format!("{:?}", x.iter().collect::<Vec<_>>())))
}

impl Array {
    /// The values as f32 (weights are read this way for SVDs and norms).
    pub fn to_f32(&self) -> ArrayD<f32> {
        match self {
            Array::F32(a) => a.clone(),
            other => other.to_f64().mapv(|v| v as f32),
        }
    }

    /// The values as f32, without a copy when they already are.
    pub fn into_f32(self) -> ArrayD<f32> {
        match self {
            Array::F32(a) => a,
            Array::F16(a) => a.mapv(f32::from),
            Array::BF16(a) => a.mapv(f32::from),
            other => other.to_f64().mapv(|v| v as f32),
        }
    }

    /// `values` (f64, e.g. read from JSON) converted to `elem_type`: any float, int64,
    /// int32, int8, uint8 or bool (non-zero is true).
    pub fn from_f64(values: ArrayD<f64>, elem_type: i32) -> Option<Array> {
        Some(match DataType::try_from(elem_type).ok()? {
            DataType::Float => Array::F32(values.mapv(|v| v as f32)),
            DataType::Double => Array::F64(values),
            DataType::Float16 => Array::F16(values.mapv(f16::from_f64)),
            DataType::Bfloat16 => Array::BF16(values.mapv(bf16::from_f64)),
            DataType::Int64 => Array::I64(values.mapv(|v| v as i64)),
            DataType::Int32 => Array::I32(values.mapv(|v| v as i32)),
            DataType::Int8 => Array::I8(values.mapv(|v| v as i8)),
            DataType::Uint8 => Array::U8(values.mapv(|v| v as u8)),
            DataType::Bool => Array::Bool(values.mapv(|v| v != 0.0)),
            _ => return None,
        })
    }

    /// `parts` (one element type, one shape) stacked along a new first axis; `None` when
    /// they differ in type or shape, or there is none.
    pub fn stack(parts: &[&Array]) -> Option<Array> {
        Array::join(parts, 0, true)
    }

    /// `parts` (one element type) concatenated along `axis`; `None` when they differ in
    /// type or in the other axes, or there is none.
    pub fn concat(parts: &[&Array], axis: usize) -> Option<Array> {
        Array::join(parts, axis, false)
    }

    /// [`Array::stack`] along `axis` (`new_axis`) or [`Array::concat`].
    fn join(parts: &[&Array], axis: usize, new_axis: bool) -> Option<Array> {
        use tract_core::ndarray::{concatenate, stack, Axis};
        macro_rules! joined {
            ($variant:ident) => {{
                let views = parts
                    .iter()
                    .map(|p| match p {
                        Array::$variant(a) => Some(a.view()),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?;
                let joined = if new_axis {
                    stack(Axis(axis), &views)
                } else {
                    concatenate(Axis(axis), &views)
                };
                Array::$variant(joined.ok()?)
            }};
        }
        Some(match parts.first()? {
            Array::F32(_) => joined!(F32),
            Array::F64(_) => joined!(F64),
            Array::F16(_) => joined!(F16),
            Array::BF16(_) => joined!(BF16),
            Array::I64(_) => joined!(I64),
            Array::I32(_) => joined!(I32),
            Array::I8(_) => joined!(I8),
            Array::U8(_) => joined!(U8),
            Array::Bool(_) => joined!(Bool),
        })
    }

    /// `values` (f32) converted to the float element type `elem_type`
    /// (float32, float16, bfloat16 or float64).
    pub fn from_f32(values: ArrayD<f32>, elem_type: i32) -> Option<Array> {
        Some(match DataType::try_from(elem_type).ok()? {
            DataType::Float => Array::F32(values),
            DataType::Float16 => Array::F16(values.mapv(f16::from_f32)),
            DataType::Bfloat16 => Array::BF16(values.mapv(bf16::from_f32)),
            DataType::Double => Array::F64(values.mapv(f64::from)),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ndarray::{Array2, IxDyn};

    /// The bytes are the values in logical (row-major) order, little-endian, whether the
    /// array's memory is row-major (copied in one piece) or not (element by element).
    #[test]
    fn raw_bytes_are_row_major_little_endian_in_every_memory_order() {
        let rows = Array2::from_shape_fn((3, 5), |(i, j)| (i * 5 + j) as f32 - 0.5);
        let columns = rows.t().as_standard_layout().to_owned().reversed_axes(); // column-major
        assert!(columns.as_slice().is_none());
        let want: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        for a in [rows.clone().into_dyn(), columns.into_dyn()] {
            assert_eq!(Array::F32(a).to_proto("w").raw_data.unwrap(), want);
        }
        let halves = rows.mapv(f16::from_f32).into_dyn();
        let want: Vec<u8> = halves.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(Array::F16(halves).to_proto("h").raw_data.unwrap(), want);
        let flags = ArrayD::from_shape_vec(IxDyn(&[4]), vec![true, false, false, true]).unwrap();
        assert_eq!(
            Array::Bool(flags).to_proto("b").raw_data.unwrap(),
            vec![1, 0, 0, 1]
        );
    }
}
