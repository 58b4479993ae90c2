//! The open rounds' upload gates: at most one upload per participant is spooled at a time, a
//! new upload of the same node closes the one it left half-open, none is taken after the node's
//! update was admitted, and a retry of a round is another opening with slots of its own; and the
//! federation service's two upload handlers, `UploadStatus` (where a cut upload resumes) and
//! `SubmitUpdate` (which checks the header against the gate before it spools a byte).

use std::sync::Arc;
use std::time::Duration;

use sanctum_protocol::hash::{ContentHash, Hasher};
use sanctum_protocol::proto::{UpdateChunk, UpdateReceipt, UploadStatusRequest, UploadStatusResponse, update_chunk};
use sanctum_protocol::tls;
use sanctum_protocol::transfer::{self, CHUNK_BYTES};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::store::{PartialKey, PartialUpload};

use super::federation::FederationApi;

#[derive(Clone, Debug)]
pub(super) struct RoundInfo {
    pub(super) plan_id: PlanId,
    pub(super) run_id: RunId,
    pub(super) round: u32,
    /// The attempt at `round` (a retry reopens the same round number): an upload of a failed
    /// attempt does not run on into the retry, and each attempt's partial uploads are its own.
    pub(super) attempt: u32,
    pub(super) model: ContentHash,
    pub(super) num_params: usize,
    /// Uploads are masked secure-aggregation inputs (num_params + 1 u32 words).
    pub(super) masked: bool,
    /// The nodes the round opened with: only they may upload.
    pub(super) participants: Arc<BTreeSet<NodeName>>,
    /// Who is uploading now and whose update was admitted, shared by every handler of this round
    /// (a clone of the `RoundInfo` holds the same slots); a new round gets fresh ones.
    pub(super) uploads: Arc<Mutex<RoundUploads>>,
}

/// The open round's upload slots: at most one upload per participant is spooled at a time, and
/// none after its update was admitted. [`PlanRun::admit_update`](crate::round::PlanRun) stays the
/// authority on admission; this is what lets a handler refuse before it spools a byte.
#[derive(Debug, Default)]
pub(super) struct RoundUploads {
    /// Each uploading participant, with the signal that tells its handler a newer upload of the
    /// same node arrived (the old stream may be half-open: a node that rebooted or lost its
    /// network leaves no FIN behind, and would otherwise hold its slot until the idle timeout).
    pub(super) in_flight: HashMap<NodeName, Arc<tokio::sync::Notify>>,
    pub(super) admitted: HashSet<NodeName>,
    /// Removes the round's partial uploads once the round is gone (the driver dropped its
    /// `RoundInfo` and no handler holds a clone): set by the first upload of the round, which
    /// also removes earlier rounds' leftovers (one directory scan per opening, not per call).
    pub(super) partials: Option<crate::store::PartialSweep>,
}

impl RoundInfo {
    /// The round a driver opened with these participants, with no upload yet.
    pub(super) fn new(u: crate::engine::UploadRound) -> Self {
        Self {
            plan_id: u.plan_id,
            run_id: u.run_id,
            round: u.round,
            attempt: u.attempt,
            model: u.model,
            num_params: u.num_params,
            masked: u.masked,
            participants: Arc::new(u.participants),
            uploads: Arc::default(),
        }
    }

    /// Whose partial upload of this opening `node`'s payload is.
    pub(super) fn partial_key(&self, node: &NodeName, payload: ContentHash) -> crate::store::PartialKey {
        crate::store::PartialKey {
            node: node.to_string(),
            plan_id: self.plan_id.to_string(),
            run: self.run_id.to_string(),
            round: self.round,
            attempt: self.attempt,
            payload,
        }
    }

    /// Whether `other` is this same opening of the round (not a retry that reopened its number).
    pub(super) fn same_opening(&self, other: &RoundInfo) -> bool {
        self.round == other.round && self.attempt == other.attempt && Arc::ptr_eq(&self.uploads, &other.uploads)
    }

