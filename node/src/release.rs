//! Releases kept until their run ends: what this node sent for a round, byte for byte, so that a
//! coordinator that asks for the same round again gets the same bytes back instead of a second,
//! freshly noised update (two noisy copies of one round would spend twice what the ledger holds).
//!
//! Layout under `state/releases/`: one directory per (plan, run), named by the SHA-256 of the
//! two (a run id comes from the coordinator and is never used as a path), holding the latest
//! round's release (`round-N.release`: the encoded header, then the payload; or
//! `round-N.masked`, a marker that a secure-aggregation input left, which is never re-sent),
//! `released` (every round of the run ever released, one per line, kept for good) and, once the
//! run closed, `closed`. A closed run's releases are deleted but its marker stays, so the
//! same run can never be started again: a plan that runs again is a new run.
//!
//! Write order for a release: the release file (temp, fsync, rename, fsync of the directory),
//! then the ledger charge, then the bytes go out. A crash anywhere leaves either nothing (retrain
//! and charge), a stored release without a charge (charge it, then send), or both (send the same
//! bytes again).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use sanctum_protocol::hash::ContentHash;

/// What went wrong with the release store.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("release store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "release store {path} is damaged ({reason}); the round is refused rather than released twice: remove the file only if the run is over"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// A stored release of one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Released {
    /// A plain (clipped and noised, or not under DP) update: the encoded header and the payload.
    Update { header: Vec<u8>, payload: Vec<u8> },
    /// A secure-aggregation masked input left; it is masked with keys of that round only.
    Masked,
}

/// The store in the node's state directory.
pub struct ReleaseStore {
    dir: PathBuf,
}

impl ReleaseStore {
    pub fn open(state_dir: &Path) -> Result<Self, ReleaseError> {
        let dir = state_dir.join("releases");
        std::fs::create_dir_all(&dir).map_err(|source| ReleaseError::Io { path: dir.clone(), source })?;
        Ok(Self { dir })
    }

    fn run_dir(&self, plan_id: &str, run: &str) -> PathBuf {
        let key = ContentHash::of(format!("{plan_id}\n{run}").as_bytes()).to_hex();
        self.dir.join(&key[..32])
    }

    /// Whether this node ever stored anything for the run.
    pub fn knows(&self, plan_id: &str, run: &str) -> bool {
        self.run_dir(plan_id, run).exists()
    }

    /// Whether the run was closed (its plan ended); nothing of it is started again.
    pub fn is_closed(&self, plan_id: &str, run: &str) -> bool {
        self.run_dir(plan_id, run).join("closed").exists()
    }

    /// Whether `round`'s release is stored, without reading it: `Some(true)` for a masked input's
    /// marker, `Some(false)` for a plain update.
    pub fn stored(&self, plan_id: &str, run: &str, round: u32) -> Option<bool> {
        let dir = self.run_dir(plan_id, run);
        if dir.join(format!("round-{round}.masked")).exists() {
            Some(true)
        } else if dir.join(format!("round-{round}.release")).exists() {
            Some(false)
        } else {
            None
        }
    }

