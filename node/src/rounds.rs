//! Which round and evaluation directives the node obeys. Pure decisions over the node's own
//! state (what it accepted, what it released, what its ledger holds), no I/O: a coordinator that
//! replays, reorders or invents directives gets a refusal with the rule, never a second release.

use std::collections::BTreeSet;

/// What the node knows of a run it accepted, for deciding on its directives.
#[derive(Clone, Debug)]
pub struct RunView<'a> {
    /// The run id the node accepted (`OfferPlan.run`).
    pub run: &'a str,
    /// The plan's number of rounds: rounds are 1..=rounds.
    pub rounds: u32,
    pub secure_aggregation: bool,
}

/// What this node holds for one (run, round).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundState {
    /// The round's release is stored (plain update: re-sendable; masked: never re-sent).
    pub stored: Option<Stored>,
    /// The ledger holds a charge for the round.
    pub charged: bool,
    /// The round was released at some point in this run (its bytes may no longer be kept).
    pub released_ever: bool,
    /// Rounds of this run already released (charged or stored), this one excluded.
    pub released_before: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    Update,
    Masked,
}

/// The decision on a `StartRound`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoundDecision {
    /// Train, store the release, charge it, send it.
    Train,
    /// The release is stored but not yet charged (a crash between the two): charge, then send.
    ChargeAndSend,
    /// Send the stored bytes again: no new release, no new charge.
    Resend,
    Refuse(String),
}

/// Decides what to do with `StartRound(run, round)`, sent with a secure-aggregation setup or not.
pub fn start_round(view: &RunView<'_>, run: &str, round: u32, with_setup: bool, state: RoundState) -> RoundDecision {
    if view.secure_aggregation && !with_setup {
        return RoundDecision::Refuse(format!(
            "round {round} comes without a secure-aggregation setup, but the accepted plan uses secure aggregation; the update is never sent in the clear"
        ));
    }
    if !view.secure_aggregation && with_setup {
        return RoundDecision::Refuse(format!(
            "round {round} asks for secure aggregation, which the accepted plan does not use"
        ));
    }
    if run != view.run {
        return RoundDecision::Refuse(format!(
            "round {round} is of run {run:?}, but this node accepted run {:?} of the plan; a run is offered before its rounds",
            view.run
        ));
    }
    if round == 0 || round > view.rounds {
        return RoundDecision::Refuse(format!(
            "round {round} is outside the plan's rounds 1..={}; nothing is trained or sent",
            view.rounds
        ));
    }
    match (state.stored, state.charged) {
        (Some(Stored::Masked), _) => RoundDecision::Refuse(format!(
            "round {round}'s masked input already left; a secure-aggregation input is never sent twice"
        )),
        (Some(Stored::Update), true) => RoundDecision::Resend,
        (Some(Stored::Update), false) => RoundDecision::ChargeAndSend,
        (None, true) => RoundDecision::Refuse(format!(
            "round {round} was already charged to the privacy ledger and its update is no longer kept; it is not trained again"
        )),
        (None, false) if state.released_ever => RoundDecision::Refuse(format!(
            "round {round} was already released in this run and its update is no longer kept; it is not trained again"
        )),
        (None, false) if state.released_before >= view.rounds => RoundDecision::Refuse(format!(
            "this run already released {} rounds, all the plan has",
            state.released_before
        )),
        (None, false) => RoundDecision::Train,
    }
}

/// Why the node declines an evaluation request ([`Lineage::evaluate`]); the text is the reason
/// the coordinator gets. Models are named by the first 12 hex digits of their hash.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EvaluationRefused {
    #[error("evaluation for run {run:?}, but this node accepted run {accepted:?} of the plan")]
    OtherRun { run: String, accepted: String },
    #[error("model {model} was already evaluated in this run")]
    AlreadyEvaluated { model: String },
    #[error(
        "model {model} is not of this run's lineage (the initial model or one this node trained on) and the run's last round has not been sent; only the final model is evaluated after it"
    )]
    NotInLineage { model: String },
    #[error("this run's final model ({model}) was already evaluated")]
    FinalDone { model: String },
}

/// What the node tracks per accepted run to decide on evaluation requests.
#[derive(Clone, Debug, Default)]
pub struct Lineage {
    /// Models of this run the node was sent to train on (and the initial model it computed).
    pub models: BTreeSet<String>,
    /// Models already evaluated for the coordinator in this run.
    pub evaluated: BTreeSet<String>,
    /// Whether the node was sent the plan's last round.
    pub saw_last_round: bool,
    /// The one model outside `models` the node evaluated as the run's final model.
    pub final_model: Option<String>,
}

impl Lineage {
    /// Decides on `Evaluate(run, hash)`: only models of this run's lineage, each at most once,
    /// and at most one final model (the result of the last round), after the last round.
    pub fn evaluate(&self, view: &RunView<'_>, run: &str, hash: &str) -> Result<(), EvaluationRefused> {
        if run != view.run {
            return Err(EvaluationRefused::OtherRun { run: run.to_string(), accepted: view.run.to_string() });
        }
        if self.evaluated.contains(hash) {
            return Err(EvaluationRefused::AlreadyEvaluated { model: short(hash).to_string() });
        }
        if self.models.contains(hash) {
            return Ok(());
        }
        if !self.saw_last_round {
            return Err(EvaluationRefused::NotInLineage { model: short(hash).to_string() });
        }
        if let Some(f) = &self.final_model {
            return Err(EvaluationRefused::FinalDone { model: short(f).to_string() });
        }
        Ok(())
    }

    /// Records an evaluation that was allowed.
    pub fn record_evaluation(&mut self, hash: &str) {
        if !self.models.contains(hash) {
            self.final_model = Some(hash.to_string());
        }
        self.evaluated.insert(hash.to_string());
    }
}

fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

/// The secure-aggregation round this node holds now: its plan, round and deadline
/// (`StartRound.deadline_unix_ms`).
#[derive(Clone, Copy, Debug)]
pub struct OpenSecAgg<'a> {
    pub plan_id: &'a str,
    pub round: u32,
    pub deadline_unix_ms: u64,
}

/// Whether a secure-aggregation `StartRound` of `plan_id` must be refused because this node holds
/// another plan's secure-aggregation round that is not past its deadline: the node has one such
/// round at a time (its keys, its masked input, its training), and taking the second would break
/// the first without a word. `Some(reason)` to refuse. A round of the same plan (the next round,
/// or one the coordinator restarted) replaces it, and a round past its deadline is over at the
/// coordinator: neither holds the slot.
pub fn secagg_slot_taken(open: Option<OpenSecAgg<'_>>, plan_id: &str, now_unix_ms: u64) -> Option<String> {
    let open = open?;
    if open.plan_id == plan_id || now_unix_ms >= open.deadline_unix_ms {
        return None;
    }
    let short = open.plan_id.get(..12).unwrap_or(open.plan_id);
    Some(format!(
        "this node is in plan {short}'s secure-aggregation round {} until its deadline; two plans' secure-aggregation rounds cannot overlap at one node",
        open.round
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIEW: RunView<'static> = RunView { run: "r1", rounds: 3, secure_aggregation: false };

    fn state(stored: Option<Stored>, charged: bool, before: u32) -> RoundState {
        RoundState { stored, charged, released_before: before, released_ever: false }
    }

    #[test]
    fn start_round_decisions() {
        use RoundDecision::*;
        let refused = |d: RoundDecision, needle: &str| match d {
            Refuse(r) => assert!(r.contains(needle), "{r}"),
            other => panic!("expected a refusal naming {needle:?}, got {other:?}"),
        };
        assert_eq!(start_round(&VIEW, "r1", 1, false, state(None, false, 0)), Train);
        assert_eq!(start_round(&VIEW, "r1", 3, false, state(None, false, 2)), Train);
        refused(start_round(&VIEW, "r1", 0, false, state(None, false, 0)), "outside the plan's rounds 1..=3");
        refused(start_round(&VIEW, "r1", 4, false, state(None, false, 0)), "outside the plan's rounds 1..=3");
        refused(start_round(&VIEW, "r1", u32::MAX, false, state(None, false, 0)), "outside");
        refused(start_round(&VIEW, "r2", 1, false, state(None, false, 0)), "accepted run \"r1\"");
        assert_eq!(start_round(&VIEW, "r1", 2, false, state(Some(Stored::Update), true, 1)), Resend);
        assert_eq!(start_round(&VIEW, "r1", 2, false, state(Some(Stored::Update), false, 1)), ChargeAndSend);
        refused(start_round(&VIEW, "r1", 2, false, state(Some(Stored::Masked), true, 1)), "never sent twice");
        refused(start_round(&VIEW, "r1", 1, false, state(None, true, 2)), "already charged");
        refused(start_round(&VIEW, "r1", 2, false, state(None, false, 3)), "already released 3 rounds");
        let sa = RunView { secure_aggregation: true, ..VIEW };
        refused(start_round(&sa, "r1", 1, false, state(None, false, 0)), "never sent in the clear");
        refused(start_round(&VIEW, "r1", 1, true, state(None, false, 0)), "does not use");
        assert_eq!(start_round(&sa, "r1", 1, true, state(None, false, 0)), Train);
        let gone = RoundState { released_ever: true, ..state(None, false, 1) };
        refused(start_round(&VIEW, "r1", 1, false, gone), "already released in this run");
    }

    #[test]
    fn evaluation_follows_the_lineage() {
        let mut l = Lineage::default();
        l.models.insert("init".into());
        l.models.insert("m1".into());
        assert!(l.evaluate(&VIEW, "r1", "m1").is_ok());
        l.record_evaluation("m1");
        assert!(l.evaluate(&VIEW, "r1", "m1").unwrap_err().to_string().contains("already evaluated"));
        assert!(l.evaluate(&VIEW, "r2", "init").unwrap_err().to_string().contains("accepted run"));
        let e = l.evaluate(&VIEW, "r1", "random").unwrap_err().to_string();
        assert!(e.contains("not of this run's lineage"), "{e}");
        l.saw_last_round = true;
        assert!(l.evaluate(&VIEW, "r1", "final").is_ok());
        l.record_evaluation("final");
        assert!(l.evaluate(&VIEW, "r1", "another").unwrap_err().to_string().contains("final model"));
        assert!(l.evaluate(&VIEW, "r1", "init").is_ok(), "lineage models stay evaluable once");
    }

    #[test]
    fn one_plans_secure_aggregation_round_at_a_time() {
        let open = Some(OpenSecAgg { plan_id: "aaaaaaaaaaaaaaaa", round: 3, deadline_unix_ms: 1_000 });
        // (what, held, offered plan, now, refused)
        let cases = [
            ("nothing held", None, "bbbb", 500, false),
            ("another plan's round before its deadline", open, "bbbb", 999, true),
            ("another plan's round past its deadline", open, "bbbb", 1_000, false),
            ("the same plan's next round", open, "aaaaaaaaaaaaaaaa", 500, false),
        ];
        for (what, held, plan, now, refused) in cases {
            let r = secagg_slot_taken(held, plan, now);
            assert_eq!(r.is_some(), refused, "{what}: {r:?}");
            if let Some(reason) = r {
                assert!(reason.contains("plan aaaaaaaaaaaa's secure-aggregation round 3"), "{reason}");
            }
        }
    }
}
