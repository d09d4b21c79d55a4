//! The adapter tensor file: lora-lite's safetensors format (keys `<module>.lora_*`,
//! torch layout, metadata `cfg`), plus lora-graft's own metadata key.

use std::collections::BTreeMap;
use std::path::Path;

use tract_core::ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::tensor::Array;

/// Metadata key holding lora-lite's AdapterConfig as JSON.
pub const CFG_KEY: &str = "cfg";
/// Metadata key holding lora-graft's own JSON (version, targets).
pub const GRAFT_KEY: &str = "lora_graft";

/// An adapter file's content.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFile {
    /// Metadata (`cfg`, `lora_graft`, and anything else found in a file read).
    pub metadata: BTreeMap<String, String>,
    /// Tensors by key, torch layout.
    pub tensors: BTreeMap<String, Array>,
}

fn st_dtype(a: &Array) -> Result<&'static str> {
    Ok(match a {
        Array::F32(_) => "F32",
        Array::F16(_) => "F16",
        Array::BF16(_) => "BF16",
        Array::F64(_) => "F64",
        Array::I64(_) => "I64",
        Array::I32(_) => "I32",
        other => {
            return Err(Error::Usage(format!(
                "adapter tensors of type {} are not supported",
                crate::dtype::name(other.elem_type())
            )))
        }
    })
}

impl AdapterFile {
    /// The file's bytes: safetensors with keys and metadata in sorted order, so the same
    /// adapter always gives the same bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut header = serde_json::Map::new();
        let meta: serde_json::Map<String, serde_json::Value> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
        let mut data: Vec<u8> = Vec::new();
        for (name, a) in &self.tensors {
            let proto = a.to_proto(name);
            let raw = proto.raw_data.unwrap_or_default();
            let start = data.len();
            data.extend_from_slice(&raw);
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": st_dtype(a)?, "shape": a.shape(), "data_offsets": [start, data.len()]}),
            );
        }
        let mut json = serde_json::to_string(&serde_json::Value::Object(header)).expect("json");
        while !json.len().is_multiple_of(8) {
            json.push(' ');
        }
        let mut out = Vec::with_capacity(8 + json.len() + data.len());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(json.as_bytes());
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// Reads a safetensors adapter file.
    pub fn read(path: &Path) -> Result<AdapterFile> {
        crate::commit::recover(&crate::files::parent_folder(path))?;
        let bytes = crate::files::read_regular(path)?;
        let bad = |reason: String| Error::AdapterFile {
            path: path.to_path_buf(),
            reason,
        };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let metadata: BTreeMap<String, String> = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let shape = IxDyn(view.shape());
            let d = view.data();
            macro_rules! arr {
                ($ty:ty, $n:expr, $v:ident) => {
                    Array::$v(
                        ArrayD::from_shape_vec(
                            shape,
                            d.chunks_exact($n)
                                .map(|b| <$ty>::from_le_bytes(b.try_into().unwrap()))
                                .collect(),
                        )
                        .map_err(|e| bad(e.to_string()))?,
                    )
                };
            }
            let a = match view.dtype() {
                safetensors::Dtype::F32 => arr!(f32, 4, F32),
                safetensors::Dtype::F16 => arr!(half::f16, 2, F16),
                safetensors::Dtype::BF16 => arr!(half::bf16, 2, BF16),
                safetensors::Dtype::F64 => arr!(f64, 8, F64),
                safetensors::Dtype::I64 => arr!(i64, 8, I64),
                safetensors::Dtype::I32 => arr!(i32, 4, I32),
                other => {
                    return Err(bad(format!(
                        "tensor '{name}' has unsupported dtype {other:?}"
                    )))
                }
            };
            tensors.insert(name, a);
        }
        Ok(AdapterFile { metadata, tensors })
    }
}
