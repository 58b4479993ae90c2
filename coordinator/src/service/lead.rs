//! The lead's service: submit a plan, watch its run, cancel it, export its final model. Only the
//! lead's certificate reaches it (the role guard in `transport`); auditors read through `Audit`.

use std::pin::Pin;
use std::sync::Arc;

use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::{
    CancelPlanRequest, CancelPlanResponse, ExportChunk, ExportModelRequest, PlanEvent, SubmitPlanRequest,
    SubmitPlanResponse, WatchPlanRequest, lead_server,
};
use sanctum_protocol::tls;
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::*;

pub(super) struct LeadApi {
    pub(super) inner: Arc<Inner>,
}

#[tonic::async_trait]
impl lead_server::Lead for LeadApi {
    type WatchPlanStream = Pin<Box<dyn Stream<Item = Result<PlanEvent, Status>> + Send + 'static>>;
    type ExportModelStream = tokio_stream::wrappers::ReceiverStream<Result<ExportChunk, Status>>;

    async fn submit_plan(&self, request: Request<SubmitPlanRequest>) -> Result<Response<SubmitPlanResponse>, Status> {
        let lead = caller(&request)?;
        let actor = tls::peer(&request)?.identity.fingerprint.to_hex();
        let plan = match Plan::parse(&request.get_ref().plan_toml) {
            Ok(plan) => plan,
            Err(e) => {
                // A parse error can quote a source line of any length: bounded in the record and
                // the reply, and the lead's records count against its quota like a node's.
                let reason = bounds::reason(e.to_string());
                self.inner.audit_member(
                    &lead,
                    &actor,
                    AuditEvent::PlanRejected { lead: Some(lead.to_string()), name: None, reason: reason.clone() },
                );
                return Err(Status::invalid_argument(reason));
            }
        };
        tracing::info!(lead = %lead, plan = plan.name, "plan submitted");
        let (reply, rx) = oneshot::channel();
        let again = request.get_ref().again;
        let model_file = request.into_inner().model_file;
        self.inner.send_event(Event::Submit { plan: Box::new(plan), model_file, again, actor, reply }).await?;
        let s = rx.await.map_err(|_| Status::unavailable("coordinator is shutting down"))??;
        Ok(Response::new(SubmitPlanResponse {
            plan_id: s.plan_id.into_string(),
            run: s.run.into_string(),
            run_number: s.run_number,
        }))
    }

