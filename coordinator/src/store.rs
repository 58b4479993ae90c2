//! The coordinator's files: global models named by content hash, the spool where uploads land
//! before they are admitted, partial uploads a node may resume, and exported final models with
//! their lineage.
//!
//! Every file is written to a temporary name, fsync'd, then renamed into place, so a crash never
//! leaves a half-written model under a real name.
//!
//! Partial uploads (`partial/`) are the exception: they grow in place, one per participant and
//! round ([`PartialKey`]), fsync'd at every chunk boundary ([`PartialUpload::append`]); what is
//! acknowledged is only what was fsync'd, whole chunks, so a restarted node (or coordinator)
//! resumes from the last acknowledged chunk. They survive a coordinator restart (a resumed run
//! reopens the same round, and the node re-sends the same bytes); they go when the upload
//! completes (the file moves to the spool), when it is refused, when another payload replaces
//! it, and when its round closes ([`Store::drop_partials`], [`PartialSweep`]).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sanctum_protocol::hash::{ContentHash, Hasher};
use sanctum_protocol::transfer::{self, CHUNK_BYTES};

/// The on-disk layout under the coordinator's state directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    /// Bytes acknowledged (fsync'd) of each partial upload this process has written, by file
    /// name: what `UploadStatus` answers while an upload is in flight, when the file may already
    /// hold a chunk that is not yet on disk. A partial from an earlier process is not in here; its
    /// file's length, rounded down to a chunk, is what survived.
    acknowledged: Arc<Mutex<HashMap<String, u64>>>,
}

/// Whose partial upload: the node (from its certificate), the plan, run, round and attempt at the
/// round, and the payload's declared SHA-256. A different payload for the same node and attempt
/// replaces it. The run and the attempt are part of the key so that a retry of a round (which
/// reopens the same round number), or the plan's next run, never shares a file with, or is
/// swept by, the attempt or run before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartialKey {
    pub node: String,
    pub plan_id: String,
    pub run: String,
    pub round: u32,
    pub attempt: u32,
    pub payload: ContentHash,
}

impl PartialKey {
    /// `PLAN-rROUND-aATTEMPT-RUN-NODE-`: names come from certificates and ids from the wire, so
    /// they are hashed rather than used as paths.
    fn prefix(&self) -> String {
        format!("{}{}-", opening_prefix(&self.plan_id, &self.run, self.round, self.attempt), short_hash(&self.node))
    }

    fn file_name(&self) -> String {
        format!("{}{}.part", self.prefix(), self.payload.to_hex())
    }
}

/// `PLAN-rROUND`: what every partial of one round's attempts starts with.
fn round_prefix(plan_id: &str, round: u32) -> String {
    format!("{}-r{round}", plan_stem(plan_id))
}

/// `PLAN-rROUND-aATTEMPT-RUN-`: what every partial of one opening of a round starts with.
fn opening_prefix(plan_id: &str, run: &str, round: u32, attempt: u32) -> String {
    format!("{}-a{attempt}-{}-", round_prefix(plan_id, round), short_hash(run))
}

fn short_hash(text: &str) -> String {
    ContentHash::of(text.as_bytes()).to_hex()[..16].to_string()
}

