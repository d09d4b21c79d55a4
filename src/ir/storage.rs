//! Where tensor bytes live: an initializer's proto plus its external bytes (the model's
//! memory-mapped data files), and scratch storage for large tensors made by passes
//! (appended to one unlinked temporary file and mapped back, so they cost page cache,
//! not resident memory).

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::proto::TensorProto;

/// An initializer: the tensor proto as stored, plus where its external bytes are.
#[derive(Clone, Debug)]
pub struct Initializer {
    /// The proto (name, dims, type, embedded data or external-data entries).
    pub proto: TensorProto,
    /// Resolved external bytes, when the proto says `data_location = EXTERNAL`.
    pub external: Option<ExternalBytes>,
    /// Made by a pass rather than read from the input model.
    pub new: bool,
}

/// New tensors of at least this many bytes are spilled to scratch storage.
pub const SPILL_BYTES: usize = 1 << 20;

/// A memory-mapped external data file.
#[derive(Debug)]
pub struct DataFile {
    /// The file on disk.
    pub path: std::path::PathBuf,
    /// Its mapping (mapping reads nothing until a page is touched).
    pub map: memmap2::Mmap,
}

/// A byte range of an external data file.
#[derive(Clone, Debug)]
pub struct ExternalBytes {
    /// The mapped file.
    pub file: Arc<DataFile>,
    /// Start of the tensor's bytes.
    pub offset: usize,
    /// Number of bytes.
    pub length: usize,
}

impl Initializer {
    /// A new embedded initializer made by a pass.
    pub fn new(proto: TensorProto) -> Initializer {
        Initializer {
            proto,
            external: None,
            new: true,
        }
    }

    /// A new initializer holding `array`: in memory when small, spilled to the scratch
    /// file from [`SPILL_BYTES`] on.
    pub fn from_array(array: &crate::tensor::Array) -> Result<Initializer> {
        let mut proto = array.to_proto("");
        match proto.raw_data.take_if(|r| r.len() >= SPILL_BYTES) {
            None => Ok(Initializer::new(proto)),
            Some(raw) => {
                Initializer::spilled(proto, &raw).map_err(|e| Error::io(std::env::temp_dir(), e))
            }
        }
    }

    /// A new initializer whose bytes go to a scratch file (memory-mapped back) rather
    /// than memory: large rewritten weights, so grafting a large model streams.
    pub fn spilled(proto: TensorProto, bytes: &[u8]) -> std::io::Result<Initializer> {
        let external = write_scratch(bytes)?;
        Ok(Initializer {
            proto,
            external: Some(external),
            new: true,
        })
    }

    /// The proto with its bytes embedded when they live in a scratch file (for handing
    /// the model to a runtime in memory); input external data stays referenced.
    pub fn runtime_proto(&self) -> TensorProto {
        let mut t = self.proto.clone();
        if self.new && t.raw_data.is_none() {
            t.raw_data = self.raw_bytes().map(<[u8]>::to_vec);
        }
        t
    }

    /// The raw little-endian bytes when the data is in `raw_data` or external;
    /// `None` when the tensor keeps its values in the typed fields.
    pub fn raw_bytes(&self) -> Option<&[u8]> {
        match &self.external {
            Some(ext) => Some(ext.bytes()),
            None if self.proto.raw_data.is_some() => self.proto.raw_data.as_deref(),
            None => None,
        }
    }

    /// Drops the pages of memory-mapped bytes from the resident set once a pass has
    /// read them (the page cache keeps them; a later read faults them back in), so
    /// reading every weight of a large model once costs one weight of memory.
    pub fn release_pages(&self) {
        if let Some(ext) = &self.external {
            ext.release_pages();
        }
    }

    /// The tensor's dims.
    pub fn dims(&self) -> &[i64] {
        &self.proto.dims
    }

    /// The tensor's ONNX element type.
    pub fn elem_type(&self) -> i32 {
        self.proto.data_type()
    }
}

impl ExternalBytes {
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.file.map[self.offset..self.offset + self.length]
    }

    /// Drops the mapped pages from the resident set (the page cache keeps them; a
    /// later read faults them back in).
    pub fn release_pages(&self) {
        // SAFETY: the mapping is read-only and file-backed: DONTNEED only drops
        // resident pages, and a later access re-reads the same bytes from the file.
        let _ = unsafe {
            self.file.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.offset,
                self.length,
            )
        };
    }
}

/// Appends `bytes` to the scratch file and maps them back.
static SCRATCH: Mutex<Option<File>> = Mutex::new(None);

fn open_scratch() -> std::io::Result<File> {
    let path = std::env::temp_dir().join(format!("lora-graft-{}-scratch", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    // Unlinked at once: the data lives as long as the file and its mappings.
    std::fs::remove_file(&path)?;
    Ok(file)
}

fn write_scratch(bytes: &[u8]) -> std::io::Result<ExternalBytes> {
    write_scratch_with(bytes.len(), |file| file.write_all(bytes))
}

/// Appends `values` to the scratch file as little-endian bytes, a chunk at a time (no
/// second copy of them in memory), and maps them back.
pub fn spill_f64(values: &[f64]) -> std::io::Result<ExternalBytes> {
    write_scratch_with(8 * values.len(), |file| {
        for chunk in values.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            file.write_all(&bytes)?;
        }
        Ok(())
    })
}

/// Appends `length` bytes that `write` writes to the scratch file and maps them back.
fn write_scratch_with(
    length: usize,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<ExternalBytes> {
    let mut guard = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(open_scratch()?);
    }
    let file = guard.as_mut().expect("opened");
    let offset = file.seek(SeekFrom::End(0))?;
    write(file)?;
    file.flush()?;
    // SAFETY: the region was just written and is never written again.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(length)
            .map(&*file)?
    };
    Ok(ExternalBytes {
        file: Arc::new(DataFile {
            path: std::env::temp_dir().join("lora-graft-scratch"),
            map,
        }),
        offset: 0,
        length,
    })
}
