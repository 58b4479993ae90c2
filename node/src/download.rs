//! A model download kept on disk while it arrives (`STATE/downloads/HASH.part`), so a broken
//! stream, or a restarted node, asks the coordinator only for the rest (`FetchModelRequest.offset`)
//! instead of starting from zero. The SHA-256 of the whole file decides at the end: a partial
//! file that does not complete to the model's hash is deleted and the model fetched again.
//!
//! Nothing here is fsync'd: the hash check catches a file torn by a crash, and the worst case is
//! fetching again. One partial download at a time: opening one removes any other (the node holds
//! one model at a time, see `daemon::training`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sanctum_protocol::hash::ContentHash;

/// Why a partial download could not be kept or completed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("partial download {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("model download would exceed its announced {size} bytes")]
    TooLarge { size: u64 },
    #[error("model bytes do not match their SHA-256 {hash}; the partial download was deleted, fetch it again")]
    Hash { hash: String },
}

/// The model being downloaded, and how much of it is held.
#[derive(Debug)]
pub struct PartialDownload {
    file: File,
    path: PathBuf,
    hash: ContentHash,
    /// Bytes in the file, at most `size`: where the next request resumes.
    held: u64,
    /// The size the coordinator announced for this model (`StartRound.model_bytes`).
    size: u64,
}

impl PartialDownload {
    /// Opens (creating) the partial download of `hash` under `dir`, announced as `size` bytes.
    /// Other models' partial downloads are removed; a file larger than `size` starts over.
    pub fn open(dir: &Path, hash: &ContentHash, size: u64) -> Result<Self, DownloadError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DownloadError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let name = format!("{}.part", hash.to_hex());
        for entry in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
            if entry.file_name() != name.as_str() {
                let _ = fs::remove_file(entry.path());
            }
        }
        let path = dir.join(&name);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut held = file.metadata().map_err(io_err(&path))?.len();
        if held > size {
            file.set_len(0).map_err(io_err(&path))?;
            held = 0;
        }
        file.seek(SeekFrom::Start(held)).map_err(io_err(&path))?;
        Ok(Self { file, path, hash: *hash, held, size })
    }

    /// Bytes already held: the offset to ask for.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Appends the next chunk; refused (nothing written) if it would pass the announced size.
    pub fn append(&mut self, data: &[u8]) -> Result<(), DownloadError> {
        if self.held + data.len() as u64 > self.size {
            return Err(DownloadError::TooLarge { size: self.size });
        }
        self.file.write_all(data).map_err(|source| DownloadError::Io { path: self.path.clone(), source })?;
        self.held += data.len() as u64;
        Ok(())
    }

    /// The whole model if it hashes to its SHA-256; the file is removed either way (a mismatch
    /// means the pieces do not belong together, so the next fetch starts from zero).
    pub fn finish(mut self) -> Result<Vec<u8>, DownloadError> {
        let read = (|| {
            let mut bytes = Vec::with_capacity(usize::try_from(self.held).unwrap_or(0));
            self.file.seek(SeekFrom::Start(0))?;
            self.file.read_to_end(&mut bytes)?;
            Ok(bytes)
        })();
        let _ = fs::remove_file(&self.path);
        let bytes = read.map_err(|source| DownloadError::Io { path: self.path.clone(), source })?;
        if ContentHash::of(&bytes) != self.hash {
            return Err(DownloadError::Hash { hash: self.hash.to_hex() });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_download_resumes_from_what_it_holds_and_the_hash_decides() -> Result<(), DownloadError> {
        let dir = tempfile::tempdir().map_err(|source| DownloadError::Io { path: "tmp".into(), source })?;
        let model: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let hash = ContentHash::of(&model);
        let size = model.len() as u64;
        let mut first = PartialDownload::open(dir.path(), &hash, size)?;
        assert_eq!(first.held(), 0);
        first.append(&model[..3_333])?;
        drop(first);
        // A restart (or a new attempt) finds the bytes and resumes exactly there.
        let mut again = PartialDownload::open(dir.path(), &hash, size)?;
        assert_eq!(again.held(), 3_333);
        assert!(matches!(again.append(&vec![0; 7_000]), Err(DownloadError::TooLarge { size: 10_000 })));
        again.append(&model[3_333..])?;
        assert_eq!(again.finish()?, model);
        assert_eq!(fs::read_dir(dir.path()).map(|d| d.count()).unwrap_or(9), 0);
        Ok(())
    }

    #[test]
    fn pieces_that_do_not_hash_to_the_model_are_deleted_and_other_models_make_way() -> Result<(), DownloadError> {
        let dir = tempfile::tempdir().map_err(|source| DownloadError::Io { path: "tmp".into(), source })?;
        let model = vec![7u8; 4_096];
        let hash = ContentHash::of(&model);
        let mut torn = PartialDownload::open(dir.path(), &hash, 4_096)?;
        torn.append(&[9u8; 1_000])?;
        drop(torn);
        let mut resumed = PartialDownload::open(dir.path(), &hash, 4_096)?;
        resumed.append(&model[1_000..])?;
        assert!(matches!(resumed.finish(), Err(DownloadError::Hash { .. })));
        assert_eq!(PartialDownload::open(dir.path(), &hash, 4_096)?.held(), 0);
        // Another model's download removes this one; a file larger than announced starts over.
        let other = ContentHash::of(b"other");
        let mut big = PartialDownload::open(dir.path(), &other, 100)?;
        big.append(&[1; 100])?;
        drop(big);
        assert_eq!(fs::read_dir(dir.path()).map(|d| d.count()).unwrap_or(0), 1);
        assert_eq!(PartialDownload::open(dir.path(), &other, 50)?.held(), 0);
        Ok(())
    }
}
