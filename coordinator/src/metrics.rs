//! The coordinator's Prometheus metrics: one registry and typed handles, incremented where the
//! events happen (the services and the driver call one method each) and encoded as Prometheus /
//! OpenMetrics text for `GET /metrics` on the status listener (`crate::web`).
//!
//! Every label value is the coordinator's own: plan and run ids (64 and 32 hex, made or checked
//! by the coordinator) and a refusal's [`RefusalKind`], a fixed set. A node's reason, metric name
//! or version never becomes a label, so no member can choose how many series a scrape returns;
//! the series grow with the runs of this process only.
//!
//! The same events feed the status page's "rounds over time" ([`Metrics::round_times`]): when
//! each round of a run closed and how long it was open, bounded per run and in runs.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sanctum_protocol::proto::plan_event;

/// Rounds kept per run for the status page's timeline (the newest; a plan of more rounds shows
/// its last [`ROUND_TIMES_PER_RUN`]).
pub const ROUND_TIMES_PER_RUN: usize = 1000;

/// Runs whose round times are kept (the oldest finished run goes first; running ones stay).
pub const RUNS_TIMED: usize = 64;

/// The labels of a per-run series: both ids are the coordinator's own.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    plan: String,
    run: String,
}

/// Why something was refused, as a label: a fixed set, so refusals cannot grow the series.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RefusalKind {
    /// A node declined a plan offer (its policy, budget or model approval said no).
    PlanDeclined,
    /// An upload that broke a rule of its form (size, shape, hash, header): `INVALID_ARGUMENT`.
    UpdateInvalid,
    /// An upload for a round that is not open, a plan not running, or a closed round:
    /// `FAILED_PRECONDITION` (the engine's refusals too).
    UpdateOutOfRound,
    /// An upload that stalled past `limits.upload_idle_timeout_secs`.
    UpdateStalled,
    /// An upload refused for another reason (storage, a revoked certificate, ...).
    UpdateOther,
    /// A round attempt that failed (too few reports, too few nodes connected).
    RoundFailed,
}

impl RefusalKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::PlanDeclined => "plan_declined",
            RefusalKind::UpdateInvalid => "update_invalid",
            RefusalKind::UpdateOutOfRound => "update_out_of_round",
            RefusalKind::UpdateStalled => "update_stalled",
            RefusalKind::UpdateOther => "update_other",
            RefusalKind::RoundFailed => "round_failed",
        }
    }

    /// The kind of a refused upload, from the status code the node is answered with (the
    /// message, which may quote the node, is never looked at).
    pub fn of_upload(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => RefusalKind::UpdateInvalid,
            tonic::Code::FailedPrecondition => RefusalKind::UpdateOutOfRound,
            tonic::Code::DeadlineExceeded => RefusalKind::UpdateStalled,
            _ => RefusalKind::UpdateOther,
        }
    }
}

/// The labels of `sanctum_refusals_total`: a [`RefusalKind`] or a connection refusal's class
/// (`tls::RefusalClass::key`, also a fixed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    kind: &'static str,
}

/// When a run's rounds opened and closed, for the round-duration histogram and the page.
#[derive(Debug, Default)]
struct RunTiming {
    /// The round open now and when it opened (a retry opens it again and restarts the clock).
    open: Option<(u32, Instant)>,
    /// Closed rounds, oldest first, at most [`ROUND_TIMES_PER_RUN`].
    closed: VecDeque<RoundTime>,
    finished: bool,
}

/// One closed round as the page plots it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundTime {
    pub round: u32,
    /// When it closed (Unix ms).
    pub closed_unix_ms: u64,
    /// How long it was open, in seconds (its last attempt); `None` when this process did not see
    /// it open (a round resumed after a restart).
    pub seconds: Option<f64>,
}

