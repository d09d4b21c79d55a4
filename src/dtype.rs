//! ONNX element types: names, storage sizes.

use crate::proto::tensor_proto::DataType;

/// The ONNX name of an element type (`float32`, `int64`, ...), lower case as numpy prints it.
pub fn name(elem_type: i32) -> &'static str {
    match DataType::try_from(elem_type) {
        Ok(DataType::Float) => "float32",
        Ok(DataType::Uint8) => "uint8",
        Ok(DataType::Int8) => "int8",
        Ok(DataType::Uint16) => "uint16",
        Ok(DataType::Int16) => "int16",
        Ok(DataType::Int32) => "int32",
        Ok(DataType::Int64) => "int64",
        Ok(DataType::String) => "string",
        Ok(DataType::Bool) => "bool",
        Ok(DataType::Float16) => "float16",
        Ok(DataType::Double) => "float64",
        Ok(DataType::Uint32) => "uint32",
        Ok(DataType::Uint64) => "uint64",
        Ok(DataType::Complex64) => "complex64",
        Ok(DataType::Complex128) => "complex128",
        Ok(DataType::Bfloat16) => "bfloat16",
        Ok(DataType::Float8e4m3fn) => "float8e4m3fn",
        Ok(DataType::Float8e4m3fnuz) => "float8e4m3fnuz",
        Ok(DataType::Float8e5m2) => "float8e5m2",
        Ok(DataType::Float8e5m2fnuz) => "float8e5m2fnuz",
        Ok(DataType::Uint4) => "uint4",
        Ok(DataType::Int4) => "int4",
        Ok(DataType::Float4e2m1) => "float4e2m1",
        Ok(DataType::Float8e8m0) => "float8e8m0",
        Ok(DataType::Uint2) => "uint2",
        Ok(DataType::Int2) => "int2",
        Ok(DataType::Float6e2m3) => "float6e2m3",
        Ok(DataType::Float6e3m2) => "float6e3m2",
        Ok(DataType::Undefined) | Err(_) => "undefined",
    }
}

/// Bits one element takes in `raw_data`, or `None` for strings and unknown types.
pub fn bits(elem_type: i32) -> Option<u64> {
    Some(match DataType::try_from(elem_type).ok()? {
        DataType::Uint2 | DataType::Int2 => 2,
        DataType::Uint4 | DataType::Int4 | DataType::Float4e2m1 => 4,
        DataType::Float6e2m3 | DataType::Float6e3m2 => 6,
        DataType::Uint8
        | DataType::Int8
        | DataType::Bool
        | DataType::Float8e4m3fn
        | DataType::Float8e4m3fnuz
        | DataType::Float8e5m2
        | DataType::Float8e5m2fnuz
        | DataType::Float8e8m0 => 8,
        DataType::Uint16 | DataType::Int16 | DataType::Float16 | DataType::Bfloat16 => 16,
        DataType::Int32 | DataType::Uint32 | DataType::Float => 32,
        DataType::Int64 | DataType::Uint64 | DataType::Double | DataType::Complex64 => 64,
        DataType::Complex128 => 128,
        DataType::String | DataType::Undefined => return None,
    })
}

/// Bytes that `numel` elements take in `raw_data` (sub-byte types are packed, rounded up).
pub fn storage_bytes(elem_type: i32, numel: u64) -> Option<u64> {
    bits(elem_type)
        .and_then(|b| b.checked_mul(numel))
        .map(|b| b.div_ceil(8))
}

/// Whether `elem_type` is a floating-point type.
pub fn is_float(elem_type: i32) -> bool {
    use crate::proto::tensor_proto::DataType as D;
    matches!(
        D::try_from(elem_type),
        Ok(D::Float | D::Float16 | D::Bfloat16 | D::Double)
    )
}

/// Number of elements of a shape, or `None` on a negative dim or overflow.
pub fn numel(dims: &[i64]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| {
        u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}
