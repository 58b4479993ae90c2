//! What the engine asks its executor to do. Effects are carried out in the order they are
//! returned: a model is stored before the directive that names it is sent, an audit record is
//! appended before the event it accompanies is published.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sanctum_protocol::audit::AuditEvent;
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::proto::{self, directive, plan_event};
use serde_json::Value;

use super::{NodeName, PlanId, RunId};

/// An audit record's parameters.
pub type Params = BTreeMap<String, Value>;

/// Who an audit record is by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// The coordinator itself (its own certificate's fingerprint).
    Coordinator,
    /// A member whose certificate fingerprint the engine was given (the lead who submitted).
    Fingerprint(String),
    /// A connected node: the executor looks up its certificate's fingerprint.
    Node(NodeName),
}

/// What the open round of a plan accepts, so the service refuses an upload before it spools it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadRound {
    pub plan_id: PlanId,
    /// The run: a plan's runs reuse round numbers, and one run's uploads are never another's.
    pub run_id: RunId,
    pub round: u32,
    /// 1 for the first attempt at `round`, +1 for each retry: a retry reopens the same round
    /// number, and nothing of a failed attempt's uploads may run on into it.
    pub attempt: u32,
    pub model: ContentHash,
    pub num_params: usize,
    /// Uploads are masked secure-aggregation inputs.
    pub masked: bool,
    pub participants: BTreeSet<NodeName>,
}

/// The final model and its manifest, to write under the exports directory.
#[derive(Clone, Debug)]
pub struct ExportJob {
    /// File stem: plan name and the model's short hash.
    pub stem: String,
    pub model: ContentHash,
    /// The manifest (plan, lineage hash chain, metrics); the executor adds the export time.
    pub manifest: serde_json::Map<String, Value>,
}

/// One thing the executor must do.
#[derive(Debug)]
pub enum Effect {
    /// Send a directive to a node if it is connected (a full or closed stream is logged).
    Send { node: NodeName, kind: directive::Kind },
    /// Store a model under its hash (`hash` is the SHA-256 of `bytes`). If it cannot be stored the
    /// executor tells the engine `Input::StorageFailed` and skips the plan's remaining effects.
    StoreModel { plan_id: PlanId, hash: ContentHash, bytes: Arc<Vec<u8>> },
    /// Append an audit record.
    Audit { actor: Actor, event: AuditEvent },
    /// Append an audit record a member caused, within its quota per period (counted beyond it).
    AuditMember { node: NodeName, event: AuditEvent },
    /// Tell the run's watchers (and the run's history) what happened.
    Publish { plan_id: PlanId, run_id: RunId, kind: plan_event::Kind },
    /// A round opened: uploads for it may be spooled.
    OpenUploads(UploadRound),
    /// The plan's round closed for uploads.
    CloseUploads { plan_id: PlanId },
    /// A node's update was admitted: no further upload of its is spooled this round.
    Admitted { plan_id: PlanId, round: u32, node: NodeName },
    /// Append the round's record to the audit log and send that exact line to `countersigners`
    /// for their receipts.
    RoundRecord { plan_id: PlanId, run_id: RunId, round: u32, record: AuditEvent, countersigners: Vec<NodeName> },
    /// Write the final model and its manifest (when `export` is set), then publish `finished`
    /// (with the exported path) and send `closed` to every node in `notify`.
    Finish {
        plan_id: PlanId,
        run_id: RunId,
        export: Option<Box<ExportJob>>,
        finished: Box<proto::PlanFinished>,
        closed: Box<directive::Kind>,
        notify: Vec<NodeName>,
        /// The lead cancelled the run (it is recorded as cancelled, not failed).
        cancelled: bool,
    },
    /// Make the run's state durable: store the moments file (content-addressed) then commit the
    /// checkpoint, in one transaction with the round it closes when there is one. Comes after the
    /// round's model is stored and before anything tells a node or the lead the round closed.
    Checkpoint {
        state: Box<super::checkpoint::RunCheckpoint>,
        moments: Option<Arc<Vec<u8>>>,
        closed: Option<super::checkpoint::ClosedRound>,
        /// A checkpoint the run cannot go on without (its start, a round's close): when it fails
        /// the run stops. One that only saves work (an evaluation report) is logged if it fails.
        required: bool,
    },
    /// Fault injection: the unmasked sum of a secure-aggregation round, for tests that check it
    /// out of band.
    DumpSum { round: u32, words: Vec<u32> },
}