/// The registry and its handles; one per coordinator, shared by the services and the driver.
pub struct Metrics {
    registry: Registry,
    rounds_completed: Family<RunLabels, Counter>,
    updates_accepted: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    round_seconds: Histogram,
    upload_seconds: Histogram,
    refusals: Family<RefusalLabels, Counter>,
    connected_nodes: Gauge,
    spool_bytes: Gauge,
    /// Per run (by run id), bounded by [`RUNS_TIMED`].
    timing: Mutex<(HashMap<String, RunTiming>, VecDeque<String>)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters and timings only: a panic elsewhere cannot leave them inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// A registry with every metric registered (names in the README's "Status page and metrics").
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let rounds_completed = Family::<RunLabels, Counter>::default();
        let updates_accepted = Counter::default();
        let bytes_in = Counter::default();
        let bytes_out = Counter::default();
        // 0.5 s to about 2.3 h: a round of a small model on a LAN to a long deadline.
        let round_seconds = Histogram::new(exponential_buckets(0.5, 2.0, 15));
        // 10 ms to about 5.5 min: a few KiB on loopback to a large model over a slow link.
        let upload_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        let refusals = Family::<RefusalLabels, Counter>::default();
        let connected_nodes = Gauge::default();
        let spool_bytes = Gauge::default();
        registry.register(
            "sanctum_rounds_completed",
            "Rounds closed with a new global model since this process started, per plan and run",
            rounds_completed.clone(),
        );
        registry.register(
            "sanctum_updates_accepted",
            "Updates (plain or masked) the engine admitted into a round",
            updates_accepted.clone(),
        );
        registry.register(
            "sanctum_received_bytes",
            "Update payload bytes received from nodes (spooled data chunks)",
            bytes_in.clone(),
        );
        registry.register("sanctum_sent_bytes", "Model bytes sent to nodes (FetchModel chunks)", bytes_out.clone());
        registry.register(
            "sanctum_round_duration_seconds",
            "Time a round was open, from its last opening to its close",
            round_seconds.clone(),
        );
        registry.register(
            "sanctum_upload_duration_seconds",
            "Time an accepted upload took, from its header to the engine's admission",
            upload_seconds.clone(),
        );
        registry.register(
            "sanctum_refusals",
            "Refusals by kind: declined offers, refused uploads, failed rounds, refused connections and calls",
            refusals.clone(),
        );
        registry.register("sanctum_connected_nodes", "Nodes with an open directive stream", connected_nodes.clone());
        registry.register(
            "sanctum_spool_bytes",
            "Bytes in the upload spool, partial uploads and robust round buffers",
            spool_bytes.clone(),
        );
        Self {
            registry,
            rounds_completed,
            updates_accepted,
            bytes_in,
            bytes_out,
            round_seconds,
            upload_seconds,
            refusals,
            connected_nodes,
            spool_bytes,
            timing: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// A plan event as it is published (`Inner::publish_run`, before the run's summary changes,
    /// so a scrape never shows fewer rounds than the summary did before it): counts closed
    /// rounds, times them, counts declined offers and failed rounds.
    pub fn on_event(&self, plan_id: &str, run: &str, kind: &plan_event::Kind) {
        match kind {
            plan_event::Kind::RoundOpened(r) => {
                let mut t = lock(&self.timing);
                Self::timing_of(&mut t, run).open = Some((r.round, Instant::now()));
            }
            plan_event::Kind::RoundClosed(r) => {
                self.rounds_completed.get_or_create(&RunLabels { plan: plan_id.into(), run: run.into() }).inc();
                let mut t = lock(&self.timing);
                let timing = Self::timing_of(&mut t, run);
                let seconds = match timing.open.take() {
                    Some((round, opened)) if round == r.round => Some(opened.elapsed().as_secs_f64()),
                    _ => None,
                };
                if let Some(s) = seconds {
                    self.round_seconds.observe(s);
                }
                if timing.closed.len() >= ROUND_TIMES_PER_RUN {
                    timing.closed.pop_front();
                }
                timing.closed.push_back(RoundTime { round: r.round, closed_unix_ms: now_unix_ms(), seconds });
            }
            plan_event::Kind::NodeDecision(d) if !d.accepted => self.refused(RefusalKind::PlanDeclined),
            plan_event::Kind::RoundFailed(_) => self.refused(RefusalKind::RoundFailed),
            plan_event::Kind::PlanFinished(_) => {
                let mut t = lock(&self.timing);
                let timing = Self::timing_of(&mut t, run);
                timing.open = None;
                timing.finished = true;
            }
            _ => {}
        }
    }

    /// The timing of `run`, created if new; drops the oldest finished runs beyond [`RUNS_TIMED`].
    fn timing_of<'t>(t: &'t mut (HashMap<String, RunTiming>, VecDeque<String>), run: &str) -> &'t mut RunTiming {
        let (map, order) = t;
        if !map.contains_key(run) {
            while map.len() >= RUNS_TIMED {
                let Some(pos) = order.iter().position(|r| map.get(r).is_some_and(|t| t.finished)) else {
                    break;
                };
                if let Some(old) = order.remove(pos) {
                    map.remove(&old);
                }
            }
            order.push_back(run.to_string());
        }
        map.entry(run.to_string()).or_default()
    }

    /// The closed rounds of `run` this process saw, oldest first.
    pub fn round_times(&self, run: &str) -> Vec<RoundTime> {
        lock(&self.timing).0.get(run).map(|t| t.closed.iter().copied().collect()).unwrap_or_default()
    }

    /// One refusal of `kind`.
    pub fn refused(&self, kind: RefusalKind) {
        self.refusals.get_or_create(&RefusalLabels { kind: kind.as_str() }).inc();
    }

    /// Connections and calls refused, by class key (`tls::RefusalClass::key`), as the periodic
    /// refusal report counted them.
    pub fn refused_connections<'a>(&self, by_class: impl IntoIterator<Item = (&'static str, &'a u64)>) {
        for (class, n) in by_class {
            self.refusals.get_or_create(&RefusalLabels { kind: class }).inc_by(*n);
        }
    }

    /// An upload the engine admitted, `started` when its header arrived.
    pub fn update_accepted(&self, started: Instant) {
        self.updates_accepted.inc();
        self.upload_seconds.observe(started.elapsed().as_secs_f64());
    }

    /// Update bytes received.
    pub fn received(&self, bytes: usize) {
        self.bytes_in.inc_by(bytes as u64);
    }

    /// Model bytes sent.
    pub fn sent(&self, bytes: usize) {
        self.bytes_out.inc_by(bytes as u64);
    }

    /// The gauges read at scrape time: nodes connected now and the spool's bytes.
    pub fn set_gauges(&self, connected_nodes: usize, spool_bytes: u64) {
        self.connected_nodes.set(i64::try_from(connected_nodes).unwrap_or(i64::MAX));
        self.spool_bytes.set(i64::try_from(spool_bytes).unwrap_or(i64::MAX));
    }

    /// The registry as OpenMetrics text (which Prometheus reads), ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String does not fail; say so rather than serve half a scrape.
            tracing::error!("metrics: cannot encode: {e}");
            return "# EOF\n".into();
        }
        out
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use sanctum_protocol::proto::{NodeDecision, RoundClosed, RoundOpened};

    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn rounds_are_counted_per_run_and_timed_and_refusals_by_kind_only() {
        let m = Metrics::new();
        let (plan, run) = ("a".repeat(64), "b".repeat(32));
        for round in 1..=3 {
            m.on_event(&plan, &run, &plan_event::Kind::RoundOpened(RoundOpened { round, ..Default::default() }));
            m.on_event(&plan, &run, &plan_event::Kind::RoundClosed(RoundClosed { round, ..Default::default() }));
        }
        let declined =
            NodeDecision { node: "x".into(), accepted: false, reason: "ε cap\" } evil".into(), ..Default::default() };
        m.on_event(&plan, &run, &plan_event::Kind::NodeDecision(declined));
        m.refused(RefusalKind::of_upload(tonic::Code::InvalidArgument));
        m.refused_connections([("handshake_failed", &5u64)]);
        m.received(4096);
        m.sent(100);
        m.update_accepted(Instant::now());
        m.set_gauges(4, 12345);
        let text = m.encode();
        assert_eq!(
            value(&text, &format!("sanctum_rounds_completed_total{{plan=\"{plan}\",run=\"{run}\"}}")),
            Some(3.0),
            "{text}"
        );
        assert_eq!(value(&text, "sanctum_refusals_total{kind=\"plan_declined\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "sanctum_refusals_total{kind=\"update_invalid\"}"), Some(1.0));
        assert_eq!(value(&text, "sanctum_refusals_total{kind=\"handshake_failed\"}"), Some(5.0));
        assert_eq!(value(&text, "sanctum_received_bytes_total"), Some(4096.0));
        assert_eq!(value(&text, "sanctum_sent_bytes_total"), Some(100.0));
        assert_eq!(value(&text, "sanctum_updates_accepted_total"), Some(1.0));
        assert_eq!(value(&text, "sanctum_connected_nodes"), Some(4.0));
        assert_eq!(value(&text, "sanctum_spool_bytes"), Some(12345.0));
        assert_eq!(value(&text, "sanctum_round_duration_seconds_count"), Some(3.0));
        assert!(!text.contains("evil"), "a node's reason never becomes a label");
        assert!(text.ends_with("# EOF\n"));
        let times = m.round_times(&run);
        assert_eq!(times.iter().map(|t| t.round).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(times.iter().all(|t| t.seconds.is_some()));
    }

    #[test]
    fn round_times_are_bounded_in_rounds_and_runs() {
        let m = Metrics::new();
        let closed = |round| plan_event::Kind::RoundClosed(RoundClosed { round, ..Default::default() });
        for round in 1..=(ROUND_TIMES_PER_RUN as u32 + 10) {
            m.on_event("p", "r", &closed(round));
        }
        let times = m.round_times("r");
        assert_eq!(times.len(), ROUND_TIMES_PER_RUN);
        assert_eq!(times[0].round, 11);
        assert_eq!(times[0].seconds, None, "a round this process did not see open has no duration");
        let finished = plan_event::Kind::PlanFinished(Default::default());
        for i in 0..(RUNS_TIMED * 2) {
            let run = format!("run{i}");
            m.on_event("p", &run, &closed(1));
            m.on_event("p", &run, &finished);
        }
        let t = lock(&m.timing);
        assert!(t.0.len() <= RUNS_TIMED && t.1.len() == t.0.len());
    }
}
