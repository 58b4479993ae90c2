//! The event history a late watcher replays (`WatchPlan` right after `SubmitPlan`, or an hour into
//! the run), bounded in both directions: at most `limits.events_per_run` events per run and
//! `limits.runs_in_memory` runs.
//!
//! A run's history drops its oldest events first, so the newest (and the run's end, always its
//! last event) are what a late watcher gets; a watcher that was subscribed all along sees every
//! event from the broadcast. Members cannot push a run's end out: nothing is kept after a run's
//! `PlanFinished` (a watcher stops there anyway), eviction never takes it, and a node's rejected
//! updates are kept only for the first [`REJECTIONS_PER_NODE_ROUND`] per round, its decisions for the
//! first [`DECISIONS_PER_NODE_RUN`] of a run. Runs beyond the bound go oldest-finished first; the running run is
//! never dropped, so its watchers always find it. Events for a run that is not kept create
//! nothing: only a run the driver started ([`History::start`]) has a history.

use std::collections::{HashMap, VecDeque};

/// `UpdateRejected` events kept (and broadcast) per node per round of a run; the rest are
/// counted. A watcher learns that a node keeps failing from the first few; more would only let one
/// node flood the run's bounded history.
pub(super) const REJECTIONS_PER_NODE_ROUND: u32 = 16;

/// `NodeDecision` events kept (broadcast, and stored with their decision row) per node per run.
/// An honest node answers an offer once, and again only when it reconnects or its policy
/// changes; a node that flips between accept and refuse as fast as it can call must not choose
/// how many rows the store writes. Beyond this, its decisions still count in the engine (and in
/// the audit log, within its quota), but watchers and `plan status` show the last one kept.
pub(super) const DECISIONS_PER_NODE_RUN: u32 = 16;

use sanctum_protocol::proto::{PlanEvent, plan_event};

/// One run's kept events.
#[derive(Debug, Default)]
struct RunEvents {
    events: VecDeque<PlanEvent>,
    /// Whether its `PlanFinished` was published (only finished runs are ever dropped).
    finished: bool,
    /// Events dropped to stay within the bound (said once in the log, counted here).
    dropped: u64,
    /// `UpdateRejected` events seen per (node, round); bounded by the run's participants × rounds.
    rejections: HashMap<(String, u32), u32>,
    /// `NodeDecision` events seen per node; bounded by the run's offered nodes.
    decisions: HashMap<String, u32>,
}

/// Every kept run's events, in order, with the order runs started in.
#[derive(Debug)]
pub(super) struct History {
    per_run: usize,
    max_runs: usize,
    runs: HashMap<String, RunEvents>,
    /// Run ids, oldest first; the same keys as `runs`.
    order: VecDeque<String>,
}

impl History {
    /// An empty history keeping `per_run` events of at most `max_runs` runs (both at least 1).
    pub(super) fn new(per_run: usize, max_runs: usize) -> Self {
        Self { per_run: per_run.max(1), max_runs: max_runs.max(1), runs: HashMap::new(), order: VecDeque::new() }
    }

    /// A run started: from now on its events are kept. Drops the oldest finished runs beyond the
    /// bound (never a running one).
    pub(super) fn start(&mut self, run: &str) {
        if self.runs.contains_key(run) {
            return;
        }
        self.runs.insert(run.to_string(), RunEvents::default());
        self.order.push_back(run.to_string());
        while self.runs.len() > self.max_runs {
            let Some(pos) = self.order.iter().position(|r| self.runs.get(r).is_some_and(|e| e.finished)) else {
                // Every kept run is still running (one at a time today): keep them all.
                break;
            };
            if let Some(old) = self.order.remove(pos) {
                self.runs.remove(&old);
            }
        }
    }

    /// Appends an event of a kept run and says whether it was kept (then it is to be broadcast).
    /// Dropped: an event of a run not kept, any event after its run's end, and a node's rejected
    /// updates beyond [`REJECTIONS_PER_NODE_ROUND`] in a round.
    pub(super) fn push(&mut self, run: &str, ev: PlanEvent) -> bool {
        let Some(kept) = self.runs.get_mut(run) else {
            return false;
        };
        if kept.finished {
            return false;
        }
        match &ev.kind {
            Some(plan_event::Kind::PlanFinished(_)) => kept.finished = true,
            Some(plan_event::Kind::UpdateRejected(r)) => {
                let n = kept.rejections.entry((r.node.clone(), r.round)).or_insert(0);
                *n = n.saturating_add(1);
                if *n > REJECTIONS_PER_NODE_ROUND {
                    return false;
                }
            }
            Some(plan_event::Kind::NodeDecision(d)) => {
                let n = kept.decisions.entry(d.node.clone()).or_insert(0);
                *n = n.saturating_add(1);
                if *n > DECISIONS_PER_NODE_RUN {
                    return false;
                }
            }
            _ => {}
        }
        if kept.events.len() >= self.per_run {
            // The oldest event that is not the run's end (only the last can be, and only once
            // finished, when nothing more is pushed; checked all the same).
            let pos = kept.events.iter().position(|e| !matches!(e.kind, Some(plan_event::Kind::PlanFinished(_))));
            if let Some(pos) = pos {
                kept.events.remove(pos);
            }
            kept.dropped += 1;
            if kept.dropped == 1 {
                tracing::warn!(
                    run,
                    limit = self.per_run,
                    "run has more events than limits.events_per_run; late watchers get the newest"
                );
            }
        }
        kept.events.push_back(ev);
        true
    }