    /// Takes `node`'s upload slot, or says why it may not upload now: not a participant, its
    /// update already admitted, or another of its uploads in flight. In the last case the older
    /// upload is told to stop (it keeps its partial file, so the node resumes from it) and the
    /// caller is answered `Unavailable`, which a node retries shortly.
    pub(super) fn claim(&self, node: &NodeName) -> Result<UploadSlot, Status> {
        if !self.participants.contains(node) {
            return Err(Status::permission_denied(format!(
                "'{node}' is not a participant of round {} (it opened with {} nodes)",
                self.round,
                self.participants.len()
            )));
        }
        let mut uploads = lock(&self.uploads);
        if uploads.admitted.contains(node) {
            return Err(Status::already_exists(format!(
                "'{node}' already had an update admitted in round {}",
                self.round
            )));
        }
        if let Some(older) = uploads.in_flight.get(node) {
            // A stored permit: the older handler sees it even if it is not waiting right now.
            older.notify_one();
            return Err(Status::unavailable(format!(
                "an earlier upload from '{node}' for round {} was still open here; it is being closed and keeps what \
                 it acknowledged: retry in a moment to resume from there",
                self.round
            )));
        }
        let superseded = Arc::new(tokio::sync::Notify::new());
        uploads.in_flight.insert(node.clone(), Arc::clone(&superseded));
        Ok(UploadSlot { uploads: Arc::clone(&self.uploads), node: node.clone(), superseded })
    }

    /// At the opening's first upload: earlier rounds' partial uploads (left by a coordinator that
    /// restarted mid-round) are removed from `store` now, and this opening's when it closes. Later
    /// uploads of the opening cost nothing here.
    pub(super) fn sweep_partials(&self, store: &crate::store::Store) {
        let mut uploads = lock(&self.uploads);
        if uploads.partials.is_none() {
            uploads.partials = Some(store.sweep_on_close(&self.plan_id, &self.run_id, self.round, self.attempt));
            if let Err(e) = store.drop_partials(&self.plan_id, Some(self.round)) {
                tracing::warn!("partial uploads of earlier rounds: {e}");
            }
        }
    }

    /// The driver admitted `node`'s update: no further upload of its is spooled this round. The
    /// driver records it (not the handler), so an upload whose caller went away while its update
    /// was being admitted still counts.
    pub(super) fn admitted(&self, node: &NodeName) {
        lock(&self.uploads).admitted.insert(node.clone());
    }
}

/// A participant's upload in progress; dropping it frees the slot, whether the upload failed,
/// timed out, went away or was admitted (then [`RoundInfo::admitted`] keeps the node out).
pub(super) struct UploadSlot {
    pub(super) uploads: Arc<Mutex<RoundUploads>>,
    pub(super) node: NodeName,
    /// Notified when a newer upload of the same node arrives: this one should stop.
    pub(super) superseded: Arc<tokio::sync::Notify>,
}

impl UploadSlot {
    /// Resolves once a newer upload of the same node asked this one to stop.
    pub(super) async fn superseded(&self) {
        self.superseded.notified().await;
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut uploads = lock(&self.uploads);
        if uploads.in_flight.get(&self.node).is_some_and(|n| Arc::ptr_eq(n, &self.superseded)) {
            uploads.in_flight.remove(&self.node);
        }
    }
}

