//! The state directory's lock: one `sanctum-node` process per state directory.
//!
//! Two processes sharing a state directory would each read the privacy ledger, each find the
//! budget unspent and each charge against it: the sum of what they release would exceed the cap
//! that each one checked. So a node takes an exclusive lock on `STATE_DIR/LOCK` before it opens
//! anything there and holds it for its lifetime; a second node fails to start, naming the holder's
//! pid. The lock is the operating system's (`flock` on Unix, `LockFileEx` on Windows, through
//! `std::fs::File::try_lock`), so it is released when the holder exits, however it exits: a crash
//! never leaves a stale lock behind. The pid written into the file is only for the message; the
//! lock itself is what excludes.
//!
//! The lock is advisory: it stops other sanctum-node processes, not a person editing files. It
//! relies on the file system honouring `flock`, which local file systems do; a state directory on
//! a network share may not.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "LOCK";

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    #[error("state directory {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
    #[error(
        "state directory {dir} is in use by another sanctum-node process ({}); stop it or use another state_dir",
        holder_text(*.pid)
    )]
    InUse {
        dir: PathBuf,
        /// The holder's pid as it wrote it into the lock file, when it could be read.
        pid: Option<u32>,
    },
}

fn holder_text(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid} from the lock file"),
        None => "its pid is not in the lock file".to_string(),
    }
}

/// An exclusive hold on a state directory, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StateLock {
    /// The state directory this lock covers.
    dir: PathBuf,
    /// The open, locked `LOCK` file: closing it is what releases the lock.
    _file: File,
}

impl StateLock {
    /// Creates `dir` if needed and locks it, or fails at once (never waits) if another process
    /// holds it.
    pub fn acquire(dir: &Path) -> Result<Self, StateLockError> {
        let io = |source| StateLockError::Io { dir: dir.to_path_buf(), source };
        let existed = dir.exists();
        std::fs::create_dir_all(dir).map_err(io)?;
        if !existed {
            // The directory's own entry in its parent, so the state written in it can be found
            // after a power cut.
            sync_dir(dir.parent().unwrap_or(Path::new("."))).map_err(io)?;
        }
        // Not truncated on open: the file may hold the running holder's pid, read below.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
                return Err(StateLockError::InUse { dir: dir.to_path_buf(), pid });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // Ours now: replace a previous holder's pid with this process's.
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(Self { dir: dir.to_path_buf(), _file: file })
    }

    /// The state directory this lock covers.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Makes a directory's entries durable (a file created in it, a file renamed into it). Unix only:
/// elsewhere directories cannot be opened as files and the file system orders this itself.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_acquire_fails_while_the_first_is_held_and_succeeds_after_it_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = StateLock::acquire(&state).unwrap();
        assert_eq!(first.dir(), state);
        let e = StateLock::acquire(&state).unwrap_err();
        assert!(matches!(e, StateLockError::InUse { pid: Some(pid), .. } if pid == std::process::id()), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "state directory {} is in use by another sanctum-node process (pid {} from the lock file); stop it or use another state_dir",
                state.display(),
                std::process::id()
            )),
            "{text}"
        );
        drop(first);
        let again = StateLock::acquire(&state).unwrap();
        // A different directory is independent.
        let other = StateLock::acquire(dir.path()).unwrap();
        drop((again, other));
    }

    #[test]
    fn a_holder_that_wrote_no_pid_is_still_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Another process's lock, simulated by a second open file description holding the lock
        // on a file with no pid in it.
        std::fs::write(dir.path().join(LOCK_FILE), "").unwrap();
        let held = File::options().read(true).write(true).open(dir.path().join(LOCK_FILE)).unwrap();
        held.try_lock().unwrap();
        let e = StateLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(e, StateLockError::InUse { pid: None, .. }), "{e:?}");
        assert!(e.to_string().contains("its pid is not in the lock file"), "{e}");
    }
}