    /// A kept run's events, oldest first (empty for a run not kept).
    pub(super) fn events(&self, run: &str) -> Vec<PlanEvent> {
        self.runs.get(run).map(|r| r.events.iter().cloned().collect()).unwrap_or_default()
    }

    /// Whether a run's events are kept (the name `WatchPlan` uses, as on the map it replaced).
    pub(super) fn contains_key(&self, run: &str) -> bool {
        self.runs.contains_key(run)
    }
}

#[cfg(test)]
mod tests {
    use sanctum_protocol::proto::{PlanFinished, RoundOpened, UpdateRejected};

    use super::*;

    fn opened(round: u32) -> PlanEvent {
        PlanEvent { kind: Some(plan_event::Kind::RoundOpened(RoundOpened { round, ..Default::default() })) }
    }

    fn finished() -> PlanEvent {
        PlanEvent { kind: Some(plan_event::Kind::PlanFinished(PlanFinished::default())) }
    }

    fn rounds(h: &History, run: &str) -> Vec<u32> {
        h.events(run)
            .into_iter()
            .filter_map(|e| match e.kind {
                Some(plan_event::Kind::RoundOpened(r)) => Some(r.round),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_run_keeps_its_newest_events_and_its_end() {
        let mut h = History::new(3, 4);
        h.start("r");
        for round in 1..=10 {
            h.push("r", opened(round));
        }
        assert_eq!(rounds(&h, "r"), [8, 9, 10]);
        h.push("r", finished());
        let ev = h.events("r");
        assert_eq!(ev.len(), 3);
        assert!(matches!(ev[2].kind, Some(plan_event::Kind::PlanFinished(_))), "the run's end is never lost");
    }

    fn rejected(node: &str, round: u32) -> PlanEvent {
        let r = UpdateRejected { round, node: node.into(), reason: "bad header".into() };
        PlanEvent { kind: Some(plan_event::Kind::UpdateRejected(r)) }
    }

    #[test]
    fn nothing_after_a_runs_end_can_push_the_end_out() {
        let mut h = History::new(3, 4);
        h.start("r");
        h.push("r", opened(1));
        assert!(h.push("r", finished()));
        for _ in 0..1000 {
            assert!(!h.push("r", rejected("rogue", 1)), "junk after the end is neither kept nor broadcast");
            assert!(!h.push("r", opened(2)));
        }
        let ev = h.events("r");
        assert_eq!(ev.len(), 2);
        assert!(matches!(ev[1].kind, Some(plan_event::Kind::PlanFinished(_))));
    }

    #[test]
    fn a_node_flipping_its_answer_is_kept_for_its_first_few_decisions_of_a_run() {
        let decided = |node: &str, accepted: bool| PlanEvent {
            kind: Some(plan_event::Kind::NodeDecision(sanctum_protocol::proto::NodeDecision {
                node: node.into(),
                accepted,
                ..Default::default()
            })),
        };
        let mut h = History::new(1000, 4);
        h.start("r");
        let kept = (0..500).filter(|i| h.push("r", decided("rogue", i % 2 == 0))).count();
        assert_eq!(kept, DECISIONS_PER_NODE_RUN as usize, "500 flips keep (and store) only the first few");
        assert!(h.push("r", decided("honest", true)), "another node has its own allowance");
        h.start("r2");
        assert!(h.push("r2", decided("rogue", true)), "and so has the next run");
    }

    #[test]
    fn one_nodes_rejections_are_kept_only_for_the_first_few_per_round() {
        let mut h = History::new(100, 4);
        h.start("r");
        h.push("r", opened(1));
        let kept = (0..2000).filter(|_| h.push("r", rejected("rogue", 1))).count();
        assert_eq!(kept, REJECTIONS_PER_NODE_ROUND as usize);
        assert!(h.push("r", rejected("honest", 1)), "another node has its own allowance");
        assert!(h.push("r", rejected("rogue", 2)), "and so has the next round");
        assert!(h.push("r", finished()));
        let ev = h.events("r");
        assert_eq!(ev.len(), 1 + 16 + 2 + 1);
        assert!(matches!(ev[0].kind, Some(plan_event::Kind::RoundOpened(_))), "the run's start is still there");
    }

    #[test]
    fn events_of_runs_that_were_never_started_create_nothing() {
        let mut h = History::new(10, 2);
        for i in 0..1000 {
            let rejected = UpdateRejected { round: 1, node: "rogue".into(), reason: "x".repeat(100) };
            h.push(&format!("made-up-{i}"), PlanEvent { kind: Some(plan_event::Kind::UpdateRejected(rejected)) });
        }
        assert!(h.runs.is_empty() && h.order.is_empty());
        assert!(!h.contains_key("made-up-1"));
        assert!(h.events("made-up-1").is_empty());
    }

    #[test]
    fn the_oldest_finished_runs_go_first_and_the_running_one_never() {
        let mut h = History::new(10, 2);
        h.start("a");
        h.push("a", finished());
        h.start("b");
        // "b" is still running when "c" starts: "a" (finished) goes, "b" stays.
        h.start("c");
        assert!(!h.contains_key("a") && h.contains_key("b") && h.contains_key("c"));
        // Nothing finished to drop: the bound waits rather than drop a running run.
        h.start("d");
        assert!(h.contains_key("b") && h.contains_key("c") && h.contains_key("d"));
        h.push("b", finished());
        h.push("c", finished());
        h.start("e");
        assert_eq!(h.order, ["d", "e"], "both finished runs made room, oldest first");
        assert_eq!(h.runs.len(), 2);
        // Starting a kept run again changes nothing.
        h.start("e");
        assert_eq!(h.order, ["d", "e"]);
    }
}