    async fn watch_plan(&self, request: Request<WatchPlanRequest>) -> Result<Response<Self::WatchPlanStream>, Status> {
        use tokio_stream::StreamExt;
        let WatchPlanRequest { plan_id, run: asked } = request.get_ref();
        // Ids not of their form name no run: answered NOT_FOUND like any other run never started
        // here (the lead types these; `plan status` resolves prefixes).
        let (plan, asked_run) = (PlanId::parse(plan_id).ok(), RunId::parse(asked).ok());
        let run = match (&plan, &asked_run) {
            (None, _) => None,
            (Some(plan), _) if asked.is_empty() => lock(&self.inner.runs).latest(plan).cloned(),
            (Some(plan), Some(r)) => Some(r.clone()).filter(|r| lock(&self.inner.runs).has(plan, r)),
            (Some(_), None) => None,
        };
        let Some(run) = run.filter(|r| lock(&self.inner.history).contains_key(r)) else {
            // The ids are the caller's: shown cut and cleaned, never echoed whole.
            return Err(Status::not_found(format!(
                "no run of plan '{}'{} was started by this coordinator since it started; check the plan id (and run) that `plan submit` printed",
                bounds::clip_chars(plan_id, 64),
                if asked.is_empty() { String::new() } else { format!(" (run '{}')", bounds::clip_chars(asked, 64)) }
            )));
        };
        let stream = watch_stream(&self.inner, &run).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_plan(&self, request: Request<CancelPlanRequest>) -> Result<Response<CancelPlanResponse>, Status> {
        let lead = caller(&request)?;
        let actor = tls::peer(&request)?.identity.fingerprint.to_hex();
        let summary = super::audit_api::resolve_run(&self.inner, &request.get_ref().id)?;
        if summary.status != "running" {
            return Err(Status::failed_precondition(not_running(&summary, "cancel")));
        }
        let (reply, rx) = oneshot::channel();
        // The summary is the coordinator's own (its run id is one of ours).
        let run = RunId::parse(&summary.run).map_err(|e| Status::internal(format!("run {}: {e}", summary.name)))?;
        self.inner.send_event(Event::Cancel { run, lead: lead.into_string(), actor, reply }).await?;
        let cancelled = rx.await.map_err(|_| Status::unavailable("coordinator is shutting down"))??;
        Ok(Response::new(cancelled))
    }

    async fn export_model(
        &self,
        request: Request<ExportModelRequest>,
    ) -> Result<Response<Self::ExportModelStream>, Status> {
        let who = tls::peer(&request)?.identity.clone();
        let summary = super::audit_api::resolve_run(&self.inner, &request.get_ref().id)?;
        if summary.status != "succeeded" {
            return Err(Status::failed_precondition(not_running(&summary, "export")));
        }
        let (manifest, hash) = read_manifest(&self.inner.store, &summary).await?;
        let (file, total) = self
            .inner
            .store
            .open_model(&hash)
            .map_err(|e| Status::internal(format!("cannot read the final model {}: {e}", hash.short())))?;
        self.inner.audit(
            &who.fingerprint.to_hex(),
            AuditEvent::ModelExportRead {
                reader: who.name.clone(),
                plan_id: summary.plan_id.clone(),
                run: summary.run.clone(),
                model_sha256: summary.final_model_sha256.clone(),
                bytes: total,
            },
        );
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(stream_export(tokio::fs::File::from_std(file), total, manifest, tx));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// Why a run that is not in the state `action` needs is refused, with what to do instead.
fn not_running(summary: &sanctum_protocol::proto::PlanSummary, action: &str) -> String {
    let run = format!("run {} of plan '{}' ({})", short(&summary.run), summary.name, short(&summary.plan_id));
    let why = if summary.reason.is_empty() { String::new() } else { format!(": {}", summary.reason) };
    match (action, summary.status.as_str()) {
        ("cancel", status) => format!("{run} has already ended ({status}{why}); there is nothing to cancel"),
        (_, "running") => format!(
            "{run} is still running ({}/{} rounds); its final model exists once it finishes: follow it with `sanctum-coordinator plan watch {}`",
            summary.rounds_completed,
            summary.rounds_planned,
            short(&summary.run)
        ),
        (_, status) => format!("{run} did not finish successfully ({status}{why}), so it has no final model to export"),
    }
}

/// The most bytes of an export manifest that are read (the plan's TOML and one hash per round).
const MAX_MANIFEST_BYTES: u64 = 8 << 20;

/// The manifest the run's end wrote beside its export (`state/exports/NAME-HASH.manifest.json`),
/// checked to be this run's and to name this final model, and the model's hash.
async fn read_manifest(
    store: &crate::store::Store,
    summary: &sanctum_protocol::proto::PlanSummary,
) -> Result<(Vec<u8>, ContentHash), Status> {
    let hash = ContentHash::parse(&summary.final_model_sha256)
        .map_err(|e| Status::internal(format!("the run's final model hash is not one: {e}")))?;
    let path = store
        .export_path(&format!("{}-{}", summary.name, hash.short()), ".manifest.json")
        .map_err(|e| Status::internal(e.to_string()))?;
    let missing = |e: std::io::Error| {
        Status::failed_precondition(format!(
            "the export manifest {} cannot be read ({e}); the final model was not exported at the run's end (see the coordinator's log)",
            path.display()
        ))
    };
    let len = tokio::fs::metadata(&path).await.map_err(missing)?.len();
    if len > MAX_MANIFEST_BYTES {
        return Err(Status::internal(format!("the export manifest {} is over 8 MiB", path.display())));
    }
    let bytes = tokio::fs::read(&path).await.map_err(missing)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Status::internal(format!("the export manifest {} is not JSON: {e}", path.display())))?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
    if field("final_model_sha256") != summary.final_model_sha256 {
        return Err(Status::internal(format!(
            "the export manifest {} names another final model than run {}'s; export from state/exports by hand",
            path.display(),
            short(&summary.run)
        )));
    }
    if field("run") != summary.run {
        // Two runs of one plan that ended on the same model share the export's name: the later
        // run's manifest replaced the earlier one's.
        return Err(Status::failed_precondition(format!(
            "run {} ended on the same final model as run {} of this plan, whose manifest replaced its own; export run {} (the same model)",
            short(&summary.run),
            short(&field("run")),
            short(&field("run"))
        )));
    }
    Ok((bytes, hash))
}

/// Sends the manifest in the first chunk, then the model in chunks of at most [`CHUNK_BYTES`]
/// (read one at a time: a slow reader holds one chunk); a read error ends the stream with it.
async fn stream_export(
    mut file: tokio::fs::File,
    total: u64,
    manifest: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Result<ExportChunk, Status>>,
) {
    use tokio::io::AsyncReadExt;
    let first = ExportChunk { manifest_json: manifest, offset: 0, data: vec![], total_bytes: total };
    if tx.send(Ok(first)).await.is_err() {
        return;
    }
    let mut offset = 0u64;
    while offset < total {
        let n = usize::try_from((total - offset).min(sanctum_protocol::transfer::CHUNK_BYTES as u64))
            .unwrap_or(sanctum_protocol::transfer::CHUNK_BYTES);
        let mut data = vec![0u8; n];
        if let Err(e) = file.read_exact(&mut data).await {
            let _ = tx.send(Err(Status::internal(format!("cannot read the final model: {e}")))).await;
            return;
        }
        let chunk = ExportChunk { manifest_json: vec![], offset, data, total_bytes: total };
        offset += n as u64;
        if tx.send(Ok(chunk)).await.is_err() {
            return;
        }
    }
}
