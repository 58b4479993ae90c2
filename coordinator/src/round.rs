//! The plan and round state machine, without I/O and without a clock: the service feeds it what
//! happened (with the time as an argument) and carries out the [`Action`]s it returns.
//!
//! Length: one state machine. Its phases, their transitions and the invariants between them
//! (who may report, when a round closes, fails or is retried) are read and reviewed together;
//! split, a transition would live apart from the phase it leaves.
//!
//! Phases: recruiting (nodes accept or refuse the plan) → rounds (train, report, aggregate) →
//! evaluation of the final model → finished. Late nodes are dropped from a round at its deadline,
//! and a participant that stops sending heartbeats while it trains is dropped once it has been
//! silent for `heartbeat_timeout`; either takes part in the next round. A round that ends with
//! fewer than `min_nodes` reports (or cannot open with that many connected) is an attempt that
//! failed: the same round opens again, on the same global model, up to `retries` times, and only
//! then does the plan fail, with the last reason.
//!
//! # Heartbeats
//! A participant is watched from its first heartbeat of the attempt until it says it is
//! uploading: before the first one it is fetching the model (or is a node that sends none), and
//! an upload's time depends on its size and the link; the round's deadline bounds both. A
//! heartbeat never moves the deadline. At most one a second counts ([`HEARTBEAT_MIN_GAP`]), but a
//! change of activity counts at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A node's name, as its certificate says.
pub use sanctum_protocol::ids::NodeName;

/// Logical time: milliseconds since the plan's run started (the engine converts its own clock).
/// Plain numbers, so the state serialises and a test moves time by adding to it.
pub type Millis = u64;

/// The parameters of a run that the state machine needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunConfig {
    pub rounds: u32,
    pub min_nodes: usize,
    pub recruit_deadline: Duration,
    pub round_deadline: Duration,
    /// How long the final evaluation waits for nodes.
    pub evaluation_deadline: Duration,
    /// Attempts after a failed one, per round (the plan's `retries`).
    #[serde(default)]
    pub retries: u32,
    /// A watched participant silent this long is dropped from the round (coordinator
    /// `limits.heartbeat_timeout_secs`).
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout: Duration,
}

fn default_heartbeat_timeout() -> Duration {
    Duration::from_secs(30)
}

fn first_attempt() -> u32 {
    1
}

/// Heartbeats closer together than this do not count (and are refused): a node cannot make the
/// coordinator do work at the rate it likes.
pub const HEARTBEAT_MIN_GAP: Millis = sanctum_protocol::HEARTBEAT_MIN_GAP_MS;

/// What a participant says it is doing, in its heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activity {
    Training,
    Uploading,
}

/// A participant's state in the open round, as published to the lead (`ParticipantState`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParticipantPhase {
    Training,
    Uploading,
    /// The deadline passed before its update.
    Late,
    /// Out of the round for the reason given.
    Dropped(String),
}

impl ParticipantPhase {
    /// The state's name in `ParticipantState.state` and `plan status`.
    pub fn name(&self) -> &'static str {
        match self {
            ParticipantPhase::Training => "training",
            ParticipantPhase::Uploading => "uploading",
            ParticipantPhase::Late => "late",
            ParticipantPhase::Dropped(_) => "dropped",
        }
    }

    /// Why, for a drop; empty otherwise.
    pub fn reason(&self) -> &str {
        match self {
            ParticipantPhase::Dropped(why) => why,
            ParticipantPhase::Late => "the round's deadline passed before its update",
            _ => "",
        }
    }
}

/// Why a heartbeat did not count; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatRefused {
    #[error("no round is open")]
    NoOpenRound,
    #[error("heartbeat is for round {got} but round {open} is open")]
    WrongRound { got: u32, open: u32 },
    #[error("'{0}' is not a participant of this round (or was dropped from it)")]
    NotParticipant(NodeName),
    #[error("at most one heartbeat a second counts")]
    TooFrequent,
}

/// What the service must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the plan offer to these nodes.
    Offer(Vec<NodeName>),
    /// Publish the current global model and ask these nodes to train on it.
    OpenRound { round: u32, participants: Vec<NodeName>, deadline: Millis },
    /// Offer the plan again to a node that accepted it and reconnected.
    Reoffer(NodeName),
    /// Send the open round again to a participant that reconnected.
    Rejoin { node: NodeName, round: u32, deadline: Millis },
    /// The round is over: aggregate what was accepted, then call [`PlanRun::round_aggregated`].
    CloseRound { round: u32, reported: Vec<NodeName>, dropped: Vec<NodeName> },
    /// An attempt at `round` failed (below `min_nodes`): tell the lead and the audit log. When
    /// `retrying`, an `OpenRound` for the same round follows (now or once enough nodes are
    /// connected); otherwise `Finish` follows.
    RoundFailed { round: u32, attempt: u32, reason: String, retrying: bool },
    /// A participant of the open round changed state (never sent for a repeated heartbeat).
    Participant { round: u32, node: NodeName, phase: ParticipantPhase },
    /// Ask these nodes to evaluate the final global model.
    Evaluate(Vec<NodeName>),
    /// The plan is over.
    Finish { success: bool, reason: String },
}

/// Why an update is not admitted into the round.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("no round is open")]
    NoOpenRound,
    #[error("update is for round {got} but round {open} is open")]
    WrongRound { got: u32, open: u32 },
    #[error("'{0}' is not a participant of this round")]
    NotParticipant(NodeName),
    #[error("'{0}' already sent its update for this round")]
    Duplicate(NodeName),
    #[error("the round's deadline passed")]
    Late,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Phase {
    Recruiting {
        deadline: Millis,
    },
    Training {
        round: u32,
        participants: BTreeSet<NodeName>,
        reported: BTreeSet<NodeName>,
        /// Participants that can no longer report this round (secure aggregation went on without
        /// them, or their heartbeats stopped); they are listed as dropped when it closes.
        left: BTreeSet<NodeName>,
        deadline: Millis,
        /// 1 for the first attempt at this round, +1 for each retry.
        #[serde(default = "first_attempt")]
        attempt: u32,
        /// Each participant's last heartbeat that counted, and what it said.
        #[serde(default)]
        heard: BTreeMap<NodeName, (Millis, Activity)>,
        /// Why each participant that left did (for the failure's reason).
        #[serde(default)]
        why: BTreeMap<NodeName, String>,
    },
    /// An attempt at `round` failed and another is due: it opens as soon as `min_nodes` accepted
    /// nodes are connected, or fails in turn at `until`.
    Retrying {
        round: u32,
        attempt: u32,
        until: Millis,
    },
    Aggregating {
        round: u32,
    },
    Evaluating {
        pending: BTreeSet<NodeName>,
        deadline: Millis,
        /// Nodes asked that went away before reporting: no longer waited for, but their report
        /// still counts if it comes (a node usually finishes the directive in hand, report
        /// included, before it sees its stream died), and one that comes back while the
        /// evaluation is still waiting for others without having reported is asked again.
        #[serde(default)]
        away: BTreeSet<NodeName>,
    },
    Finished,
}

