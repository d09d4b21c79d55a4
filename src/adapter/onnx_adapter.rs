//! ONNX Runtime's `.onnx_adapter` file (FlatBuffers, onnxruntime's
//! `lora/adapter_format/adapter_schema.fbs`, format version 1): file identifier `TORT`,
//! table `Adapter {format_version, adapter_version, model_version, parameters}`, table
//! `Parameter {name, dims: [int64], data_type (ONNX's enum), raw_data: [uint8]}` with
//! `raw_data` little-endian and aligned to 8 bytes from the start of the file (ONNX
//! Runtime memory-maps the file and uses the bytes in place).
//!
//! Written with the `flatbuffers` crate's builder; read by a small reader of this one
//! schema that checks every offset against the file's length (a file is untrusted data).

use std::path::Path;

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use crate::error::{Error, Result};
use crate::tensor::Array;

/// The schema's file identifier.
pub const IDENTIFIER: &str = "TORT";
/// The only format version ONNX Runtime reads.
pub const FORMAT_VERSION: i32 = 1;
/// The file extension ONNX Runtime and onnxruntime-genai use.
pub const EXTENSION: &str = "onnx_adapter";

/// An `.onnx_adapter` file's content.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxAdapter {
    /// The adapter's own version (free for the user).
    pub adapter_version: i32,
    /// The model version it was made for (free for the user).
    pub model_version: i32,
    /// Parameters in file order: graph input name and tensor.
    pub parameters: Vec<(String, Array)>,
}

// vtable slots: 4 + 2 · field index.
const ADAPTER_FORMAT_VERSION: u16 = 4;
const ADAPTER_ADAPTER_VERSION: u16 = 6;
const ADAPTER_MODEL_VERSION: u16 = 8;
const ADAPTER_PARAMETERS: u16 = 10;
const PARAM_NAME: u16 = 4;
const PARAM_DIMS: u16 = 6;
const PARAM_DATA_TYPE: u16 = 8;
const PARAM_RAW_DATA: u16 = 10;

/// A table of a FlatBuffers file, read with every offset bounds-checked. (The
/// `flatbuffers` crate's verifier also demands that every `int64` vector be 8-byte
/// aligned, which ONNX Runtime's own writer does not do for `dims`; reading copies
/// the bytes, so alignment does not matter here.)
#[derive(Clone, Copy)]
struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
    vtable: usize,
    vtable_len: usize,
}

type Read<T> = std::result::Result<T, String>;

fn u32_at(buf: &[u8], pos: usize) -> Read<usize> {
    buf.get(pos..pos.checked_add(4).ok_or("offset overflow")?)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or_else(|| format!("offset {pos} points past the end of the file"))
}

fn u16_at(buf: &[u8], pos: usize) -> Read<usize> {
    buf.get(pos..pos.checked_add(2).ok_or("offset overflow")?)
        .map(|b| u16::from_le_bytes(b.try_into().expect("2 bytes")) as usize)
        .ok_or_else(|| format!("offset {pos} points past the end of the file"))
}

