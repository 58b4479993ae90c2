//! The node's one line to the coordinator: the only holder of the gRPC `FederationClient`. Every
//! method writes what is about to leave into the egress log (fsync'd) before it sends, so no
//! message can leave unrecorded: the daemon decides what to send, this is how it goes out.

use std::sync::Arc;

use sanctum_protocol::hash::{ContentHash, Hasher};
use sanctum_protocol::prost::{self, Message};
use sanctum_protocol::proto::{
    Countersignature, Directive, EvaluationReport, FetchModelRequest, PlanResponse, SecAggMessage, SubscribeRequest,
    UpdateChunk, UpdateHeader, federation_client::FederationClient, update_chunk,
};
use sanctum_protocol::transfer;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::egress::{EgressLog, Rule};

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
}

/// The egress log and, while a session is open, the gRPC client.
pub struct Link {
    egress: EgressLog,
    /// `None` between sessions; replaced on each reconnect.
    client: Option<FederationClient<Channel>>,
}

impl Link {
    pub fn new(egress: EgressLog) -> Self {
        Self { egress, client: None }
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

    /// A model by its hash, at most `size` bytes, checked against the hash.
    pub async fn fetch_model(&mut self, plan_id: &str, hash_hex: &str, size: u64) -> Result<Vec<u8>, LinkError> {
        let hash = ContentHash::parse(hash_hex).map_err(LinkError::BadHash)?;
        let req = FetchModelRequest { sha256: hash_hex.to_string() };
        self.egress.record("FetchModel", plan_id, None, req.encoded_len(), Rule::ModelRequest)?;
        let mut stream = self.client()?.fetch_model(req).await?.into_inner();
        // The announced size is the coordinator's word: reserve at most 64 MiB up front.
        let mut bytes = Vec::with_capacity(size.min(64 << 20) as usize);
        while let Some(chunk) = stream.message().await? {
            if chunk.offset != bytes.len() as u64 || bytes.len() as u64 + chunk.data.len() as u64 > size {
                return Err(LinkError::ModelStream { size });
            }
            bytes.extend_from_slice(&chunk.data);
        }
        if ContentHash::of(&bytes) != hash {
            return Err(LinkError::ModelHash { hash: hash_hex.to_string() });
        }
        Ok(bytes)
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
        let header = UpdateChunk { part: Some(update_chunk::Part::Header(header)) };
        let payload = Arc::new(payload);
        let n_chunks = payload.len().div_ceil(transfer::CHUNK_BYTES);
        let chunk_len = |i: usize| transfer::CHUNK_BYTES.min(payload.len() - i * transfer::CHUNK_BYTES);
        let bytes_out =
            header.encoded_len() + (0..n_chunks).map(|i| data_chunk_encoded_len(chunk_len(i))).sum::<usize>();
        self.egress.record("SubmitUpdate", &plan_id, Some(round), bytes_out, rule)?;
        let data = {
            let payload = Arc::clone(&payload);
            (0..n_chunks).map(move |i| {
                let start = i * transfer::CHUNK_BYTES;
                let end = (start + transfer::CHUNK_BYTES).min(payload.len());
                UpdateChunk { part: Some(update_chunk::Part::Data(payload[start..end].to_vec())) }
            })
        };
        let messages = std::iter::once(header).chain(data);
        match self.client()?.submit_update(tokio_stream::iter(messages)).await {
            Ok(_) => tracing::info!(round, "update accepted by the coordinator"),
            Err(s) => tracing::warn!(round, "update refused by the coordinator: {}", s.message()),
        }
        Ok((payload_sha256, payload_len))
    }

    /// One secure-aggregation message (keys, shares, a consistency signature, unmasking shares).
    pub async fn sec_agg(&mut self, msg: SecAggMessage) -> Result<(), LinkError> {
        self.egress.record("SecAgg", &msg.plan_id, Some(msg.round), msg.encoded_len(), Rule::SecAgg)?;
        self.client()?.sec_agg(msg).await.map_err(|s| LinkError::SecAggRefused(s.message().to_string()))?;
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
