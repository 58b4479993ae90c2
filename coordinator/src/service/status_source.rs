//! What the status page and the metrics endpoint read from a running coordinator
//! ([`crate::web::Source`]): a snapshot of the runs, their kept events and the nodes, taken
//! under the locks one at a time (never two at once, so no lock order to keep), and the
//! metrics with their gauges read at the scrape.

use sanctum_protocol::proto::plan_event;

use super::*;
use crate::web::page::{self, NodeView, Refusal, RunView, Snapshot};

impl crate::web::Source for Coordinator {
    fn snapshot(&self) -> Snapshot {
        let inner = &self.inner;
        // The newest runs only: the page lists at most `RUNS_LISTED`.
        let (runs, runs_total) = {
            let plans = lock(&inner.plans);
            (plans.iter().rev().take(page::RUNS_LISTED).cloned().collect::<Vec<_>>(), plans.len())
        };
        let runs = runs
            .into_iter()
            .enumerate()
            .map(|(i, summary)| {
                if i >= page::RUNS_DETAILED {
                    return RunView { summary, ..Default::default() };
                }
                let (events, kept) = {
                    let history = lock(&inner.history);
                    (history.events(&summary.run), history.contains_key(&summary.run))
                };
                let status = crate::status::plan_status(&summary, &events, kept);
                let refusals = refusals(&events);
                let round_times = inner.metrics.round_times(&summary.run);
                RunView { summary, status, round_times, refusals }
            })
            .collect();
        let connected: BTreeSet<NodeName> = lock(&inner.nodes).keys().cloned().collect();
        let seen: Vec<(NodeName, crate::status::NodeSeen)> =
            lock(&inner.seen).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut nodes: std::collections::BTreeMap<String, NodeView> = seen
            .into_iter()
            .map(|(name, s)| {
                let view = NodeView {
                    name: name.to_string(),
                    connected: connected.contains(&name),
                    last_seen_unix_ms: s.last_seen_unix_ms,
                    version: s.version,
                    device: s.device,
                };
                (name.to_string(), view)
            })
            .collect();
        for name in &connected {
            nodes.entry(name.to_string()).or_insert_with(|| NodeView {
                name: name.to_string(),
                connected: true,
                ..Default::default()
            });
        }
        Snapshot {
            now_unix_ms: unix_ms(SystemTime::now()),
            refresh_secs: 0,
            runs,
            runs_total,
            nodes: nodes.into_values().collect(),
        }
    }

    fn metrics_text(&self) -> String {
        let connected = lock(&self.inner.nodes).len();
        self.inner.metrics.set_gauges(connected, self.inner.store.spool_bytes());
        self.inner.metrics.encode()
    }
}

/// The declined offers and rejected updates among a run's kept events, oldest first.
fn refusals(events: &[PlanEvent]) -> Vec<Refusal> {
    events
        .iter()
        .filter_map(|ev| match &ev.kind {
            Some(plan_event::Kind::NodeDecision(d)) if !d.accepted => {
                Some(Refusal { round: 0, node: d.node.clone(), what: "declined the plan", reason: d.reason.clone() })
            }
            Some(plan_event::Kind::UpdateRejected(r)) => Some(Refusal {
                round: r.round,
                node: r.node.clone(),
                what: "update rejected",
                reason: r.reason.clone(),
            }),
            _ => None,
        })
        .collect()
}