    /// The stored release of `round`, if it is this run's latest.
    pub fn get(&self, plan_id: &str, run: &str, round: u32) -> Result<Option<Released>, ReleaseError> {
        let dir = self.run_dir(plan_id, run);
        if dir.join(format!("round-{round}.masked")).exists() {
            return Ok(Some(Released::Masked));
        }
        let path = dir.join(format!("round-{round}.release"));
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ReleaseError::Io { path, source }),
        };
        let corrupt = |reason: &str| ReleaseError::Corrupt { path: path.clone(), reason: reason.into() };
        let len_bytes: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt("too short"))?;
        let header_len = usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|_| corrupt("bad header length"))?;
        let header_end = 8usize.checked_add(header_len).filter(|&e| e <= bytes.len()).ok_or_else(|| corrupt("cut"))?;
        Ok(Some(Released::Update { header: bytes[8..header_end].to_vec(), payload: bytes[header_end..].to_vec() }))
    }

    /// Every round of the run that was ever released here.
    pub fn released_rounds(&self, plan_id: &str, run: &str) -> Result<BTreeSet<u32>, ReleaseError> {
        let path = self.run_dir(plan_id, run).join("released");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(source) => return Err(ReleaseError::Io { path, source }),
        };
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        complete
            .lines()
            .map(|l| {
                l.trim()
                    .parse::<u32>()
                    .map_err(|_| ReleaseError::Corrupt { path: path.clone(), reason: format!("line {l:?}") })
            })
            .collect()
    }

    /// Stores a round's release durably, replacing the run's earlier rounds (only the latest
    /// round can be asked for again; an earlier one is refused), and adds the round to the run's
    /// released rounds.
    pub fn put(&self, plan_id: &str, run: &str, round: u32, release: &Released) -> Result<(), ReleaseError> {
        let dir = self.run_dir(plan_id, run);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReleaseError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let (name, bytes) = match release {
            Released::Masked => (format!("round-{round}.masked"), Vec::new()),
            Released::Update { header, payload } => {
                let mut b = Vec::with_capacity(8 + header.len() + payload.len());
                b.extend_from_slice(&(header.len() as u64).to_le_bytes());
                b.extend_from_slice(header);
                b.extend_from_slice(payload);
                (format!("round-{round}.release"), b)
            }
        };
        let path = dir.join(&name);
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io(&dir))?;
        tmp.write_all(&bytes).map_err(io(&path))?;
        tmp.as_file().sync_all().map_err(io(&path))?;
        tmp.persist(&path).map_err(|e| ReleaseError::Io { path: path.clone(), source: e.error })?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io(&dir))?;
        if !self.released_rounds(plan_id, run)?.contains(&round) {
            let list = dir.join("released");
            // A torn last line (no newline) is ignored when read, so appending after it is safe
            // only on a fresh line.
            let mut f = OpenOptions::new().create(true).append(true).open(&list).map_err(io(&list))?;
            let len = f.metadata().map_err(io(&list))?.len();
            let sep = if len > 0 && !std::fs::read(&list).map_err(io(&list))?.ends_with(b"\n") { "\n" } else { "" };
            writeln!(f, "{sep}{round}").map_err(io(&list))?;
            f.sync_all().map_err(io(&list))?;
        }
        // Earlier rounds are no longer kept: asking for them again is refused.
        self.remove_rounds(&dir, Some(&name));
        Ok(())
    }

    /// Marks the run closed (durably) and deletes its releases.
    pub fn close(&self, plan_id: &str, run: &str) -> Result<(), ReleaseError> {
        let dir = self.run_dir(plan_id, run);
        std::fs::create_dir_all(&dir).map_err(|source| ReleaseError::Io { path: dir.clone(), source })?;
        let marker = dir.join("closed");
        File::create(&marker)
            .and_then(|f| f.sync_all())
            .and_then(|()| File::open(&dir)?.sync_all())
            .map_err(|source| ReleaseError::Io { path: marker, source })?;
        self.remove_rounds(&dir, None);
        Ok(())
    }

    fn remove_rounds(&self, dir: &Path, keep: Option<&str>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("round-")
                && Some(name.as_str()) != keep
                && let Err(err) = std::fs::remove_file(e.path())
            {
                tracing::warn!("release store: cannot remove {}: {err}", e.path().display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(b: u8) -> Released {
        Released::Update { header: vec![b; 3], payload: vec![b; 10] }
    }

    #[test]
    fn a_release_survives_a_reopen_and_only_the_latest_round_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        assert_eq!(s.get("p", "r", 1).unwrap(), None);
        s.put("p", "r", 1, &update(1)).unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        assert_eq!(s.get("p", "r", 1).unwrap(), Some(update(1)));
        assert_eq!(s.stored("p", "r", 1), Some(false));
        assert_eq!(s.get("p", "other-run", 1).unwrap(), None, "runs are kept apart");
        s.put("p", "r", 2, &Released::Masked).unwrap();
        assert_eq!(s.get("p", "r", 2).unwrap(), Some(Released::Masked));
        assert_eq!(s.get("p", "r", 1).unwrap(), None, "an earlier round is no longer kept");
        assert_eq!(s.released_rounds("p", "r").unwrap(), BTreeSet::from([1, 2]), "but stays released");
        s.put("p", "r", 2, &Released::Masked).unwrap();
        assert_eq!(s.released_rounds("p", "r").unwrap().len(), 2);
        s.close("p", "r").unwrap();
        assert_eq!(s.released_rounds("p", "r").unwrap(), BTreeSet::from([1, 2]), "for good");
    }

    #[test]
    fn a_closed_run_stays_closed_and_its_releases_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        s.put("p", "r", 1, &update(7)).unwrap();
        assert!(!s.is_closed("p", "r"));
        s.close("p", "r").unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        assert!(s.is_closed("p", "r"));
        assert!(!s.is_closed("p", "r2"));
        assert_eq!(s.get("p", "r", 1).unwrap(), None);
    }

    #[test]
    fn run_ids_never_become_paths() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        s.put("p", "../../escape", 1, &update(1)).unwrap();
        assert!(!dir.path().join("escape").exists() && !dir.path().parent().unwrap().join("escape").exists());
        assert_eq!(s.get("p", "../../escape", 1).unwrap(), Some(update(1)));
    }

    #[test]
    fn a_damaged_release_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        s.put("p", "r", 1, &update(1)).unwrap();
        let file = s.run_dir("p", "r").join("round-1.release");
        std::fs::write(&file, [255u8; 12]).unwrap();
        let e = s.get("p", "r", 1).unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
    }
}
