//! The driver task: the effect executor around the sans-IO [`Engine`]. It turns events from the
//! handlers and the clock into engine inputs (reading a spooled update back, recording a new run
//! before the engine starts it) and carries out the effects the engine returns, in order:
//! directives to nodes, models into the content store, audit records, events for watchers, the
//! upload gates the handlers check, round records and receipts, exports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::{self, Directive, directive};
use tokio::sync::mpsc;
use tonic::Status;

use serde_json::json;

use crate::db::{Checkpoint, RoundRow, RunStatus};
use crate::engine::checkpoint::RunCheckpoint;
use crate::engine::{self, Actor, Effect, Engine, ExportJob, Input, Millis, Refused, SubmitRefused};
use crate::receipts;
use crate::runs::fresh_run_id;
use crate::store::{Store, write_atomic};

use super::*;

mod restore;

/// Why a run's state could not be made durable.
#[derive(Debug, thiserror::Error)]
enum CheckpointFailed {
    #[error("checkpoint store: {0}")]
    Moments(std::io::Error),
    #[error("checkpoint: {0}")]
    Encode(serde_json::Error),
    #[error("store: {0}; the round is not durable, so the run stops here")]
    Store(crate::db::DbError),
}

pub(super) struct Driver {
    inner: Arc<Inner>,
    engine: Engine,
    /// The zero of the engine's clock.
    epoch: Instant,
}

impl Driver {
    /// `buffers`: where robust runs keep their open round's updates (on disk, `spool/robust`).
    pub(super) fn new(
        inner: Arc<Inner>,
        evaluation_deadline: Duration,
        buffers: Box<dyn crate::strategy::robust::RoundBuffers>,
    ) -> Self {
        let epoch = Instant::now();
        let engine = Engine::new(epoch, unix_ms(SystemTime::now()), evaluation_deadline)
            .with_heartbeat_timeout(Duration::from_secs(inner.limits.heartbeat_timeout_secs))
            .with_round_buffers(buffers);
        Self { inner, engine, epoch }
    }

