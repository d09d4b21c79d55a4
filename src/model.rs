//! Loading and saving `.onnx` files: embedded or external data, checked before use,
//! mapped lazily; saving atomically, keeping external data where it is.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use prost::Message;

use crate::dtype;
use crate::error::{Error, Result};
use crate::ir::{DataFile, ExternalBytes, Graph, Initializer};
use crate::proto::{tensor_proto::DataLocation, GraphProto, ModelProto, TensorProto};

/// A loaded model: the graph as arena IR, every other proto field kept verbatim.
#[derive(Debug, Clone)]
pub struct Model {
    /// The model proto without its graph (opsets, metadata, functions, ... verbatim).
    pub proto: ModelProto,
    /// The main graph.
    pub graph: Graph,
    /// The file it was read from.
    pub path: PathBuf,
    /// Its folder: external data locations are relative to it.
    pub dir: PathBuf,
}

/// How [`Model::save`] treats external data.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// How the input's external data files reach an output in another folder.
    pub placement: DataPlacement,
    /// New tensors (made by passes) of at least this many bytes go to the output's own
    /// data file when the model keeps data externally.
    pub new_data_threshold: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            placement: DataPlacement::Clone,
            new_data_threshold: 1024,
        }
    }
}

/// How an output in another folder gets the input's external data files (runtimes
/// refuse data paths that leave the model's folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlacement {
    /// A copy-on-write clone where the filesystem can (btrfs, xfs), else a copy. Safe
    /// everywhere: the `onnx` Python package refuses data files with several hard links.
    Clone,
    /// A hard link where possible (no copy, no space; ONNX Runtime and tract accept
    /// it, `onnx.load` and `onnx.checker` refuse it as a "hardlink attack"), else a copy.
    HardLink,
}

/// What [`Model::save`] wrote.
#[derive(Debug, Clone, Default)]
pub struct SaveReport {
    /// The model file.
    pub model: PathBuf,
    /// External data files hard-linked beside the output.
    pub linked: Vec<PathBuf>,
    /// External data files cloned beside the output (copy-on-write: no space used).
    pub cloned: Vec<PathBuf>,
    /// External data files copied beside the output (no copy-on-write clone possible).
    pub copied: Vec<PathBuf>,
    /// The output's own data file for new tensors, if one was written.
    pub own_data: Option<PathBuf>,
}

/// Maps the external data files of one model, once each.
struct DataFiles {
    model: PathBuf,
    dir: PathBuf,
    dir_canonical: PathBuf,
    open: HashMap<String, Arc<DataFile>>,
}

impl DataFiles {
    fn tensor_error(&self, t: &TensorProto, reason: String) -> Error {
        Error::Tensor {
            path: self.model.clone(),
            tensor: t.name().to_string(),
            reason,
        }
    }

    /// Checks an external tensor's location, range and size, and maps its file.
    fn resolve(&mut self, t: &TensorProto) -> Result<ExternalBytes> {
        let entry = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key() == key)
                .map(|e| e.value())
        };
        let location = entry("location")
            .filter(|l| !l.is_empty())
            .ok_or_else(|| self.tensor_error(t, "external data without a 'location' entry".into()))?
            .to_string();
        let number = |key: &str| -> Result<Option<u64>> {
            entry(key)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        self.tensor_error(
                            t,
                            format!("external data '{key}' = {v:?} is not a byte count"),
                        )
                    })
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?;
        let file = self.open(t, &location)?;
        let size = file.map.len() as u64;
        let length = length.unwrap_or(size.saturating_sub(offset));
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(self.tensor_error(
                t,
                format!(
                    "external data range {offset}..{} is past the end of '{location}' ({size} bytes); the data file is truncated or belongs to another model",
                    offset.saturating_add(length)
                ),
            ));
        }
        if let Some(expected) =
            dtype::numel(&t.dims).and_then(|n| dtype::storage_bytes(t.data_type(), n))
        {
            if expected != length {
                return Err(self.tensor_error(
                    t,
                    format!(
                        "external data holds {length} bytes but dims {:?} of {} need {expected}",
                        t.dims,
                        dtype::name(t.data_type())
                    ),
                ));
            }
        }
        Ok(ExternalBytes {
            file,
            offset: offset as usize,
            length: length as usize,
        })
    }

    fn open(&mut self, t: &TensorProto, location: &str) -> Result<Arc<DataFile>> {
        if let Some(f) = self.open.get(location) {
            return Ok(f.clone());
        }
        let rel = Path::new(location);
        if rel.is_absolute()
            || location.starts_with('/')
            || location.starts_with('\\')
            || rel.has_root()
        {
            return Err(self.tensor_error(
                t,
                format!("external data location '{location}' is absolute; runtimes only accept paths inside the model's folder: move the file beside the model and make the location relative"),
            ));
        }
        if rel
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
        {
            return Err(self.tensor_error(
                t,
                format!("external data location '{location}' leaves the model's folder ('..'); move the file beside the model"),
            ));
        }
        let path = self.dir.join(rel);
        let canonical = fs::canonicalize(&path).map_err(|e| {
            self.tensor_error(
                t,
                format!(
                    "external data file '{}' cannot be opened: {e}",
                    path.display()
                ),
            )
        })?;
        if !canonical.starts_with(&self.dir_canonical) {
            return Err(self.tensor_error(
                t,
                format!("external data location '{location}' leaves the model's folder through a symlink (to '{}'); copy the data file beside the model", canonical.display()),
            ));
        }
        let handle = fs::File::open(&canonical).map_err(|e| Error::io(&path, e))?;
        if !handle
            .metadata()
            .map_err(|e| Error::io(&path, e))?
            .is_file()
        {
            return Err(self.tensor_error(
                t,
                format!("external data location '{location}' is not a regular file"),
            ));
        }
        // SAFETY: the mapping is read-only; lora-graft never writes its inputs, and a
        // file truncated by another process while mapped is outside what we guard.
        let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| Error::io(&path, e))?;
        let file = Arc::new(DataFile { path, map });
        self.open.insert(location.to_string(), file.clone());
        Ok(file)
    }
}

