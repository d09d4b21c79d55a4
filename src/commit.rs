//! Writing a command's output files as one set: every file is written under a temporary
//! name in its folder (`<file>.<pid>.tmp`), then a journal naming them all is written
//! and the temporary files are renamed over their targets, the last staged (the model)
//! last. POSIX has no rename of several files at once, so a run killed between two
//! renames leaves its journal (`<last file>.<pid>.commit`); the next lora-graft run that
//! reads or writes in that folder finds it and completes the renames before anything
//! else (the staged files were complete and synced before the journal was written), so
//! readers never pair files from two runs. A run killed before its journal leaves only
//! temporary files, which the next run removes. Folders are locked (`flock`) while a
//! set is renamed, so two concurrent writers commit one after the other.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::files::parent_folder;

/// Output files being written as one set; dropped without [`Commit::commit`], it
/// removes its temporary files and the targets stay as they were.
#[derive(Debug, Default)]
pub struct Commit {
    /// (temporary file, target), in the order they are renamed.
    staged: Vec<(PathBuf, PathBuf)>,
}

impl Commit {
    /// An empty set.
    pub fn new() -> Self {
        Commit::default()
    }

    /// Creates the temporary file that will become `target`, for the caller to fill.
    pub fn create(&mut self, target: &Path) -> Result<File> {
        let temp = self.stage(target)?;
        File::create(&temp).map_err(|e| Error::io(target, e))
    }

    /// Stages `bytes` as the new content of `target`.
    pub fn write(&mut self, target: &Path, bytes: &[u8]) -> Result<()> {
        let mut f = self.create(target)?;
        f.write_all(bytes).map_err(|e| Error::io(target, e))?;
        f.sync_all().map_err(|e| Error::io(target, e))
    }

    /// Registers `target` and returns the temporary path it is staged under, for a
    /// caller that creates the file itself (a clone or a hard link).
    pub fn stage(&mut self, target: &Path) -> Result<PathBuf> {
        if self.staged.iter().any(|(_, t)| t == target) {
            return Err(Error::Usage(format!(
                "{}: written twice by one command; choose different output paths",
                target.display()
            )));
        }
        not_a_folder(target)?;
        let temp = temp_path(target);
        self.staged.push((temp.clone(), target.to_path_buf()));
        Ok(temp)
    }

    /// Takes `target` out of the set (a file staged in case it was needed), removing
    /// its temporary file if one was made.
    pub fn unstage(&mut self, target: &Path) {
        self.staged.retain(|(temp, t)| {
            let keep = t != target;
            if !keep {
                let _ = fs::remove_file(temp);
            }
            keep
        });
    }

    /// Renames every staged file over its target, as one set (see the module doc).
    pub fn commit(mut self) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        let Some((_, last)) = staged.last() else {
            return Ok(());
        };
        let journal = journal_path(last);
        let _locks = lock_folders(staged.iter().map(|(_, t)| t.as_path()))?;
        // A rename over a folder fails, and once the journal is written a failed rename
        // is left for the next run: check (again, under the locks) before it.
        if let Err(e) = staged.iter().try_for_each(|(_, t)| not_a_folder(t)) {
            self.staged = staged; // removed by Drop
            return Err(e);
        }
        kill_point();
        let text = serde_json::to_string(&staged).map_err(|_| {
            Error::Usage(format!(
                "{}: output paths must be UTF-8; choose another path",
                last.display()
            ))
        })?;
        let written = (|| -> std::io::Result<()> {
            let mut f = File::create(&journal)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            sync_folder(&parent_folder(&journal))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&journal);
            self.staged = staged; // removed by Drop
            return Err(Error::io(&journal, e));
        }
        // From here the set is committed: a failure below is completed by the next run.
        finish(&journal, &staged)
    }
}

impl Drop for Commit {
    fn drop(&mut self) {
        for (temp, _) in &self.staged {
            let _ = fs::remove_file(temp);
        }
    }
}

/// An error when `target` is an existing folder (no file can be renamed over it).
fn not_a_folder(target: &Path) -> Result<()> {
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => Err(Error::Usage(format!(
            "{}: is a folder; choose a file path for this output",
            target.display()
        ))),
        _ => Ok(()),
    }
}

/// Renames the journal's files and removes the journal.
fn finish(journal: &Path, staged: &[(PathBuf, PathBuf)]) -> Result<()> {
    let mut folders: Vec<PathBuf> = Vec::new();
    for (temp, target) in staged {
        kill_point();
        if temp.exists() {
            fs::rename(temp, target).map_err(|e| Error::io(target, e))?;
        }
        let folder = parent_folder(target);
        if !folders.contains(&folder) {
            folders.push(folder);
        }
    }
    for folder in &folders {
        sync_folder(folder).map_err(|e| Error::io(folder, e))?;
    }
    kill_point();
    fs::remove_file(journal).map_err(|e| Error::io(journal, e))
}

