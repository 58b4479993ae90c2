//! The typed audit events: one enum that every writer builds and every reader (the report, the
//! restart's recovery) matches on, so an event's name and its parameters are written in one
//! place and a reader cannot misspell either.
//!
//! - **The line does not change.** An event is the record's `event` and `params` pair (serde's
//!   adjacent tagging, `tag = "event"`, `content = "params"`), and each field has the Rust type
//!   its writer used before the enum existed, so `serde_json` writes the same JSON: a log written
//!   before and one written after are the same bytes, and old signatures stay valid
//!   (`tests`: every kind against a line a real log holds, or the params today's writer built).
//!   Adjacent rather than internal tagging because one event, `audit_records_suppressed`, has a
//!   parameter called `event` of its own.
//! - **Old records read.** A field that older writers left out is an `Option` (written only when
//!   `Some`); unknown parameters are ignored; an event this version does not know reads as
//!   [`AuditEvent::Unknown`] with its parameters kept, so a newer writer's log still reports.
//! - **Non-finite numbers.** `serde_json` writes a NaN or infinite `f64` as `null`; a plain `f64`
//!   field reads `null` back as NaN, so the record re-serialises to the same line.
//! - **Rounds** are `u64` although every writer's round is a `u32`: the JSON is the same, and a
//!   reader must not fail on a round number a log holds (a report once met 10^12).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::Record;
use crate::plan::PrivacyMode;

/// An audit record's parameters (sorted keys: the canonical form).
pub type Params = BTreeMap<String, Value>;

/// One update a round record lists: who sent it, its hash and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundUpdate {
    pub node: String,
    pub payload_sha256: String,
    pub bytes: u64,
}

/// Every kind of audit record Sanctum writes, with the parameters of each.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "params", rename_all = "snake_case")]
pub enum AuditEvent {
    // --- Every log -------------------------------------------------------------------------
    /// The first record: binds the log's Ed25519 key to the writer's certificate.
    LogOpened {
        writer: String,
        role: String,
        /// The writer's certificate (DER, hex).
        certificate: String,
        /// The log's Ed25519 public key (hex).
        audit_key: String,
        log_id: String,
        /// ECDSA signature by the certificate's key over the audit key and the log id (hex).
        binding: String,
    },
    /// A torn last line from a crash was cut off on reopening.
    LogRecovered {
        torn_bytes_cut: u64,
    },

    // --- The coordinator: plans and rounds -----------------------------------------------------
    PlanSubmitted {
        plan_id: String,
        /// Absent before runs existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_number: Option<u32>,
        name: String,
        plan_sha256: String,
        rounds: u32,
        strategy: String,
        privacy: PrivacyMode,
        noise_multiplier: Option<f64>,
        target_epsilon: Option<f64>,
        delta: Option<f64>,
        secure_aggregation: bool,
        initial_model: String,
    },
    /// A submission the coordinator refused: the lead's (`lead`) plan did not parse, or the
    /// plan (`name`) failed its checks.
    PlanRejected {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lead: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        reason: String,
    },
    /// A node accepted an offer: in the coordinator's log with `node`, in the node's with `run`.
    PlanAccepted(PlanDecision),
    /// A node refused an offer (same fields as [`AuditEvent::PlanAccepted`]).
    PlanRefused(PlanDecision),
    PlanCancelled {
        plan_id: String,
        run: String,
        by: String,
        rounds_completed: u32,
    },
    /// A restart continues a run from its last completed round.
    PlanResumed {
        plan_id: String,
        run: String,
        rounds_completed: u32,
        model_sha256: String,
    },
    RoundOpened {
        plan_id: String,
        round: u64,
        participants: Vec<String>,
        model_sha256: String,
        /// The secure-aggregation cohort, or `null` without secure aggregation.
        secure_aggregation: Option<Vec<String>>,
        threshold: Option<u64>,
    },
    UpdateReceived {
        node: String,
        plan_id: String,
        round: u64,
        payload_sha256: String,
        bytes: u64,
        masked: bool,
    },
    UpdateRejected {
        node: String,
        plan_id: String,
        round: u64,
        reason: String,
    },
    RoundClosed {
        plan_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run: Option<String>,
        round: u64,
        reported: Vec<String>,
        dropped: Vec<String>,
    },
    RoundFailed {
        plan_id: String,
        run: String,
        round: u64,
        attempt: u32,
        reason: String,
        retrying: bool,
    },
    AggregateReleased {
        plan_id: String,
        round: u64,
        model_sha256: String,
        contributors: u64,
    },
    /// The closed round as the nodes that reported countersign it (its exact line is sent).
    RoundRecord {
        plan_id: String,
        /// The run whose round it records (a plan's runs record the same round numbers); absent
        /// in records of coordinators before it was written, which readers match by plan and
        /// round as they did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run: Option<String>,
        round: u64,
        model_sha256: String,
        updates: Vec<RoundUpdate>,
        reported: Vec<String>,
        dropped: Vec<String>,
    },
    /// A node's countersignature of a round record, as the coordinator took it.
    Receipt {
        node: String,
        plan_id: String,
        round: u64,
        record_sha256: String,
        signature: String,
        agrees: bool,
        reason: String,
        /// The signer's certificate (DER, hex); absent before verdicts were signed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        certificate: Option<String>,
    },
    ModelExported {
        plan_id: String,
        model_sha256: String,
        path: String,
    },
    PlanFinished {
        plan_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run: Option<String>,
        success: bool,
        reason: String,
        rounds_completed: u32,
        final_model_sha256: String,
        #[serde(deserialize_with = "f64_or_null")]
        client_epsilon: f64,
        #[serde(deserialize_with = "f64_or_null")]
        client_delta: f64,
    },

