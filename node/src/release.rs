//! Releases kept until their run ends: what this node sent for a round, byte for byte, so that a
//! coordinator that asks for the same round again gets the same bytes back instead of a second,
//! freshly noised update (two noisy copies of one round would spend twice what the ledger holds).
//!
//! Layout under `state/releases/`: one directory per (plan, run), named by the SHA-256 of the
//! two (a run id comes from the coordinator and is never used as a path), holding the latest
//! round's release (`round-N.release`: the encoded header, then the payload; or
//! `round-N.masked`, a marker that a secure-aggregation input left, which is never re-sent),
//! `released` (every round of the run ever released, one per line, kept for good),
//! `uploads` (JSON Lines, kept for good: each round's update as it left, its payload's SHA-256
//! and size, and whether the coordinator answered the upload; the last line of a round holds),
//! `run` (the plan and run ids, JSON, so the runs of a plan can be listed) and, once the run
//! closed, `closed`. A closed run's releases are deleted but its marker stays, so the same run
//! can never be started again: a plan that runs again is a new run.
//!
//! `uploads` is what a round record is judged against ([`crate::receipt`]): the coordinator's
//! record lists what it received, which for secure aggregation is the masked input, so the
//! daemon notes a masked input's hash just before it leaves, and a plain update's when it is
//! stored. A directory written by an earlier node has neither `uploads` nor `run`: it is read as
//! before, its rounds' uploads are not known, and it is found only under the run the daemon
//! names (the plan's accepted run).
//!
//! Write order for a release: the release file (temp, fsync, rename, fsync of the directory),
//! then the ledger charge, then the bytes go out. A crash anywhere leaves either nothing (retrain
//! and charge), a stored release without a charge (charge it, then send), or both (send the same
//! bytes again).

use std::collections::{BTreeMap, BTreeSet};
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

/// One round's update as it left (or was about to): what a round record must list.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Upload {
    pub round: u32,
    /// SHA-256 (hex) of the payload the coordinator receives (the masked input under secure
    /// aggregation).
    pub payload_sha256: String,
    pub bytes: u64,
    /// The coordinator answered the upload; `false`: it was stored and about to leave, and may
    /// or may not have arrived.
    pub answered: bool,
}

/// What the store says about one run's update in a round ([`ReleaseStore::round_uploads`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoundUpload {
    /// Noted in `uploads`.
    Known(Upload),
    /// The round was released, but nothing was noted: written by an earlier node (or a masked
    /// input's marker whose input was never made).
    NotKnown,
}

/// The plan and run a run directory belongs to (its `run` file).
#[derive(serde::Serialize, serde::Deserialize)]
struct RunId {
    plan_id: String,
    run: String,
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
        self.name_run(&dir, plan_id, run)?;
        // Noted before the release is stored, so a released round always has its hash here (a
        // crash in between leaves a note that the retrained round's note replaces).
        if let Released::Update { payload, .. } = release {
            let upload = Upload {
                round,
                payload_sha256: ContentHash::of(payload).to_hex(),
                bytes: payload.len() as u64,
                answered: false,
            };
            self.note_upload(plan_id, run, &upload)?;
        }
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

    /// Notes (durably) a round's update as it leaves or once the coordinator answered it; the
    /// last note of a round holds.
    pub fn note_upload(&self, plan_id: &str, run: &str, upload: &Upload) -> Result<(), ReleaseError> {
        let dir = self.run_dir(plan_id, run);
        std::fs::create_dir_all(&dir).map_err(|source| ReleaseError::Io { path: dir.clone(), source })?;
        self.name_run(&dir, plan_id, run)?;
        let path = dir.join("uploads");
        let io = |source| ReleaseError::Io { path: path.clone(), source };
        let line = serde_json::to_string(upload).map_err(|e| ReleaseError::Corrupt {
            path: path.clone(),
            reason: format!("cannot write the note ({e})"),
        })?;
        let mut f = OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        // A torn last line (a crash during its write: that note never held) is cut off first.
        if len > 0 {
            let text = std::fs::read(&path).map_err(io)?;
            if !text.ends_with(b"\n") {
                let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                f.set_len(keep as u64).map_err(io)?;
            }
        }
        f.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        if len == 0 {
            File::open(&dir).and_then(|d| d.sync_all()).map_err(|source| ReleaseError::Io { path: dir, source })?;
        }
        Ok(())
    }

