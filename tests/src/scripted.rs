//! Scripted nodes: a client holding a real node certificate that subscribes, accepts every
//! `OfferPlan` and answers each `StartRound` as the test says, with no training and no node
//! process. Uploads are chunked as the real node chunks them ([`transfer::CHUNK_BYTES`] per data
//! message, made as they are sent), so a large payload is never one message.

use std::sync::Arc;

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::proto::federation_client::FederationClient;
use sanctum_protocol::proto::{
    Directive, PlanResponse, StartRound, SubscribeRequest, UpdateChunk, UpdateHeader, UpdateReceipt, directive,
    update_chunk,
};
use sanctum_protocol::tls::TlsFiles;
use sanctum_protocol::transfer;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::{Consortium, CoordinatorProcess, channel};

/// A client holding `files` (a node certificate), with message limits large enough for attacks.
pub async fn client(coord: &CoordinatorProcess, files: &TlsFiles) -> FederationClient<Channel> {
    let ch = channel(&coord.address(), files).await.expect("a node certificate connects");
    FederationClient::new(ch).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

/// A scripted hospital: a member certificate for `name`, a client holding it and its directive
/// stream, subscribed (the caller waits for the coordinator to see it).
pub async fn subscribed(
    c: &Consortium,
    coord: &CoordinatorProcess,
    name: &str,
) -> (TlsFiles, FederationClient<Channel>, Streaming<Directive>) {
    let files = c.member(name, "node");
    let node = client(coord, &files).await;
    let directives = node.clone().subscribe(SubscribeRequest::default()).await.expect("subscribe").into_inner();
    (files, node, directives)
}

/// The header of an upload of `payload` (`num_params` little-endian f32) for `start`'s round.
pub fn header(plan_id: &str, start: &StartRound, payload: &[u8], num_params: u64, sample_count: u64) -> UpdateChunk {
    UpdateChunk {
        part: Some(update_chunk::Part::Header(UpdateHeader {
            plan_id: plan_id.into(),
            round: start.round,
            base_model_sha256: start.model_sha256.clone(),
            num_params,
            sample_count,
            payload_sha256: ContentHash::of(payload).to_hex(),
            metrics: vec![],
            masked: false,
            offset: 0,
        })),
    }
}

/// One data message of an upload.
pub fn data(bytes: &[u8]) -> UpdateChunk {
    UpdateChunk { part: Some(update_chunk::Part::Data(bytes.to_vec())) }
}

/// `header`, then `payload` in chunks of [`transfer::CHUNK_BYTES`], each copied out only when the
/// stream is polled for it (as the node's link does: one chunk in memory per upload, not two
/// copies of the payload).
pub fn chunked(header: UpdateChunk, payload: Arc<[u8]>) -> impl tokio_stream::Stream<Item = UpdateChunk> + Send {
    let n = payload.len().div_ceil(transfer::CHUNK_BYTES);
    let chunks = (0..n).map(move |i| {
        let from = i * transfer::CHUNK_BYTES;
        data(&payload[from..(from + transfer::CHUNK_BYTES).min(payload.len())])
    });
    tokio_stream::iter(std::iter::once(header).chain(chunks))
}

/// Uploads `payload` (`num_params` little-endian f32, weighted by `sample_count`) for `start`'s
/// round, chunked; the coordinator's receipt.
pub async fn upload(
    client: &mut FederationClient<Channel>,
    start: &StartRound,
    payload: Arc<[u8]>,
    num_params: u64,
    sample_count: u64,
) -> Result<UpdateReceipt, Status> {
    let first = header(&start.plan_id, start, &payload, num_params, sample_count);
    client.submit_update(chunked(first, payload)).await.map(tonic::Response::into_inner)
}

/// Follows `directives` as a node that accepts every offer and answers each `StartRound` with
/// `round(client, start)` (awaited before the next directive is read); it leaves (drops its
/// stream) at `Evaluate` or when the plan closes. Returns the rounds it was sent, in order.
pub async fn follow_directives<F, Fut>(
    mut client: FederationClient<Channel>,
    mut directives: Streaming<Directive>,
    mut round: F,
) -> Vec<StartRound>
where
    F: FnMut(FederationClient<Channel>, StartRound) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut starts = Vec::new();
    while let Ok(Some(d)) = directives.message().await {
        match d.kind {
            Some(directive::Kind::OfferPlan(o)) => {
                let accept =
                    PlanResponse { plan_id: o.plan_id, accept: true, reason: String::new(), privacy: None, run: o.run };
                client.respond_to_plan(accept).await.expect("the coordinator takes the node's answer to its offer");
            }
            Some(directive::Kind::StartRound(start)) => {
                round(client.clone(), start.clone()).await;
                starts.push(start);
            }
            Some(directive::Kind::Evaluate(_)) | Some(directive::Kind::PlanClosed(_)) => break,
            _ => {}
        }
    }
    starts
}

/// A node (held by the test) that answers each `StartRound` with `update(round)` = (values,
/// sample_count) and insists on its receipt; otherwise as [`follow_directives`].
pub async fn scripted_node(
    client: FederationClient<Channel>,
    directives: Streaming<Directive>,
    update: impl Fn(u32) -> (Vec<f32>, u64),
) -> Vec<StartRound> {
    follow_directives(client, directives, |mut client, start| {
        let (values, samples) = update(start.round);
        async move {
            let payload: Arc<[u8]> = transfer::f32_to_le_bytes(&values).into();
            let receipt = upload(&mut client, &start, payload, values.len() as u64, samples).await;
            assert!(receipt.is_ok(), "round {}: {receipt:?}", start.round);
        }
    })
    .await
}