/// Completes the sets that killed runs left committed but not renamed in `folder`, and
/// removes the temporary files that killed runs left uncommitted.
pub fn recover(folder: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(folder) else {
        return Ok(());
    };
    let mut journals = Vec::new();
    let mut temps = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = pid_suffix(&name, ".commit") {
            if process_gone(pid) {
                journals.push(entry.path());
            }
        } else if let Some(pid) = pid_suffix(&name, ".tmp") {
            if process_gone(pid) {
                temps.push(entry.path());
            }
        }
    }
    for journal in journals {
        let Some(staged) = read_journal(&journal) else {
            continue; // not one of ours: left alone
        };
        let _locks = lock_folders(staged.iter().map(|(_, t)| t.as_path()))?;
        if journal.exists() {
            finish(&journal, &staged)?;
        }
    }
    for temp in temps {
        if temp.exists() {
            let _ = fs::remove_file(temp);
        }
    }
    Ok(())
}

/// The journal's (temporary, target) pairs, if it is a journal lora-graft wrote: every
/// temporary file is its target's `<name>.<pid>.tmp` with the journal's pid, so a
/// planted journal cannot rename anything but a killed run's temporary files.
fn read_journal(journal: &Path) -> Option<Vec<(PathBuf, PathBuf)>> {
    let name = journal.file_name()?.to_string_lossy().into_owned();
    let pid = pid_suffix(&name, ".commit")?;
    let text = crate::files::read_regular_text(journal).ok()?;
    let staged: Vec<(PathBuf, PathBuf)> = serde_json::from_str(&text).ok()?;
    let ours = staged
        .iter()
        .all(|(temp, target)| *temp == temp_name(target, pid));
    (ours && !staged.is_empty()).then_some(staged)
}

/// `<name>.<pid>.<suffix>` → pid.
fn pid_suffix(name: &str, suffix: &str) -> Option<i32> {
    let rest = name.strip_suffix(suffix)?;
    let (_, pid) = rest.rsplit_once('.')?;
    pid.parse().ok().filter(|&p| p > 0)
}

fn process_gone(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid as u32 != std::process::id()
        && unsafe { libc::kill(pid, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// `<path>.<pid>.tmp`.
fn temp_name(path: &Path, pid: i32) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{pid}.tmp"));
    path.with_file_name(name)
}

/// This process's temporary name for `path`, after completing or removing what killed
/// runs left in its folder.
fn temp_path(path: &Path) -> PathBuf {
    let _ = recover(&parent_folder(path));
    temp_name(path, std::process::id() as i32)
}

/// `<path>.<pid>.commit`.
fn journal_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.commit", std::process::id()));
    path.with_file_name(name)
}

/// Exclusive `flock`s on the folders of `paths`, taken in one order (no deadlock),
/// released when dropped.
fn lock_folders<'a>(paths: impl Iterator<Item = &'a Path>) -> Result<Vec<File>> {
    let mut folders: Vec<PathBuf> = paths
        .map(|p| {
            let f = parent_folder(p);
            fs::canonicalize(&f).unwrap_or(f)
        })
        .collect();
    folders.sort();
    folders.dedup();
    folders
        .into_iter()
        .map(|folder| {
            let dir = File::open(&folder).map_err(|e| Error::io(&folder, e))?;
            // SAFETY: the descriptor is open; flock only takes an advisory lock on it.
            if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(Error::io(&folder, std::io::Error::last_os_error()));
            }
            Ok(dir)
        })
        .collect()
}

fn sync_folder(folder: &Path) -> std::io::Result<()> {
    File::open(folder)?.sync_all()
}

/// Test hook: with `LORA_GRAFT_TEST_KILL_AT=N` the process kills itself (SIGKILL) at
/// the N-th step of its commits (before writing a journal, before each rename, and
/// before removing the journal),
/// so tests can check what a kill at every step leaves.
fn kill_point() {
    static STEP: AtomicUsize = AtomicUsize::new(0);
    static AT: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let at = *AT.get_or_init(|| {
        std::env::var("LORA_GRAFT_TEST_KILL_AT")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let step = STEP.fetch_add(1, Ordering::SeqCst) + 1;
    if at == Some(step) {
        // SAFETY: sending a signal to this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
