//! How many audit records one member can cause: the first few per (node, event) per period are
//! itemised, the rest only counted, and one summary per suppressed (node, event) is written when
//! the period ends. And how often one member can make the store write its row
//! ([`NodeRowWrites`]).
//!
//! Every audit record is signed and fsync'd. A member's certificate lets it call as often as it
//! likes: a loop of bad upload headers, repeated answers to an offer or a subscribe/disconnect
//! loop would otherwise choose how fast the audit log (and the disk) grows. The period is
//! `limits.refusal_report_secs`, the one the TLS layer's refusal reports use
//! (`sanctum_protocol::tls::refusals`). [`AuditQuota`] is pure: time is an argument.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Records itemised per (node, event) in one period.
pub(super) const ITEMISED_PER_PERIOD: u32 = 16;
/// Distinct (node, event) pairs counted at once. Nodes are consortium members, so this is far
/// above any real count; beyond it, records of new pairs are counted under [`OTHER_NODES`] and
/// never itemised, so the map stays bounded even if the CA issued many certificates.
const MAX_KEYS: usize = 4096;
/// The node name the overflow beyond [`MAX_KEYS`] is counted under.
pub(super) const OTHER_NODES: &str = "(other nodes)";

#[derive(Debug, Default)]
struct Count {
    itemised: u32,
    suppressed: u64,
}

/// Records of one (node, event) not written in a period, to be said in one summary record.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Suppressed {
    pub(super) node: String,
    pub(super) event: &'static str,
    pub(super) count: u64,
    /// How many of that pair were itemised in the period (the summary says where it cut).
    pub(super) itemised: u32,
}

/// Member-caused audit records, counted per (node, event) per period.
#[derive(Debug)]
pub(super) struct AuditQuota {
    period: Duration,
    /// When the current period began (the first record after the last summary).
    started: Option<Instant>,
    counts: HashMap<(String, &'static str), Count>,
}

impl AuditQuota {
    /// A quota whose periods last `period` (at least a second).
    pub(super) fn new(period: Duration) -> Self {
        Self { period: period.max(Duration::from_secs(1)), started: None, counts: HashMap::new() }
    }

    /// Counts a record `node` caused; `true` if it is to be written itemised.
    pub(super) fn admit(&mut self, node: &str, event: &'static str, now: Instant) -> bool {
        self.started.get_or_insert(now);
        let key = if self.counts.len() < MAX_KEYS || self.counts.contains_key(&(node.to_string(), event)) {
            (node.to_string(), event)
        } else {
            (OTHER_NODES.to_string(), event)
        };
        let overflow = key.0 == OTHER_NODES;
        let c = self.counts.entry(key).or_default();
        if !overflow && c.itemised < ITEMISED_PER_PERIOD {
            c.itemised += 1;
            true
        } else {
            c.suppressed += 1;
            false
        }
    }

    /// At the end of a period: the pairs that had records suppressed in it (sorted), and a fresh
    /// period. Before the end, or when nothing was counted: nothing.
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<Suppressed> {
        let Some(started) = self.started else {
            return Vec::new();
        };
        if now.saturating_duration_since(started) < self.period {
            return Vec::new();
        }
        self.started = None;
        let mut due: Vec<Suppressed> = self
            .counts
            .drain()
            .filter(|(_, c)| c.suppressed > 0)
            .map(|((node, event), c)| Suppressed { node, event, count: c.suppressed, itemised: c.itemised })
            .collect();
        due.sort_by(|a, b| (&a.node, a.event).cmp(&(&b.node, b.event)));
        due
    }

    /// The period's length, for the summary record.
    pub(super) fn period(&self) -> Duration {
        self.period
    }
}

/// How often a node can make the coordinator write its row in the store (`nodes list` across
/// restarts). A reconnect loop would otherwise cost one fsync'd transaction per `Subscribe` on
/// the store's one thread, which every round's commit waits behind. A row is written at the
/// node's first connection since this start, again when its version or device changed (at most
/// once per [`NODE_ROW_CHANGED_EVERY`]), and otherwise at most once per
/// [`NODE_ROW_REFRESH_EVERY`] (its last-seen time); between writes the coordinator's memory
/// holds the newest. Pure: time is an argument.
#[derive(Debug, Default)]
pub(super) struct NodeRowWrites {
    /// Per node: when its row was last written, with the version and device written.
    written: HashMap<String, (Instant, String, String)>,
}

/// The least time between two writes of a node's row that says something new.
pub(super) const NODE_ROW_CHANGED_EVERY: Duration = Duration::from_secs(1);
/// The least time between two writes of a node's row that only refresh its last-seen time.
pub(super) const NODE_ROW_REFRESH_EVERY: Duration = Duration::from_secs(60);

impl NodeRowWrites {
    /// Whether `node`'s row, now saying `version` and `device`, is to be written at `now`; if so,
    /// it counts as written. Beyond [`MAX_KEYS`] nodes, a node not yet written is written once
    /// a refresh period, like the others (the map is then cleared and starts again).
    pub(super) fn due(&mut self, node: &str, version: &str, device: &str, now: Instant) -> bool {
        let due = match self.written.get(node) {
            None => true,
            Some((at, v, d)) => {
                let since = now.saturating_duration_since(*at);
                let changed = v != version || d != device;
                since >= NODE_ROW_REFRESH_EVERY || (changed && since >= NODE_ROW_CHANGED_EVERY)
            }
        };
        if due {
            if self.written.len() >= MAX_KEYS && !self.written.contains_key(node) {
                self.written.retain(|_, (at, _, _)| now.saturating_duration_since(*at) < NODE_ROW_REFRESH_EVERY);
                if self.written.len() >= MAX_KEYS {
                    return false;
                }
            }
            self.written.insert(node.to_string(), (now, version.to_string(), device.to_string()));
        }
        due
    }

