//! The daemon's errors: why it could not start, and why a directive was not carried out.
//!
//! Every message is the one the node logged before these were typed (end-to-end tests and
//! operators read them). Wrapped errors of other modules are `transparent`, so their text and
//! their chain of causes read as before; the few that were flattened to their text before
//! (`{0}` without a source) stay flattened, so a chain printed with [`Chain`] shows no cause twice.

use std::path::PathBuf;

use sanctum_protocol::audit::AuditError;
use sanctum_protocol::hash::ParseHashError;
use sanctum_protocol::model::ModelError;
use sanctum_protocol::receipt::ReceiptError;
use sanctum_protocol::secagg::SecAggError;
use sanctum_protocol::secagg::keys::KeySignatureError;
use sanctum_protocol::tls::TlsError;

use crate::approvals::ApprovalError;
use crate::budget::BudgetError;
use crate::ledger::LedgerError;
use crate::link::LinkError;
use crate::release::ReleaseError;
use crate::state_lock::StateLockError;
use crate::train::TrainError;

/// Why the node could not start, or a directive was not carried out (the daemon logs it and goes
/// on serving; only [`super::Node::new`] and [`super::Node::run`] return one to `main`).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    StateLock(#[from] StateLockError),
    /// The egress log (`DIR/egress.jsonl`) could not be opened; the io error's own text, as before.
    #[error("{error}")]
    EgressOpen { dir: PathBuf, error: std::io::Error },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error(transparent)]
    Scaffold(#[from] crate::scaffold::ScaffoldError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Approvals made with `sanctum-node model` could not reach the audit log.
    #[error(transparent)]
    Approval(#[from] ApprovalError),
    /// Nothing left (egress log, connection) or the coordinator refused the call.
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Charge(#[from] ChargeError),
    /// Pricing a release or a noised metric failed (nothing is sent).
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The training thread panicked or was cancelled.
    #[error(transparent)]
    Join(#[from] tokio::task::JoinError),
    /// A fetched model's bytes do not fit the plan's layout.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The coordinator named a model by a text that is not a SHA-256.
    #[error("{0}")]
    ModelHash(ParseHashError),
    #[error(transparent)]
    Signature(#[from] KeySignatureError),
    #[error(transparent)]
    Receipt(#[from] ReceiptError),
    /// The secure-aggregation protocol refused a step (a peer, a share, a survivor list).
    #[error(transparent)]
    SecAgg(#[from] SecAggError),
    /// The coordinator's secure-aggregation setup or step does not fit the plan or the policy.
    #[error(transparent)]
    SecAggRefused(#[from] SecAggRefusal),
    /// A directive refused under this node's own state or policy; already logged and audited
    /// (`directive_refused`), the reason is what the audit record says.
    #[error("{reason}")]
    Refused {
        /// The refused directive (`StartRound`, `Evaluate`).
        directive: &'static str,
        reason: String,
    },
    #[error("round for plan {plan_id} which this node did not accept")]
    NotAccepted { plan_id: String },
    /// The plan closed between the round's keys and its training.
    #[error("plan closed")]
    PlanClosed,
    #[error("plan closed during training")]
    PlanClosedDuringTraining,
    /// The release store lists the round but holds no update for it.
    #[error("round {round}'s stored release disappeared")]
    ReleaseMissing { round: u32 },
    #[error("round {round}'s stored release is damaged: {error}")]
    ReleaseDamaged { round: u32, error: sanctum_protocol::prost::DecodeError },
}

/// Why a secure-aggregation round or step is not taken part in: the coordinator's setup or step
/// does not fit the accepted plan, the policy or the round this node is in. Nothing is sent.
#[derive(Debug, thiserror::Error)]
pub enum SecAggRefusal {
    #[error("no secure-aggregation setup")]
    NoSetup,
    #[error("the coordinator asks for secure aggregation, which the accepted plan does not use")]
    NotInPlan,
    #[error("the coordinator set threshold {threshold} for {participants} participants; the plan requires {wanted}")]
    ThresholdBelowPlan { threshold: usize, participants: usize, wanted: usize },
    #[error("threshold {threshold} would release sums of fewer hospitals than policy.min_cohort = {min_cohort}")]
    ThresholdBelowMinCohort { threshold: usize, min_cohort: usize },
    #[error("the round's clip_norm or max_samples differ from the plan's")]
    SettingsDiffer,
    /// The plan's encoding for this round cannot be built (flattened to its text, as before).
    #[error("{0}")]
    Encoding(SecAggError),
    #[error("run {round_run:?} was replaced by run {accepted_run:?} during training; nothing is sent")]
    RunReplaced { round_run: String, accepted_run: String },
    #[error("no secure-aggregation round is open here (round {round} step ignored)")]
    NoRoundOpen { round: u32 },
    #[error("step for round {step_round} but this node is in round {open_round}")]
    OtherRound { step_round: u32, open_round: u32 },
    #[error("empty step")]
    EmptyStep,
}

/// Why a release was not charged; the caller sends nothing.
#[derive(Debug, thiserror::Error)]
pub enum ChargeError {
    #[error("plan closed during training")]
    PlanClosed,
    /// The run's released rounds could not be read, so the cost cannot be priced.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// The cost cannot be priced or is over the policy's caps.
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Charged to the ledger, but its audit record could not be written.
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// An error and its causes on one line, `outer: cause: cause`: how the daemon logged them before
/// its errors were typed (and how `main` prints an error it exits with).
pub(crate) use sanctum_protocol::errors::Chain;

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain reads as the old logs did: the outer message, then each cause (a ledger error
    /// names its io cause in its own message and as its source, so the cause shows twice, as it
    /// always did).
    #[test]
    fn a_chain_prints_the_outer_message_then_each_cause() {
        let io = std::io::Error::other("disk full");
        let e = DaemonError::Ledger(LedgerError::Io { path: "L".into(), source: io });
        assert_eq!(e.to_string(), "privacy ledger L: disk full");
        assert_eq!(Chain(&e).to_string(), "privacy ledger L: disk full: disk full");
        let flat = DaemonError::ModelHash(ParseHashError::WrongLength { text: "ab".into(), bytes: 1 });
        assert_eq!(Chain(&flat).to_string(), flat.to_string());
        let refused =
            DaemonError::SecAggRefused(SecAggRefusal::ThresholdBelowMinCohort { threshold: 2, min_cohort: 3 });
        assert_eq!(
            Chain(&refused).to_string(),
            "threshold 2 would release sums of fewer hospitals than policy.min_cohort = 3"
        );
    }
}
