//! Where a job writes: default output paths, the checks made before any work, and
//! writing a model with its adapter file so that a failure leaves neither behind.

use std::path::{Path, PathBuf};

use crate::adapter::AdapterFile;
use crate::error::{Error, Result};
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

/// Checks, before any work, that the model `out` and the adapter file can be written
/// without touching the input: neither is the input, they differ, and their folders
/// exist and are writable.
pub fn check_output_paths(input: &Path, out: &Path, adapter_path: &Path) -> Result<()> {
    for (what, p) in [("output model", out), ("adapter file", adapter_path)] {
        if let (Ok(a), Ok(b)) = (std::fs::canonicalize(p), std::fs::canonicalize(input)) {
            if a == b {
                return Err(Error::Usage(format!(
                    "{}: the {what} would overwrite the input model; choose another path",
                    p.display()
                )));
            }
        }
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let writable = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            // SAFETY: a valid NUL-terminated path; access() only reads it.
            .map(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0)
            .unwrap_or(false);
        if !dir.is_dir() || !writable {
            return Err(Error::Usage(format!(
                "{}: the {what}'s folder '{}' does not exist or is not writable",
                p.display(),
                dir.display()
            )));
        }
    }
    if out == adapter_path {
        return Err(Error::Usage(format!(
            "{}: the model and the adapter file cannot have the same path",
            out.display()
        )));
    }
    Ok(())
}

/// Writes the grafted model and its adapter file; on any failure neither is left behind.
pub fn write(
    model: &Model,
    adapter: &AdapterFile,
    out: &Path,
    adapter_path: &Path,
) -> Result<SaveReport> {
    check_output_paths(&model.path, out, adapter_path)?;
    let bytes = adapter.to_bytes()?;
    let report = model.save(out, &SaveOptions::default())?;
    let mut created = Vec::new();
    if let Err(e) = crate::model::write_atomic(adapter_path, &bytes, &mut created) {
        let _ = std::fs::remove_file(out);
        for p in report
            .linked
            .iter()
            .chain(&report.cloned)
            .chain(&report.copied)
            .chain(&report.own_data)
        {
            let _ = std::fs::remove_file(p);
        }
        for p in created {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    Ok(report)
}