/// Reads a spooled payload back for the engine: `num_params` f32 values checked finite as they
/// are decoded, or, when masked, `num_params + 1` u32 words. Runs on the blocking pool.
fn read_payload(
    spool: tempfile::NamedTempFile,
    num_params: usize,
    masked: bool,
) -> Result<crate::engine::Payload, crate::aggregate::PayloadError> {
    let mut file = std::io::BufReader::with_capacity(1 << 20, spool.reopen()?);
    if masked {
        let mut bytes = Vec::with_capacity((num_params + 1) * 4);
        std::io::Read::read_to_end(&mut file, &mut bytes)?;
        let words = sanctum_protocol::secagg::wire::words_from_le(&bytes).map_err(|_| {
            crate::aggregate::PayloadError::Length { got: bytes.len() as u64, want: (num_params as u64 + 1) * 4 }
        })?;
        return Ok(crate::engine::Payload::Words(words));
    }
    Ok(crate::engine::Payload::Values(crate::aggregate::FiniteValues::read_le(&mut file, num_params)?))
}

/// Opens the partial upload `key` of `total` bytes on the blocking pool, resumes it at `offset`
/// (checked against what it holds: see [`transfer::check_upload_offset`]) and hashes what it
/// already holds, so the final check covers the whole payload.
async fn open_partial(
    store: &crate::store::Store,
    key: PartialKey,
    total: u64,
    offset: u64,
) -> std::io::Result<Result<(PartialUpload, Hasher), transfer::ResumeError>> {
    let store = store.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let mut partial = store.open_partial(&key, total)?;
        if let Err(e) = transfer::check_upload_offset(offset, partial.acknowledged(), total) {
            return Ok(Err(e));
        }
        if offset < partial.acknowledged() {
            partial.rewind(offset)?;
        }
        let hasher = partial.hash_held()?;
        Ok(Ok((partial, hasher)))
    })
    .await;
    opened.map_err(std::io::Error::other)?
}

/// Waits for the next message of an upload, at most `idle`; `None` when the time ran out.
async fn next_chunk(
    stream: &mut Streaming<UpdateChunk>,
    idle: Duration,
) -> Option<Result<Option<UpdateChunk>, Status>> {
    tokio::time::timeout(idle, stream.message()).await.ok()
}

impl FederationApi {
    /// Opens `key`'s partial upload for a `total`-byte payload resumed at `offset`, or says why
    /// not (the handler passes the status through its `reject`).
    async fn open_upload(&self, key: PartialKey, total: u64, offset: u64) -> Result<(PartialUpload, Hasher), Status> {
        match open_partial(&self.inner.store, key, total, offset).await {
            Ok(Ok(opened)) => Ok(opened),
            Ok(Err(e)) => Err(Status::failed_precondition(format!("upload offset: {e}"))),
            Err(e) => Err(Status::internal(format!("partial upload: {e}"))),
        }
    }

    /// Drops what an upload that broke a rule held: the file it opened, or the partial it would
    /// have resumed (not resumed after a broken rule).
    fn discard(&self, opened: Option<(PartialUpload, Hasher)>, key: &PartialKey) {
        match opened {
            Some((partial, _)) => partial.discard(),
            None => {
                if let Err(e) = self.inner.store.discard_partial(key) {
                    tracing::warn!("partial upload: {e}");
                }
            }
        }
    }

    /// `UploadStatus`: how much of an upload of the open round this node may resume from.
    pub(super) async fn resume_point(
        &self,
        request: Request<UploadStatusRequest>,
    ) -> Result<Response<UploadStatusResponse>, Status> {
        let node = caller(&request)?;
        let req = request.into_inner();
        let plan_id = bounds::plan_id("plan_id", &req.plan_id)?;
        bounds::sha256_field("payload_sha256", &req.payload_sha256)?;
        let payload = ContentHash::parse(&req.payload_sha256)
            .map_err(|e| Status::invalid_argument(format!("payload_sha256: {e}")))?;
        let info = self.inner.rounds.read().unwrap_or_else(|p| p.into_inner()).get(&plan_id).cloned();
        let Some(info) = info.filter(|i| i.round == req.round) else {
            return Err(Status::failed_precondition(format!(
                "round {} of plan {} is not open: there is no upload of it to resume",
                req.round,
                short(&req.plan_id)
            )));
        };
        if !info.participants.contains(&node) {
            return Err(Status::permission_denied(format!("'{node}' is not a participant of round {}", info.round)));
        }
        let total = (info.num_params + usize::from(info.masked)) as u64 * 4;
        let key = info.partial_key(&node, payload);
        let acknowledged = self
            .inner
            .store
            .partial_acknowledged(&key, total)
            .map_err(|e| Status::internal(format!("partial upload: {e}")))?;
        Ok(Response::new(UploadStatusResponse { acknowledged_bytes: acknowledged, total_bytes: total }))
    }