/// `now + wait` in logical milliseconds, saturating: a deadline past `u64::MAX` ms (585 million
/// years) is no deadline. Plans bound their deadlines (`plan::limits::MAX_DEADLINE_SECS`, 30 days).
fn later(now: Millis, wait: Duration) -> Millis {
    now.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
}

/// One plan's progress.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanRun {
    cfg: RunConfig,
    phase: Phase,
    /// Nodes the plan was offered to.
    offered: BTreeSet<NodeName>,
    /// Nodes that accepted; only they ever take part.
    accepted: BTreeSet<NodeName>,
    /// Nodes that refused, with their reason.
    refused: BTreeMap<NodeName, String>,
    /// Accepted nodes whose connection is currently up.
    online: BTreeSet<NodeName>,
    rounds_completed: u32,
    /// A resumed run: only these nodes (those that had accepted before the restart) are offered
    /// it. `None` for a run recruiting from scratch.
    #[serde(default)]
    eligible: Option<BTreeSet<NodeName>>,
    /// A resumed run that no node had accepted yet (the coordinator stopped while recruiting):
    /// it recruits anew and waits for `min_nodes` acceptances until the recruiting deadline, since
    /// the nodes come back one by one after the restart.
    #[serde(default)]
    recruit_anew: bool,
}

impl PlanRun {
    /// Starts recruiting among the nodes connected now.
    pub fn start(cfg: RunConfig, connected: impl IntoIterator<Item = NodeName>, now: Millis) -> (Self, Vec<Action>) {
        let offered: BTreeSet<NodeName> = connected.into_iter().collect();
        let run = Self {
            phase: Phase::Recruiting { deadline: later(now, cfg.recruit_deadline) },
            cfg,
            offered: offered.clone(),
            accepted: BTreeSet::new(),
            refused: BTreeMap::new(),
            online: offered.clone(),
            rounds_completed: 0,
            eligible: None,
            recruit_anew: false,
        };
        let actions = if offered.is_empty() { vec![] } else { vec![Action::Offer(offered.into_iter().collect())] };
        (run, actions)
    }

    /// Rounds whose aggregate was applied.
    pub fn rounds_completed(&self) -> u32 {
        self.rounds_completed
    }

    /// Whether the plan is over.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// The round currently collecting updates.
    pub fn open_round(&self) -> Option<u32> {
        match &self.phase {
            Phase::Training { round, .. } => Some(*round),
            _ => None,
        }
    }

    /// Nodes that accepted the plan (and did not leave it since).
    pub fn accepted(&self) -> &BTreeSet<NodeName> {
        &self.accepted
    }

    /// A run restored from a checkpoint after `rounds_completed` rounds: the nodes that had
    /// accepted are offered it again as they connect (a restart of the coordinator closed their
    /// streams) and the next round opens once they have answered, or at the recruiting deadline
    /// with those that did. Only they may take part: a node that refused, or never answered,
    /// stays out, as it would have had the coordinator not restarted.
    pub fn resume(
        cfg: RunConfig,
        accepted: BTreeSet<NodeName>,
        refused: BTreeMap<NodeName, String>,
        rounds_completed: u32,
        connected: impl IntoIterator<Item = NodeName>,
        now: Millis,
    ) -> (Self, Vec<Action>) {
        let online: BTreeSet<NodeName> = connected.into_iter().collect();
        // Stopped before any node accepted: recruit anew among every node that connects.
        let recruit_anew = accepted.is_empty();
        let offered: BTreeSet<NodeName> =
            if recruit_anew { online.clone() } else { online.intersection(&accepted).cloned().collect() };
        let run = Self {
            phase: Phase::Recruiting { deadline: later(now, cfg.recruit_deadline) },
            cfg,
            offered: offered.clone(),
            accepted: BTreeSet::new(),
            refused,
            online,
            rounds_completed,
            eligible: (!recruit_anew).then_some(accepted),
            recruit_anew,
        };
        let actions = if offered.is_empty() { vec![] } else { vec![Action::Offer(offered.into_iter().collect())] };
        (run, actions)
    }

    /// Nodes that refused the plan and why.
    pub fn refusals(&self) -> &BTreeMap<NodeName, String> {
        &self.refused
    }

    /// A node connected (or reconnected).
    pub fn node_connected(&mut self, node: &NodeName, now: Millis) -> Vec<Action> {
        self.online.insert(node.clone());
        if let Phase::Recruiting { .. } = self.phase {
            if self.eligible.as_ref().is_some_and(|e| !e.contains(node)) {
                return self.tick(now);
            }
            if self.offered.insert(node.clone()) {
                return vec![Action::Offer(vec![node.clone()])];
            }
            return self.tick(now);
        }
        if self.is_finished() || !self.accepted.contains(node) {
            return self.tick(now);
        }
        // A node that accepted and comes back (a restart loses what it knew) is offered the plan
        // again first, so the directives that follow make sense to it; if it now refuses it
        // leaves the plan (see `decision`).
        let mut actions = vec![Action::Reoffer(node.clone())];
        // A participant of the open round gets the round again: it may still report before the
        // deadline (a second upload is refused as a duplicate).
        if let Phase::Training { round, participants, reported, left, deadline, .. } = &self.phase
            && participants.contains(node)
            && !reported.contains(node)
            && !left.contains(node)
            && now < *deadline
        {
            actions.push(Action::Rejoin { node: node.clone(), round: *round, deadline: *deadline });
        }
        // So is a node asked for the final evaluation that went away before reporting, while the
        // evaluation still waits for others: its report counts like any other.
        if let Phase::Evaluating { pending, away, deadline } = &mut self.phase
            && now < *deadline
            && away.remove(node)
        {
            pending.insert(node.clone());
            actions.push(Action::Evaluate(vec![node.clone()]));
        }
        // A retry waiting for nodes may open now.
        actions.extend(self.advance(now));
        actions
    }

    /// A node's connection went away.
    pub fn node_disconnected(&mut self, node: &NodeName, now: Millis) -> Vec<Action> {
        self.online.remove(node);
        if let Phase::Evaluating { pending, away, .. } = &mut self.phase
            && pending.remove(node)
        {
            away.insert(node.clone());
        }
        // A participant that went away no longer holds up its round (see `advance`); it is
        // listed as dropped when the round closes.
        self.advance(now)
    }

    /// A node accepted or refused the plan.
    pub fn decision(&mut self, node: &NodeName, accept: bool, reason: &str, now: Millis) -> Vec<Action> {
        self.decide(node, accept, reason, now).unwrap_or_default()
    }