impl<'a> Table<'a> {
    /// The table at `pos`.
    fn at(buf: &'a [u8], pos: usize) -> Read<Table<'a>> {
        let soffset = u32_at(buf, pos)? as u32 as i32 as i64;
        let vtable = usize::try_from(pos as i64 - soffset)
            .map_err(|_| format!("table at {pos} has its vtable before the file"))?;
        let vtable_len = u16_at(buf, vtable)?;
        if vtable_len < 4 || vtable.saturating_add(vtable_len) > buf.len() {
            return Err(format!("table at {pos} has a broken vtable"));
        }
        Ok(Table {
            buf,
            pos,
            vtable,
            vtable_len,
        })
    }

    /// Where field `slot` is stored, if it is.
    fn field(&self, slot: u16) -> Read<Option<usize>> {
        let slot = slot as usize;
        if slot + 2 > self.vtable_len {
            return Ok(None);
        }
        match u16_at(self.buf, self.vtable + slot)? {
            0 => Ok(None),
            off => Ok(Some(self.pos + off)),
        }
    }

    fn i32(&self, slot: u16) -> Read<i32> {
        match self.field(slot)? {
            None => Ok(0),
            Some(p) => Ok(u32_at(self.buf, p)? as u32 as i32),
        }
    }

    /// The bytes of vector field `slot` (element size `size`) and its length.
    fn vector(&self, slot: u16, size: usize) -> Read<Option<(&'a [u8], usize)>> {
        let Some(p) = self.field(slot)? else {
            return Ok(None);
        };
        let start = p
            .checked_add(u32_at(self.buf, p)?)
            .ok_or("offset overflow")?;
        let len = u32_at(self.buf, start)?;
        let bytes = len.checked_mul(size).ok_or("vector too long")?;
        let data = self
            .buf
            .get(start + 4..(start + 4).checked_add(bytes).ok_or("vector too long")?)
            .ok_or_else(|| format!("vector at {start} runs past the end of the file"))?;
        Ok(Some((data, len)))
    }

    /// Table `i` of vector-of-tables field `slot`.
    fn tables(&self, slot: u16) -> Read<Vec<Table<'a>>> {
        let Some(p) = self.field(slot)? else {
            return Ok(Vec::new());
        };
        let start = p
            .checked_add(u32_at(self.buf, p)?)
            .ok_or("offset overflow")?;
        let len = u32_at(self.buf, start)?;
        if len.saturating_mul(4) > self.buf.len() {
            return Err(format!("vector at {start} runs past the end of the file"));
        }
        (0..len)
            .map(|i| {
                let at = start + 4 + 4 * i;
                Table::at(
                    self.buf,
                    at.checked_add(u32_at(self.buf, at)?)
                        .ok_or("offset overflow")?,
                )
            })
            .collect()
    }
}

impl OnnxAdapter {
    /// The file's bytes: parameters in the given order, each `raw_data` 8-byte aligned.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        // Room for every tensor and its table up front: no regrowth copies.
        let size: usize = self
            .parameters
            .iter()
            .map(|(n, a)| {
                crate::dtype::storage_bytes(a.elem_type(), a.len() as u64).unwrap_or(0) as usize
                    + n.len()
                    + 128
            })
            .sum();
        let mut fbb = FlatBufferBuilder::with_capacity(size + 1024);
        let mut params: Vec<WIPOffset<flatbuffers::TableFinishedWIPOffset>> = Vec::new();
        for (name, a) in &self.parameters {
            let raw = a.to_proto(name).raw_data.unwrap_or_default();
            // The builder writes back to front: pad so that the bytes, once pushed, start
            // at a multiple of 8 from the end; `dims` (int64) makes the whole buffer a
            // multiple of 8, so they start at a multiple of 8 from the front too.
            let pad = (8 - (fbb.unfinished_data().len() + raw.len()) % 8) % 8;
            for _ in 0..pad {
                fbb.push(0u8);
            }
            let raw_data = fbb.create_vector(&raw);
            let dims: Vec<i64> = a.shape().iter().map(|&d| d as i64).collect();
            let dims = fbb.create_vector(&dims);
            let name = fbb.create_string(name);
            let t = fbb.start_table();
            fbb.push_slot_always(PARAM_NAME, name);
            fbb.push_slot_always(PARAM_DIMS, dims);
            fbb.push_slot_always(PARAM_DATA_TYPE, a.elem_type());
            fbb.push_slot_always(PARAM_RAW_DATA, raw_data);
            params.push(fbb.end_table(t));
        }
        let params = fbb.create_vector(&params);
        let t = fbb.start_table();
        fbb.push_slot_always(ADAPTER_FORMAT_VERSION, FORMAT_VERSION);
        fbb.push_slot_always(ADAPTER_ADAPTER_VERSION, self.adapter_version);
        fbb.push_slot_always(ADAPTER_MODEL_VERSION, self.model_version);
        fbb.push_slot_always(ADAPTER_PARAMETERS, params);
        let root = fbb.end_table(t);
        fbb.finish(root, Some(IDENTIFIER));
        let (mut buf, head) = fbb.collapse();
        buf.drain(..head);
        Ok(buf)
    }

    /// Parses `bytes`, read from `path` (named in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<OnnxAdapter> {
        let bad = |reason: String| Error::AdapterFile {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < 8 || !flatbuffers::buffer_has_identifier(bytes, IDENTIFIER, false) {
            return Err(bad(format!(
                "not an .onnx_adapter file (no '{IDENTIFIER}' file identifier); write one with `lora-graft export-adapter --format onnx-adapter`"
            )));
        }
        let parsed = parse(bytes).map_err(|why| {
            bad(format!(
                "corrupt .onnx_adapter file: {why}; is it truncated?"
            ))
        })?;
        let (version, adapter_version, model_version, params) = parsed;
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}; lora-graft and ONNX Runtime read version {FORMAT_VERSION}"
            )));
        }
        let mut parameters = Vec::new();
        for (name, dims, data_type, raw) in params {
            let proto = crate::proto::TensorProto {
                name: Some(name.clone()),
                dims,
                data_type: Some(data_type),
                ..Default::default()
            };
            let a = Array::from_proto(&proto, Some(raw))
                .map_err(|e| bad(format!("parameter '{name}': {e}")))?;
            parameters.push((name, a));
        }
        Ok(OnnxAdapter {
            adapter_version,
            model_version,
            parameters,
        })
    }

    /// Reads an `.onnx_adapter` file.
    pub fn read(path: &Path) -> Result<OnnxAdapter> {
        crate::commit::recover(&crate::files::parent_folder(path))?;
        let bytes = crate::files::read_regular(path)?;
        OnnxAdapter::from_bytes(&bytes, path)
    }

    /// Whether `bytes` carry the `.onnx_adapter` file identifier.
    pub fn is_onnx_adapter(bytes: &[u8]) -> bool {
        bytes.len() >= 8 && flatbuffers::buffer_has_identifier(bytes, IDENTIFIER, false)
    }
}