fn plan_stem(plan_id: &str) -> String {
    format!("p{}", short_hash(plan_id))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Opens (creating) the layout under `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        for sub in ["models", "spool", "partial", "exports", "checkpoints"] {
            fs::create_dir_all(root.join(sub))?;
        }
        // Spooled uploads from a previous process were never admitted: drop them. Partial uploads
        // stay: the node resumes them when its round reopens.
        for entry in fs::read_dir(root.join("spool"))? {
            let _ = fs::remove_file(entry?.path());
        }
        Ok(Self { root: root.to_path_buf(), acknowledged: Arc::default() })
    }

    fn partial_dir(&self) -> PathBuf {
        self.root.join("partial")
    }

    /// How many bytes of `key`'s `total`-byte payload are acknowledged: 0 when there is no
    /// partial upload, otherwise whole chunks (or the whole payload) that are on disk.
    pub fn partial_acknowledged(&self, key: &PartialKey, total: u64) -> io::Result<u64> {
        let name = key.file_name();
        if let Some(&n) = lock(&self.acknowledged).get(&name) {
            return Ok(n.min(total));
        }
        match fs::metadata(self.partial_dir().join(&name)) {
            Ok(m) => Ok(transfer::acknowledged(m.len(), total)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Opens `key`'s partial upload of a `total`-byte payload, creating it, and cut back to what
    /// is acknowledged (a torn last chunk goes). Any other payload's partial for the same node,
    /// plan and round is removed first: at most one per participant and round.
    pub fn open_partial(&self, key: &PartialKey, total: u64) -> io::Result<PartialUpload> {
        let dir = self.partial_dir();
        let name = key.file_name();
        let prefix = key.prefix();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let other = entry.file_name().to_string_lossy().into_owned();
            if other.starts_with(&prefix) && other != name {
                fs::remove_file(entry.path())?;
                lock(&self.acknowledged).remove(&other);
            }
        }
        let acknowledged = self.partial_acknowledged(key, total)?;
        let path = dir.join(&name);
        let existed = path.exists();
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        file.set_len(acknowledged)?;
        file.seek(SeekFrom::Start(acknowledged))?;
        file.sync_all()?;
        if !existed {
            // The new name itself must survive a crash, or the chunks fsync'd into it would not.
            File::open(&dir)?.sync_all()?;
        }
        lock(&self.acknowledged).insert(name.clone(), acknowledged);
        Ok(PartialUpload {
            file,
            path,
            name,
            written: acknowledged,
            acknowledged,
            total,
            registry: Arc::clone(&self.acknowledged),
            spool: self.root.join("spool"),
        })
    }

    /// Removes `key`'s partial upload, if there is one (an upload that broke a rule before it sent
    /// data: what it held is not resumed).
    pub fn discard_partial(&self, key: &PartialKey) -> io::Result<()> {
        let name = key.file_name();
        lock(&self.acknowledged).remove(&name);
        match fs::remove_file(self.partial_dir().join(&name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes the partial uploads of `plan_id` other than those of round `keep` (all of them for
    /// `None`): their rounds closed, so no node can resume them. Returns how many went.
    pub fn drop_partials(&self, plan_id: &str, keep: Option<u32>) -> io::Result<usize> {
        let plan = format!("{}-r", plan_stem(plan_id));
        let keep = keep.map(|r| format!("{}-", round_prefix(plan_id, r)));
        let mut removed = 0;
        for entry in fs::read_dir(self.partial_dir())? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&plan) && keep.as_ref().is_none_or(|k| !name.starts_with(k.as_str())) {
                match fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                lock(&self.acknowledged).remove(&name);
            }
        }
        Ok(removed)
    }

    /// A guard that removes attempt `attempt` at round `round` of `plan_id`'s partial uploads
    /// when it is dropped: the service keeps one with the open round, so they go when that
    /// attempt closes (and not a retry's, which is open by then).
    pub fn sweep_on_close(&self, plan_id: &str, run: &str, round: u32, attempt: u32) -> PartialSweep {
        PartialSweep { store: self.clone(), prefix: opening_prefix(plan_id, run, round, attempt) }
    }

    /// How many partial uploads there are (for tests and the status of a stuck upload).
    pub fn partial_files(&self) -> io::Result<usize> {
        Ok(fs::read_dir(self.partial_dir())?.count())
    }

    /// Bytes in the upload spool, the partial uploads and the robust round buffers now (the
    /// metrics' `sanctum_spool_bytes`); a file that goes while it is counted counts as empty.
    pub fn spool_bytes(&self) -> u64 {
        // The spool, the partial uploads and the robust aggregators' per-run round buffers
        // (`spool/robust/<run>/`), one level down.
        let robust = self.root.join("spool").join("robust");
        let run_dirs: Vec<PathBuf> = fs::read_dir(&robust)
            .into_iter()
            .flat_map(|d| d.filter_map(Result::ok))
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        [self.root.join("spool"), self.partial_dir()]
            .into_iter()
            .chain(run_dirs)
            .filter_map(|dir| fs::read_dir(dir).ok())
            .flat_map(|d| d.filter_map(Result::ok))
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
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

/// A participant's partial upload, open for appending. Dropping it keeps the file (the node may
/// resume it); [`PartialUpload::discard`] removes it, [`PartialUpload::into_spool`] hands it on.
#[derive(Debug)]
pub struct PartialUpload {
    file: File,
    path: PathBuf,
    name: String,
    /// Bytes in the file; the file's position is here.
    written: u64,
    /// Bytes fsync'd, whole chunks or the whole payload: what the node may resume from.
    acknowledged: u64,
    /// The payload's expected size: `append` refuses more.
    total: u64,
    registry: Arc<Mutex<HashMap<String, u64>>>,
    spool: PathBuf,
}

impl PartialUpload {
    /// Bytes acknowledged so far (see [`transfer::acknowledged`]).
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged
    }

    /// Goes back to `offset` (at most what is acknowledged: a node that starts again from an
    /// earlier chunk re-sends the rest).
    pub fn rewind(&mut self, offset: u64) -> io::Result<()> {
        let offset = offset.min(self.acknowledged);
        self.file.set_len(offset)?;
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.sync_all()?;
        self.written = offset;
        self.acknowledged = offset;
        lock(&self.registry).insert(self.name.clone(), offset);
        Ok(())
    }

    /// The hash state over the bytes already held, so the final check covers the whole payload,
    /// not only what this stream carried.
    pub fn hash_held(&mut self) -> io::Result<Hasher> {
        let mut hasher = Hasher::default();
        self.file.seek(SeekFrom::Start(0))?;
        let mut left = self.written;
        let mut buf = vec![0u8; CHUNK_BYTES];
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(CHUNK_BYTES).min(CHUNK_BYTES);
            let n = self.file.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "partial upload is shorter than it was"));
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        self.file.seek(SeekFrom::Start(self.written))?;
        Ok(hasher)
    }

    /// Appends `data`; each time a chunk boundary (or the end) is crossed the file is fsync'd
    /// and the new boundary becomes what is acknowledged.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let after = self.written + data.len() as u64;
        if after > self.total {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("partial upload would exceed its {} bytes", self.total),
            ));
        }
        self.file.write_all(data)?;
        self.written = after;
        let boundary = transfer::acknowledged(after, self.total);
        if boundary > self.acknowledged {
            self.file.sync_data()?;
            self.acknowledged = boundary;
            lock(&self.registry).insert(self.name.clone(), boundary);
        }
        Ok(())
    }

    /// The complete upload as a spool file (removed when dropped), for its handler to read back.
    pub fn into_spool(self) -> io::Result<tempfile::NamedTempFile> {
        self.file.sync_all()?;
        let spooled = tempfile::Builder::new().prefix("update-").tempfile_in(&self.spool)?;
        let (_, target) = spooled.into_parts();
        // Same file system: a rename, not a copy, however large the update.
        fs::rename(&self.path, &target)?;
        lock(&self.registry).remove(&self.name);
        let mut file = self.file;
        file.seek(SeekFrom::Start(0))?;
        Ok(tempfile::NamedTempFile::from_parts(file, target))
    }

    /// Removes the partial upload: it was refused, or its round closed.
    pub fn discard(self) {
        let _ = fs::remove_file(&self.path);
        lock(&self.registry).remove(&self.name);
    }
}

/// Removes one round's partial uploads when dropped (see [`Store::sweep_on_close`]).
#[derive(Debug)]
pub struct PartialSweep {
    store: Store,
    /// What the names of the swept opening's partials start with.
    prefix: String,
}

impl Drop for PartialSweep {
    fn drop(&mut self) {
        let plan = &self.prefix;
        let Ok(entries) = fs::read_dir(self.store.partial_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(plan.as_str()) {
                let _ = fs::remove_file(entry.path());
                lock(&self.store.acknowledged).remove(&name);
            }
        }
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

    fn key(node: &str, round: u32, payload: &[u8]) -> PartialKey {
        PartialKey {
            node: node.into(),
            plan_id: "ab".repeat(32),
            run: "cd".repeat(16),
            round,
            attempt: 1,
            payload: ContentHash::of(payload),
        }
    }

    #[test]
    fn a_partial_upload_acknowledges_whole_chunks_and_resumes_after_a_restart() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let c = CHUNK_BYTES;
        let payload: Vec<u8> = (0..(3 * c + 400)).map(|i| (i % 241) as u8).collect();
        let total = payload.len() as u64;
        let k = key("cleveland", 1, &payload);
        let store = Store::open(dir.path())?;
        assert_eq!(store.partial_acknowledged(&k, total)?, 0);
        let mut partial = store.open_partial(&k, total)?;
        // Chunks of any size: only crossed chunk boundaries are acknowledged.
        partial.append(&payload[..c / 2])?;
        assert_eq!((partial.acknowledged(), store.partial_acknowledged(&k, total)?), (0, 0));
        partial.append(&payload[c / 2..c + c / 2])?;
        assert_eq!((partial.acknowledged(), store.partial_acknowledged(&k, total)?), (c as u64, c as u64));
        partial.append(&payload[c + c / 2..2 * c + 100])?;
        assert_eq!(store.partial_acknowledged(&k, total)?, 2 * c as u64);
        drop(partial);

        // A new process finds the file: what survived, cut to the last whole chunk.
        let store = Store::open(dir.path())?;
        assert_eq!(store.partial_acknowledged(&k, total)?, 2 * c as u64);
        let mut partial = store.open_partial(&k, total)?;
        assert_eq!(partial.acknowledged(), 2 * c as u64);
        let mut hasher = partial.hash_held()?;
        hasher.update(&payload[2 * c..]);
        assert_eq!(hasher.finish(), ContentHash::of(&payload));
        // More than the payload is refused; then the rest, and the whole is acknowledged.
        assert!(partial.append(&vec![0; c + 401]).is_err());
        partial.append(&payload[2 * c..])?;
        assert_eq!(partial.acknowledged(), total);
        let spooled = partial.into_spool()?;
        assert_eq!(fs::read(spooled.path())?, payload);
        assert_eq!((store.partial_files()?, store.partial_acknowledged(&k, total)?), (0, 0));
        drop(spooled);
        assert_eq!(fs::read_dir(dir.path().join("spool"))?.count(), 0);
        Ok(())
    }

    #[test]
    fn a_retry_of_a_round_keeps_its_own_partials_when_the_failed_attempt_is_swept() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let total = 4 * CHUNK_BYTES as u64;
        let chunk = vec![1u8; CHUNK_BYTES];
        let failed = key("cleveland", 3, b"same bytes");
        let retry = PartialKey { attempt: 2, ..failed.clone() };
        let mut first = store.open_partial(&failed, total)?;
        first.append(&chunk)?;
        drop(first);
        // The retry's upload of the same payload is its own file, not the failed attempt's.
        let mut second = store.open_partial(&retry, total)?;
        assert_eq!(second.acknowledged(), 0);
        second.append(&chunk)?;
        second.append(&chunk)?;
        drop(second);
        assert_eq!(store.partial_files()?, 2);
        // The failed attempt's sweep (its last handler went) leaves the retry's file whole.
        drop(store.sweep_on_close(&failed.plan_id, &failed.run, 3, 1));
        assert_eq!(store.partial_files()?, 1);
        assert_eq!(store.partial_acknowledged(&retry, total)?, 2 * CHUNK_BYTES as u64);
        // Nor does the plan's next run share a file with, or sweep, this run's.
        let next_run = PartialKey { run: "ef".repeat(16), ..retry.clone() };
        drop(store.open_partial(&next_run, total)?);
        drop(store.sweep_on_close(&next_run.plan_id, &next_run.run, 3, 2));
        assert_eq!(store.partial_acknowledged(&retry, total)?, 2 * CHUNK_BYTES as u64);
        assert_eq!(store.partial_files()?, 1);
        // A new round keeps nothing of round 3.
        assert_eq!(store.drop_partials(&failed.plan_id, Some(4))?, 1);
        Ok(())
    }

    #[test]
    fn one_partial_per_participant_and_round_and_none_after_its_round() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let total = 4 * CHUNK_BYTES as u64;
        let chunk = vec![1u8; CHUNK_BYTES];
        let mut first = store.open_partial(&key("cleveland", 1, b"first"), total)?;
        first.append(&chunk)?;
        drop(first);
        // Another payload for the same node and round replaces it; other nodes keep theirs.
        let mut other = store.open_partial(&key("hungarian", 1, b"theirs"), total)?;
        other.append(&chunk)?;
        drop(other);
        let second = store.open_partial(&key("cleveland", 1, b"second"), total)?;
        assert_eq!(second.acknowledged(), 0);
        drop(second);
        assert_eq!(store.partial_acknowledged(&key("cleveland", 1, b"first"), total)?, 0);
        assert_eq!(store.partial_acknowledged(&key("hungarian", 1, b"theirs"), total)?, CHUNK_BYTES as u64);
        assert_eq!(store.partial_files()?, 2);
        // Round 2 keeps round 2's; the other rounds of the plan go.
        drop(store.open_partial(&key("cleveland", 2, b"next"), total)?);
        assert_eq!(store.drop_partials(&"ab".repeat(32), Some(2))?, 2);
        assert_eq!(store.partial_files()?, 1);
        // Closing round 2 removes the rest; a rewind goes back to a chunk already held.
        let mut again = store.open_partial(&key("cleveland", 2, b"next"), total)?;
        again.append(&chunk)?;
        again.append(&chunk)?;
        again.rewind(CHUNK_BYTES as u64)?;
        assert_eq!(store.partial_acknowledged(&key("cleveland", 2, b"next"), total)?, CHUNK_BYTES as u64);
        drop(again);
        drop(store.sweep_on_close(&"ab".repeat(32), &"cd".repeat(16), 2, 1));
        assert_eq!(store.partial_files()?, 0);
        let discarded = store.open_partial(&key("cleveland", 3, b"bad"), total)?;
        discarded.discard();
        assert_eq!(store.partial_files()?, 0);
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