    // --- The coordinator: members, access, its own state ----------------------------------------
    NodeConnected {
        node: String,
        device: String,
        version: String,
    },
    NodeDisconnected {
        node: String,
    },
    /// A member caused more records of one kind in a period than its quota; the rest were counted.
    AuditRecordsSuppressed {
        node: String,
        event: String,
        suppressed: u64,
        itemised: u64,
        period_secs: u64,
    },
    /// The refused TLS handshakes of a period (older logs: one record per refusal, with only
    /// `remote` and `reason`).
    AuthenticationFailed {
        remote: String,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by_reason: Option<BTreeMap<String, u64>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        distinct_remotes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        distinct_remotes_capped: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sample_remotes: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sample_reasons: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        over_secs: Option<u64>,
    },
    /// A verified member called what its role may not.
    CallRefused {
        remote: String,
        reason: String,
    },
    CertificateRevocationApplied {
        name: String,
        fingerprint: String,
        revoked_at: String,
    },
    RevocationListRestored(RevocationListState),
    RevocationListUnusable(RevocationListState),
    AuditLogRead {
        reader: String,
        role: String,
        bytes: u64,
    },
    ModelExportRead {
        reader: String,
        plan_id: String,
        run: String,
        model_sha256: String,
        bytes: u64,
    },
    CoordinatorStopped {
        reason: String,
        signal: String,
        running: Vec<String>,
    },

    // --- The consortium CA's log -------------------------------------------------------------
    CertificateIssued {
        name: String,
        role: String,
        fingerprint: String,
        not_after: String,
        days: i64,
    },
    CertificateRenewed {
        name: String,
        role: String,
        fingerprint: String,
        not_after: String,
        previous_fingerprint: String,
    },
    CertificateRevoked {
        name: String,
        role: String,
        fingerprint: String,
        not_after: String,
        reason: String,
    },
    /// A request for a name already issued to another key.
    CertificateRefused {
        name: String,
        role: String,
        fingerprint: String,
        not_after: String,
        reason: String,
        requested_role: String,
        requested_key_sha256: String,
    },

