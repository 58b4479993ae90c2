//! The coordinator's files: global models named by content hash, the spool where uploads land
//! before they are admitted, and exported final models with their lineage.
//!
//! Every file is written to a temporary name, fsync'd, then renamed into place, so a crash never
//! leaves a half-written model under a real name.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sanctum_protocol::hash::ContentHash;

/// The on-disk layout under the coordinator's state directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating) the layout under `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        for sub in ["models", "spool", "exports"] {
            fs::create_dir_all(root.join(sub))?;
        }
        // Spooled uploads from a previous process were never admitted: drop them.
        for entry in fs::read_dir(root.join("spool"))? {
            let _ = fs::remove_file(entry?.path());
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// The path of the model with this hash.
    pub fn model_path(&self, hash: &ContentHash) -> PathBuf {
        self.root.join("models").join(format!("{hash}.safetensors"))
    }

    /// Stores a model's bytes under their hash (idempotent).
    pub fn put_model(&self, bytes: &[u8]) -> io::Result<ContentHash> {
        let hash = ContentHash::of(bytes);
        let path = self.model_path(&hash);
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        Ok(hash)
    }

    /// Reads a stored model; `NotFound` if no model has that hash.
    pub fn read_model(&self, hash: &ContentHash) -> io::Result<Vec<u8>> {
        fs::read(self.model_path(hash))
    }

    /// A fresh spool file for an incoming upload; it is removed when dropped.
    pub fn spool(&self) -> io::Result<tempfile::NamedTempFile> {
        tempfile::Builder::new().prefix("update-").tempfile_in(self.root.join("spool"))
    }

    /// Where exported models go.
    pub fn exports_dir(&self) -> PathBuf {
        self.root.join("exports")
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // Make the rename itself durable.
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_content_addressed_and_spool_is_cleared() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let h = store.put_model(b"weights")?;
        assert_eq!(h, ContentHash::of(b"weights"));
        assert_eq!(store.read_model(&h)?, b"weights");
        assert_eq!(store.put_model(b"weights")?, h);
        let leftover = store.spool()?;
        let (_, path) = leftover.keep().map_err(|e| e.error)?;
        Store::open(dir.path())?;
        assert!(!path.exists());
        Ok(())
    }
}