    /// Each round's last note in the run's `uploads` (none for a run written by an earlier node).
    pub fn uploads(&self, plan_id: &str, run: &str) -> Result<BTreeMap<u32, Upload>, ReleaseError> {
        let path = self.run_dir(plan_id, run).join("uploads");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => return Err(ReleaseError::Io { path, source }),
        };
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        let mut uploads = BTreeMap::new();
        for line in complete.lines().filter(|l| !l.trim().is_empty()) {
            let upload: Upload = serde_json::from_str(line)
                .map_err(|e| ReleaseError::Corrupt { path: path.clone(), reason: format!("line {line:?}: {e}") })?;
            uploads.insert(upload.round, upload);
        }
        Ok(uploads)
    }

    /// The runs of `plan_id` this store holds a `run` file for, plus `also` (a run named by the
    /// caller, found even in a directory written by an earlier node), each once.
    pub fn runs_of(&self, plan_id: &str, also: Option<&str>) -> Result<Vec<String>, ReleaseError> {
        let mut runs: Vec<String> = Vec::new();
        let entries =
            std::fs::read_dir(&self.dir).map_err(|source| ReleaseError::Io { path: self.dir.clone(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| ReleaseError::Io { path: self.dir.clone(), source })?;
            let path = entry.path().join("run");
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(ReleaseError::Io { path, source }),
            };
            let id: RunId = serde_json::from_slice(&bytes)
                .map_err(|e| ReleaseError::Corrupt { path: path.clone(), reason: e.to_string() })?;
            if id.plan_id == plan_id && !runs.contains(&id.run) {
                runs.push(id.run);
            }
        }
        if let Some(run) = also
            && !runs.iter().any(|r| r == run)
        {
            runs.push(run.to_string());
        }
        runs.sort();
        Ok(runs)
    }

    /// What each run of `plan_id` (see [`ReleaseStore::runs_of`]) holds of this node's update in
    /// `round`; runs that released nothing in that round are left out.
    pub fn round_uploads(
        &self,
        plan_id: &str,
        round: u32,
        also: Option<&str>,
    ) -> Result<Vec<(String, RoundUpload)>, ReleaseError> {
        let mut found = Vec::new();
        for run in self.runs_of(plan_id, also)? {
            if let Some(upload) = self.uploads(plan_id, &run)?.remove(&round) {
                found.push((run, RoundUpload::Known(upload)));
            } else if self.released_rounds(plan_id, &run)?.contains(&round) {
                found.push((run, RoundUpload::NotKnown));
            }
        }
        Ok(found)
    }

    /// Writes the run directory's `run` file once (atomically), so the plan's runs can be listed.
    fn name_run(&self, dir: &Path, plan_id: &str, run: &str) -> Result<(), ReleaseError> {
        let path = dir.join("run");
        if path.exists() {
            return Ok(());
        }
        let io = |source| ReleaseError::Io { path: path.clone(), source };
        let id = RunId { plan_id: plan_id.to_string(), run: run.to_string() };
        let bytes = serde_json::to_vec(&id)
            .map_err(|e| ReleaseError::Corrupt { path: path.clone(), reason: format!("cannot write it ({e})") })?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        tmp.write_all(&bytes).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
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

    fn up(round: u32, b: u8, answered: bool) -> Upload {
        Upload { round, payload_sha256: ContentHash::of(&[b; 10]).to_hex(), bytes: 10, answered }
    }

    #[test]
    fn a_stored_update_is_noted_with_its_hash_and_the_notes_outlive_the_release() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        s.put("p", "r", 1, &update(1)).unwrap();
        assert_eq!(s.uploads("p", "r").unwrap(), BTreeMap::from([(1, up(1, 1, false))]), "the payload's hash and size");
        s.note_upload("p", "r", &up(1, 1, true)).unwrap();
        s.put("p", "r", 2, &Released::Masked).unwrap();
        s.note_upload("p", "r", &Upload { round: 2, payload_sha256: "ab".repeat(32), bytes: 40, answered: true })
            .unwrap();
        s.close("p", "r").unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        let uploads = s.uploads("p", "r").unwrap();
        assert_eq!(uploads[&1], up(1, 1, true), "the last note of a round holds, after the run closed");
        assert_eq!((uploads[&2].bytes, uploads[&2].answered), (40, true));
        assert_eq!(s.uploads("p", "other").unwrap(), BTreeMap::new());
    }

    #[test]
    fn the_runs_of_a_plan_are_listed_and_each_holds_its_own_round() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        s.put("p", "run-1", 3, &update(1)).unwrap();
        s.put("p", "run-2", 3, &update(2)).unwrap();
        s.put("q", "run-1", 3, &update(3)).unwrap();
        s.put("p", "run-3", 2, &update(4)).unwrap();
        s.close("p", "run-4").unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        assert_eq!(s.runs_of("p", None).unwrap(), ["run-1", "run-2", "run-3"]);
        assert_eq!(s.runs_of("p", Some("run-9")).unwrap(), ["run-1", "run-2", "run-3", "run-9"]);
        assert_eq!(s.runs_of("p", Some("run-1")).unwrap().len(), 3, "each once");
        assert_eq!(
            s.round_uploads("p", 3, None).unwrap(),
            vec![
                ("run-1".to_string(), RoundUpload::Known(up(3, 1, false))),
                ("run-2".to_string(), RoundUpload::Known(up(3, 2, false))),
            ],
            "run 3 released no round 3; plan q is another plan"
        );
    }

    #[test]
    fn a_run_written_by_an_earlier_node_is_read_and_its_uploads_are_not_known() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        // The earlier layout: `released` and the round's release, no `uploads`, no `run`.
        let old = s.run_dir("p", "r");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("released"), "1\n2\n").unwrap();
        let Released::Update { header, payload } = update(2) else { unreachable!() };
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&header);
        file.extend_from_slice(&payload);
        std::fs::write(old.join("round-2.release"), file).unwrap();
        assert_eq!(s.get("p", "r", 2).unwrap(), Some(update(2)), "its release is read as before");
        assert_eq!(s.released_rounds("p", "r").unwrap(), BTreeSet::from([1, 2]));
        assert!(s.runs_of("p", None).unwrap().is_empty(), "it names no run");
        assert_eq!(s.round_uploads("p", 2, None).unwrap(), vec![]);
        assert_eq!(s.round_uploads("p", 2, Some("r")).unwrap(), vec![("r".to_string(), RoundUpload::NotKnown)]);
        // The node goes on with the run: the next round is noted, and the run is named.
        s.put("p", "r", 3, &update(3)).unwrap();
        assert_eq!(
            s.round_uploads("p", 3, None).unwrap(),
            vec![("r".to_string(), RoundUpload::Known(up(3, 3, false)))]
        );
        assert_eq!(s.round_uploads("p", 1, None).unwrap(), vec![("r".to_string(), RoundUpload::NotKnown)]);
    }

    #[test]
    fn a_torn_last_note_is_ignored_and_cut_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReleaseStore::open(dir.path()).unwrap();
        s.note_upload("p", "r", &up(1, 1, true)).unwrap();
        let path = s.run_dir("p", "r").join("uploads");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"round\":2,\"payl").unwrap();
        assert_eq!(s.uploads("p", "r").unwrap().len(), 1, "the torn note never counted");
        s.note_upload("p", "r", &up(2, 2, true)).unwrap();
        assert_eq!(s.uploads("p", "r").unwrap(), BTreeMap::from([(1, up(1, 1, true)), (2, up(2, 2, true))]));
        std::fs::write(&path, "not json\n").unwrap();
        assert!(s.uploads("p", "r").unwrap_err().to_string().contains("damaged"));
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