    // --- A node's log ------------------------------------------------------------------------
    Connected {
        coordinator: String,
    },
    DirectiveRefused {
        directive: String,
        plan_id: String,
        round: u64,
        reason: String,
    },
    UpdateSent {
        plan_id: String,
        round: u64,
        payload_sha256: String,
        bytes: u64,
        masked: bool,
        resend: bool,
    },
    EpsilonCharged {
        plan_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run: Option<String>,
        round: u64,
        #[serde(deserialize_with = "f64_or_null")]
        epsilon: f64,
        #[serde(deserialize_with = "f64_or_null")]
        delta: f64,
        accountant: String,
        /// The node's `policy.max_epsilon`, `null` when it sets none.
        epsilon_cap: Option<f64>,
    },
    /// The node's own countersignature of a round record.
    ReceiptSigned {
        plan_id: String,
        round: u64,
        record_sha256: String,
        agrees: bool,
        reason: String,
        /// Absent before verdicts were signed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    EvaluationSent {
        plan_id: String,
        run: String,
        model_sha256: String,
        value: Option<f64>,
        samples: Option<u64>,
    },
    PlanClosed {
        plan_id: String,
        run: String,
        success: bool,
        reason: String,
    },
    NodeStopped {
        reason: String,
        signal: String,
    },
    ModelApproved {
        sha256: String,
        name: String,
        approved_by: String,
        approved_at: String,
        /// The event's key in the node's audited-approvals file.
        key: String,
        parameters: u64,
        file: String,
    },
    ModelRevoked {
        sha256: String,
        name: String,
        approved_by: String,
        approved_at: String,
        key: String,
        revoked_by: String,
        revoked_at: String,
    },

    /// A kind of record this version does not know (a newer writer's): kept as it was.
    #[serde(skip)]
    Unknown {
        event: String,
        params: Params,
    },
}

/// A node's answer to an offer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanDecision {
    /// The node (in the coordinator's log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub plan_id: String,
    /// The run offered (in the node's log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    pub reason: String,
    /// The (ε, δ) the node would spend, `null` without differential privacy.
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
}

/// The revocation list the coordinator follows broke or was fixed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationListState {
    pub path: String,
    /// Why it is unusable; empty once restored.
    pub error: String,
    pub kept_revocations: u64,
    pub broken_secs: u64,
}

/// The names of the kinds this version knows: a record of any other reads as
/// [`AuditEvent::Unknown`]. Kept in step with the enum by `tests::every_kind_is_known_and_named`.
pub const KNOWN_EVENTS: &[&str] = &[
    "log_opened",
    "log_recovered",
    "plan_submitted",
    "plan_rejected",
    "plan_accepted",
    "plan_refused",
    "plan_cancelled",
    "plan_resumed",
    "round_opened",
    "update_received",
    "update_rejected",
    "round_closed",
    "round_failed",
    "aggregate_released",
    "round_record",
    "receipt",
    "model_exported",
    "plan_finished",
    "node_connected",
    "node_disconnected",
    "audit_records_suppressed",
    "authentication_failed",
    "call_refused",
    "certificate_revocation_applied",
    "revocation_list_restored",
    "revocation_list_unusable",
    "audit_log_read",
    "model_export_read",
    "coordinator_stopped",
    "certificate_issued",
    "certificate_renewed",
    "certificate_revoked",
    "certificate_refused",
    "connected",
    "directive_refused",
    "update_sent",
    "epsilon_charged",
    "receipt_signed",
    "evaluation_sent",
    "plan_closed",
    "node_stopped",
    "model_approved",
    "model_revoked",
];

/// Why a record's event could not be read or written as typed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error(
        "audit record {seq} ({event}): parameter `{field}`: {reason}; the record is not what this version's {event} holds (a changed writer, or a hand-made record): read it with `audit verify` and report it"
    )]
    Field { seq: u64, event: String, field: String, reason: String },
    #[error("audit event {event}: its parameters do not encode as a JSON object: {reason}")]
    Encode { event: String, reason: String },
}