    /// A node accepted or refused the plan: `Some` (with what to do) if the answer counted,
    /// `None` if it was discarded (a repeat of the node's standing answer, an answer from a node
    /// the plan was not offered to, an acceptance once recruiting is over). The service audits
    /// and publishes only a decision that counted, so repeating an answer costs nothing.
    pub fn decide(&mut self, node: &NodeName, accept: bool, reason: &str, now: Millis) -> Option<Vec<Action>> {
        if !matches!(self.phase, Phase::Recruiting { .. }) {
            // An answer to a re-offer: a node that now refuses leaves the plan.
            if !accept && self.accepted.remove(node) {
                self.refused.insert(node.clone(), reason.to_string());
                return Some(self.advance(now));
            }
            return None;
        }
        if !self.offered.contains(node) {
            return None;
        }
        let repeat = if accept { self.accepted.contains(node) } else { self.refused.contains_key(node) };
        if repeat {
            return None;
        }
        if accept {
            self.refused.remove(node);
            self.accepted.insert(node.clone());
        } else {
            self.accepted.remove(node);
            self.refused.insert(node.clone(), reason.to_string());
        }
        Some(self.advance(now))
    }

    /// Whether [`PlanRun::admit_update`] would admit this update now, changing nothing: the
    /// service asks first when admitting has a side effect it cannot undo (a masked input joins
    /// the secure-aggregation sum), so nothing is in the sum of a node told it was refused.
    pub fn can_admit(&self, node: &NodeName, round: u32, now: Millis) -> Result<(), Rejection> {
        let Phase::Training { round: open, participants, reported, left, deadline, .. } = &self.phase else {
            return Err(Rejection::NoOpenRound);
        };
        if round != *open {
            return Err(Rejection::WrongRound { got: round, open: *open });
        }
        if reported.contains(node) {
            return Err(Rejection::Duplicate(node.clone()));
        }
        if !participants.contains(node) || left.contains(node) {
            return Err(Rejection::NotParticipant(node.clone()));
        }
        if now >= *deadline {
            return Err(Rejection::Late);
        }
        Ok(())
    }

    /// Asks whether an update may enter the round; on `Ok` the node counts as reported and the
    /// service must apply the update before anything else happens.
    pub fn admit_update(&mut self, node: &NodeName, round: u32, now: Millis) -> Result<Vec<Action>, Rejection> {
        self.can_admit(node, round, now)?;
        if let Phase::Training { reported, .. } = &mut self.phase {
            reported.insert(node.clone());
        }
        Ok(self.advance(now))
    }

    /// A participant can no longer report in the open round (it missed a secure-aggregation step):
    /// the round stops waiting for it.
    pub fn leave_round(&mut self, node: &NodeName, now: Millis) -> Vec<Action> {
        if let Phase::Training { participants, reported, left, why, .. } = &mut self.phase
            && participants.contains(node)
            && !reported.contains(node)
        {
            left.insert(node.clone());
            why.entry(node.clone()).or_insert_with(|| "it missed a secure-aggregation step".into());
        }
        self.advance(now)
    }

    /// How often a participant should send heartbeats: a third of the timeout (so two may be lost
    /// before it is dropped), never more often than one counts.
    pub fn heartbeat_interval(&self) -> Millis {
        let timeout = u64::try_from(self.cfg.heartbeat_timeout.as_millis()).unwrap_or(u64::MAX);
        (timeout / 3).max(HEARTBEAT_MIN_GAP)
    }

    /// A participant says it is alive and what it is doing. Counts at most once a second; a
    /// change of activity is published. Never moves the deadline.
    pub fn heartbeat(
        &mut self,
        node: &NodeName,
        round: u32,
        activity: Activity,
        now: Millis,
    ) -> Result<Vec<Action>, HeartbeatRefused> {
        let Phase::Training { round: open, participants, reported, left, heard, .. } = &mut self.phase else {
            return Err(HeartbeatRefused::NoOpenRound);
        };
        if round != *open {
            return Err(HeartbeatRefused::WrongRound { got: round, open: *open });
        }
        if !participants.contains(node) || left.contains(node) || reported.contains(node) {
            return Err(HeartbeatRefused::NotParticipant(node.clone()));
        }
        let previous = heard.get(node).copied();
        // A change of activity counts at once (an "uploading" right after a short training must
        // stop the silence watch, or a long upload would be dropped as silent); the service's
        // per-node bucket bounds how often a node can flip.
        if previous.is_some_and(|(at, a)| a == activity && now < at.saturating_add(HEARTBEAT_MIN_GAP)) {
            return Err(HeartbeatRefused::TooFrequent);
        }
        heard.insert(node.clone(), (now, activity));
        let round = *open;
        let mut actions = Vec::new();
        if previous.map(|(_, a)| a) != Some(activity) {
            let phase = match activity {
                Activity::Training => ParticipantPhase::Training,
                Activity::Uploading => ParticipantPhase::Uploading,
            };
            actions.push(Action::Participant { round, node: node.clone(), phase });
        }
        Ok(actions)
    }

    /// The attempt at the open round (1 for the first), or `None` with no round open.
    pub fn attempt(&self) -> Option<u32> {
        match &self.phase {
            Phase::Training { attempt, .. } => Some(*attempt),
            _ => None,
        }
    }

    /// The service finished aggregating `round`.
    pub fn round_aggregated(&mut self, round: u32, now: Millis) -> Vec<Action> {
        if !matches!(self.phase, Phase::Aggregating { round: r } if r == round) {
            return vec![];
        }
        self.rounds_completed = round;
        self.next_round_or_evaluate(now)
    }

    /// Opens the round after the last completed one, or, after the last round, asks the
    /// participants to evaluate the final model.
    fn next_round_or_evaluate(&mut self, now: Millis) -> Vec<Action> {
        if self.rounds_completed < self.cfg.rounds {
            return self.open_round_now(self.rounds_completed + 1, now);
        }
        let pending: BTreeSet<NodeName> = self.accepted.intersection(&self.online).cloned().collect();
        self.phase = Phase::Evaluating {
            pending: pending.clone(),
            deadline: later(now, self.cfg.evaluation_deadline),
            away: BTreeSet::new(),
        };
        let mut actions = vec![Action::Evaluate(pending.into_iter().collect())];
        actions.extend(self.advance(now));
        actions
    }

    /// The service could not aggregate (no usable update, or its storage failed).
    pub fn aggregation_failed(&mut self, reason: &str) -> Vec<Action> {
        self.finish(false, reason.to_string())
    }

    /// Whether the final evaluation is waiting for `node`'s report.
    pub fn awaits_evaluation(&self, node: &NodeName) -> bool {
        matches!(&self.phase, Phase::Evaluating { pending, away, .. } if pending.contains(node) || away.contains(node))
    }

