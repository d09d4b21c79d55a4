//! Opening user files safely: only regular files are opened for reading, and the check
//! cannot block (a FIFO named as a model, adapter or data file would otherwise hang).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Opens `path` for reading without blocking on a FIFO (`O_NONBLOCK`); the caller
/// checks the kind of file before reading.
pub fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    if let Some(log) = OPENED.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        log.push(path.to_path_buf());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// The paths opened for reading since recording began, when it is on.
static OPENED: std::sync::Mutex<Option<Vec<PathBuf>>> = std::sync::Mutex::new(None);

/// Test hook: turns on the record of every path this process opens for reading (user
/// models, their data files, adapters, data) and returns the paths recorded since the
/// last call, so a fuzzer can check that no file outside a model's folder is opened.
pub fn take_opened() -> Vec<PathBuf> {
    OPENED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(Vec::new)
        .drain(..)
        .collect()
}

/// Opens `path` for reading if it is a regular file. The open does not block, so a
/// FIFO or device is refused instead of waited on.
pub fn open_regular(path: &Path) -> Result<File> {
    let file = open_nonblocking(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Usage(format!(
            "{}: not a regular file (a folder, FIFO or device); give a file",
            path.display()
        )));
    }
    Ok(file)
}

/// The bytes of the regular file `path`.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The text of the regular file `path` (UTF-8).
pub fn read_regular_text(path: &Path) -> Result<String> {
    String::from_utf8(read_regular(path)?).map_err(|_| {
        Error::Usage(format!(
            "{}: not UTF-8 text; give a text file",
            path.display()
        ))
    })
}

/// The folder a path is in (`.` for a bare file name).
pub fn parent_folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether two existing paths are the same file (hard links included).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
