//! The lead's service: submit a plan, watch its run.

use std::pin::Pin;
use std::sync::Arc;

use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::{PlanEvent, SubmitPlanRequest, SubmitPlanResponse, WatchPlanRequest, lead_server};
use sanctum_protocol::tls;
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use serde_json::json;

use super::*;

pub(super) struct LeadApi {
    pub(super) inner: Arc<Inner>,
}

#[tonic::async_trait]
impl lead_server::Lead for LeadApi {
    type WatchPlanStream = Pin<Box<dyn Stream<Item = Result<PlanEvent, Status>> + Send + 'static>>;

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
                    "plan_rejected",
                    [("lead", json!(lead)), ("reason", json!(reason))],
                );
                return Err(Status::invalid_argument(reason));
            }
        };
        tracing::info!(lead, plan = plan.name, "plan submitted");
        let (reply, rx) = oneshot::channel();
        let again = request.get_ref().again;
        let model_file = request.into_inner().model_file;
        self.inner.send_event(Event::Submit { plan: Box::new(plan), model_file, again, actor, reply }).await?;
        let s = rx.await.map_err(|_| Status::unavailable("coordinator is shutting down"))??;
        Ok(Response::new(SubmitPlanResponse { plan_id: s.plan_id, run: s.run, run_number: s.run_number }))
    }

    async fn watch_plan(&self, request: Request<WatchPlanRequest>) -> Result<Response<Self::WatchPlanStream>, Status> {
        use tokio_stream::StreamExt;
        let WatchPlanRequest { plan_id, run: asked } = request.get_ref();
        let run = if asked.is_empty() {
            lock(&self.inner.runs).latest(plan_id).map(str::to_string)
        } else {
            Some(asked.clone()).filter(|r| lock(&self.inner.runs).has(plan_id, r))
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
}