/// One parameter as stored: name, dims, ONNX data type, raw bytes.
type RawParameter<'a> = (String, Vec<i64>, i32, &'a [u8]);

/// `(format_version, adapter_version, model_version, parameters)` of a file.
fn parse(bytes: &[u8]) -> Read<(i32, i32, i32, Vec<RawParameter<'_>>)> {
    let root = Table::at(bytes, u32_at(bytes, 0)?)?;
    let mut params = Vec::new();
    for (i, p) in root.tables(ADAPTER_PARAMETERS)?.into_iter().enumerate() {
        let name = p
            .vector(PARAM_NAME, 1)?
            .ok_or_else(|| format!("parameter {i} has no name"))?
            .0;
        let name = std::str::from_utf8(name)
            .map_err(|_| format!("parameter {i}'s name is not UTF-8"))?
            .to_string();
        let dims = match p.vector(PARAM_DIMS, 8)? {
            Some((data, _)) => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            None => Vec::new(),
        };
        let raw = p.vector(PARAM_RAW_DATA, 1)?.map_or(&[][..], |v| v.0);
        params.push((name, dims, p.i32(PARAM_DATA_TYPE)?, raw));
    }
    Ok((
        root.i32(ADAPTER_FORMAT_VERSION)?,
        root.i32(ADAPTER_ADAPTER_VERSION)?,
        root.i32(ADAPTER_MODEL_VERSION)?,
        params,
    ))
}

impl std::fmt::Display for OnnxAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            ".onnx_adapter format {FORMAT_VERSION}, adapter version {}, model version {}, {} parameters",
            self.adapter_version,
            self.model_version,
            self.parameters.len()
        )?;
        for (name, a) in &self.parameters {
            writeln!(
                f,
                "  {name:<56} {:<9} {:?}",
                crate::dtype::name(a.elem_type()),
                a.shape()
            )?;
        }
        Ok(())
    }
}
