//! The driver at start: every run the store says is running is restored from its checkpoint
//! (`Engine::restore`), after the audit records of its last committed round that a crash left
//! out are written (`crate::recovery`) and its round record is awaited for receipts again; a run
//! whose end the audit log records is recorded as ended instead, and one that cannot be restored
//! as interrupted, with the reason. Every run the store says ended whose end a crash kept from
//! the audit log (the log holds its `plan_submitted`, not its `plan_finished`) gets its
//! `plan_finished` from what the store knows. The audit log is read once, typed.

use std::time::SystemTime;

use sanctum_protocol::audit::AuditEvent;
use sanctum_protocol::hash::ContentHash;

use super::*;
use crate::recovery;

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
    /// the reason. Every run the store says ended whose end the audit log lacks gets its
    /// `plan_finished` (`crate::recovery`).
    pub(super) fn restore_runs(&mut self) {
        let rows = match self.inner.db.call(|s| s.runs()) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!("store: {e}; no run is resumed");
                return;
            }
        };
        let path = lock(&self.inner.audit).path().to_path_buf();
        let records = match sanctum_protocol::audit::read_records(&path) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(
                    "audit log {}: {e}; runs are resumed as the store says, and no record a crash left out is written",
                    path.display()
                );
                None
            }
        };
        let log = records.as_deref().map(recovery::entries);
        let runs = log.as_deref().map(recovery::Runs::read);
        // Ends first: they concern runs the store already holds as ended, and none of the
        // records below (a resumed run's) is one.
        if let Some(runs) = &runs {
            for row in rows.iter().filter(|r| runs.end_missing(r)) {
                self.write_missing_end(row);
            }
        }
        for row in rows.into_iter().filter(|r| r.status == RunStatus::Running) {
            let run_id = row.run_id.clone();
            // A run's end goes to the store, then the audit log; a store write that failed (it is
            // only logged) must not bring an ended, or cancelled, run back to life at the next start.
            if let Some(recovery::Ended { status, reason, model }) =
                runs.as_ref().and_then(|runs| runs.ended(run_id.as_str())).cloned()
            {
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
            let result = self.restore_one(&row, log.as_deref());
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
                    let (id, reason) = (run_id.clone(), why.clone());
                    match self.inner.db.call(move |s| s.finish_run(&id, RunStatus::Interrupted, &reason, None, at)) {
                        Err(e) => tracing::error!("store: {e}"),
                        // Its end is in the store: now in the audit log too (the log started it,
                        // and holds no end: it would not be running otherwise).
                        Ok(()) => {
                            let ended = crate::db::RunRow { status: RunStatus::Interrupted, reason: why, ..row };
                            if runs.as_ref().is_some_and(|runs| runs.end_missing(&ended)) {
                                self.write_missing_end(&ended);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Appends the `plan_finished` of a run the store says ended and the audit log holds no end
    /// of, from the store's row and the run's checkpoint (rounds completed, its model).
    fn write_missing_end(&self, row: &crate::db::RunRow) {
        let id = row.run_id.clone();
        let (rounds, model) = match self.inner.db.call(move |s| s.checkpoint(&id)) {
            Ok(Some(cp)) => {
                let model = serde_json::from_slice::<RunCheckpoint>(&cp.state).ok().map(|state| state.model);
                (cp.rounds_completed, model)
            }
            Ok(None) => (0, None),
            Err(e) => {
                tracing::error!("store: {e}; the run's end is written without its rounds and model");
                (0, None)
            }
        };
        tracing::warn!(
            run = short(&row.run_id),
            "the audit log lacks the end of run {} ({}); writing its plan_finished",
            row.name,
            row.status.as_str()
        );
        let own = lock(&self.inner.audit).own_fingerprint().to_string();
        self.inner.audit(&own, recovery::plan_finished(row, rounds, model.as_deref()));
    }

    fn restore_one(
        &mut self,
        row: &crate::db::RunRow,
        log: Option<&[recovery::Entry<'_>]>,
    ) -> Result<Vec<Effect>, NotRestored> {
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
            match log {
                Some(log) => self.complete_round_records(log, &state.plan_id, &state.run_id, last),
                None => tracing::error!("the audit log could not be read; the last round's records are not checked"),
            }
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
    fn complete_round_records(
        &self,
        log: &[recovery::Entry<'_>],
        plan_id: &str,
        run_id: &str,
        last: &engine::checkpoint::ClosedRound,
    ) {
        let missing = recovery::missing(log, plan_id, run_id, last.round);
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
            let appended = recovery::round_record(&last.record, run_id)
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
            recovery::round_record_line(log, plan_id, run_id, last.round)
        };
        // The nodes that reported may still countersign the record after the restart: a record
        // written only now reached nobody, so each recipient is sent it as it connects; those
        // whose receipt the log already holds may not countersign it again.
        if let Some(line) = line {
            let hash = ContentHash::of(line.as_bytes());
            let signed = recovery::signed(log, &hash);
            let sent = if missing.round_record { receipts::Delivered::None } else { receipts::Delivered::All };
            let mut awaiting = lock(&self.inner.receipts);
            awaiting.insert(plan_id, run_id, last.round, line, sent);
            awaiting.already_signed(&hash, signed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use sanctum_protocol::audit::{AuditEvent, AuditLog, read_records};
    use sanctum_protocol::pki::{self, Role, SignSpec};
    use sanctum_protocol::tls::TlsMaterial;

    use crate::db::{RunRow, RunStatus, StoreConfig};
    use crate::service::{Coordinator, CoordinatorOptions};
    use crate::test_ids::{plan, run};

    fn options(dir: &std::path::Path) -> CoordinatorOptions {
        CoordinatorOptions {
            state_dir: dir.to_path_buf(),
            evaluation_deadline: Duration::from_secs(5),
            revocation_list: None,
            limits: crate::config::Limits::default(),
            store: StoreConfig::default(),
            #[cfg(feature = "fault-injection")]
            faults: crate::faults::FaultOptions::default(),
        }
    }

    fn row(label: &str, number: u32, status: RunStatus) -> RunRow {
        RunRow {
            run_id: run(label),
            plan_id: plan("heart"),
            number,
            name: "heart".into(),
            wire_toml: String::new(),
            submitted_by: "lead".into(),
            submitted_ms: 1,
            rounds_planned: 2,
            status,
            reason: String::new(),
            final_model: None,
            finished_ms: None,
        }
    }

    /// The `plan_finished` records of the log in `dir`.
    fn ends(dir: &std::path::Path) -> Vec<AuditEvent> {
        read_records(&dir.join("audit").join("audit.jsonl"))
            .unwrap()
            .iter()
            .filter_map(|r| r.typed().ok())
            .filter(|e| matches!(e, AuditEvent::PlanFinished { .. }))
            .collect()
    }

    /// Starts a coordinator on `dir` in a runtime of its own, waits until its log holds `want`
    /// `plan_finished` records (or `patience`), and stops it (the runtime's end ends the driver).
    fn start_and_wait(
        dir: &std::path::Path,
        material: &TlsMaterial,
        want: usize,
        patience: Duration,
    ) -> Vec<AuditEvent> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let coordinator = rt.block_on(async { Coordinator::start(options(dir), material) }).unwrap();
        let deadline = Instant::now() + patience;
        while ends(dir).len() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Time for a wrong second record to show.
        std::thread::sleep(Duration::from_millis(300));
        drop(coordinator);
        rt.shutdown_timeout(Duration::from_secs(5));
        ends(dir)
    }

    /// A crash between a run's end in the store and its `plan_finished` record: the next start
    /// writes the record from the store's row and checkpoint, once; a run the log never started
    /// gets none; the log still verifies and reports.
    #[test]
    fn a_run_ended_in_the_store_whose_end_the_log_lacks_gets_its_plan_finished_at_start_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::init_ca("restore", 1).unwrap();
        let hosts = ["localhost".to_string()];
        let spec = SignSpec { name: "coordinator", role: Role::Coordinator, days: 1, hosts: &hosts };
        let cert = pki::issue(&ca.cert_pem, &ca.key_pem, &spec).unwrap();
        let material = TlsMaterial::from_pem(&ca.cert_pem, &cert.cert_pem, &cert.key_pem).unwrap();
        let model = "ab".repeat(32);
        {
            let mut db = crate::db::open(&StoreConfig::default(), dir.path()).unwrap();
            for (number, label) in [(1, "crashed"), (2, "never-logged")] {
                db.insert_run(&row(label, number, RunStatus::Running)).unwrap();
                let cp = crate::db::Checkpoint {
                    run_id: run(label),
                    rounds_completed: 2,
                    state: b"{}".to_vec(),
                    saved_ms: 2,
                };
                db.save_checkpoint(&cp).unwrap();
                db.finish_run(&run(label), RunStatus::Succeeded, "all 2 rounds completed", Some(&model), 3).unwrap();
            }
            let mut log = AuditLog::open_for(&dir.path().join("audit"), &material).unwrap();
            let own = log.own_fingerprint().to_string();
            let submitted = AuditEvent::PlanSubmitted {
                plan_id: plan("heart").to_string(),
                run: Some(run("crashed").to_string()),
                run_number: Some(1),
                name: "heart".into(),
                plan_sha256: plan("heart").to_string(),
                rounds: 2,
                strategy: "fedavg".into(),
                privacy: sanctum_protocol::plan::PrivacyMode::None,
                noise_multiplier: None,
                target_epsilon: None,
                delta: None,
                secure_aggregation: false,
                initial_model: "cd".repeat(32),
            };
            log.append_event(&own, &submitted).unwrap();
        }
        assert!(ends(dir.path()).is_empty());

        let got = start_and_wait(dir.path(), &material, 1, Duration::from_secs(10));
        assert_eq!(got.len(), 1, "{got:?}");
        let AuditEvent::PlanFinished { run: r, success, reason, rounds_completed, final_model_sha256, .. } = &got[0]
        else {
            unreachable!()
        };
        assert_eq!(r.as_deref(), Some(run("crashed").as_str()));
        assert!(*success && reason == "all 2 rounds completed" && *rounds_completed == 2, "{got:?}");
        assert_eq!(final_model_sha256, &model);

        // The next start finds the end in the log: nothing more.
        assert_eq!(start_and_wait(dir.path(), &material, 2, Duration::from_secs(1)).len(), 1, "written once");

        let log = dir.path().join("audit").join("audit.jsonl");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        let check = |der: &[u8]| sanctum_protocol::audit::issued_by(&ca.cert_pem, der);
        sanctum_protocol::audit::verify_file(&log, Some(&check)).unwrap();
        let out = dir.path().join("report");
        std::fs::create_dir_all(&out).unwrap();
        let written = crate::report::write(&log, &[], Some(&ca_file), &out, false).unwrap();
        assert!(!written.findings.failed(), "{:?}", written.findings);
        let md = std::fs::read_to_string(&written.md).unwrap();
        assert!(md.contains("succeeded: all 2 rounds completed after 2 round(s)"), "{md}");
    }
}
