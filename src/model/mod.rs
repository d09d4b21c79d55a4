//! Loading and saving `.onnx` files: embedded or external data, checked before use,
//! mapped lazily; saving atomically, keeping external data where it is ([`save`]).

mod save;

pub use save::{own_data_name, DataPlacement, SaveOptions, SaveReport};

use std::collections::{BTreeSet, HashMap};
use std::fs;
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
        for (i, e) in t.external_data.iter().enumerate() {
            if t.external_data[..i].iter().any(|p| p.key() == e.key()) {
                return Err(self.tensor_error(
                    t,
                    format!(
                        "external data key '{}' appears twice (ONNX Runtime refuses it); keep one",
                        e.key()
                    ),
                ));
            }
        }
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
        let numel = dtype::numel(&t.dims).ok_or_else(|| {
            self.tensor_error(
                t,
                format!("invalid dims {:?} (negative or too large)", t.dims),
            )
        })?;
        if let Some(expected) = dtype::storage_bytes(t.data_type(), numel) {
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
        let handle = crate::files::open_nonblocking(&canonical).map_err(|e| Error::io(&path, e))?;
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
        let file = Arc::new(DataFile {
            path,
            start: 0,
            map,
        });
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
        crate::commit::recover(&crate::files::parent_folder(path))?;
        let bytes = crate::files::read_regular(path)?;
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
}
