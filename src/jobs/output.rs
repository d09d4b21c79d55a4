//! Where a job writes: default output paths, the checks made before any work, and
//! writing a model with its adapter file so that a failure leaves neither behind.

use std::path::{Path, PathBuf};

use crate::adapter::AdapterFile;
use crate::commit::Commit;
use crate::error::{Error, Result};
use crate::files::{parent_folder, same_file};
use crate::ir::DataSink;
use crate::model::{Model, SaveOptions, SaveReport};

/// `<stem>.<variant>.onnx` beside the input, and the adapter file beside the model
/// (`<model stem>.safetensors`).
pub fn default_paths(
    input: &Path,
    variant: &str,
    out: Option<&Path>,
    adapter: Option<&Path>,
) -> (PathBuf, PathBuf) {
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| {
        let stem = input.file_stem().unwrap_or_default().to_string_lossy();
        input.with_file_name(format!("{stem}.{variant}.onnx"))
    });
    let adapter = adapter
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out.with_extension("safetensors"));
    (out, adapter)
}

/// Every file a command reads and writes, checked before any work: no output is an
/// input (compared by resolved path and by file identity, so links and `..` do not fool
/// it), no two outputs are the same file, and every output's folder is writable.
#[derive(Debug, Default)]
pub struct OutputPlan {
    inputs: Vec<(String, PathBuf)>,
    outputs: Vec<(String, PathBuf, Option<PathBuf>)>,
}

impl OutputPlan {
    /// Records a file the command reads.
    pub fn read(mut self, what: impl Into<String>, path: &Path) -> Self {
        self.inputs.push((what.into(), path.to_path_buf()));
        self
    }

    /// Records a model the command reads: the model file and its external data files.
    pub fn read_model(mut self, model: &Model) -> Result<Self> {
        self.inputs.push(("input model".into(), model.path.clone()));
        for loc in model.external_files()? {
            let path = model.dir.join(&loc);
            self.inputs
                .push((format!("input model's data file '{loc}'"), path));
        }
        Ok(self)
    }

    /// Records a file the command writes.
    pub fn write(mut self, what: impl Into<String>, path: &Path) -> Self {
        self.outputs.push((what.into(), path.to_path_buf(), None));
        self
    }

    /// Records the files saving `model` to `out` writes: the model, its own data file,
    /// and, in another folder, the copies of the input's data files.
    pub fn write_model(mut self, what: &str, model: &Model, out: &Path) -> Result<Self> {
        let base = model.external_files()?;
        let dir = parent_folder(out);
        self.outputs.push((what.into(), out.to_path_buf(), None));
        if !base.is_empty() {
            let own = dir.join(crate::model::own_data_name(out, &base));
            self.outputs
                .push((format!("{what}'s data file"), own, None));
        }
        if resolve(&dir) != resolve(&model.dir) {
            for loc in base {
                let source = model.dir.join(&loc);
                self.outputs.push((
                    format!("copy of the data file '{loc}'"),
                    dir.join(&loc),
                    Some(source),
                ));
            }
        }
        Ok(self)
    }

    /// [`OutputPlan::check`] after creating the output folder `dir` (an exported PEFT
    /// folder), when it does not exist yet and its parent does.
    /// A folder it creates is removed again when the check fails.
    pub fn check_creating_folder(&self, dir: &Path) -> Result<()> {
        let create = !dir.exists() && parent_folder(dir).is_dir();
        if create {
            std::fs::create_dir(dir).map_err(|e| Error::io(dir, e))?;
        }
        let checked = self.check();
        if checked.is_err() && create {
            let _ = std::fs::remove_dir(dir);
        }
        checked
    }

    /// Refuses, naming both, an output that is an input or another output, and an output
    /// whose folder does not exist or is not writable.
    pub fn check(&self) -> Result<()> {
        // What killed runs left in these folders is completed or removed first.
        for path in self
            .inputs
            .iter()
            .map(|(_, p)| p)
            .chain(self.outputs.iter().map(|(_, p, _)| p))
        {
            crate::commit::recover(&parent_folder(path))?;
        }
        for (i, (what, path, source)) in self.outputs.iter().enumerate() {
            if path.is_dir() {
                return Err(Error::Usage(format!(
                    "{}: the {what} would be written over a folder; choose a file path",
                    path.display()
                )));
            }
            let target = resolve(path);
            for (input_what, input) in &self.inputs {
                // A copy of an input's data file onto itself (an earlier run's) is kept.
                if source.as_deref().is_some_and(|s| same_file(s, input)) {
                    continue;
                }
                if target == resolve(input) || same_file(path, input) {
                    return Err(Error::Usage(format!(
                        "{}: the {what} would overwrite the {input_what}; choose another path",
                        path.display()
                    )));
                }
            }
            for (other_what, other, _) in &self.outputs[..i] {
                if target == resolve(other) || same_file(path, other) {
                    return Err(Error::Usage(format!(
                        "{}: the {what} and the {other_what} would be the same file; choose different paths",
                        path.display()
                    )));
                }
            }
            let dir = parent_folder(path);
            if !dir.is_dir() || !writable(&dir) {
                return Err(Error::Usage(format!(
                    "{}: the {what}'s folder '{}' does not exist or is not writable",
                    path.display(),
                    dir.display()
                )));
            }
        }
        Ok(())
    }
}

/// `path` with links and `..` resolved, also when the file does not exist yet.
fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (std::fs::canonicalize(parent_folder(path)), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

fn writable(dir: &Path) -> bool {
    std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        // SAFETY: a valid NUL-terminated path; access() only reads it.
        .map(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0)
        .unwrap_or(false)
}

/// Writes the grafted model and its adapter file as one set ([`crate::commit`]).
pub fn write(
    model: &Model,
    adapter: &AdapterFile,
    out: &Path,
    adapter_path: &Path,
) -> Result<SaveReport> {
    write_staged(model, adapter, out, adapter_path, Commit::new(), None)
}

/// [`write`] into `commit`, where the grafting already placed tensors in `sink` (the
/// output's data file, [`Model::data_sink`]).
pub fn write_staged(
    model: &Model,
    adapter: &AdapterFile,
    out: &Path,
    adapter_path: &Path,
    mut commit: Commit,
    sink: Option<&DataSink>,
) -> Result<SaveReport> {
    OutputPlan::default()
        .read_model(model)?
        .write_model("output model", model, out)?
        .write("adapter file", adapter_path)
        .check()?;
    commit.write(adapter_path, &adapter.to_bytes()?)?;
    let report = model.stage_save(out, &SaveOptions::default(), &mut commit, sink)?;
    commit.commit()?;
    Ok(report)
}
