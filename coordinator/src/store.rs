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
        for sub in ["models", "spool", "exports", "checkpoints"] {
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

    /// Opens a stored model for streaming, with its size; `NotFound` if no model has that hash.
    /// Models are never rewritten under their name, so the size stays the size.
    pub fn open_model(&self, hash: &ContentHash) -> io::Result<(File, u64)> {
        let file = File::open(self.model_path(hash))?;
        let len = file.metadata()?.len();
        Ok((file, len))
    }

    /// Stores a checkpoint's blob (a server optimizer's moments) under its hash (idempotent).
    pub fn put_blob(&self, bytes: &[u8]) -> io::Result<ContentHash> {
        let hash = ContentHash::of(bytes);
        let path = self.root.join("checkpoints").join(format!("{hash}.bin"));
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        Ok(hash)
    }

    /// Reads a checkpoint's blob; `NotFound` if none has that hash.
    pub fn read_blob(&self, hash: &ContentHash) -> io::Result<Vec<u8>> {
        fs::read(self.root.join("checkpoints").join(format!("{hash}.bin")))
    }

    /// A fresh spool file for an incoming upload; it is removed when dropped.
    pub fn spool(&self) -> io::Result<tempfile::NamedTempFile> {
        tempfile::Builder::new().prefix("update-").tempfile_in(self.root.join("spool"))
    }

    /// Where exported models go.
    pub fn exports_dir(&self) -> PathBuf {
        self.root.join("exports")
    }

    /// The path of an export `{stem}{suffix}`, always directly inside [`Store::exports_dir`].
    ///
    /// Plan names are checked at `Plan::parse` (`[A-Za-z0-9][A-Za-z0-9._-]{0,63}`); this is the
    /// second line: the stem is made a plain file name ([`safe_stem`]) and the joined path's
    /// parent must be the exports directory itself, or nothing is written.
    pub fn export_path(&self, stem: &str, suffix: &str) -> io::Result<PathBuf> {
        let dir = self.exports_dir();
        let name = format!("{}{suffix}", safe_stem(stem));
        let path = dir.join(&name);
        if path.parent() != Some(dir.as_path()) || path.file_name() != Some(std::ffi::OsStr::new(&name)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("export name {name:?} would leave {}; nothing was written", dir.display()),
            ));
        }
        Ok(path)
    }
}

/// `stem` as a plain file name: at most 100 characters, each ASCII letter, digit, '_' or '-'
/// kept, a '.' kept unless it starts the name or follows another '.', anything else (a path
/// separator, a drive colon, a NUL, a non-ASCII letter) replaced by '_'; never empty.
pub fn safe_stem(stem: &str) -> String {
    let mut out = String::new();
    for c in stem.chars().take(100) {
        let keep =
            c.is_ascii_alphanumeric() || c == '_' || c == '-' || (c == '.' && !out.is_empty() && !out.ends_with('.'));
        out.push(if keep { c } else { '_' });
    }
    if out.is_empty() { "export".to_string() } else { out }
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
    fn an_export_name_never_leaves_the_exports_directory() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let exports = store.exports_dir();
        let cases = [
            ("heart-disease-fedavg-1a2b3c", "heart-disease-fedavg-1a2b3c"),
            ("/tmp/evil", "_tmp_evil"),
            ("../../evil", "_._.__evil"),
            ("a/../../b", "a_.__.__b"),
            ("..", "_."),
            (".hidden", "_hidden"),
            ("C:\\evil", "C__evil"),
            ("nul\0byte", "nul_byte"),
            ("Hôpital-Genève", "H_pital-Gen_ve"),
            ("", "export"),
        ];
        for (stem, want) in cases {
            assert_eq!(safe_stem(stem), want, "{stem:?}");
            let path = store.export_path(stem, ".safetensors")?;
            assert_eq!(path.parent(), Some(exports.as_path()), "{stem:?}");
            assert_eq!(path, exports.join(format!("{want}.safetensors")));
        }
        assert_eq!(safe_stem(&"x".repeat(500)).len(), 100);
        // A suffix is the caller's own, but one with a separator is refused too.
        assert!(store.export_path("model", "/../../x").is_err());
        Ok(())
    }

    #[test]
    fn models_are_content_addressed_and_spool_is_cleared() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let h = store.put_model(b"weights")?;
        assert_eq!(h, ContentHash::of(b"weights"));
        assert_eq!(store.read_model(&h)?, b"weights");
        let (mut file, len) = store.open_model(&h)?;
        let mut streamed = Vec::new();
        io::Read::read_to_end(&mut file, &mut streamed)?;
        assert_eq!((streamed.as_slice(), len), (&b"weights"[..], 7));
        let missing = store.open_model(&ContentHash::of(b"never stored")).err().map(|e| e.kind());
        assert_eq!(missing, Some(io::ErrorKind::NotFound));
        assert_eq!(store.put_model(b"weights")?, h);
        let leftover = store.spool()?;
        let (_, path) = leftover.keep().map_err(|e| e.error)?;
        Store::open(dir.path())?;
        assert!(!path.exists());
        Ok(())
    }
}
