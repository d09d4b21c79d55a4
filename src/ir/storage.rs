//! Where tensor bytes live: an initializer's proto plus its external bytes (the model's
//! memory-mapped data files), and where large tensors made by passes go: appended to a
//! file and mapped back, so they cost page cache, not resident memory. That file is one
//! unlinked scratch file, or the output's own data file ([`DataSink`]) when the job
//! knows its output: a tensor placed there is written to disk while the passes still
//! compute, and saving only points at it.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
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
    pub path: PathBuf,
    /// The file position of the mapping's first byte.
    pub start: u64,
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
        Initializer::unplaced(array).place(None)
    }

    /// A new initializer holding `array` in memory, whatever its size, for a worker
    /// whose results are placed in order afterwards ([`Initializer::place`]).
    pub fn unplaced(array: &crate::tensor::Array) -> Initializer {
        Initializer::new(array.to_proto(""))
    }

    /// Moves the bytes of a new in-memory initializer of at least [`SPILL_BYTES`] to
    /// `sink` (the output's data file), or to the scratch file without one; others are
    /// returned as they are.
    pub fn place(mut self, sink: Option<&DataSink>) -> Result<Initializer> {
        let large = |r: &Vec<u8>| r.len() >= SPILL_BYTES;
        let Some(raw) = self.proto.raw_data.take_if(|r| self.new && large(r)) else {
            return Ok(self);
        };
        let external = match sink {
            Some(sink) => sink.place(&raw)?,
            None => write_scratch(&raw).map_err(|e| Error::io(std::env::temp_dir(), e))?,
        };
        self.external = Some(external);
        Ok(self)
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

/// A file tensors are appended to and mapped back from.
#[derive(Debug)]
struct Appended {
    file: File,
    /// Where its mappings say they come from.
    path: PathBuf,
    /// Bytes written so far.
    len: u64,
}

impl Appended {
    /// Appends `length` bytes that `write` writes, from a multiple of `align` on (zeros
    /// before); returns where they start.
    fn append(
        &mut self,
        length: usize,
        align: u64,
        write: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> std::io::Result<u64> {
        let offset = self.len.next_multiple_of(align);
        self.file
            .write_all(&vec![0u8; (offset - self.len) as usize])?;
        self.len = offset;
        write(&mut self.file)?;
        self.len = offset + length as u64;
        Ok(offset)
    }

    /// The written bytes `offset..offset + length`, mapped.
    fn map(&self, offset: u64, length: usize) -> std::io::Result<ExternalBytes> {
        // SAFETY: the region was written and is never written again.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(length)
                .map(&self.file)?
        };
        Ok(ExternalBytes {
            file: Arc::new(DataFile {
                path: self.path.clone(),
                start: offset,
                map,
            }),
            offset: 0,
            length,
        })
    }
}

/// The scratch file (unlinked), opened on first use.
static SCRATCH: Mutex<Option<Appended>> = Mutex::new(None);

fn open_scratch() -> std::io::Result<Appended> {
    let path = std::env::temp_dir().join(format!("lora-graft-{}-scratch", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    // Unlinked at once: the data lives as long as the file and its mappings.
    std::fs::remove_file(&path)?;
    Ok(Appended {
        file,
        path: std::env::temp_dir().join("lora-graft-scratch"),
        len: 0,
    })
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
    let scratch = guard.as_mut().expect("opened");
    let offset = scratch.append(length, 1, write)?;
    scratch.map(offset, length)
}

/// Tensors in an output's own data file start at multiples of this many bytes.
pub const DATA_ALIGN: u64 = 64;

/// An output model's own data file, written before the model is saved: a pass's large
/// new tensors are placed in it as they are made (in a fixed order, so the file is the
/// same every run), the kernel writes them to disk while the passes go on, and saving
/// appends the remaining new tensors and points at all of them. Written under the
/// temporary name the output's [`crate::commit::Commit`] renames.
#[derive(Debug)]
pub struct DataSink {
    /// The file it becomes.
    target: PathBuf,
    /// The name external-data entries give it (relative to the model's folder).
    name: String,
    /// The temporary file, created on the first write.
    temp: PathBuf,
    file: Mutex<Option<SinkFile>>,
}

/// A sink's open file: appended to through the page cache, and, where the filesystem
/// allows it, placed tensors written past it (`O_DIRECT`).
#[derive(Debug)]
struct SinkFile {
    appended: Appended,
    direct: Option<File>,
}

/// `O_DIRECT` writes start, end and sit in memory at multiples of this many bytes.
const DIRECT_ALIGN: u64 = 4096;

impl DataSink {
    /// A sink for `target`, written to `temp` and known to the model as `name`;
    /// nothing is created until the first tensor.
    pub fn new(target: PathBuf, name: String, temp: PathBuf) -> DataSink {
        DataSink {
            target,
            name,
            temp,
            file: Mutex::new(None),
        }
    }

    /// The name external-data entries give the file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Appends `bytes` (aligned to [`DATA_ALIGN`]) and returns where they start; the
    /// kernel is asked to start writing them to disk at once.
    pub fn append(&self, bytes: &[u8]) -> Result<u64> {
        self.with_file(|f| append_buffered(&mut f.appended, bytes))
    }

    /// Appends `bytes` and maps them back: a tensor placed for good. They go straight
    /// to the disk where the filesystem allows it (no page-cache copy to make, reclaim
    /// or write back: this thread waits for the disk while the workers compute).
    pub fn place(&self, bytes: &[u8]) -> Result<ExternalBytes> {
        self.with_file(|f| {
            let direct = f.direct.as_ref().map(|direct| {
                let offset = f.appended.len.next_multiple_of(DIRECT_ALIGN);
                write_direct(direct, offset, bytes).map(|()| offset)
            });
            let offset = match direct {
                Some(Ok(offset)) => {
                    f.appended.len = offset + bytes.len() as u64;
                    f.appended.file.seek(SeekFrom::Start(f.appended.len))?;
                    offset
                }
                // Refused (an alignment the filesystem wants larger): through the page
                // cache from now on, over whatever the refused write left.
                Some(Err(_)) | None => {
                    f.direct = None;
                    append_buffered(&mut f.appended, bytes)?
                }
            };
            f.appended.map(offset, bytes.len())
        })
    }

    /// Where `bytes` start in this file, when they were placed in it.
    pub fn offset_of(&self, bytes: &ExternalBytes) -> Option<u64> {
        (bytes.file.path == self.temp).then(|| bytes.file.start + bytes.offset as u64)
    }

    /// Writes everything to disk; false when nothing was ever written (no file exists).
    pub fn finish(&self) -> Result<bool> {
        let guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = guard.as_ref() else {
            return Ok(false);
        };
        // A direct write's zero padding past the last tensor goes.
        let file = &f.appended.file;
        file.set_len(f.appended.len)
            .and_then(|()| file.sync_all())
            .map(|()| true)
            .map_err(|e| self.error(e))
    }

    fn with_file<T>(&self, f: impl FnOnce(&mut SinkFile) -> std::io::Result<T>) -> Result<T> {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.temp)
                .map_err(|e| self.error(e))?;
            *guard = Some(SinkFile {
                appended: Appended {
                    file,
                    path: self.temp.clone(),
                    len: 0,
                },
                direct: open_direct(&self.temp),
            });
        }
        f(guard.as_mut().expect("opened")).map_err(|e| self.error(e))
    }

    fn error(&self, e: std::io::Error) -> Error {
        Error::io(&self.target, e)
    }

    /// The file it becomes.
    pub fn target(&self) -> &Path {
        &self.target
    }
}

/// Appends `bytes` through the page cache and starts their writeback.
fn append_buffered(f: &mut Appended, bytes: &[u8]) -> std::io::Result<u64> {
    let offset = f.append(bytes.len(), DATA_ALIGN, |file| file.write_all(bytes))?;
    start_writeback(&f.file, offset, bytes.len());
    Ok(offset)
}

/// `path` opened again for writes that bypass the page cache, where the system has them.
fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Writes `bytes` at `offset` (a multiple of [`DIRECT_ALIGN`]) through an `O_DIRECT`
/// descriptor: in aligned chunks copied into an aligned buffer, the last one padded
/// with zeros.
fn write_direct(file: &File, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 8 << 20;
    let align = DIRECT_ALIGN as usize;
    let size = CHUNK.min(bytes.len().next_multiple_of(align));
    let mut buffer = vec![0u8; size + align];
    let start = buffer.as_ptr().align_offset(align);
    let aligned = &mut buffer[start..start + size];
    for (k, chunk) in bytes.chunks(CHUNK).enumerate() {
        let n = chunk.len().next_multiple_of(align);
        aligned[..chunk.len()].copy_from_slice(chunk);
        aligned[chunk.len()..n].fill(0);
        file.write_all_at(&aligned[..n], offset + (k * CHUNK) as u64)?;
    }
    Ok(())
}

/// Starts writing `length` bytes of `file` from `offset` to disk without waiting, so
/// the final `fsync` finds little left to write.
fn start_writeback(file: &File, offset: u64, length: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open; the call only schedules writeback.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                length as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, length);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where writes past the page cache are refused (here: a descriptor that cannot
    /// write), placing falls back to the page cache for that tensor and every later one,
    /// over whatever the refused write left; the bytes map back and the file ends with
    /// the last tensor.
    #[test]
    fn a_refused_direct_write_falls_back_to_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let temp = dir.path().join("d.data.tmp");
        let sink = DataSink::new(dir.path().join("d.data"), "d.data".into(), temp.clone());
        let first: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        sink.place(&first).unwrap();
        sink.with_file(|f| {
            f.direct = Some(File::open(&temp)?); // read-only: its writes fail
            Ok(())
        })
        .unwrap();
        let mut end = 0;
        for k in 0..3u8 {
            let bytes: Vec<u8> = (0..5_000u32)
                .map(|i| (i as u8).wrapping_mul(k + 3))
                .collect();
            let placed = sink.place(&bytes).unwrap();
            assert!(placed.bytes() == bytes.as_slice());
            end = sink.offset_of(&placed).unwrap() + bytes.len() as u64;
            assert!(sink.file.lock().unwrap().as_ref().unwrap().direct.is_none());
        }
        assert!(sink.finish().unwrap());
        assert_eq!(std::fs::metadata(&temp).unwrap().len(), end);
        let all = std::fs::read(&temp).unwrap();
        assert_eq!(
            &all[..first.len()],
            first.as_slice(),
            "the first tensor intact"
        );
    }
}