/// Checks that an embedded tensor's stored values agree with its dims and type.
fn check_embedded(model: &Path, t: &TensorProto) -> Result<()> {
    let err = |reason: String| Error::Tensor {
        path: model.to_path_buf(),
        tensor: t.name().to_string(),
        reason,
    };
    let n = dtype::numel(&t.dims).ok_or_else(|| err(format!("invalid dims {:?}", t.dims)))?;
    if let Some(raw) = &t.raw_data {
        if let Some(expected) = dtype::storage_bytes(t.data_type(), n) {
            if raw.len() as u64 != expected {
                return Err(err(format!(
                    "raw data holds {} bytes but dims {:?} of {} need {expected}; the file is corrupt",
                    raw.len(),
                    t.dims,
                    dtype::name(t.data_type())
                )));
            }
        }
        return Ok(());
    }
    use crate::proto::tensor_proto::DataType as D;
    let (field, count, per) = match D::try_from(t.data_type()) {
        Ok(D::Float) => ("float_data", t.float_data.len() as u64, 1),
        Ok(D::Complex64) => ("float_data", t.float_data.len() as u64, 2),
        Ok(D::Double) => ("double_data", t.double_data.len() as u64, 1),
        Ok(D::Complex128) => ("double_data", t.double_data.len() as u64, 2),
        Ok(D::Int64) => ("int64_data", t.int64_data.len() as u64, 1),
        Ok(D::Uint32 | D::Uint64) => ("uint64_data", t.uint64_data.len() as u64, 1),
        Ok(D::String) => ("string_data", t.string_data.len() as u64, 1),
        Ok(
            D::Int32
            | D::Int16
            | D::Int8
            | D::Uint8
            | D::Uint16
            | D::Bool
            | D::Float16
            | D::Bfloat16,
        ) => ("int32_data", t.int32_data.len() as u64, 1),
        _ => return Ok(()), // packed and 8-bit float types: layout varies by IR version
    };
    if count != n * per {
        return Err(err(format!(
            "{field} holds {count} values but dims {:?} need {}; the file is corrupt",
            t.dims,
            n * per
        )));
    }
    Ok(())
}

/// Calls `f` on every tensor proto in a graph, its subgraphs and tensor attributes.
fn visit_tensors(g: &GraphProto, f: &mut impl FnMut(&TensorProto) -> Result<()>) -> Result<()> {
    for t in &g.initializer {
        f(t)?;
    }
    for n in &g.node {
        for a in &n.attribute {
            for t in a.t.iter().chain(&a.tensors) {
                f(t)?;
            }
            for sub in a.g.iter().chain(&a.graphs) {
                visit_tensors(sub, f)?;
            }
        }
    }
    Ok(())
}

fn is_external(t: &TensorProto) -> bool {
    t.data_location() == DataLocation::External
}

fn location(t: &TensorProto) -> Option<&str> {
    t.external_data
        .iter()
        .find(|e| e.key() == "location")
        .map(|e| e.value())
}

