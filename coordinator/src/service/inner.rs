//! What the services and the driver share, as methods on [`Inner`]: the audit log (with the
//! per-member quota), the node registry (calls, hellos, fingerprints, disconnects), events to
//! the driver and to watchers, and the records of decisions, receipts and refusals.

use super::*;

impl Inner {
    /// Appends an audit record; a failure to write it is logged loudly (the record is lost, the
    /// service goes on).
    pub(super) fn audit(&self, actor: &str, event: AuditEvent) {
        if let Err(e) = lock(&self.audit).append_event(actor, &event) {
            tracing::error!("audit log: {e}");
        }
    }

    /// Appends an audit record that member `node` caused, if it is within the quota of its
    /// (node, event) this period ([`quota::ITEMISED_PER_PERIOD`]); beyond it the record is only
    /// counted, and [`Inner::flush_audit_quota`] writes one summary when the period ends. Returns
    /// whether it was written (callers log only what they audit, so the log is bounded too).
    pub(super) fn audit_member(&self, node: &str, actor: &str, event: AuditEvent) -> bool {
        // The quota counts per kind; members only cause kinds this version writes.
        let kind = sanctum_protocol::audit::KNOWN_EVENTS.iter().copied().find(|k| *k == event.name());
        let now = std::time::Instant::now();
        let itemise = lock(&self.audit_quota).admit(node, kind.unwrap_or("unknown"), now);
        self.flush_audit_quota(now);
        if itemise && let Err(e) = lock(&self.audit).append_event(actor, &event) {
            tracing::error!("audit log: {e}");
        }
        itemise
    }

    /// Writes the summaries of a period that has ended: one `audit_records_suppressed` record per
    /// (node, event) that had records counted but not written. Called with each member record and
    /// from the driver's tick, so a summary comes within a period of the flood's end.
    pub(super) fn flush_audit_quota(&self, now: std::time::Instant) {
        let (due, period) = {
            let mut q = lock(&self.audit_quota);
            (q.take_due(now), q.period())
        };
        if due.is_empty() {
            return;
        }
        let own = lock(&self.audit).own_fingerprint().to_string();
        for s in due {
            tracing::warn!(
                node = s.node,
                event = s.event,
                suppressed = s.count,
                "a member caused more audit records than the quota allows; the rest were counted"
            );
            self.audit(
                &own,
                AuditEvent::AuditRecordsSuppressed {
                    node: s.node.to_string(),
                    event: s.event.to_string(),
                    suppressed: s.count,
                    itemised: u64::from(s.itemised),
                    period_secs: period.as_secs(),
                },
            );
        }
    }

    /// Whether `plan_id` is the plan running now (its latest run has not finished): only then do
    /// member-caused events (a rejected update) reach its watchers and history.
    pub(super) fn is_running(&self, plan_id: &str) -> bool {
        lock(&self.plans).iter().rev().find(|p| p.plan_id == plan_id).is_some_and(|p| p.status == "running")
    }

    /// A call from node `node` passed the role guard: it was seen now. One lock and, after its
    /// first call, no allocation.
    pub(super) fn node_called(&self, node: &NodeName) {
        let now = unix_ms(SystemTime::now());
        let mut seen = lock(&self.seen);
        match seen.get_mut(node) {
            Some(s) => s.last_seen_unix_ms = now,
            None => {
                seen.insert(node.clone(), crate::status::NodeSeen { last_seen_unix_ms: now, ..Default::default() });
            }
        }
    }

    /// What a node said of itself at `Subscribe` (already bounded by `bounds::label`).
    pub(super) fn node_hello(&self, node: &NodeName, version: &str, device: &str) {
        let now = unix_ms(SystemTime::now());
        {
            let mut seen = lock(&self.seen);
            let s = seen.entry(node.clone()).or_default();
            (s.version, s.device, s.last_seen_unix_ms) = (version.to_string(), device.to_string(), now);
        }
        // Kept in the store at connections (not at each call), so `nodes list` knows every node
        // ever seen across restarts: at the first since this start, and then as
        // `quota::NodeRowWrites` allows (a reconnect loop costs no more than a write a second).
        if !lock(&self.node_rows).due(node, version, device, std::time::Instant::now()) {
            return;
        }
        let row = crate::db::NodeRow {
            name: node.clone(),
            fingerprint: self.fingerprint(node),
            version: version.to_string(),
            device: device.to_string(),
            first_seen_ms: now,
            last_seen_ms: now,
        };
        if let Err(e) = self.db.call(move |s| s.upsert_node(&row)) {
            lock(&self.node_rows).forget(node);
            tracing::error!("store: {e}; the node is remembered until the next restart only");
        }
    }