    /// A node reported its evaluation of the final model.
    pub fn evaluated(&mut self, node: &NodeName, now: Millis) -> Vec<Action> {
        if let Phase::Evaluating { pending, away, .. } = &mut self.phase {
            pending.remove(node);
            away.remove(node);
        }
        self.advance(now)
    }

    /// The lead cancelled the plan.
    pub fn cancel(&mut self, reason: &str) -> Vec<Action> {
        if self.is_finished() {
            return vec![];
        }
        self.finish(false, reason.to_string())
    }

    /// Time passed: deadlines may have expired.
    pub fn tick(&mut self, now: Millis) -> Vec<Action> {
        self.advance(now)
    }

    fn open_round_now(&mut self, round: u32, now: Millis) -> Vec<Action> {
        self.open_attempt(round, 1, now)
    }

    /// Opens attempt `attempt` at `round` with the accepted nodes connected now, or fails it.
    fn open_attempt(&mut self, round: u32, attempt: u32, now: Millis) -> Vec<Action> {
        let participants: BTreeSet<NodeName> = self.accepted.intersection(&self.online).cloned().collect();
        if participants.len() < self.cfg.min_nodes {
            let reason = format!(
                "round {round} cannot start: {} of the {} nodes that accepted are connected, min_nodes is {}",
                participants.len(),
                self.accepted.len(),
                self.cfg.min_nodes
            );
            return self.fail_attempt(round, attempt, reason, now);
        }
        let deadline = later(now, self.cfg.round_deadline);
        self.phase = Phase::Training {
            round,
            participants: participants.clone(),
            reported: BTreeSet::new(),
            left: BTreeSet::new(),
            deadline,
            attempt,
            heard: BTreeMap::new(),
            why: BTreeMap::new(),
        };
        vec![Action::OpenRound { round, participants: participants.into_iter().collect(), deadline }]
    }

    /// Attempt `attempt` at `round` failed: another follows while retries remain (it opens once
    /// `min_nodes` accepted nodes are connected, waiting at most a round's deadline for them);
    /// otherwise the plan fails with this reason.
    fn fail_attempt(&mut self, round: u32, attempt: u32, reason: String, now: Millis) -> Vec<Action> {
        let retrying = attempt <= self.cfg.retries;
        let mut actions = vec![Action::RoundFailed { round, attempt, reason: reason.clone(), retrying }];
        if retrying {
            self.phase = Phase::Retrying { round, attempt: attempt + 1, until: later(now, self.cfg.round_deadline) };
            actions.extend(self.advance(now));
        } else {
            let reason = if attempt > 1 { format!("{reason} (attempt {attempt}; no retry left)") } else { reason };
            actions.extend(self.finish(false, reason));
        }
        actions
    }

    /// Drops the watched participants of the open round whose heartbeats stopped.
    fn drop_silent(&mut self, now: Millis) -> Vec<Action> {
        let timeout = u64::try_from(self.cfg.heartbeat_timeout.as_millis()).unwrap_or(u64::MAX);
        let Phase::Training { round, reported, left, heard, why, .. } = &mut self.phase else {
            return vec![];
        };
        let silent: Vec<(NodeName, Millis)> = heard
            .iter()
            .filter(|(n, (at, activity))| {
                *activity == Activity::Training
                    && now >= at.saturating_add(timeout)
                    && !reported.contains(*n)
                    && !left.contains(*n)
            })
            .map(|(n, (at, _))| (n.clone(), *at))
            .collect();
        let mut actions = Vec::new();
        for (node, at) in silent {
            let reason = format!("no heartbeat for {} s", (now - at) / 1000);
            left.insert(node.clone());
            why.insert(node.clone(), reason.clone());
            actions.push(Action::Participant { round: *round, node, phase: ParticipantPhase::Dropped(reason) });
        }
        actions
    }

    fn finish(&mut self, success: bool, reason: String) -> Vec<Action> {
        self.phase = Phase::Finished;
        vec![Action::Finish { success, reason }]
    }