/// Reads `null` (what `serde_json` writes for a NaN or infinite `f64`) as NaN.
fn f64_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl AuditEvent {
    /// The record's `event` name.
    pub fn name(&self) -> &str {
        use AuditEvent as E;
        match self {
            E::LogOpened { .. } => "log_opened",
            E::LogRecovered { .. } => "log_recovered",
            E::PlanSubmitted { .. } => "plan_submitted",
            E::PlanRejected { .. } => "plan_rejected",
            E::PlanAccepted(_) => "plan_accepted",
            E::PlanRefused(_) => "plan_refused",
            E::PlanCancelled { .. } => "plan_cancelled",
            E::PlanResumed { .. } => "plan_resumed",
            E::RoundOpened { .. } => "round_opened",
            E::UpdateReceived { .. } => "update_received",
            E::UpdateRejected { .. } => "update_rejected",
            E::RoundClosed { .. } => "round_closed",
            E::RoundFailed { .. } => "round_failed",
            E::AggregateReleased { .. } => "aggregate_released",
            E::RoundRecord { .. } => "round_record",
            E::Receipt { .. } => "receipt",
            E::ModelExported { .. } => "model_exported",
            E::PlanFinished { .. } => "plan_finished",
            E::NodeConnected { .. } => "node_connected",
            E::NodeDisconnected { .. } => "node_disconnected",
            E::AuditRecordsSuppressed { .. } => "audit_records_suppressed",
            E::AuthenticationFailed { .. } => "authentication_failed",
            E::CallRefused { .. } => "call_refused",
            E::CertificateRevocationApplied { .. } => "certificate_revocation_applied",
            E::RevocationListRestored(_) => "revocation_list_restored",
            E::RevocationListUnusable(_) => "revocation_list_unusable",
            E::AuditLogRead { .. } => "audit_log_read",
            E::ModelExportRead { .. } => "model_export_read",
            E::CoordinatorStopped { .. } => "coordinator_stopped",
            E::CertificateIssued { .. } => "certificate_issued",
            E::CertificateRenewed { .. } => "certificate_renewed",
            E::CertificateRevoked { .. } => "certificate_revoked",
            E::CertificateRefused { .. } => "certificate_refused",
            E::Connected { .. } => "connected",
            E::DirectiveRefused { .. } => "directive_refused",
            E::UpdateSent { .. } => "update_sent",
            E::EpsilonCharged { .. } => "epsilon_charged",
            E::ReceiptSigned { .. } => "receipt_signed",
            E::EvaluationSent { .. } => "evaluation_sent",
            E::PlanClosed { .. } => "plan_closed",
            E::NodeStopped { .. } => "node_stopped",
            E::ModelApproved { .. } => "model_approved",
            E::ModelRevoked { .. } => "model_revoked",
            E::Unknown { event, .. } => event,
        }
    }

    /// The record's `event` and `params`, as the log writes them.
    pub fn to_parts(&self) -> Result<(String, Params), EventError> {
        if let AuditEvent::Unknown { event, params } = self {
            return Ok((event.clone(), params.clone()));
        }
        let encode = |reason: String| EventError::Encode { event: self.name().to_string(), reason };
        let value = serde_json::to_value(self).map_err(|e| encode(e.to_string()))?;
        let mut whole = match value {
            Value::Object(m) => m,
            other => return Err(encode(format!("not an object: {other}"))),
        };
        match (whole.remove("event"), whole.remove("params")) {
            (Some(Value::String(event)), Some(Value::Object(params))) => Ok((event, params.into_iter().collect())),
            _ => Err(encode("no event name or no parameters".into())),
        }
    }

    /// Reads a record's event: a kind this version does not know is [`AuditEvent::Unknown`]; a
    /// known kind whose parameters do not fit is an error naming the record and the parameter.
    pub fn from_record(record: &Record) -> Result<Self, EventError> {
        Self::from_parts(record.seq, &record.event, &record.params)
    }

    /// [`AuditEvent::from_record`] from the parts (`seq` only names the record in an error).
    pub fn from_parts(seq: u64, event: &str, params: &Params) -> Result<Self, EventError> {
        if !KNOWN_EVENTS.contains(&event) {
            return Ok(AuditEvent::Unknown { event: event.to_string(), params: params.clone() });
        }
        let mut whole = serde_json::Map::new();
        // `event` first: serde then reads the parameters straight into the variant, so the path
        // to a bad one is known.
        whole.insert("event".into(), Value::from(event));
        whole.insert("params".into(), Value::Object(params.clone().into_iter().collect()));
        serde_path_to_error::deserialize(Value::Object(whole)).map_err(|e| {
            let path = e.path().to_string();
            let field = path.strip_prefix("params.").unwrap_or(&path);
            let field = if field == "params" || field == "." {
                // A missing parameter is reported at the object that lacks it; serde names it.
                missing_field(&e.inner().to_string()).unwrap_or("params").to_string()
            } else {
                field.to_string()
            };
            EventError::Field { seq, event: event.to_string(), field, reason: e.into_inner().to_string() }
        })
    }
}

/// The field of serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

impl Record {
    /// The record's event, typed (see [`AuditEvent::from_record`]).
    pub fn typed(&self) -> Result<AuditEvent, EventError> {
        AuditEvent::from_record(self)
    }
}