    /// `SubmitUpdate`: checks the header against the open round, claims the node's upload slot,
    /// spools the payload (resuming a partial upload at the offset asked for), checks its hash
    /// and hands the update to the driver.
    pub(super) async fn spool_update(
        &self,
        request: Request<Streaming<UpdateChunk>>,
    ) -> Result<Response<UpdateReceipt>, Status> {
        let node = caller(&request)?;
        let identity = tls::peer(&request)?.identity.clone();
        let idle_secs = self.inner.limits.upload_idle_timeout_secs;
        let idle = Duration::from_secs(idle_secs);
        let stalled = || {
            Status::deadline_exceeded(format!(
                "upload sent nothing for {idle_secs} s (limits.upload_idle_timeout_secs); it was dropped, and what was \
                 acknowledged is kept for UploadStatus to resume"
            ))
        };
        let mut stream = request.into_inner();
        let mut header = match next_chunk(&mut stream, idle).await {
            None => return Err(self.inner.reject(&node, "", 0, stalled())),
            Some(Ok(Some(UpdateChunk { part: Some(update_chunk::Part::Header(h)) }))) => h,
            Some(Err(e)) => return Err(e),
            Some(Ok(_)) => {
                return Err(self.inner.reject(
                    &node,
                    "",
                    0,
                    Status::invalid_argument("the first message of an upload must be its header"),
                ));
            }
        };
        let started = std::time::Instant::now();
        let metrics = bounds::metrics(std::mem::take(&mut header.metrics));
        // Every check that needs no payload comes first: nothing is spooled for an upload that
        // names no plan, the wrong round, a node that is not a participant, or a duplicate.
        let reject = |status: Status| self.inner.reject(&node, &header.plan_id, header.round, status);
        let plan_id = bounds::plan_id("plan_id", &header.plan_id).map_err(reject)?;
        bounds::sha256_field("base_model_sha256", &header.base_model_sha256).map_err(reject)?;
        bounds::sha256_field("payload_sha256", &header.payload_sha256).map_err(reject)?;
        let info = {
            let rounds = self.inner.rounds.read().unwrap_or_else(|p| p.into_inner());
            match rounds.get(&plan_id) {
                Some(info) => info.clone(),
                // Named by the one open round when there is one, so a node with a stale plan id
                // hears which plan is training (as when one plan ran at a time).
                None => match rounds.values().next() {
                    Some(open) if rounds.len() == 1 => open.clone(),
                    Some(_) => return Err(reject(Status::failed_precondition("no round of this plan is open"))),
                    None => return Err(reject(Status::failed_precondition("no round is open"))),
                },
            }
        };
        if plan_id != info.plan_id || header.round != info.round {
            return Err(reject(Status::failed_precondition(format!(
                "update is for plan {} round {}, but round {} of plan {} is open",
                short(&header.plan_id),
                header.round,
                info.round,
                short(&info.plan_id)
            ))));
        }
        if header.base_model_sha256 != info.model.to_hex() {
            return Err(reject(Status::invalid_argument(format!(
                "update was computed from model {}, but the round's model is {}",
                short(&header.base_model_sha256),
                info.model.short()
            ))));
        }
        if header.masked != info.masked {
            return Err(reject(Status::invalid_argument(if info.masked {
                "this plan uses secure aggregation: send a masked input".to_string()
            } else {
                "this plan does not use secure aggregation: send the plain update".to_string()
            })));
        }
        let words = info.num_params + usize::from(info.masked);
        if header.num_params != words as u64 {
            return Err(reject(Status::invalid_argument(if info.masked {
                format!("masked input has {} words, the round expects {words}", header.num_params)
            } else {
                format!("update has {} parameters, the model has {}", header.num_params, info.num_params)
            })));
        }
        let payload_hash = ContentHash::parse(&header.payload_sha256)
            .map_err(|e| reject(Status::invalid_argument(format!("payload_sha256: {e}"))))?;
        // Held until this call returns: one upload per participant is spooled at a time.
        // A newcomer that closes a half-open upload of its own is asked to retry: not a rejection.
        let slot = info.claim(&node).map_err(|s| if s.code() == tonic::Code::Unavailable { s } else { reject(s) })?;
        let expected = words as u64 * 4;
        // The round's partial uploads go when it closes; earlier rounds' leftovers (a coordinator
        // that restarted mid-round) go at the round's first upload.
        info.sweep_partials(&self.inner.store);
        let key = info.partial_key(&node, payload_hash);
        let offset = header.offset;
        // The offset is checked now against what is held (memory, or one `stat`), but the partial
        // file is opened, with its fsyncs, only once data arrives: a loop of uploads that send a
        // header and nothing else costs the disk nothing.
        let held = self
            .inner
            .store
            .partial_acknowledged(&key, expected)
            .map_err(|e| reject(Status::internal(format!("partial upload: {e}"))))?;
        if let Err(e) = transfer::check_upload_offset(offset, held, expected) {
            return Err(reject(Status::failed_precondition(format!("upload offset: {e}"))));
        }
        let mut opened: Option<(PartialUpload, Hasher)> = None;
        if offset > 0 {
            tracing::info!(
                node = %node,
                round = info.round,
                offset,
                total = expected,
                "resuming upload from {node} for round {} at offset {offset} of {expected} bytes",
                info.round
            );
        }
        let mut received = offset;
        // Returning keeps the partial file (a node may resume it) unless the upload broke a rule or
        // its round closed; it always frees the slot. A complete upload moves to the spool.
        loop {
            let next = tokio::select! {
                next = next_chunk(&mut stream, idle) => next,
                () = slot.superseded() => {
                    // Kept: the newer upload resumes from what this one acknowledged.
                    tracing::info!(node = %node, round = info.round, received, "an upload gave way to a newer one from the same node");

                    return Err(Status::aborted(
                        "a newer upload of this update from the same node arrived; this one stopped, keeping what it acknowledged",
                    ));
                }
            };
            let msg = match next {
                None => return Err(reject(stalled())),
                Some(Err(e)) => return Err(e),
                Some(Ok(None)) => break,
                Some(Ok(Some(msg))) => msg,
            };
            // An upload from a certificate revoked since it began ends at its next chunk.
            self.inner.still_trusted(&identity).map_err(reject)?;
            // So does one whose round closed (or whose plan ended) while it was being sent: a slow
            // upload must not hold a spool, and its slot, past its round. A retry of the round is
            // another opening: the failed attempt's upload ends too (nothing of it is aggregated).
            let still_open = self
                .inner
                .rounds
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&info.plan_id)
                .is_some_and(|open| open.same_opening(&info));
            if !still_open {
                self.discard(opened.take(), &key);
                return Err(reject(Status::failed_precondition(format!(
                    "round {} of plan {} closed while this update was being uploaded; it was dropped and its spool freed",
                    info.round,
                    short(&info.plan_id)
                ))));
            }
            let data = match msg.part {
                Some(update_chunk::Part::Data(d)) => d,
                _ => {
                    self.discard(opened.take(), &key);
                    return Err(reject(Status::invalid_argument("an upload carries one header, then only data")));
                }
            };
            // An empty chunk too: it would open the partial file (and its fsyncs) for nothing.
            if data.is_empty() || data.len() > CHUNK_BYTES || data.len() % 4 != 0 {
                self.discard(opened.take(), &key);
                return Err(reject(Status::invalid_argument(format!(
                    "data chunk of {} bytes: chunks are whole f32 values, at least 4 and at most {CHUNK_BYTES} bytes",
                    data.len()
                ))));
            }
            received += data.len() as u64;
            self.inner.metrics.received(data.len());
            if received > expected {
                self.discard(opened.take(), &key);
                return Err(reject(Status::invalid_argument(format!(
                    "upload carries more than the {expected} bytes its {words} values need"
                ))));
            }
            let (mut partial, mut hasher) = match opened.take() {
                Some(o) => o,
                None => self.open_upload(key.clone(), expected, offset).await.map_err(reject)?,
            };
            hasher.update(&data);
            // Written and, at each chunk boundary, fsync'd off the async workers.
            let partial = tokio::task::spawn_blocking(move || partial.append(&data).map(|()| partial))
                .await
                .map_err(|e| reject(Status::internal(format!("spool: {e}"))))?
                .map_err(|e| reject(Status::internal(format!("spool: {e}"))))?;
            opened = Some((partial, hasher));
        }
        if received != expected {
            // Kept: the node may resume it (UploadStatus says from where).
            return Err(reject(Status::invalid_argument(format!("upload ended after {received} of {expected} bytes"))));
        }
        // A resumed upload whose every byte was already held sends no data: opened only now.
        let (partial, hasher) = match opened {
            Some(o) => o,
            None => self.open_upload(key, expected, offset).await.map_err(reject)?,
        };
        if hasher.finish() != payload_hash {
            partial.discard();
            return Err(reject(Status::invalid_argument(if offset > 0 {
                format!("payload does not match payload_sha256 (resumed at offset {offset}); send it again from 0")
            } else {
                "payload does not match payload_sha256".to_string()
            })));
        }
        let spool = tokio::task::spawn_blocking(move || partial.into_spool())
            .await
            .map_err(|e| reject(Status::internal(format!("spool: {e}"))))?
            .map_err(|e| reject(Status::internal(format!("spool: {e}"))))?;
        // Read back and checked on the blocking pool, beside the other uploads' (a slot each, held
        // until the driver has taken it): the driver only folds.
        let decode_slot = Arc::clone(&self.inner.decode_slots)
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        let (num_params, masked) = (info.num_params, header.masked);
        // The slot goes into the blocking task and comes back with the payload: a handler
        // cancelled while it waits (a reset stream) cannot free the slot while the decode runs on.
        let (payload, decode_slot) = tokio::task::spawn_blocking(move || {
            let payload = read_payload(spool, num_params, masked);
            (payload, decode_slot)
        })
        .await
        .map_err(|e| reject(Status::internal(format!("spool: {e}"))))?;
        let payload = payload.map_err(|e| match e {
            crate::aggregate::PayloadError::Io(e) => reject(Status::internal(format!("spool: {e}"))),
            e => reject(Status::invalid_argument(e.to_string())),
        })?;
        let update = Box::new(crate::engine::Update {
            round: header.round,
            attempt: info.attempt,
            plan_id,
            base_model: header.base_model_sha256.clone(),
            sample_count: header.sample_count,
            metrics,
            masked: header.masked,
            payload_sha256: header.payload_sha256.clone(),
            bytes: received,
            payload,
        });
        let (reply, rx) = oneshot::channel();
        self.inner.send_event(Event::Update { node: node.clone(), update, decode_slot, reply }).await?;
        match rx.await {
            Ok(Ok(())) => {
                self.inner.metrics.update_accepted(started);
                Ok(Response::new(UpdateReceipt { accepted: true, reason: String::new() }))
            }
            Ok(Err(reason)) => Err(reject(Status::failed_precondition(reason.to_string()))),
            Err(_) => Err(Status::unavailable("coordinator is shutting down")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ids::{node, nodes};

    fn round() -> RoundInfo {
        attempt(1)
    }

    fn attempt(attempt: u32) -> RoundInfo {
        RoundInfo::new(crate::engine::UploadRound {
            plan_id: PlanId::parse(&"ab".repeat(32)).unwrap(),
            run_id: RunId::parse(&"cd".repeat(16)).unwrap(),
            round: 3,
            attempt,
            model: ContentHash::of(b"model"),
            num_params: 14,
            masked: false,
            participants: nodes(&["a", "b"]).into_iter().collect(),
        })
    }

    #[test]
    fn one_upload_per_participant_is_spooled_and_none_after_admission() {
        let info = round();
        let e = info.claim(&node("rogue")).err().map(|s| (s.code(), s.message().to_string()));
        assert_eq!(e.as_ref().map(|e| e.0), Some(tonic::Code::PermissionDenied));
        assert!(e.is_some_and(|e| e.1.contains("not a participant of round 3")));
        let slot = info.claim(&node("a"));
        assert!(slot.is_ok());
        // A clone (what each handler holds) shares the slots.
        let twin = info.clone();
        let dup = twin.claim(&node("a")).err().map(|s| (s.code(), s.message().to_string()));
        assert_eq!(dup.as_ref().map(|e| e.0), Some(tonic::Code::Unavailable), "a node retries Unavailable");
        assert!(dup.is_some_and(|e| e.1.contains("still open here")));
        assert!(twin.claim(&node("b")).is_ok(), "another participant is not held up (its slot is freed at once here)");
        drop(slot);
        // The upload failed: the node may try again.
        let slot = info.claim(&node("a"));
        assert!(slot.is_ok());
        info.admitted(&node("a"));
        drop(slot);
        let again = info.claim(&node("a")).err().map(|s| (s.code(), s.message().to_string()));
        assert_eq!(again.as_ref().map(|e| e.0), Some(tonic::Code::AlreadyExists));
        assert!(again.is_some_and(|e| e.1.contains("already had an update admitted")));
        // The next round starts with fresh slots.
        assert!(round().claim(&node("a")).is_ok());
    }

    /// A participant whose earlier upload stream is half-open (its host rebooted, its network
    /// went) is not locked out until the idle timeout: its new upload tells the old one to stop
    /// and is asked to retry, and the retry gets the slot once the old handler let go.
    #[tokio::test]
    async fn a_new_upload_of_the_same_node_closes_the_one_left_half_open() {
        let info = round();
        let old = info.claim(&node("a")).map_err(|s| s.message().to_string()).unwrap();
        let superseded = tokio::time::timeout(Duration::from_millis(50), old.superseded()).await;
        assert!(superseded.is_err(), "nobody asked the upload to stop yet");
        assert_eq!(info.claim(&node("a")).err().map(|s| s.code()), Some(tonic::Code::Unavailable));
        let superseded = tokio::time::timeout(Duration::from_secs(5), old.superseded()).await;
        assert!(superseded.is_ok(), "the older upload is told to stop");
        drop(old);
        assert!(info.claim(&node("a")).is_ok(), "the retry takes the slot");
    }

    /// A retry of a round reopens its number: an upload of the failed attempt is not of the
    /// retry's opening (so it ends at its next chunk), and the retry's slots are its own.
    #[test]
    fn a_retry_of_a_round_is_another_opening() {
        let (first, retry) = (attempt(1), attempt(2));
        assert!(first.same_opening(&first.clone()));
        assert!(!first.same_opening(&retry), "same round number, another attempt");
        assert!(!first.same_opening(&attempt(1)), "a reopening with the same numbers has fresh slots");
        let held = first.claim(&node("a"));
        assert!(held.is_ok());
        assert!(retry.claim(&node("a")).is_ok(), "the failed attempt's upload does not hold the retry's slot");
    }
}
