//! The node's one line to the coordinator: the only holder of the gRPC `FederationClient`. Every
//! method writes what is about to leave into the egress log (fsync'd) before it sends, so no
//! message can leave unrecorded: the daemon decides what to send, this is how it goes out.
//!
//! Transfers resume. A download lands in a partial file ([`crate::download`]) and a broken
//! stream asks for the rest (`FetchModelRequest.offset`); an upload that re-sends a stored
//! release, or whose stream broke, first asks `UploadStatus` how much of this payload the
//! coordinator holds and sends only the rest (`UpdateHeader.offset`). Each attempt is its own
//! egress record with the bytes it actually sends.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sanctum_protocol::hash::{ContentHash, Hasher};
use sanctum_protocol::prost::{self, Message};
use sanctum_protocol::proto::HeartbeatRequest;
use sanctum_protocol::proto::{
    Countersignature, Directive, EvaluationReport, FetchModelRequest, PlanResponse, SecAggMessage, SubscribeRequest,
    UpdateChunk, UpdateHeader, UploadStatusRequest, federation_client::FederationClient, update_chunk,
};
use sanctum_protocol::transfer;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::download::{DownloadError, PartialDownload};
use crate::egress::{EgressLog, Rule};

/// How many times a transfer whose stream broke is taken up again before the error goes to the
/// daemon (which reconnects, and is sent the round again).
const TRANSFER_ATTEMPTS: u32 = 4;

/// A broken stream (the connection, not the coordinator's verdict): worth resuming.
fn broken(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// Fault injection for the resumable-upload test: once `percent` % of an upload's bytes are
/// acknowledged by the coordinator, `then` runs (the daemon's hook exits the process there).
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug)]
pub struct UploadCut {
    pub percent: u8,
    pub then: fn(acknowledged: u64, total: u64),
}