    fn advance(&mut self, now: Millis) -> Vec<Action> {
        match &self.phase {
            Phase::Recruiting { deadline } => {
                let answered = |n: &NodeName| self.accepted.contains(n) || self.refused.contains_key(n);
                let undecided = match &self.eligible {
                    // A resumed run waits for every node that had accepted, connected or not: after
                    // a coordinator restart they come back one by one, with jittered backoff.
                    Some(eligible) => eligible.iter().any(|n| !answered(n)),
                    None => {
                        self.offered.iter().filter(|n| self.online.contains(*n)).any(|n| !answered(n))
                            || (self.recruit_anew && self.accepted.len() < self.cfg.min_nodes)
                    }
                };
                if undecided && now < *deadline {
                    return vec![];
                }
                if self.accepted.len() >= self.cfg.min_nodes {
                    return self.next_round_or_evaluate(now);
                }
                if !undecided || now >= *deadline {
                    let mut reason = format!(
                        "{} node(s) accepted the plan, min_nodes is {}",
                        self.accepted.len(),
                        self.cfg.min_nodes
                    );
                    for (node, why) in &self.refused {
                        reason.push_str(&format!("; {node} refused: {why}"));
                    }
                    return self.finish(false, reason);
                }
                vec![]
            }
            Phase::Training { .. } => {
                let mut actions = self.drop_silent(now);
                let Phase::Training { round, participants, reported, left, deadline, attempt, why, .. } = &self.phase
                else {
                    return actions;
                };
                // A participant that went away or left the plan or the round no longer holds it up.
                let all_in = participants.iter().all(|p| {
                    reported.contains(p) || !self.online.contains(p) || !self.accepted.contains(p) || left.contains(p)
                });
                if !all_in && now < *deadline {
                    return actions;
                }
                let (round, attempt) = (*round, *attempt);
                let reported_list: Vec<NodeName> = reported.iter().cloned().collect();
                let dropped: Vec<NodeName> = participants.difference(reported).cloned().collect();
                // Why each dropped participant is out, for the lead.
                let mut reasons = Vec::new();
                for p in &dropped {
                    let reason = match why.get(p) {
                        Some(w) => w.clone(),
                        None if !self.accepted.contains(p) => "it left the plan".into(),
                        None if !self.online.contains(p) => "disconnected".into(),
                        None => {
                            actions.push(Action::Participant { round, node: p.clone(), phase: ParticipantPhase::Late });
                            "late (the deadline passed)".into()
                        }
                    };
                    reasons.push(format!("{p} ({reason})"));
                }
                if reported.len() < self.cfg.min_nodes {
                    let reason = format!(
                        "round {round} failed: {} node(s) reported, min_nodes is {}; dropped: {}",
                        reported.len(),
                        self.cfg.min_nodes,
                        if reasons.is_empty() { "none".to_string() } else { reasons.join(", ") }
                    );
                    actions.extend(self.fail_attempt(round, attempt, reason, now));
                    return actions;
                }
                self.phase = Phase::Aggregating { round };
                actions.push(Action::CloseRound { round, reported: reported_list, dropped });
                actions
            }
            Phase::Retrying { round, attempt, until } => {
                let (round, attempt, until) = (*round, *attempt, *until);
                let connected = self.accepted.intersection(&self.online).count();
                if connected >= self.cfg.min_nodes || now >= until {
                    return self.open_attempt(round, attempt, now);
                }
                vec![]
            }
            Phase::Evaluating { pending, deadline, away } => {
                if pending.is_empty() || now >= *deadline {
                    let missing = pending.iter().chain(away.iter()).cloned().collect::<Vec<_>>();
                    let reason = if missing.is_empty() {
                        "completed".to_string()
                    } else {
                        format!("completed; no final evaluation from {}", missing.join(", "))
                    };
                    return self.finish(true, reason);
                }
                vec![]
            }
            Phase::Aggregating { .. } | Phase::Finished => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ids::node;

    fn cfg(rounds: u32, min_nodes: usize) -> RunConfig {
        RunConfig {
            rounds,
            min_nodes,
            recruit_deadline: Duration::from_secs(10),
            round_deadline: Duration::from_secs(30),
            evaluation_deadline: Duration::from_secs(5),
            retries: 0,
            heartbeat_timeout: Duration::from_secs(30),
        }
    }

    fn retrying(rounds: u32, min_nodes: usize, retries: u32) -> RunConfig {
        RunConfig { retries, heartbeat_timeout: Duration::from_secs(5), ..cfg(rounds, min_nodes) }
    }

    /// A run of `c` with a, b and c accepted and round 1 open at 0.
    fn three_in_round_one(c: RunConfig) -> PlanRun {
        let (mut run, _) = PlanRun::start(c, names(&["a", "b", "c"]), 0);
        for n in ["a", "b", "c"] {
            run.decision(&node(n), true, "", 0);
        }
        assert_eq!(run.open_round(), Some(1));
        run
    }

    #[test]
    fn a_round_below_min_nodes_is_retried_as_the_same_round_with_the_nodes_connected_then() {
        let mut run = three_in_round_one(retrying(2, 3, 1));
        run.admit_update(&node("a"), 1, 0).unwrap();
        run.admit_update(&node("b"), 1, 0).unwrap();
        // c is late: at the deadline the attempt fails and the same round opens again at once.
        let a = run.tick(30_000);
        match &a[..] {
            [
                Action::Participant { round: 1, node, phase: ParticipantPhase::Late },
                Action::RoundFailed { round: 1, attempt: 1, reason, retrying: true },
                Action::OpenRound { round: 1, participants, deadline: 60_000 },
            ] => {
                assert_eq!(node, "c");
                assert_eq!(
                    reason,
                    "round 1 failed: 2 node(s) reported, min_nodes is 3; dropped: c (late (the deadline passed))"
                );
                assert_eq!(participants, &names(&["a", "b", "c"]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((run.open_round(), run.attempt(), run.rounds_completed()), (Some(1), Some(2), 0));
        // The retry is a fresh attempt: a and b report again (a node re-sends the same bytes).
        run.admit_update(&node("a"), 1, 30_001).unwrap();
        run.admit_update(&node("c"), 1, 30_002).unwrap();
        let a = run.admit_update(&node("b"), 1, 30_003).unwrap();
        assert_eq!(a, vec![Action::CloseRound { round: 1, reported: names(&["a", "b", "c"]), dropped: vec![] }]);
        // The next round starts again at attempt 1 with the full retries.
        assert!(matches!(&run.round_aggregated(1, 30_004)[..], [Action::OpenRound { round: 2, .. }]));
        assert_eq!(run.attempt(), Some(1));
    }

    #[test]
    fn only_when_the_retries_are_spent_does_the_plan_fail_with_the_last_reason() {
        let mut run = three_in_round_one(retrying(2, 3, 1));
        run.admit_update(&node("a"), 1, 0).unwrap();
        assert!(matches!(
            &run.tick(30_000)[..],
            [.., Action::RoundFailed { attempt: 1, retrying: true, .. }, Action::OpenRound { .. }]
        ));
        run.admit_update(&node("a"), 1, 30_000).unwrap();
        run.admit_update(&node("b"), 1, 30_000).unwrap();
        // c goes away in the retry: the round stops waiting and the last attempt fails.
        let a = run.node_disconnected(&node("c"), 31_000);
        match &a[..] {
            [
                Action::RoundFailed { round: 1, attempt: 2, reason, retrying: false },
                Action::Finish { success: false, reason: last },
            ] => {
                assert!(reason.contains("dropped: c (disconnected)"), "{reason}");
                assert_eq!(last, &format!("{reason} (attempt 2; no retry left)"));
            }
            other => panic!("{other:?}"),
        }
        assert!(run.is_finished());
    }

    #[test]
    fn without_retries_a_failed_round_fails_the_plan_at_once_as_before() {
        let mut run = three_in_round_one(cfg(2, 3));
        run.admit_update(&node("a"), 1, 0).unwrap();
        let a = run.tick(30_000);
        assert!(
            matches!(&a[..], [.., Action::RoundFailed { attempt: 1, retrying: false, .. }, Action::Finish { success: false, reason }]
                if reason.starts_with("round 1 failed: 1 node(s) reported, min_nodes is 3; dropped: b (late")),
            "{a:?}"
        );
    }

    #[test]
    fn a_retry_waits_for_enough_connected_nodes_and_fails_in_turn_at_a_round_deadline() {
        let mut run = three_in_round_one(retrying(1, 3, 2));
        run.admit_update(&node("a"), 1, 0).unwrap();
        run.admit_update(&node("b"), 1, 0).unwrap();
        // c crashed: attempt 1 fails at once and attempt 2 cannot open with two connected.
        let a = run.node_disconnected(&node("c"), 1_000);
        assert!(matches!(&a[..], [Action::RoundFailed { attempt: 1, retrying: true, .. }]), "{a:?}");
        assert_eq!(run.open_round(), None, "waiting for a third node");
        assert!(run.tick(20_000).is_empty());
        // c comes back within the wait: offered the plan again, then the round opens with it.
        let a = run.node_connected(&node("c"), 20_000);
        assert!(
            matches!(&a[..], [Action::Reoffer(n), Action::OpenRound { round: 1, participants, .. }] if n == "c" && participants.len() == 3),
            "{a:?}"
        );
        assert_eq!(run.attempt(), Some(2));
        // Attempt 2 fails too (c drops again); attempt 3 cannot open and, at its deadline, fails
        // with the reason that nothing was connected.
        run.admit_update(&node("a"), 1, 21_000).unwrap();
        run.admit_update(&node("b"), 1, 21_000).unwrap();
        assert!(matches!(
            &run.node_disconnected(&node("c"), 22_000)[..],
            [Action::RoundFailed { attempt: 2, retrying: true, .. }]
        ));
        assert!(run.tick(51_999).is_empty());
        let a = run.tick(52_000);
        assert!(
            matches!(&a[..], [Action::RoundFailed { attempt: 3, retrying: false, reason, .. }, Action::Finish { success: false, .. }]
                if reason == "round 1 cannot start: 2 of the 3 nodes that accepted are connected, min_nodes is 3"),
            "{a:?}"
        );
    }

    #[test]
    fn an_uploading_heartbeat_right_after_a_short_training_counts_and_ends_the_silence_watch() {
        let mut run = three_in_round_one(retrying(2, 2, 0));
        assert!(!run.heartbeat(&node("c"), 1, Activity::Training, 1_000).unwrap().is_empty());
        // Training took 10 ms: the change of activity counts at once and is published.
        assert_eq!(
            run.heartbeat(&node("c"), 1, Activity::Uploading, 1_010),
            Ok(vec![Action::Participant { round: 1, node: node("c"), phase: ParticipantPhase::Uploading }])
        );
        // The same activity again within the second does not.
        assert_eq!(run.heartbeat(&node("c"), 1, Activity::Uploading, 1_020), Err(HeartbeatRefused::TooFrequent));
        // Its upload outlasts the heartbeat timeout (5 s): only the deadline bounds it now.
        assert!(run.tick(20_000).is_empty(), "an uploading node is not dropped as silent");
    }

    #[test]
    fn a_participant_silent_past_the_heartbeat_timeout_is_dropped_before_the_deadline() {
        let mut run = three_in_round_one(retrying(2, 2, 0));
        assert_eq!(run.heartbeat_interval(), 1_666, "a third of 5 s");
        // a and c are heard from; b never is (it is fetching, or sends no heartbeats).
        let a = run.heartbeat(&node("a"), 1, Activity::Training, 1_000).unwrap();
        assert_eq!(a, vec![Action::Participant { round: 1, node: node("a"), phase: ParticipantPhase::Training }]);
        assert!(!run.heartbeat(&node("c"), 1, Activity::Training, 1_000).unwrap().is_empty());
        // Repeats count once a second at most and publish nothing.
        assert_eq!(run.heartbeat(&node("a"), 1, Activity::Training, 1_999), Err(HeartbeatRefused::TooFrequent));
        assert_eq!(run.heartbeat(&node("a"), 1, Activity::Training, 2_000), Ok(vec![]));
        assert_eq!(run.heartbeat(&node("a"), 1, Activity::Training, 5_000), Ok(vec![]));
        assert_eq!(
            run.heartbeat(&node("a"), 2, Activity::Training, 5_000),
            Err(HeartbeatRefused::WrongRound { got: 2, open: 1 })
        );
        assert_eq!(
            run.heartbeat(&node("x"), 1, Activity::Training, 5_000),
            Err(HeartbeatRefused::NotParticipant(node("x")))
        );
        run.admit_update(&node("a"), 1, 5_500).unwrap();
        assert!(run.tick(5_999).is_empty(), "c was heard at 1 s: silent for 4.999 s");
        // c has been silent for 5 s: dropped; b (never heard) still holds the round.
        let a = run.tick(6_000);
        assert_eq!(
            a,
            vec![Action::Participant {
                round: 1,
                node: node("c"),
                phase: ParticipantPhase::Dropped("no heartbeat for 5 s".into())
            }]
        );
        assert_eq!(run.admit_update(&node("c"), 1, 6_100), Err(Rejection::NotParticipant(node("c"))));
        assert_eq!(
            run.heartbeat(&node("c"), 1, Activity::Training, 6_100),
            Err(HeartbeatRefused::NotParticipant(node("c")))
        );
        // b says it is uploading: from here only the deadline bounds it, however long it is silent.
        assert!(matches!(
            &run.heartbeat(&node("b"), 1, Activity::Uploading, 7_000).unwrap()[..],
            [Action::Participant { phase: ParticipantPhase::Uploading, .. }]
        ));
        assert!(run.tick(29_999).is_empty(), "a heartbeat never moves the deadline, nor does silence while uploading");
        let a = run.admit_update(&node("b"), 1, 29_999).unwrap();
        assert_eq!(a, vec![Action::CloseRound { round: 1, reported: names(&["a", "b"]), dropped: names(&["c"]) }]);
        // c takes part in the next round, its silence forgotten.
        let a = run.round_aggregated(1, 30_000);
        assert!(matches!(&a[..], [Action::OpenRound { round: 2, participants, .. }] if participants.len() == 3));
        assert!(run.heartbeat(&node("c"), 2, Activity::Training, 30_000).is_ok());
    }

    #[test]
    fn heartbeats_cannot_keep_a_round_past_its_deadline() {
        let mut run = three_in_round_one(retrying(1, 1, 0));
        run.admit_update(&node("a"), 1, 0).unwrap();
        for t in (0..30_000).step_by(1_000) {
            run.heartbeat(&node("b"), 1, Activity::Training, t).unwrap();
            run.heartbeat(&node("c"), 1, Activity::Training, t).unwrap();
        }
        let a = run.tick(30_000);
        assert!(
            matches!(a.last(), Some(Action::CloseRound { dropped, .. }) if dropped == &names(&["b", "c"])),
            "{a:?}"
        );
    }

    fn names(v: &[&str]) -> Vec<NodeName> {
        v.iter().map(|s| node(s)).collect()
    }

    #[test]
    fn full_run_with_all_nodes() {
        let t0: Millis = 0;
        let (mut run, a) = PlanRun::start(cfg(2, 2), names(&["a", "b"]), t0);
        assert_eq!(a, vec![Action::Offer(names(&["a", "b"]))]);
        assert!(run.decision(&node("a"), true, "", t0).is_empty());
        let a = run.decision(&node("b"), true, "", t0);
        assert!(
            matches!(&a[..], [Action::OpenRound { round: 1, participants, .. }] if participants == &names(&["a", "b"]))
        );
        assert!(run.admit_update(&node("a"), 1, t0).unwrap().is_empty());
        assert_eq!(run.admit_update(&node("a"), 1, t0), Err(Rejection::Duplicate(node("a"))));
        let a = run.admit_update(&node("b"), 1, t0).unwrap();
        assert_eq!(a, vec![Action::CloseRound { round: 1, reported: names(&["a", "b"]), dropped: vec![] }]);
        assert_eq!(run.admit_update(&node("a"), 1, t0), Err(Rejection::NoOpenRound));
        let a = run.round_aggregated(1, t0);
        assert!(matches!(&a[..], [Action::OpenRound { round: 2, .. }]));
        assert_eq!(run.admit_update(&node("a"), 1, t0), Err(Rejection::WrongRound { got: 1, open: 2 }));
        run.admit_update(&node("a"), 2, t0).unwrap();
        run.admit_update(&node("b"), 2, t0).unwrap();
        let a = run.round_aggregated(2, t0);
        assert_eq!(a, vec![Action::Evaluate(names(&["a", "b"]))]);
        run.evaluated(&node("a"), t0);
        let a = run.evaluated(&node("b"), t0);
        assert_eq!(a, vec![Action::Finish { success: true, reason: "completed".into() }]);
        assert_eq!(run.rounds_completed(), 2);
    }

    #[test]
    fn a_node_that_leaves_during_the_final_evaluation_and_returns_is_asked_again_and_counted() {
        let t0: Millis = 0;
        let (mut run, _) = PlanRun::start(cfg(1, 2), names(&["a", "b", "c"]), t0);
        for n in ["a", "b", "c"] {
            run.node_connected(&node(n), t0);
            run.decision(&node(n), true, "", t0);
        }
        for n in ["a", "b", "c"] {
            run.admit_update(&node(n), 1, t0).unwrap();
        }
        assert_eq!(run.round_aggregated(1, t0), vec![Action::Evaluate(names(&["a", "b", "c"]))]);
        // `b` goes away before reporting: no longer waited for, but its report would still count.
        assert!(run.node_disconnected(&node("b"), t0).is_empty());
        assert!(run.awaits_evaluation(&node("b")));
        assert!(run.evaluated(&node("a"), t0).is_empty(), "still waiting for c");
        // It comes back while c is still awaited: offered the plan again and asked again.
        let a = run.node_connected(&node("b"), t0 + 10);
        assert_eq!(a, vec![Action::Reoffer(node("b")), Action::Evaluate(names(&["b"]))]);
        assert!(run.awaits_evaluation(&node("b")));
        assert!(run.evaluated(&node("c"), t0 + 20).is_empty(), "and now waited for");
        assert_eq!(
            run.evaluated(&node("b"), t0 + 30),
            vec![Action::Finish { success: true, reason: "completed".into() }]
        );

        // One that never comes back is named when the evaluation ends without it.
        let (mut run, _) = PlanRun::start(cfg(1, 2), names(&["a", "b"]), t0);
        for n in ["a", "b"] {
            run.node_connected(&node(n), t0);
            run.decision(&node(n), true, "", t0);
        }
        for n in ["a", "b"] {
            run.admit_update(&node(n), 1, t0).unwrap();
        }
        assert_eq!(run.round_aggregated(1, t0), vec![Action::Evaluate(names(&["a", "b"]))]);
        run.node_disconnected(&node("b"), t0);
        let a = run.evaluated(&node("a"), t0);
        assert_eq!(a, vec![Action::Finish { success: true, reason: "completed; no final evaluation from b".into() }]);

        // The likeliest order: the node sends its report, then notices its stream died. The report
        // counts, and the node is not asked again when it returns.
        let (mut run, _) = PlanRun::start(cfg(1, 2), names(&["a", "b", "c"]), t0);
        for n in ["a", "b", "c"] {
            run.node_connected(&node(n), t0);
            run.decision(&node(n), true, "", t0);
        }
        for n in ["a", "b", "c"] {
            run.admit_update(&node(n), 1, t0).unwrap();
        }
        run.round_aggregated(1, t0);
        run.node_disconnected(&node("b"), t0);
        assert!(run.evaluated(&node("b"), t0 + 1).is_empty(), "b's report is taken; c is still awaited");
        assert!(!run.awaits_evaluation(&node("b")), "counted once");
        assert_eq!(run.node_connected(&node("b"), t0 + 2), vec![Action::Reoffer(node("b"))], "not asked again");
        run.evaluated(&node("a"), t0 + 3);
        assert_eq!(
            run.evaluated(&node("c"), t0 + 4),
            vec![Action::Finish { success: true, reason: "completed".into() }]
        );
    }

    #[test]
    fn deadlines_no_clock_can_hold_do_not_panic_and_the_run_goes_on() {
        // 2⁶³ seconds (what a plan could ask before plan limits) and the largest Duration.
        for wait in [Duration::from_secs(1 << 63), Duration::from_secs(u64::MAX), Duration::MAX] {
            let t0: Millis = 0;
            let long =
                RunConfig { recruit_deadline: wait, round_deadline: wait, evaluation_deadline: wait, ..cfg(1, 1) };
            let (mut run, a) = PlanRun::start(long, names(&["a"]), t0);
            assert_eq!(a, vec![Action::Offer(names(&["a"]))]);
            let a = run.decision(&node("a"), true, "", t0);
            let Some(Action::OpenRound { deadline, .. }) = a.first() else {
                panic!("the round opens: {a:?}");
            };
            assert!(*deadline > t0 + 100 * 365 * 86_400 * 1000, "as far ahead as an Instant goes");
            assert!(run.tick(t0 + 86_400 * 1000).is_empty(), "still waiting a day later");
            assert!(matches!(&run.admit_update(&node("a"), 1, t0).unwrap()[..], [Action::CloseRound { round: 1, .. }]));
            assert_eq!(run.round_aggregated(1, t0), vec![Action::Evaluate(names(&["a"]))]);
            assert!(matches!(&run.evaluated(&node("a"), t0)[..], [Action::Finish { success: true, .. }]));
        }
    }

    #[test]
    fn late_node_is_dropped_at_the_deadline_and_the_round_goes_on() {
        let t0: Millis = 0;
        let (mut run, _) = PlanRun::start(cfg(1, 2), names(&["a", "b", "c"]), t0);
        for n in ["a", "b", "c"] {
            run.decision(&node(n), true, "", t0);
        }
        run.admit_update(&node("a"), 1, t0).unwrap();
        run.admit_update(&node("b"), 1, t0).unwrap();
        assert!(run.tick(t0 + 29 * 1000).is_empty());
        let late = t0 + 31 * 1000;
        assert_eq!(run.admit_update(&node("c"), 1, late), Err(Rejection::Late));
        let a = run.tick(late);
        assert_eq!(
            a,
            vec![
                Action::Participant { round: 1, node: node("c"), phase: ParticipantPhase::Late },
                Action::CloseRound { round: 1, reported: names(&["a", "b"]), dropped: names(&["c"]) }
            ]
        );
    }

    #[test]
    fn refusals_below_min_nodes_fail_with_the_reasons() {
        let t0: Millis = 0;
        let (mut run, _) = PlanRun::start(cfg(1, 2), names(&["a", "b"]), t0);
        run.decision(&node("a"), true, "", t0);
        let a = run.decision(&node("b"), false, "schema mismatch: column 'age' missing", t0);
        match &a[..] {
            [Action::Finish { success: false, reason }] => {
                assert!(reason.contains("b refused: schema mismatch"), "{reason}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn round_fails_cleanly_below_min_nodes_and_disconnects_close_early() {
        let t0: Millis = 0;
        let (mut run, _) = PlanRun::start(cfg(3, 2), names(&["a", "b", "c"]), t0);
        for n in ["a", "b", "c"] {
            run.decision(&node(n), true, "", t0);
        }
        run.admit_update(&node("a"), 1, t0).unwrap();
        run.admit_update(&node("b"), 1, t0).unwrap();
        // c crashes: the round closes without waiting for the deadline.
        let a = run.node_disconnected(&node("c"), t0);
        assert_eq!(a, vec![Action::CloseRound { round: 1, reported: names(&["a", "b"]), dropped: names(&["c"]) }]);
        run.round_aggregated(1, t0);
        run.admit_update(&node("a"), 2, t0).unwrap();
        let a = run.tick(t0 + 31 * 1000);
        assert!(
            matches!(&a[..], [.., Action::RoundFailed { round: 2, retrying: false, .. }, Action::Finish { success: false, reason }] if reason.contains("round 2 failed")),
            "{a:?}"
        );
        assert!(run.is_finished());
    }

    #[test]
    fn a_participant_that_reconnects_gets_the_round_again() {
        let t0: Millis = 0;
        let (mut run, _) = PlanRun::start(cfg(1, 2), names(&["a", "b", "c"]), t0);
        for n in ["a", "b", "c"] {
            run.decision(&node(n), true, "", t0);
        }
        run.admit_update(&node("a"), 1, t0).unwrap();
        assert!(run.node_disconnected(&node("c"), t0).is_empty(), "b has not reported yet");
        let a = run.node_connected(&node("c"), t0);
        assert!(
            matches!(&a[..], [Action::Reoffer(r), Action::Rejoin { node, round: 1, .. }] if r == "c" && node == "c"),
            "{a:?}"
        );
        run.admit_update(&node("c"), 1, t0).unwrap();
        let a = run.admit_update(&node("b"), 1, t0).unwrap();
        assert_eq!(a, vec![Action::CloseRound { round: 1, reported: names(&["a", "b", "c"]), dropped: vec![] }]);
    }

    #[test]
    fn a_node_that_refuses_a_reoffer_leaves_the_plan_and_stops_holding_the_round() {
        let t0: Millis = 0;
        let (mut run, _) = PlanRun::start(cfg(2, 2), names(&["a", "b", "c"]), t0);
        for n in ["a", "b", "c"] {
            run.decision(&node(n), true, "", t0);
        }
        run.admit_update(&node("a"), 1, t0).unwrap();
        run.admit_update(&node("b"), 1, t0).unwrap();
        run.node_disconnected(&node("c"), t0);
        run.round_aggregated(1, t0);
        // c restarts during round 2 (it was not a participant): it is only offered the plan again.
        let a = run.node_connected(&node("c"), t0);
        assert_eq!(a, vec![Action::Reoffer(node("c"))]);
        // c refuses the re-offer (say its policy changed): it leaves the plan.
        assert!(run.decision(&node("c"), false, "policy changed", t0).is_empty());
        assert_eq!(run.refusals().get("c").map(String::as_str), Some("policy changed"));
        run.admit_update(&node("a"), 2, t0).unwrap();
        let a = run.admit_update(&node("b"), 2, t0).unwrap();
        assert!(matches!(&a[..], [Action::CloseRound { round: 2, .. }]), "{a:?}");
    }

    #[test]
    fn recruiting_waits_for_the_deadline_when_nodes_are_silent() {
        let t0: Millis = 0;
        let (mut run, _) = PlanRun::start(cfg(1, 1), names(&["a", "b"]), t0);
        assert!(run.decision(&node("a"), true, "", t0).is_empty());
        let a = run.tick(t0 + 11 * 1000);
        assert!(matches!(&a[..], [Action::OpenRound { round: 1, participants, .. }] if participants == &names(&["a"])));
        // b never answered and is not a participant.
        assert_eq!(run.admit_update(&node("b"), 1, t0 + 12 * 1000), Err(Rejection::NotParticipant(node("b"))));
    }

    #[test]
    fn a_repeated_answer_does_not_count_and_says_so() {
        let t0: Millis = 0;
        let (mut run, _) = PlanRun::start(cfg(1, 2), names(&["a", "b", "c"]), t0);
        assert_eq!(run.decide(&node("a"), true, "", t0), Some(vec![]));
        for _ in 0..1000 {
            assert_eq!(
                run.decide(&node("a"), true, "", t0),
                None,
                "a repeat is discarded, so it is neither audited nor published"
            );
        }
        assert_eq!(run.decide(&node("c"), false, "no", t0), Some(vec![]));
        assert_eq!(run.decide(&node("c"), false, "still no", t0), None);
        assert_eq!(run.decide(&node("rogue"), true, "", t0), None, "not offered");
        // Changing one's answer while recruiting counts.
        assert!(run.decide(&node("c"), true, "", t0).is_some());
        assert!(run.decide(&node("b"), true, "", t0).is_some_and(|a| matches!(&a[..], [Action::OpenRound { .. }])));
        assert_eq!(run.decide(&node("b"), true, "", t0), None, "an acceptance after recruiting does not count");
        assert!(run.decide(&node("a"), false, "changed my mind", t0).is_some(), "a refusal of a re-offer does");
        assert_eq!(run.decide(&node("a"), false, "again", t0), None);
    }

    #[test]
    fn can_admit_answers_as_admit_update_would_and_changes_nothing() {
        let t0: Millis = 0;
        let (mut run, _) = PlanRun::start(cfg(1, 1), names(&["a", "b"]), t0);
        run.decision(&node("a"), true, "", t0);
        run.decision(&node("b"), true, "", t0);
        let late = t0 + 31 * 1000;
        assert_eq!(run.can_admit(&node("a"), 1, late), Err(Rejection::Late));
        assert_eq!(run.can_admit(&node("a"), 2, t0), Err(Rejection::WrongRound { got: 2, open: 1 }));
        assert_eq!(run.can_admit(&node("x"), 1, t0), Err(Rejection::NotParticipant(node("x"))));
        for _ in 0..3 {
            assert_eq!(run.can_admit(&node("a"), 1, t0), Ok(()), "asking twice changes nothing");
        }
        assert!(run.admit_update(&node("a"), 1, t0).is_ok());
        assert_eq!(run.can_admit(&node("a"), 1, t0), Err(Rejection::Duplicate(node("a"))));
    }
}