    /// The engine's clock: milliseconds since this driver started.
    fn now(&self) -> Millis {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        self.restore_runs();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => return,
                },
                _ = tick.tick() => {
                    if !self.engine.is_idle() {
                        let _ = self.step(Input::Tick);
                    }
                    // A flood's summary is written within a period of its end, even if nothing follows.
                    self.inner.flush_audit_quota(Instant::now());
                }
            }
        }
    }

    /// Hands the engine an input and carries out its effects; returns why it refused the input.
    fn step(&mut self, input: Input) -> Result<(), Refused> {
        let effects = self.engine.step(self.now(), input)?;
        self.execute(effects);
        Ok(())
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Connected { node } => {
                // Round records written while recovering reached nobody: sent as each recipient
                // connects, before anything new.
                let undelivered = lock(&self.inner.receipts).undelivered_to(&node);
                for (plan_id, round, record) in undelivered {
                    tracing::info!(node = %node, round, "sending a round record written after a restart, to countersign");
                    self.send(&node, directive::Kind::RoundReceipt(proto::RoundReceipt { plan_id, round, record }));
                }
                let _ = self.step(Input::Connected { node });
            }
            Event::Disconnected { node, conn } => {
                let mut nodes = lock(&self.inner.nodes);
                if nodes.get(&node).is_some_and(|c| c.id == conn) {
                    let fingerprint = nodes.remove(&node).map(|c| c.fingerprint).unwrap_or_default();
                    drop(nodes);
                    // A subscribe/disconnect loop is itemised within the node's quota, then counted.
                    if self.inner.audit_member(
                        &node,
                        &fingerprint,
                        AuditEvent::NodeDisconnected { node: node.to_string() },
                    ) {
                        tracing::info!(node = %node, "node disconnected");
                    }
                    let _ = self.step(Input::Disconnected { node });
                }
            }
            Event::Submit { plan, model_file, again, actor, reply } => {
                let name = plan.name.clone();
                let result = self.submit(*plan, &model_file, again, &actor);
                if let Err(status) = &result {
                    self.inner.audit(
                        &actor,
                        AuditEvent::PlanRejected { lead: None, name: Some(name), reason: status.message().to_string() },
                    );
                }
                let _ = reply.send(result);
            }
            Event::Decision { node, response } => {
                let _ = self.step(Input::Decision { node, response });
            }
            Event::Update { node, update, decode_slot, reply } => {
                let result = self.step(Input::Update { node, update }).map_err(NotTaken::from);
                // Folded (or refused): the decoded payload is gone, another may be read back.
                drop(decode_slot);
                let _ = reply.send(result);
            }
            Event::SecAgg { node, cert_der, msg, reply } => {
                let result = self.step(Input::SecAgg { node: node.clone(), cert_der, msg });
                if let Err(reason) = &result {
                    // The handler's `reject` logs and audits it, within the node's quota.
                    tracing::debug!(node = %node, "secure-aggregation message refused: {reason}");
                }
                let _ = reply.send(result.map_err(NotTaken::from));
            }
            Event::Evaluation { node, report } => {
                let _ = self.step(Input::Evaluation { node, report });
            }
            Event::Heartbeat { node, plan_id, run, round, activity } => {
                if let Err(why) = self.step(Input::Heartbeat { node: node.clone(), plan_id, run, round, activity }) {
                    // Debug only: a node decides how many it sends.
                    tracing::debug!(node = %node, round, "heartbeat not counted: {why}");
                }
            }
            Event::Drain { signal, reply } => {
                self.drain(signal);
                let _ = reply.send(());
            }
            Event::Cancel { run, lead, actor, reply } => {
                let _ = reply.send(self.cancel(&run, &lead, &actor));
            }
        }
    }

    fn submit(&mut self, plan: Plan, model_file: &[u8], again: bool, actor: &str) -> Result<Submitted, Status> {
        // Everything that can refuse the plan is checked before a run is recorded.
        let prepared = self.engine.prepare(plan, model_file).map_err(|e| match e {
            SubmitRefused::Invalid(reason) => Status::invalid_argument(reason),
            e @ SubmitRefused::AlreadyRunning { .. } => Status::failed_precondition(e.to_string()),
        })?;
        if !model_file.is_empty() {
            // Stored by its hash, so nodes fetch it like a global model once they have approved it.
            self.inner.store.put_model(model_file).map_err(|e| Status::internal(format!("model store: {e}")))?;
        }
        let plan_id = prepared.plan_id.clone();
        let new_run = {
            let mut runs = lock(&self.inner.runs);
            let mut next = runs.clone();
            let new_run = next
                .admit(&plan_id, &prepared.plan.name, again, fresh_run_id())
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
            // Durable before any hospital hears of the run, so its id is never given out twice.
            let row = crate::db::RunRow {
                run_id: new_run.id.clone(),
                plan_id: plan_id.clone(),
                number: new_run.number,
                name: prepared.plan.name.clone(),
                wire_toml: prepared.wire_toml.clone(),
                submitted_by: actor.to_string(),
                submitted_ms: unix_ms(SystemTime::now()),
                rounds_planned: prepared.plan.rounds,
                status: RunStatus::Running,
                reason: String::new(),
                final_model: None,
                finished_ms: None,
            };
            self.inner
                .db
                .call(move |s| s.insert_run(&row))
                .map_err(|e| Status::internal(format!("{e}; the plan was not started")))?;
            *runs = next;
            new_run
        };
        lock(&self.inner.history).start(&new_run.id);
        lock(&self.inner.plans).push(proto::PlanSummary {
            plan_id: plan_id.to_string(),
            run: new_run.id.to_string(),
            run_number: new_run.number,
            name: prepared.plan.name.clone(),
            status: "running".into(),
            rounds_planned: prepared.plan.rounds,
            started_unix_ms: unix_ms(SystemTime::now()),
            ..Default::default()
        });
        let input = Input::Start {
            prepared: Box::new(prepared),
            run_id: new_run.id.clone(),
            run_number: new_run.number,
            actor: actor.to_string(),
        };
        // Starting refuses nothing: the checks were `prepare`'s.
        let _ = self.step(input);
        Ok(Submitted { plan_id, run: new_run.id, run_number: new_run.number })
    }

    /// The process is stopping: every event before this one was carried out in full (the driver
    /// handles one at a time), so what remains is to say so and let the nodes go. Their directive
    /// streams end here; they reconnect, with jittered backoff, to the next process, which resumes
    /// every running run from its last completed round.
    fn drain(&mut self, signal: &str) {
        let running: Vec<String> = self.engine.running().map(|r| r.run_id().to_string()).collect();
        tracing::info!(signal, runs = running.len(), "stopping: running runs resume at the next start");
        let own = lock(&self.inner.audit).own_fingerprint().to_string();
        self.inner.audit(
            &own,
            AuditEvent::CoordinatorStopped { reason: "signal".into(), signal: signal.to_string(), running },
        );
        lock(&self.inner.nodes).clear();
    }

    /// The lead `lead` (audit actor `actor`) cancels `run`: audited as `plan_cancelled`, then the
    /// run ends as failed ("cancelled by LEAD", nodes get `PlanClosed`) and shows as cancelled.
    fn cancel(&mut self, run: &RunId, lead: &str, actor: &str) -> Result<proto::CancelPlanResponse, Status> {
        let Some(plan_id) = self.engine.running().find(|r| r.run_id() == run).map(|r| r.plan_id().to_string()) else {
            return Err(Status::failed_precondition(format!(
                "run {} is not running any more (it ended before the cancel arrived); nothing was changed",
                short(run)
            )));
        };
        tracing::warn!(run = short(run), lead, "plan cancelled by the lead");
        let input = Input::Cancel { run_id: run.clone(), actor: actor.to_string(), by: lead.to_string() };
        self.step(input).map_err(|e| Status::failed_precondition(e.to_string()))?;
        if let Some(p) = lock(&self.inner.plans).iter_mut().find(|p| p.run == *run) {
            p.status = "cancelled".into();
        }
        Ok(proto::CancelPlanResponse { plan_id, run: run.to_string(), reason: format!("cancelled by {lead}") })
    }

    /// Carries out the engine's effects in order. A model that cannot be stored fails its plan:
    /// the rest of the batch (which would name that model) is dropped.
    fn execute(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send { node, kind } => self.send(&node, kind),
                Effect::StoreModel { plan_id, hash, bytes } => {
                    if let Err(e) = self.inner.store.put_model(&bytes) {
                        let reason = format!("model store: {e}; model {} was not stored", hash.short());
                        tracing::error!("{reason}");
                        let _ = self.step(Input::StorageFailed { plan_id, reason });
                        return;
                    }
                }
                Effect::Audit { actor, event } => {
                    let actor = self.actor(&actor);
                    self.inner.audit(&actor, event);
                }
                Effect::AuditMember { node, event } => {
                    let fingerprint = self.inner.fingerprint(&node);
                    self.inner.audit_member(&node, &fingerprint, event);
                }
                Effect::Publish { plan_id, run_id, kind } => self.inner.publish_run(&plan_id, &run_id, kind),
                Effect::OpenUploads(u) => {
                    let plan_id = u.plan_id.clone();
                    self.inner.rounds.write().unwrap_or_else(|p| p.into_inner()).insert(plan_id, RoundInfo::new(u));
                }
                Effect::CloseUploads { plan_id } => {
                    self.inner.rounds.write().unwrap_or_else(|p| p.into_inner()).remove(&plan_id);
                }
                Effect::Admitted { plan_id, round, node } => {
                    if let Some(info) = self.inner.rounds.read().unwrap_or_else(|p| p.into_inner()).get(&plan_id)
                        && info.round == round
                    {
                        info.admitted(&node);
                    }
                }
                Effect::RoundRecord { plan_id, run_id, round, record, countersigners } => {
                    self.round_record(plan_id, &run_id, round, &record, &countersigners);
                }
                Effect::Checkpoint { state, moments, closed, required } => {
                    if let Err(reason) = self.checkpoint(&state, moments.as_deref(), closed) {
                        if !required {
                            // Only work saved (an evaluation report): the run goes on, and a
                            // restart would ask that node again.
                            tracing::error!("{reason}; the run goes on without this checkpoint");
                            continue;
                        }
                        tracing::error!("{reason}");
                        let _ = self
                            .step(Input::StorageFailed { plan_id: state.plan_id.clone(), reason: reason.to_string() });
                        return;
                    }
                }
                Effect::Finish { plan_id, run_id, export, mut finished, closed, notify, cancelled } => {
                    let status = match (finished.success, cancelled) {
                        (true, _) => RunStatus::Succeeded,
                        (false, true) => RunStatus::Cancelled,
                        (false, false) => RunStatus::Failed,
                    };
                    let (id, reason, model) =
                        (run_id.clone(), finished.reason.clone(), finished.final_model_sha256.clone());
                    let model = finished.success.then_some(model);
                    let at = unix_ms(SystemTime::now());
                    if let Err(e) =
                        self.inner.db.call(move |s| s.finish_run(&id, status, &reason, model.as_deref(), at))
                    {
                        tracing::error!("store: {e}; the run's end is not recorded");
                    }
                    if let Some(job) = export {
                        match export_files(&self.inner.store, *job) {
                            Ok(p) => finished.model_path = p.display().to_string(),
                            Err(e) => tracing::error!("exporting the final model failed: {e}"),
                        }
                    }
                    self.inner.publish_run(&plan_id, &run_id, proto::plan_event::Kind::PlanFinished(*finished));
                    for n in notify {
                        self.send(&n, (*closed).clone());
                    }
                }
                // Emitted only in a `fault-injection` build (`engine::secagg`).
                #[cfg(feature = "fault-injection")]
                Effect::DumpSum { round, words } => self.inner.faults.dump_sum(round, &words),
                #[cfg(not(feature = "fault-injection"))]
                Effect::DumpSum { .. } => {}
            }
        }
    }

    /// Makes a run's state durable: the moments file first, then the checkpoint (with the round it
    /// closes, in one transaction).
    fn checkpoint(
        &self,
        state: &RunCheckpoint,
        moments: Option<&Vec<u8>>,
        closed: Option<engine::checkpoint::ClosedRound>,
    ) -> Result<(), CheckpointFailed> {
        if let Some(bytes) = moments {
            self.inner.store.put_blob(bytes).map_err(CheckpointFailed::Moments)?;
        }
        let json = serde_json::to_vec(state).map_err(CheckpointFailed::Encode)?;
        let saved_ms = unix_ms(SystemTime::now());
        let cp = Checkpoint {
            run_id: state.run_id.clone(),
            rounds_completed: state.rounds_completed,
            state: json,
            saved_ms,
        };
        let run_id = state.run_id.clone();
        let result = match closed {
            Some(c) => {
                let row = RoundRow {
                    run_id,
                    round: c.round,
                    model_sha256: c.model_sha256,
                    reported: c.reported,
                    dropped: c.dropped,
                    // The signed line is the audit log's `round_record`, written after this commit.
                    record_line: String::new(),
                    closed_ms: saved_ms,
                };
                self.inner.db.call(move |s| s.commit_round(&row, &cp))
            }
            None => self.inner.db.call(move |s| s.save_checkpoint(&cp)),
        };
        result.map_err(CheckpointFailed::Store)
    }

    fn actor(&self, actor: &Actor) -> String {
        match actor {
            Actor::Coordinator => lock(&self.inner.audit).own_fingerprint().to_string(),
            Actor::Fingerprint(f) => f.clone(),
            Actor::Node(node) => self.inner.fingerprint(node),
        }
    }

    fn send(&self, node: &str, kind: directive::Kind) {
        let tx = lock(&self.inner.nodes).get(node).map(|c| c.tx.clone());
        match tx {
            Some(tx) => {
                if tx.try_send(Ok(Directive { kind: Some(kind) })).is_err() {
                    tracing::warn!(
                        node,
                        "directive stream is full or closed; the node will be dropped if it stays silent"
                    );
                }
            }
            None => tracing::warn!(node, "node is not connected; directive not sent"),
        }
    }

    /// Records the closed round (model, every accepted update's hash and size, who reported and
    /// who dropped) and sends that exact record to each node that reported, to countersign.
    fn round_record(
        &mut self,
        plan_id: PlanId,
        run_id: &RunId,
        round: u32,
        record: &AuditEvent,
        countersigners: &[NodeName],
    ) {
        let line = {
            let mut log = lock(&self.inner.audit);
            let own = log.own_fingerprint().to_string();
            log.append_event_line(&own, record)
        };
        match line {
            Ok((_, line)) => {
                lock(&self.inner.receipts).insert(&plan_id, run_id, round, line.clone(), receipts::Delivered::All);
                let receipt = directive::Kind::RoundReceipt(proto::RoundReceipt {
                    plan_id: plan_id.into_string(),
                    round,
                    record: line,
                });
                for n in countersigners {
                    self.send(n, receipt.clone());
                }
            }
            Err(e) => tracing::error!("audit log: {e}"),
        }
    }
}

/// Why the final model or its manifest was not exported; the run's end is recorded even so.
#[derive(Debug, thiserror::Error)]
enum ExportFailed {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the manifest does not serialise: {0}")]
    Manifest(#[from] serde_json::Error),
}

/// Writes the final model (safetensors) and its manifest: plan, lineage hash chain, metrics.
fn export_files(store: &Store, job: ExportJob) -> Result<PathBuf, ExportFailed> {
    let model_path = store.export_path(&job.stem, ".safetensors")?;
    let manifest_path = store.export_path(&job.stem, ".manifest.json")?;
    write_atomic(&model_path, &store.read_model(&job.model)?)?;
    let mut manifest = job.manifest;
    manifest.insert("exported_unix_ms".into(), json!(unix_ms(SystemTime::now())));
    write_atomic(&manifest_path, serde_json::to_string_pretty(&serde_json::Value::Object(manifest))?.as_bytes())?;
    Ok(model_path)
}
