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
                self.inner.audit(&actor, "plan_rejected", [("lead", json!(lead)), ("reason", json!(e.to_string()))]);
                return Err(Status::invalid_argument(e.to_string()));
            }
        };
        tracing::info!(lead, plan = plan.name, "plan submitted");
        let (reply, rx) = oneshot::channel();
        let again = request.get_ref().again;
        self.inner.send_event(Event::Submit { plan: Box::new(plan), again, actor, reply }).await?;
        let s = rx.await.map_err(|_| Status::unavailable("coordinator is shutting down"))??;
        Ok(Response::new(SubmitPlanResponse { plan_id: s.plan_id, run: s.run, run_number: s.run_number }))
    }

    async fn watch_plan(&self, request: Request<WatchPlanRequest>) -> Result<Response<Self::WatchPlanStream>, Status> {
        use tokio_stream::StreamExt;
        let WatchPlanRequest { plan_id, run } = request.get_ref();
        let run = if run.is_empty() {
            lock(&self.inner.runs).latest(plan_id).map(str::to_string)
        } else {
            Some(run.clone()).filter(|r| lock(&self.inner.runs).has(plan_id, r))
        };
        let Some(run) = run.filter(|r| lock(&self.inner.history).contains_key(r)) else {
            return Err(Status::not_found(format!(
                "no run of plan '{plan_id}' was started by this coordinator since it started; check the plan id (and run) that `plan submit` printed"
            )));
        };
        let stream = watch_stream(&self.inner, &run).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}
