//! Saving a model atomically: external data stays in its files (linked, cloned or
//! copied beside an output in another folder), new tensors go to the output's own data
//! file, and all of them are committed as one set ([`crate::commit`]).

use super::*;
use crate::commit::Commit;
use crate::ir::DataSink;

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

impl Model {
    /// The own data file of `out` as a sink that passes place large new tensors in
    /// while they run ([`crate::ir::Initializer::place`]), staged in `commit`; `None`
    /// when the model keeps its data in the model file (so would its output).
    pub fn data_sink(&self, out: &Path, commit: &mut Commit) -> Result<Option<DataSink>> {
        let base = self.external_files()?;
        if base.is_empty() {
            return Ok(None);
        }
        let name = own_data_name(out, &base);
        let target = crate::files::parent_folder(out).join(&name);
        let temp = commit.stage(&target)?;
        Ok(Some(DataSink::new(target, name, temp)))
    }

    /// Writes the model to `out` atomically, with the data files it needs (see
    /// [`Model::stage_save`]).
    pub fn save(&self, out: &Path, opts: &SaveOptions) -> Result<SaveReport> {
        let mut commit = Commit::new();
        let report = self.stage_save(out, opts, &mut commit, None)?;
        commit.commit()?;
        Ok(report)
    }

    /// Stages the model's files into `commit`, the model file last: external data stays
    /// in its files, referenced by the same relative location; when `out` is in another
    /// folder each data file is cloned or linked there; new tensors go to the output's
    /// own data file: `sink` when the passes placed tensors in it already (made by
    /// [`Model::data_sink`] for `out` and `commit`). Nothing is visible until the commit.
    pub fn stage_save(
        &self,
        out: &Path,
        opts: &SaveOptions,
        commit: &mut Commit,
        sink: Option<&DataSink>,
    ) -> Result<SaveReport> {
        let out_dir = crate::files::parent_folder(out);
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
        let same_dir = fs::canonicalize(&self.dir).ok() == Some(out_dir_canonical);
        let mut report = SaveReport {
            model: out.to_path_buf(),
            ..Default::default()
        };
        // 1. External data of the input: reachable from the output's folder.
        if !same_dir {
            for loc in self.external_files()? {
                let src = self.dir.join(&loc);
                let dst = out_dir.join(&loc);
                if dst.exists() {
                    if crate::files::same_file(&src, &dst) || same_content(&src, &dst) {
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
                let tmp = commit.stage(&dst)?;
                if opts.placement == DataPlacement::HardLink && fs::hard_link(&src, &tmp).is_ok() {
                    report.linked.push(dst);
                    continue;
                }
                if clone_file(&src, &tmp).map_err(|e| Error::io(&dst, e))? {
                    report.cloned.push(dst);
                } else {
                    report.copied.push(dst);
                }
            }
        }
        // 2. New large tensors go to the output's own data file when the model keeps
        //    its data externally: those a pass placed there already stay where they
        //    are, the others are appended.
        let staged_here;
        let sink = match sink {
            Some(sink) => {
                let fits = crate::files::parent_folder(sink.target()) == out_dir
                    && !self.external_files()?.contains(sink.name());
                if !fits {
                    return Err(Error::Usage(format!(
                        "{}: the tensors were placed in '{}', which is not this output's own data file; save to the output the job was started for",
                        out.display(),
                        sink.target().display()
                    )));
                }
                Some(sink)
            }
            None => {
                staged_here = self.data_sink(out, commit)?;
                staged_here.as_ref()
            }
        };
        let mut write_error: Option<Error> = None;
        let proto = self.to_proto_with(|init| {
            let mut t = init.proto.clone();
            let entries = |offset: u64, length: usize| {
                let entry = |k: &str, v: String| crate::proto::StringStringEntryProto {
                    key: Some(k.into()),
                    value: Some(v),
                };
                let own_name = sink.map_or("", |s| s.name()).to_string();
                vec![
                    entry("location", own_name),
                    entry("offset", offset.to_string()),
                    entry("length", length.to_string()),
                ]
            };
            let placed =
                (init.external.as_ref()).and_then(|e| Some((sink?.offset_of(e)?, e.length)));
            if let Some((offset, length)) = placed.filter(|_| init.new) {
                t.raw_data = None;
                t.external_data = entries(offset, length);
                t.data_location = Some(DataLocation::External as i32);
                init.release_pages();
                return t;
            }
            let Some(raw) = init.new.then(|| init.raw_bytes()).flatten() else {
                return t;
            };
            t.raw_data = None;
            // Shape-like tensors (int64 / int32 shapes, splits, axes, indices) stay in the
            // model: shape inference (onnx.checker, ONNX Runtime) reads them and cannot
            // read external data. (Quantized weights, int8 / int4, may go out.)
            use crate::proto::tensor_proto::DataType;
            let integer = [DataType::Int64 as i32, DataType::Int32 as i32].contains(&t.data_type());
            let sink = match sink {
                Some(sink)
                    if !integer
                        && raw.len() >= opts.new_data_threshold
                        && write_error.is_none() =>
                {
                    sink
                }
                _ => {
                    t.raw_data = Some(raw.to_vec());
                    init.release_pages();
                    return t;
                }
            };
            match sink.append(raw) {
                Ok(offset) => {
                    init.release_pages();
                    t.external_data = entries(offset, raw.len());
                    t.data_location = Some(DataLocation::External as i32);
                }
                Err(e) => write_error = Some(e),
            }
            t
        })?;
        if let Some(e) = write_error {
            return Err(e);
        }
        if let Some(sink) = sink {
            if sink.finish()? {
                report.own_data = Some(sink.target().to_path_buf());
            } else {
                commit.unstage(sink.target());
            }
        }
        // 3. The model itself, last, so it never points at missing data.
        let bytes = proto.encode_to_vec();
        if bytes.len() as u64 >= 2 << 30 {
            return Err(Error::Usage(format!(
                "{}: the model would exceed protobuf's 2 GB limit; keep its tensors as external data",
                out.display()
            )));
        }
        commit.write(out, &bytes)?;
        Ok(report)
    }
}

/// The file name of an output model's own data file (its new tensors): `<out>.data`, or
/// `<out>.<n>.data` when the input's external data uses that name (an output named like
/// the input in another folder, where the base data is copied under its own name).
pub fn own_data_name(out: &Path, base: &BTreeSet<String>) -> String {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::iter::once(format!("{name}.data"))
        .chain((1..).map(|n| format!("{name}.{n}.data")))
        .find(|candidate| !base.contains(candidate))
        .expect("some name is free")
}

/// Whether two files hold the same bytes (an earlier run's copy of the same data).
fn same_content(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let open = crate::files::open_nonblocking;
    let (Ok(fa), Ok(fb)) = (open(a), open(b)) else {
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
    let mut from = crate::files::open_nonblocking(src)?;
    let mut to = fs::File::create(dst)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        const FICLONE: libc::c_ulong = 0x4004_9409;
        // SAFETY: both descriptors are open for the duration of the call.
        if unsafe { libc::ioctl(to.as_raw_fd(), FICLONE as _, from.as_raw_fd()) } == 0 {
            to.sync_all()?;
            return Ok(true);
        }
    }
    std::io::copy(&mut from, &mut to)?;
    to.sync_all()?;
    Ok(false)
}