impl Model {
    /// Reads `path`, checks every tensor's data (external ranges are mapped, not read)
    /// and builds the IR. The graph is validated.
    pub fn load(path: &Path) -> Result<Model> {
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut proto = ModelProto::decode(bytes.as_slice()).map_err(|e| Error::Decode {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        drop(bytes);
        let graph_proto = proto.graph.take().ok_or_else(|| Error::Decode {
            path: path.to_path_buf(),
            reason: "it holds no graph".into(),
        })?;
        if proto.ir_version.is_none() && proto.opset_import.is_empty() {
            return Err(Error::Decode {
                path: path.to_path_buf(),
                reason: "it has neither an IR version nor opset imports".into(),
            });
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir_canonical = fs::canonicalize(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut files = DataFiles {
            model: path.to_path_buf(),
            dir: dir.clone(),
            dir_canonical,
            open: HashMap::new(),
        };
        visit_tensors(&graph_proto, &mut |t| {
            if is_external(t) {
                files.resolve(t).map(|_| ())
            } else {
                check_embedded(path, t)
            }
        })?;
        for f in &proto.functions {
            for n in &f.node {
                for a in &n.attribute {
                    for t in a.t.iter().chain(&a.tensors) {
                        if is_external(t) {
                            files.resolve(t)?;
                        } else {
                            check_embedded(path, t)?;
                        }
                    }
                }
            }
        }
        let graph = Graph::from_proto(graph_proto, |t| {
            if is_external(t) {
                files.resolve(t).map(Some)
            } else {
                Ok(None)
            }
        })
        .map_err(|e| e.context(path.display().to_string()))?;
        graph
            .validate()
            .map_err(|e| e.context(path.display().to_string()))?;
        Ok(Model {
            proto,
            graph,
            path: path.to_path_buf(),
            dir,
        })
    }

    /// The whole model proto, initializers as stored (external ones referenced).
    pub fn to_proto(&self) -> Result<ModelProto> {
        self.to_proto_with(|init| init.proto.clone())
    }

    fn to_proto_with(&self, tensor: impl FnMut(&Initializer) -> TensorProto) -> Result<ModelProto> {
        let mut proto = self.proto.clone();
        proto.graph = Some(self.graph.to_proto(tensor)?);
        Ok(proto)
    }

    /// Relative locations of every external data file the model references.
    pub fn external_files(&self) -> Result<BTreeSet<String>> {
        let mut files = BTreeSet::new();
        let graph = self.to_proto()?.graph.unwrap_or_default();
        visit_tensors(&graph, &mut |t| {
            if is_external(t) {
                if let Some(l) = location(t) {
                    files.insert(l.to_string());
                }
            }
            Ok(())
        })?;
        Ok(files)
    }

    /// Writes the model to `out` atomically. External data stays in its files, referenced
    /// by the same relative location; when `out` is in another folder each data file is
    /// hard-linked there (or copied where links are impossible, or when asked).
    pub fn save(&self, out: &Path, opts: &SaveOptions) -> Result<SaveReport> {
        let out_dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let out_dir_canonical = fs::canonicalize(&out_dir).map_err(|e| {
            Error::Usage(format!(
                "{}: the output folder '{}' does not exist or cannot be read ({e})",
                out.display(),
                out_dir.display()
            ))
        })?;
        if let (Ok(a), Ok(b)) = (fs::canonicalize(out), fs::canonicalize(&self.path)) {
            if a == b {
                return Err(Error::Usage(format!(
                    "{}: refusing to overwrite the input model; choose another output path",
                    out.display()
                )));
            }
        }
        let same_dir = fs::canonicalize(&self.dir).ok() == Some(out_dir_canonical.clone());
        let mut report = SaveReport {
            model: out.to_path_buf(),
            ..Default::default()
        };
        let mut created: Vec<PathBuf> = Vec::new();
        let result = self.save_inner(out, &out_dir, same_dir, opts, &mut report, &mut created);
        if result.is_err() {
            for path in created {
                let _ = fs::remove_file(path);
            }
        }
        result.map(|_| report)
    }

    fn save_inner(
        &self,
        out: &Path,
        out_dir: &Path,
        same_dir: bool,
        opts: &SaveOptions,
        report: &mut SaveReport,
        created: &mut Vec<PathBuf>,
    ) -> Result<()> {
        // 1. External data of the input: reachable from the output's folder.
        if !same_dir {
            for loc in self.external_files()? {
                let src = self.dir.join(&loc);
                let dst = out_dir.join(&loc);
                if dst.exists() {
                    if same_file(&src, &dst) || same_content(&src, &dst) {
                        continue;
                    }
                    return Err(Error::Usage(format!(
                        "{}: refusing to overwrite '{}', which is not the input's data file; write the output to another folder",
                        out.display(),
                        dst.display()
                    )));
                }
                if let Some(parent) = dst.parent() {
                    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                if opts.placement == DataPlacement::HardLink && fs::hard_link(&src, &dst).is_ok() {
                    created.push(dst.clone());
                    report.linked.push(dst);
                    continue;
                }
                let tmp = temp_path(&dst);
                created.push(tmp.clone());
                let cloned = clone_file(&src, &tmp).map_err(|e| Error::io(&dst, e))?;
                fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
                created.push(dst.clone());
                if cloned {
                    report.cloned.push(dst);
                } else {
                    report.copied.push(dst);
                }
            }
        }
        // 2. New large tensors go to the output's own data file when the model keeps
        //    its data externally.
        let uses_external = self
            .graph
            .initializers()
            .any(|(_, i)| i.external.is_some() && !i.new);
        let own_name = format!(
            "{}.data",
            out.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let own_path = out_dir.join(&own_name);
        // Streamed: a PiSSA W_res of a large model never sits in memory whole.
        let mut own: Option<(std::io::BufWriter<fs::File>, u64)> = None;
        let mut write_error: Option<Error> = None;
        let proto = self.to_proto_with(|init| {
            let mut t = init.proto.clone();
            let Some(raw) = init.new.then(|| init.raw_bytes()).flatten() else {
                return t;
            };
            t.raw_data = None;
            if !uses_external || raw.len() < opts.new_data_threshold || write_error.is_some() {
                t.raw_data = Some(raw.to_vec());
                init.release_pages();
                return t;
            }
            let appended = (|| -> Result<u64> {
                if own.is_none() {
                    let tmp = temp_path(&own_path);
                    created.push(tmp.clone());
                    let f = fs::File::create(&tmp).map_err(|e| Error::io(&own_path, e))?;
                    own = Some((std::io::BufWriter::new(f), 0));
                }
                let (w, len) = own.as_mut().expect("opened");
                let pad = len.next_multiple_of(64) - *len;
                w.write_all(&vec![0u8; pad as usize])
                    .map_err(|e| Error::io(&own_path, e))?;
                let offset = *len + pad;
                w.write_all(raw).map_err(|e| Error::io(&own_path, e))?;
                init.release_pages();
                *len = offset + raw.len() as u64;
                Ok(offset)
            })();
            match appended {
                Ok(offset) => {
                    let entry = |k: &str, v: String| crate::proto::StringStringEntryProto {
                        key: Some(k.into()),
                        value: Some(v),
                    };
                    t.external_data = vec![
                        entry("location", own_name.clone()),
                        entry("offset", offset.to_string()),
                        entry("length", raw.len().to_string()),
                    ];
                    t.data_location = Some(DataLocation::External as i32);
                }
                Err(e) => write_error = Some(e),
            }
            t
        })?;
        if let Some(e) = write_error {
            return Err(e);
        }
        if let Some((w, _)) = own {
            let f = w
                .into_inner()
                .map_err(|e| Error::io(&own_path, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&own_path, e))?;
            fs::rename(temp_path(&own_path), &own_path).map_err(|e| Error::io(&own_path, e))?;
            created.push(own_path.clone());
            report.own_data = Some(own_path);
        }
        // 3. The model itself, last, so it never points at missing data.
        let bytes = proto.encode_to_vec();
        if bytes.len() as u64 >= 2 << 30 {
            return Err(Error::Usage(format!(
                "{}: the model would exceed protobuf's 2 GB limit; keep its tensors as external data",
                out.display()
            )));
        }
        write_atomic(out, &bytes, created)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8], created: &mut Vec<PathBuf>) -> Result<()> {
    let tmp = temp_path(path);
    created.push(tmp.clone());
    let mut f = fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    created.push(path.to_path_buf());
    Ok(())
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Whether two files hold the same bytes (an earlier run's copy of the same data).
fn same_content(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (Ok(fa), Ok(fb)) = (fs::File::open(a), fs::File::open(b)) else {
        return false;
    };
    if fa.metadata().map(|m| m.len()).ok() != fb.metadata().map(|m| m.len()).ok() {
        return false;
    }
    let (mut ra, mut rb) = (fa, fb);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let fill = |r: &mut fs::File, buf: &mut [u8]| -> Option<usize> {
        let mut n = 0;
        while n < buf.len() {
            match r.read(&mut buf[n..]).ok()? {
                0 => break,
                k => n += k,
            }
        }
        Some(n)
    };
    loop {
        let (Some(na), Some(nb)) = (fill(&mut ra, &mut ba), fill(&mut rb, &mut bb)) else {
            return false;
        };
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

/// Copies `src` to `dst`: a copy-on-write clone where the filesystem supports one
/// (returns true), else a plain copy (false).
fn clone_file(src: &Path, dst: &Path) -> std::io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        const FICLONE: libc::c_ulong = 0x4004_9409;
        let from = fs::File::open(src)?;
        let to = fs::File::create(dst)?;
        // SAFETY: both descriptors are open for the duration of the call.
        if unsafe { libc::ioctl(to.as_raw_fd(), FICLONE as _, from.as_raw_fd()) } == 0 {
            return Ok(true);
        }
    }
    fs::copy(src, dst).map(|_| false)
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(a: &Path, b: &Path) -> bool {
    fs::canonicalize(a).ok() == fs::canonicalize(b).ok()
}
