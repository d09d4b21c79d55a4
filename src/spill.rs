//! Scratch storage for large tensors made by passes: appended to one unlinked temporary
//! file and memory-mapped back, so they cost page cache, not resident memory.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};

use crate::ir::{DataFile, ExternalBytes};

static SCRATCH: Mutex<Option<File>> = Mutex::new(None);

fn open() -> std::io::Result<File> {
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

/// Appends `bytes` to the scratch file and maps them back.
pub fn write(bytes: &[u8]) -> std::io::Result<ExternalBytes> {
    let mut guard = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(open()?);
    }
    let file = guard.as_mut().expect("opened");
    let offset = file.seek(SeekFrom::End(0))?;
    file.write_all(bytes)?;
    file.flush()?;
    // SAFETY: the region was just written and is never written again.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(bytes.len())
            .map(&*file)?
    };
    Ok(ExternalBytes {
        file: Arc::new(DataFile {
            path: std::env::temp_dir().join("lora-graft-scratch"),
            map,
        }),
        offset: 0,
        length: bytes.len(),
    })
}