    /// The certificate fingerprint of a connected node (its audit actor).
    pub(super) fn fingerprint(&self, node: &str) -> String {
        lock(&self.nodes).get(node).map(|c| c.fingerprint.clone()).unwrap_or_else(|| format!("node:{node}"))
    }

    /// Hands an event to the driver, waiting for room in its queue (backpressure on the caller);
    /// fails only when the driver is gone, i.e. during shutdown.
    pub(super) async fn send_event(&self, ev: Event) -> Result<(), Status> {
        self.events.send(ev).await.map_err(|_| Status::unavailable("coordinator is shutting down"))
    }

    /// Tells the driver a directive stream ended, from code that cannot await (a `Drop`). A
    /// disconnect is never lost: when the queue is full, a task waits for room and sends it.
    /// Those tasks are bounded too: each directive stream sends its disconnect once, and the
    /// streams open at once are bounded by `limits.max_connections` × `max_concurrent_streams`
    /// (and a node's reconnect ends its previous stream).
    pub(super) fn notify_disconnected(events: &mpsc::Sender<Event>, node: NodeName, conn: u64) {
        match events.try_send(Event::Disconnected { node, conn }) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => {
                let events = events.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move {
                            let _ = events.send(ev).await;
                        });
                    }
                    // No runtime: the process is shutting down and the driver with it.
                    Err(_) => tracing::debug!("disconnect not delivered: no runtime (shutting down)"),
                }
            }
        }
    }

    pub(super) fn publish(&self, plan_id: &PlanId, kind: plan_event::Kind) {
        // A plan has at most one run going on, so a plan's events belong to its latest run.
        let Some(run) = lock(&self.runs).latest(plan_id).cloned() else {
            return;
        };
        self.publish_run(plan_id, &run, kind);
    }

    /// Publishes an event of run `run` of plan `plan_id` to its watchers and history; what the lead
    /// is told about rounds and the plan's end is also what the audit log keeps.
    pub(super) fn publish_run(&self, plan_id: &PlanId, run: &RunId, kind: plan_event::Kind) {
        let run = run.clone();
        self.metrics.on_event(plan_id.as_str(), run.as_str(), &kind);
        let own = lock(&self.audit).own_fingerprint().to_string();
        match &kind {
            plan_event::Kind::RoundClosed(r) => {
                if let Some(p) = lock(&self.plans).iter_mut().find(|p| p.run == run) {
                    p.rounds_completed = r.round;
                    p.rounds.push(r.clone());
                }
                self.audit(
                    &own,
                    AuditEvent::RoundClosed {
                        plan_id: plan_id.to_string(),
                        run: Some(run.to_string()),
                        round: u64::from(r.round),
                        reported: r.reported.clone(),
                        dropped: r.dropped.clone(),
                    },
                );
                self.audit(
                    &own,
                    AuditEvent::AggregateReleased {
                        plan_id: plan_id.to_string(),
                        round: u64::from(r.round),
                        model_sha256: r.new_model_sha256.clone(),
                        contributors: r.reported.len() as u64,
                    },
                );
            }
            plan_event::Kind::PlanFinished(f) => {
                if let Some(p) = lock(&self.plans).iter_mut().find(|p| p.run == run) {
                    p.status = if f.success { "succeeded" } else { "failed" }.into();
                    p.finished_unix_ms = unix_ms(SystemTime::now());
                    p.rounds_completed = f.rounds_completed;
                    p.final_model_sha256 = f.final_model_sha256.clone();
                    p.reason = f.reason.clone();
                }
                if !f.model_path.is_empty() {
                    self.audit(
                        &own,
                        AuditEvent::ModelExported {
                            plan_id: plan_id.to_string(),
                            model_sha256: f.final_model_sha256.clone(),
                            path: f.model_path.clone(),
                        },
                    );
                }
                self.audit(
                    &own,
                    AuditEvent::PlanFinished {
                        plan_id: plan_id.to_string(),
                        run: Some(run.to_string()),
                        success: f.success,
                        reason: f.reason.clone(),
                        rounds_completed: f.rounds_completed,
                        final_model_sha256: f.final_model_sha256.clone(),
                        client_epsilon: f.client_epsilon,
                        client_delta: f.client_delta,
                    },
                );
            }
            _ => {}
        }
        let ev = PlanEvent { kind: Some(kind) };
        let mut history = lock(&self.history);
        // What the history refuses as junk (events after the run's end, a node's rejected updates
        // or flip-flopping decisions beyond their bound) is not broadcast or stored either: live
        // and late watchers see the same run, and a member cannot choose how much the store writes.
        if history.push(&run, ev.clone()) {
            if let Some(plan_event::Kind::NodeDecision(d)) = &ev.kind {
                self.record_decision(&run, d);
            }
            // Kept in the store too, so a watcher after a restart sees the run from its start;
            // not a node's rejected uploads, which a node can cause at will (they are in the audit
            // log, within its quota): what the store keeps grows with rounds and nodes only.
            let rejected = matches!(ev.kind, Some(plan_event::Kind::UpdateRejected(_)));
            let (id, bytes) = (run.clone(), sanctum_protocol::prost::Message::encode_to_vec(&ev));
            if !rejected && let Err(e) = self.db.call(move |s| s.append_event(&id, &bytes)) {
                tracing::error!("store: {e}; the event is kept in memory only");
            }
            let _ = self.plan_events.send((run, ev));
        }
    }

    /// A node's counted answer to a run's offer, kept in the store (the latest per node wins;
    /// earlier answers stay as history).
    pub(super) fn record_decision(&self, run: &RunId, d: &proto::NodeDecision) {
        let finite = |x: f64| (x.is_finite() && x >= 0.0).then_some(x);
        // The engine wrote the event from the node's `NodeName`: it parses back.
        let Ok(node) = NodeName::parse(&d.node) else {
            tracing::error!("decision of a node whose name is not a certificate name; not stored");
            return;
        };
        let row = crate::db::DecisionRow {
            run_id: run.clone(),
            node,
            accept: d.accepted,
            reason: bounds::clip_bytes(&d.reason, bounds::REASON_BYTES).into_owned(),
            epsilon: d.privacy.as_ref().and_then(|p| finite(p.epsilon)),
            delta: d.privacy.as_ref().and_then(|p| finite(p.delta)),
            at_ms: unix_ms(SystemTime::now()),
        };
        if let Err(e) = self.db.call(move |s| s.record_decision(&row)) {
            tracing::error!("store: {e}; the decision is in the audit log only");
        }
    }

    /// A countersignature the coordinator took, kept in the store beside its round.
    pub(super) fn record_receipt(&self, accepted: &crate::receipts::Accepted) {
        // The run whose record was countersigned (a late receipt of an earlier run's round is
        // that run's, not the plan's latest). Both ids were this coordinator's own (the run) and
        // the verified certificate's (the node), so they parse.
        let (Ok(run_id), Ok(node)) = (RunId::parse(&accepted.run), NodeName::parse(&accepted.node)) else {
            tracing::error!("receipt of a run or node whose id is not of its form; not stored");
            return;
        };
        let row = crate::db::ReceiptRow {
            run_id,
            round: accepted.round,
            node,
            agrees: accepted.agrees,
            reason: bounds::clip_bytes(&accepted.reason, bounds::REASON_BYTES).into_owned(),
            signature: accepted.signature.clone(),
            at_ms: unix_ms(SystemTime::now()),
        };
        if let Err(e) = self.db.call(move |s| s.record_receipt(&row)) {
            tracing::error!("store: {e}; the receipt is in the audit log only");
        }
    }

    /// Logs and publishes a refused update, and returns the status for the node. `plan_id` is a
    /// plan id (64 hex) or empty: a header whose plan id is not one is rejected with "" so the
    /// node's string never reaches the log; the reason is bounded ([`bounds::REASON_BYTES`]).
    pub(super) fn reject(&self, node: &str, plan_id: &str, round: u32, status: Status) -> Status {
        let plan_id = if bounds::is_sha256_hex(plan_id) { plan_id } else { "" };
        self.metrics.refused(crate::metrics::RefusalKind::of_upload(status.code()));
        let reason = bounds::clip_bytes(status.message(), bounds::REASON_BYTES);
        // Itemised within the node's quota, counted beyond it (a loop of bad headers must not
        // choose how fast the audit log and the log grow).
        let itemised = self.audit_member(
            node,
            &self.fingerprint(node),
            AuditEvent::UpdateRejected {
                node: node.to_string(),
                plan_id: plan_id.to_string(),
                round: u64::from(round),
                reason: reason.to_string(),
            },
        );
        if itemised {
            tracing::warn!(node, round, plan = short(plan_id), "rejected update: {reason}");
        }
        // An upload that never named its plan has no watcher to tell, and one for a plan that is
        // not running must not grow (or end) a finished run's history. Only a rejection within the
        // node's quota, and for the round the plan has open, reaches the watchers: a node choosing
        // a new round number for each header must not choose how large the history grows.
        let open_round = self.rounds.read().unwrap_or_else(|p| p.into_inner()).get(plan_id).map(|i| i.round);
        if plan_id.is_empty() || !itemised || open_round != Some(round) || !self.is_running(plan_id) {
            return status;
        }
        let Ok(plan_id) = PlanId::parse(plan_id) else {
            return status;
        };
        self.publish(
            &plan_id,
            plan_event::Kind::UpdateRejected(proto::UpdateRejected {
                round,
                node: node.to_string(),
                reason: reason.into_owned(),
            }),
        );
        status
    }
}