    /// `node`'s row could not be written after all: its next connection writes it.
    pub(super) fn forget(&mut self, node: &str) {
        self.written.remove(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_records_of_a_period_are_itemised_and_the_rest_summarised_once() {
        let t0 = Instant::now();
        let mut q = AuditQuota::new(Duration::from_secs(60));
        let written = (0..2000).filter(|_| q.admit("rogue", "update_rejected", t0)).count();
        assert_eq!(written, ITEMISED_PER_PERIOD as usize);
        // Another node, or another event of the same node, has its own allowance.
        assert!(q.admit("honest", "update_rejected", t0));
        assert!(q.admit("rogue", "node_connected", t0));
        assert!(q.take_due(t0 + Duration::from_secs(59)).is_empty(), "nothing is due before the period ends");
        let due = q.take_due(t0 + Duration::from_secs(60));
        assert_eq!(
            due,
            [Suppressed { node: "rogue".into(), event: "update_rejected", count: 2000 - 16, itemised: 16 }],
            "one summary, only for the pair that had records suppressed"
        );
        assert!(q.take_due(t0 + Duration::from_secs(600)).is_empty(), "said once");
        // The next period starts with a fresh allowance.
        assert!(q.admit("rogue", "update_rejected", t0 + Duration::from_secs(61)));
    }

    #[test]
    fn the_pairs_counted_at_once_are_bounded() {
        let t0 = Instant::now();
        let mut q = AuditQuota::new(Duration::from_secs(60));
        for i in 0..MAX_KEYS {
            assert!(q.admit(&format!("n{i}"), "node_connected", t0));
        }
        for i in 0..1000 {
            assert!(!q.admit(&format!("new{i}"), "node_connected", t0), "beyond the bound nothing is itemised");
        }
        assert!(q.counts.len() <= MAX_KEYS + 1);
        let due = q.take_due(t0 + Duration::from_secs(60));
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].node.as_str(), due[0].count), (OTHER_NODES, 1000));
        assert!(q.counts.is_empty());
    }

    #[test]
    fn a_reconnect_loop_writes_a_nodes_row_once_a_minute_and_a_change_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut w = NodeRowWrites::default();
        assert!(w.due("a", "0.1", "cpu", t0), "the first connection since the start is written");
        let same = (1..10_000).filter(|i| w.due("a", "0.1", "cpu", t0 + Duration::from_millis(*i))).count();
        assert_eq!(same, 0, "ten seconds of reconnects with nothing new write nothing");
        assert!(w.due("b", "0.1", "cpu", t0), "another node has its own row");
        // A new version is written, but a node alternating versions gets one write a second.
        assert!(w.due("a", "0.2", "cpu", t0 + Duration::from_secs(11)));
        let flips = (0..1000)
            .filter(|i| {
                let v = if i % 2 == 0 { "0.1" } else { "0.2" };
                w.due("a", v, "cpu", t0 + Duration::from_secs(11) + Duration::from_millis(10 * i))
            })
            .count();
        assert!(flips <= 10, "1000 alternations over 10 s wrote {flips} rows");
        assert!(w.due("a", "0.2", "cuda:0", t0 + Duration::from_secs(30)), "a new device after a quiet second");
        assert!(w.due("a", "0.2", "cuda:0", t0 + Duration::from_secs(90)), "the last-seen time once a minute");
        // A write that failed is not counted: the next connection writes the row.
        w.forget("a");
        assert!(w.due("a", "0.2", "cuda:0", t0 + Duration::from_secs(91)));
    }

    #[test]
    fn the_nodes_whose_rows_are_timed_are_bounded() {
        let t0 = Instant::now();
        let mut w = NodeRowWrites::default();
        for i in 0..MAX_KEYS {
            assert!(w.due(&format!("n{i}"), "v", "cpu", t0));
        }
        assert!(!w.due("late", "v", "cpu", t0), "beyond the bound, within the period: not written");
        assert!(w.written.len() <= MAX_KEYS);
        assert!(w.due("late", "v", "cpu", t0 + NODE_ROW_REFRESH_EVERY), "the next period makes room");
        assert!(w.written.len() <= MAX_KEYS);
    }
}