/// Why a message did not leave, or what came back was refused.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The egress record could not be written, so nothing was sent.
    #[error("egress log: {0}")]
    Egress(#[from] std::io::Error),
    #[error("not connected to the coordinator")]
    NotConnected,
    #[error(transparent)]
    Rpc(#[from] tonic::Status),
    #[error("coordinator refused: {0}")]
    SecAggRefused(String),
    #[error("{0}")]
    BadHash(String),
    #[error("model stream out of order or larger than announced ({size} bytes)")]
    ModelStream { size: u64 },
    #[error("model bytes do not match their SHA-256 {hash}")]
    ModelHash { hash: String },
    #[error(transparent)]
    Download(#[from] DownloadError),
}

/// The egress log and, while a session is open, the gRPC client.
pub struct Link {
    egress: EgressLog,
    /// `None` between sessions; replaced on each reconnect.
    client: Option<FederationClient<Channel>>,
    /// Where a model download is kept while it arrives (`STATE/downloads`).
    downloads: PathBuf,
    #[cfg(feature = "fault-injection")]
    upload_cut: Option<UploadCut>,
}

impl Link {
    /// The link of a node whose state directory is `state_dir`.
    pub fn new(egress: EgressLog, state_dir: &Path) -> Self {
        Self {
            egress,
            client: None,
            downloads: state_dir.join("downloads"),
            #[cfg(feature = "fault-injection")]
            upload_cut: None,
        }
    }

    /// Cuts uploads as `cut` says (fault-injection builds only; see [`UploadCut`]).
    #[cfg(feature = "fault-injection")]
    pub fn cut_uploads(&mut self, cut: Option<UploadCut>) {
        self.upload_cut = cut;
    }

    /// A new session's channel (the previous client, if any, is dropped).
    pub fn connect(&mut self, channel: Channel) {
        self.client = Some(FederationClient::new(channel).max_decoding_message_size(2 * transfer::CHUNK_BYTES));
    }

    /// Drops the session's client.
    pub fn disconnect(&mut self) {
        self.client = None;
    }

    fn client(&mut self) -> Result<&mut FederationClient<Channel>, LinkError> {
        self.client.as_mut().ok_or(LinkError::NotConnected)
    }

    /// Hello (software version and device), then the directive stream.
    pub async fn subscribe(&mut self, hello: SubscribeRequest) -> Result<Streaming<Directive>, LinkError> {
        self.egress.record("Subscribe", "", None, hello.encoded_len(), Rule::Subscribe)?;
        Ok(self.client()?.subscribe(hello).await?.into_inner())
    }

    /// Accepting or refusing a plan, with the reason and the planned privacy cost.
    pub async fn respond_to_plan(&mut self, msg: PlanResponse) -> Result<(), LinkError> {
        self.egress.record("RespondToPlan", &msg.plan_id, None, msg.encoded_len(), Rule::PlanDecision)?;
        self.client()?.respond_to_plan(msg).await?;
        Ok(())
    }

    /// A model by its hash, at most `size` bytes, checked against the hash. What arrives is kept
    /// in a partial file: a broken stream, or the next fetch after a restart, asks only for the
    /// rest.
    pub async fn fetch_model(&mut self, plan_id: &str, hash_hex: &str, size: u64) -> Result<Vec<u8>, LinkError> {
        let hash = ContentHash::parse(hash_hex).map_err(|e| LinkError::BadHash(e.to_string()))?;
        let mut partial = PartialDownload::open(&self.downloads, &hash, size)?;
        let mut attempt = 1;
        loop {
            let offset = partial.held();
            if offset > 0 {
                tracing::info!(model = &hash_hex[..12], "resuming model download at offset {offset} of {size} bytes");
            }
            let req = FetchModelRequest { sha256: hash_hex.to_string(), offset };
            self.egress.record("FetchModel", plan_id, None, req.encoded_len(), Rule::ModelRequest)?;
            match self.fetch_into(req, &mut partial, size).await {
                Ok(()) => break,
                // Taken up again only when it made progress: a coordinator that is gone fails fast.
                Err(LinkError::Rpc(s)) if broken(&s) && attempt < TRANSFER_ATTEMPTS && partial.held() > offset => {
                    tracing::warn!("model download broke after {} of {size} bytes: {}", partial.held(), s.message());
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
        partial.finish().map_err(|e| match e {
            DownloadError::Hash { hash } => LinkError::ModelHash { hash },
            e => LinkError::Download(e),
        })
    }

    /// One `FetchModel` stream, appended to `partial` chunk by chunk.
    async fn fetch_into(
        &mut self,
        req: FetchModelRequest,
        partial: &mut PartialDownload,
        size: u64,
    ) -> Result<(), LinkError> {
        let mut stream = self.client()?.fetch_model(req).await?.into_inner();
        while let Some(chunk) = stream.message().await? {
            if chunk.offset != partial.held() || partial.held() + chunk.data.len() as u64 > size {
                return Err(LinkError::ModelStream { size });
            }
            partial.append(&chunk.data)?;
        }
        Ok(())
    }

    /// How much of this payload the coordinator holds (0 when it holds none or cannot say:
    /// then the upload starts afresh, as before resumable uploads).
    async fn upload_status(
        &mut self,
        plan_id: &str,
        round: u32,
        payload_sha256: &str,
        total: u64,
    ) -> Result<u64, LinkError> {
        let req =
            UploadStatusRequest { plan_id: plan_id.to_string(), round, payload_sha256: payload_sha256.to_string() };
        self.egress.record("UploadStatus", plan_id, Some(round), req.encoded_len(), Rule::UploadStatus)?;
        match self.client()?.upload_status(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let held = r.acknowledged_bytes;
                // The coordinator's word: only an offset that fits this payload is used.
                if r.total_bytes != total || transfer::check_upload_offset(held, held, total).is_err() {
                    tracing::warn!(
                        held,
                        total,
                        "the coordinator's upload status does not fit this payload; sending all of it"
                    );
                    return Ok(0);
                }
                Ok(held)
            }
            Err(s) => {
                tracing::debug!("upload status: {}", s.message());
                Ok(0)
            }
        }
    }

    /// Uploads an update (one header, then chunks made as they are sent); fills in the payload
    /// hash and returns it with the payload's size. A refusal by the coordinator is logged, not
    /// an error: the update left.
    pub async fn upload(
        &mut self,
        mut header: UpdateHeader,
        payload: Vec<u8>,
        rule: Rule,
    ) -> Result<(String, usize), LinkError> {
        let (plan_id, round) = (header.plan_id.clone(), header.round);
        let mut hasher = Hasher::default();
        hasher.update(&payload);
        header.payload_sha256 = hasher.finish().to_hex();
        let payload_sha256 = header.payload_sha256.clone();
        let payload_len = payload.len();
        let total = payload_len as u64;
        let payload = Arc::new(payload);
        let mut rule = rule;
        let mut attempt = 1;
        loop {
            // A fresh release cannot be held by the coordinator yet; a re-send (after a restart)
            // or a retry may be, in part.
            let offset = if matches!(rule, Rule::ModelUpdateResend) {
                self.upload_status(&plan_id, round, &payload_sha256, total).await?
            } else {
                0
            };
            header.offset = offset;
            let start = usize::try_from(offset).unwrap_or(payload_len).min(payload_len);
            let first = UpdateChunk { part: Some(update_chunk::Part::Header(header.clone())) };
            let bytes_out = first.encoded_len()
                + transfer::chunks_from(&payload, start).map(|(_, c)| data_chunk_encoded_len(c.len())).sum::<usize>();
            self.egress.record_upload(&plan_id, round, bytes_out, offset, rule)?;
            if offset > 0 {
                tracing::info!(round, "resuming upload at offset {offset} of {total} bytes");
            }
            let data = {
                let payload = Arc::clone(&payload);
                let n = transfer::chunks_from(&payload, start).count();
                (0..n).map(move |i| {
                    let from = start + i * transfer::CHUNK_BYTES;
                    let to = (from + transfer::CHUNK_BYTES).min(payload.len());
                    (to as u64, UpdateChunk { part: Some(update_chunk::Part::Data(payload[from..to].to_vec())) })
                })
            };
            let result = self.submit(first, data, &plan_id, round, &payload_sha256, total).await?;
            match result {
                Ok(()) => tracing::info!(round, "update accepted by the coordinator"),
                Err(s) if broken(&s) && attempt < TRANSFER_ATTEMPTS => {
                    tracing::warn!(round, "upload broke ({}); asking where to resume", s.message());
                    attempt += 1;
                    // The same bytes again: no new release.
                    rule = Rule::ModelUpdateResend;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(s) => tracing::warn!(round, "update refused by the coordinator: {}", s.message()),
            }
            return Ok((payload_sha256, payload_len));
        }
    }

    /// One `SubmitUpdate` stream: the header, then `data` (each chunk with the payload offset it
    /// ends at). The outer `Err` is a link failure; the inner one the coordinator's answer.
    async fn submit(
        &mut self,
        header: UpdateChunk,
        data: impl Iterator<Item = (u64, UpdateChunk)> + Send + 'static,
        plan_id: &str,
        round: u32,
        payload_sha256: &str,
        total: u64,
    ) -> Result<Result<(), tonic::Status>, LinkError> {
        #[cfg(feature = "fault-injection")]
        if let Some(cut) = self.upload_cut {
            let client = self.client()?.clone();
            let req =
                UploadStatusRequest { plan_id: plan_id.to_string(), round, payload_sha256: payload_sha256.to_string() };
            let stream = cut_stream(client, req, header, data, cut, total);
            return Ok(self.client()?.submit_update(stream).await.map(drop));
        }
        let _ = (plan_id, round, payload_sha256, total);
        let messages = std::iter::once(header).chain(data.map(|(_, m)| m));
        Ok(self.client()?.submit_update(tokio_stream::iter(messages)).await.map(drop))
    }

    /// One secure-aggregation message (keys, shares, a consistency signature, unmasking shares).
    pub async fn sec_agg(&mut self, msg: SecAggMessage) -> Result<(), LinkError> {
        self.egress.record("SecAgg", &msg.plan_id, Some(msg.round), msg.encoded_len(), Rule::SecAgg)?;
        self.client()?.sec_agg(msg).await.map_err(|s| LinkError::SecAggRefused(s.message().to_string()))?;
        Ok(())
    }

    /// A heartbeat while training a round (plan, round, run and phase: nothing of the data).
    pub async fn heartbeat(&mut self, msg: HeartbeatRequest) -> Result<(), LinkError> {
        self.egress.record("Heartbeat", &msg.plan_id, Some(msg.round), msg.encoded_len(), Rule::Heartbeat)?;
        self.client()?.heartbeat(msg).await?;
        Ok(())
    }

    /// A countersignature of the coordinator's record of a round.
    pub async fn countersign(&mut self, msg: Countersignature) -> Result<(), LinkError> {
        self.egress.record("Countersign", &msg.plan_id, Some(msg.round), msg.encoded_len(), Rule::Receipt)?;
        self.client()?.countersign(msg).await?;
        Ok(())
    }

    /// An evaluation's metrics (none: the node declines, so an honest coordinator stops waiting).
    pub async fn report_evaluation(&mut self, report: EvaluationReport) -> Result<(), LinkError> {
        self.egress.record("ReportEvaluation", &report.plan_id, None, report.encoded_len(), Rule::Evaluation)?;
        self.client()?.report_evaluation(report).await?;
        Ok(())
    }
}

/// The upload's messages fed through a channel: once the chunks sent reach `cut.percent` % of
/// `total`, nothing more is fed until the coordinator acknowledges that much (asked with
/// `UploadStatus` on a second call), then `cut.then` runs. If it returns (or no acknowledgement
/// comes within 60 s), the rest is sent.
#[cfg(feature = "fault-injection")]
fn cut_stream(
    mut client: FederationClient<Channel>,
    req: UploadStatusRequest,
    header: UpdateChunk,
    data: impl Iterator<Item = (u64, UpdateChunk)> + Send + 'static,
    cut: UploadCut,
    total: u64,
) -> tokio_stream::wrappers::ReceiverStream<UpdateChunk> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let at = (total * u64::from(cut.percent)).div_ceil(100);
    tokio::spawn(async move {
        if tx.send(header).await.is_err() {
            return;
        }
        let mut cut_done = false;
        for (end, msg) in data {
            if tx.send(msg).await.is_err() {
                return;
            }
            if cut_done || end < at {
                continue;
            }
            cut_done = true;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while tokio::time::Instant::now() < deadline {
                let held = client.upload_status(req.clone()).await.map(|r| r.into_inner().acknowledged_bytes);
                if let Ok(held) = held
                    && held >= at
                {
                    (cut.then)(held, total);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Encoded size of an `UpdateChunk` carrying `len` data bytes (field 2, length-delimited), so the
/// egress log can count an upload without building all its messages at once.
fn data_chunk_encoded_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_counts_data_chunks_as_prost_encodes_them() {
        for len in [0, 1, 127, 128, 4096, transfer::CHUNK_BYTES] {
            let msg = UpdateChunk { part: Some(update_chunk::Part::Data(vec![7; len])) };
            assert_eq!(data_chunk_encoded_len(len), msg.encoded_len(), "len {len}");
        }
    }
}
