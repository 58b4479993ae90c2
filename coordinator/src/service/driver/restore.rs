//! The driver at start: every run the store says is running is restored from its checkpoint
//! (`Engine::restore`), after the audit records of its last committed round that a crash left
//! out are written (`crate::recovery`) and its round record is awaited for receipts again; a run
//! whose end the audit log records is recorded as ended instead, and one that cannot be restored
//! as interrupted, with the reason.

use std::time::SystemTime;

use sanctum_protocol::audit::AuditEvent;
use sanctum_protocol::hash::ContentHash;

use super::*;

/// Why a run the store says is running cannot be restored; it is recorded as interrupted with
/// this reason.
#[derive(Debug, thiserror::Error)]
enum NotRestored {
    #[error("{0}")]
    Store(#[from] crate::db::DbError),
    #[error("it has no checkpoint")]
    NoCheckpoint,
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] serde_json::Error),
    #[error("{0}")]
    Hash(#[from] sanctum_protocol::hash::ParseHashError),
    #[error("model {model}: {source}")]
    Model { model: String, source: std::io::Error },
    #[error("moments {moments}: {source}")]
    Moments { moments: String, source: std::io::Error },
    #[error("{0}")]
    Engine(#[from] engine::checkpoint::RestoreError),
}

impl Driver {
    /// Restores every run the store says is running (a restart, or a crash): each continues from
    /// its last completed round. A run that cannot be restored is recorded as interrupted with
    /// the reason.
    pub(super) fn restore_runs(&mut self) {
        let rows = match self.inner.db.call(|s| s.runs()) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!("store: {e}; no run is resumed");
                return;
            }
        };
        let running: Vec<_> = rows.into_iter().filter(|r| r.status == RunStatus::Running).collect();
        // A run's end goes to the store, then the audit log; a store write that failed (it is only
        // logged) must not bring an ended, or cancelled, run back to life at the next start.
        let ended = if running.is_empty() { Default::default() } else { self.ended_in_audit_log() };
        for row in running {
            let run_id = row.run_id.clone();
            if let Some((status, reason, model)) = ended.get(run_id.as_str()).cloned() {
                tracing::warn!(
                    run = short(&run_id),
                    "the audit log shows run {} ended ({}); recorded in the store, not resumed",
                    row.name,
                    status.as_str()
                );
                if let Some(p) = lock(&self.inner.plans).iter_mut().find(|p| p.run == run_id) {
                    p.status = status.as_str().into();
                    p.reason = reason.clone();
                }
                let (id, at) = (run_id.clone(), unix_ms(SystemTime::now()));
                if let Err(e) = self.inner.db.call(move |s| s.finish_run(&id, status, &reason, model.as_deref(), at)) {
                    tracing::error!("store: {e}");
                }
                continue;
            }
            let result = self.restore_one(&row);
            match result {
                Ok(effects) => {
                    lock(&self.inner.history).start(&run_id);
                    self.execute(effects);
                }
                Err(reason) => {
                    tracing::error!(run = short(&run_id), "run {} cannot be resumed: {reason}", row.name);
                    let at = unix_ms(SystemTime::now());
                    let why = format!("interrupted by a coordinator restart and not resumed: {reason}");
                    if let Some(p) = lock(&self.inner.plans).iter_mut().find(|p| p.run == run_id) {
                        p.status = RunStatus::Interrupted.as_str().into();
                        p.reason = why.clone();
                    }
                    let id = run_id.clone();
                    if let Err(e) =
                        self.inner.db.call(move |s| s.finish_run(&id, RunStatus::Interrupted, &why, None, at))
                    {
                        tracing::error!("store: {e}");
                    }
                }
            }
        }
    }

    /// The runs whose end the audit log records: status, reason and (on success) final model.
    fn ended_in_audit_log(&self) -> std::collections::HashMap<String, (RunStatus, String, Option<String>)> {
        let path = lock(&self.inner.audit).path().to_path_buf();
        let records = match sanctum_protocol::audit::read_records(&path) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("audit log {}: {e}; runs are resumed as the store says", path.display());
                return Default::default();
            }
        };
        let mut cancelled = std::collections::HashSet::new();
        let mut ended = std::collections::HashMap::new();
        for r in &records {
            match AuditEvent::from_record(r) {
                Ok(AuditEvent::PlanCancelled { run, .. }) => {
                    cancelled.insert(run);
                }
                Ok(AuditEvent::PlanFinished { run: Some(run), success, reason, final_model_sha256, .. }) => {
                    let status = match (success, cancelled.contains(&run)) {
                        (true, _) => RunStatus::Succeeded,
                        (false, true) => RunStatus::Cancelled,
                        (false, false) => RunStatus::Failed,
                    };
                    ended.insert(run, (status, reason, success.then_some(final_model_sha256)));
                }
                _ => {}
            }
        }
        ended
    }

    fn restore_one(&mut self, row: &crate::db::RunRow) -> Result<Vec<Effect>, NotRestored> {
        let id = row.run_id.clone();
        let cp = self.inner.db.call(move |s| s.checkpoint(&id))?.ok_or(NotRestored::NoCheckpoint)?;
        let state: RunCheckpoint = serde_json::from_slice(&cp.state)?;
        let model_hash = ContentHash::parse(&state.model)?;
        let model = self
            .inner
            .store
            .read_model(&model_hash)
            .map_err(|source| NotRestored::Model { model: model_hash.short().to_string(), source })?;
        let moments = match &state.moments {
            Some(h) => {
                let hash = ContentHash::parse(h)?;
                let read = self.inner.store.read_blob(&hash);
                Some(read.map_err(|source| NotRestored::Moments { moments: hash.short().to_string(), source })?)
            }
            None => None,
        };
        if let Some(last) = &state.last_round {
            self.complete_round_records(&state.plan_id, &state.run_id, last);
            self.complete_round_event(&state.run_id, last);
        }
        let now = self.now();
        Ok(self.engine.restore(now, state, &model, moments.as_deref())?)
    }

    /// Stores the last committed round's `RoundClosed` event when a crash right after the commit
    /// kept it from the store, so a watcher after the restart replays every round once. Its
    /// metrics (of the model the round started from) were in memory only; the rest is the
    /// checkpoint's.
    fn complete_round_event(&self, run_id: &RunId, last: &engine::checkpoint::ClosedRound) {
        let id = run_id.clone();
        let stored = match self.inner.db.call(move |s| s.events(&id, 0, 1 << 24)) {
            Ok(events) => events,
            Err(e) => {
                tracing::error!("store: {e}; the last round's event is not checked");
                return;
            }
        };
        let present = stored.iter().any(|(_, bytes)| {
            matches!(
                <PlanEvent as sanctum_protocol::prost::Message>::decode(&bytes[..]).ok().and_then(|e| e.kind),
                Some(proto::plan_event::Kind::RoundClosed(c)) if c.round == last.round
            )
        });
        if present {
            return;
        }
        tracing::warn!(round = last.round, "storing the round's closing event a crash left out");
        let ev = PlanEvent {
            kind: Some(proto::plan_event::Kind::RoundClosed(proto::RoundClosed {
                round: last.round,
                reported: last.reported.iter().map(ToString::to_string).collect(),
                dropped: last.dropped.iter().map(ToString::to_string).collect(),
                metrics: Vec::new(),
                new_model_sha256: last.model_sha256.clone(),
            })),
        };
        let (id, bytes) = (run_id.clone(), sanctum_protocol::prost::Message::encode_to_vec(&ev));
        if let Err(e) = self.inner.db.call(move |s| s.append_event(&id, &bytes)) {
            tracing::error!("store: {e}; the round's closing event is not stored");
        }
    }

    /// Writes the audit records of a run's last committed round that a crash right after its
    /// commit left out (`crate::recovery`), and awaits the nodes' receipts for its record again.
    fn complete_round_records(&self, plan_id: &str, run_id: &str, last: &engine::checkpoint::ClosedRound) {
        let path = lock(&self.inner.audit).path().to_path_buf();
        let records = match sanctum_protocol::audit::read_records(&path) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("audit log {}: {e}; the last round's records are not checked", path.display());
                return;
            }
        };
        let missing = crate::recovery::missing(&records, plan_id, run_id, last.round);
        let own = lock(&self.inner.audit).own_fingerprint().to_string();
        if missing.any() {
            tracing::warn!(round = last.round, ?missing, "writing the audit records a crash left out");
        }
        if missing.round_closed {
            self.inner.audit(
                &own,
                AuditEvent::RoundClosed {
                    plan_id: plan_id.to_string(),
                    run: Some(run_id.to_string()),
                    round: u64::from(last.round),
                    reported: last.reported.iter().map(ToString::to_string).collect(),
                    dropped: last.dropped.iter().map(ToString::to_string).collect(),
                },
            );
        }
        if missing.aggregate_released {
            self.inner.audit(
                &own,
                AuditEvent::AggregateReleased {
                    plan_id: plan_id.to_string(),
                    round: u64::from(last.round),
                    model_sha256: last.model_sha256.clone(),
                    contributors: last.reported.len() as u64,
                },
            );
        }
        let line = if missing.round_record {
            let appended = crate::recovery::round_record(&last.record)
                .map_err(|e| e.to_string())
                .and_then(|record| lock(&self.inner.audit).append_event_line(&own, &record).map_err(|e| e.to_string()));
            match appended {
                Ok((_, line)) => Some(line),
                Err(e) => {
                    tracing::error!("audit log: {e}");
                    None
                }
            }
        } else {
            records
                .iter()
                .rev()
                .find(|r| {
                    r.event == "round_record"
                        && r.params.get("plan_id").and_then(|v| v.as_str()) == Some(plan_id)
                        && r.params.get("round").and_then(|v| v.as_u64()) == Some(u64::from(last.round))
                })
                .map(|r| r.line())
        };
        // The nodes that reported may still countersign the record after the restart: a record
        // written only now reached nobody, so each recipient is sent it as it connects; those
        // whose receipt the log already holds may not countersign it again.
        if let Some(line) = line {
            let hash = ContentHash::of(line.as_bytes());
            let hex = hash.to_hex();
            let signed: Vec<&str> = records
                .iter()
                .filter(|r| {
                    r.event == "receipt" && r.params.get("record_sha256").and_then(|v| v.as_str()) == Some(hex.as_str())
                })
                .filter_map(|r| r.params.get("node").and_then(|v| v.as_str()))
                .collect();
            let sent = if missing.round_record { receipts::Delivered::None } else { receipts::Delivered::All };
            let mut awaiting = lock(&self.inner.receipts);
            awaiting.insert(plan_id, run_id, last.round, line, sent);
            awaiting.already_signed(&hash, signed);
        }
    }
}
