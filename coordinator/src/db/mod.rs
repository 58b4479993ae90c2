//! The coordinator's durable state: runs, closed rounds with the engine's checkpoint, node
//! decisions, receipts, the events watchers replay, and the nodes seen. Models and uploads stay
//! content-addressed files ([`crate::store`]); this holds what says which of them matter.
//!
//! One trait, [`StateStore`], two backends: SQLite in `STATE_DIR/coordinator.sqlite3`
//! ([`sqlite`], the default, nothing to install) and PostgreSQL ([`postgres`], for deployments
//! that outgrow one machine). The trait is synchronous on purpose: the store is driven from one
//! executor thread of its own, never from the async workers, so a blocking call is the right shape
//! and a commit returns only once it is durable.
//!
//! Invariants every backend keeps (the conformance suite in `tests.rs` checks both):
//! - a round and the checkpoint taken at its end are committed in one transaction, so after a
//!   crash the store holds a prefix of whole rounds and the checkpoint of the last one;
//! - a round, a receipt and a run id are written once; a second write is refused and changes
//!   nothing;
//! - a run's events are numbered 1, 2, 3, … without gaps, in commit order;
//! - the schema is migrated in order at open, in one transaction; a database newer than the
//!   binary is refused, never written to.
//!
//! Upgrade from `runs.json`: at the first open, the runs of the old registry are imported (status
//! `interrupted`) in the migration's transaction, then the file is renamed `runs.json.imported`,
//! so run ids stay unique across the upgrade.

mod postgres;
mod sqlite;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use sanctum_protocol::ids::{IdError, NodeName, PlanId, RunId};

pub use crate::config::{StoreBackend, StoreConfig};
use crate::runs::{RunFile, RunFileError};

/// The SQLite database's file name in the state directory.
pub const SQLITE_FILE: &str = "coordinator.sqlite3";

/// One step of the schema, applied once, in order of `version`.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// What a run is doing; stored as its lowercase name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Found running after a restart that could not resume it (or imported from `runs.json`,
    /// which kept no outcome).
    Interrupted,
}

impl RunStatus {
    pub const ALL: [RunStatus; 5] =
        [RunStatus::Running, RunStatus::Succeeded, RunStatus::Failed, RunStatus::Cancelled, RunStatus::Interrupted];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(text: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One submission of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRow {
    /// 128 random bits in hex ([`crate::runs::fresh_run_id`]); unique in the store, for ever.
    pub run_id: RunId,
    /// SHA-256 of the plan.
    pub plan_id: PlanId,
    /// The run's number among its plan's runs, from 1; unique per plan.
    pub number: u32,
    pub name: String,
    /// The plan as submitted (its wire TOML), so a restart can rebuild the run.
    pub wire_toml: String,
    /// SHA-256 fingerprint of the submitting lead's certificate.
    pub submitted_by: String,
    pub submitted_ms: u64,
    pub rounds_planned: u32,
    pub status: RunStatus,
    /// Why the run ended (empty while running).
    pub reason: String,
    /// SHA-256 of the final model, when the run produced one.
    pub final_model: Option<String>,
    pub finished_ms: Option<u64>,
}

/// A closed round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundRow {
    pub run_id: RunId,
    pub round: u32,
    /// SHA-256 of the model the round produced.
    pub model_sha256: String,
    /// Nodes whose update went into the model, and nodes dropped from the round.
    pub reported: Vec<NodeName>,
    pub dropped: Vec<NodeName>,
    /// The signed audit line of the round, as written to the audit log.
    pub record_line: String,
    pub closed_ms: u64,
}

/// The engine's serialised state; one per run, the latest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub run_id: RunId,
    pub rounds_completed: u32,
    /// Opaque here: the engine's serde_json.
    pub state: Vec<u8>,
    pub saved_ms: u64,
}

/// A node's answer to a plan offer.
#[derive(Clone, Debug, PartialEq)]
pub struct DecisionRow {
    pub run_id: RunId,
    pub node: NodeName,
    pub accept: bool,
    pub reason: String,
    /// The privacy spend the node accepted, when the plan has one; finite and non-negative.
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    pub at_ms: u64,
}

/// A node's countersignature of a round record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptRow {
    pub run_id: RunId,
    pub round: u32,
    pub node: NodeName,
    pub agrees: bool,
    pub reason: String,
    pub signature: Vec<u8>,
    pub at_ms: u64,
}

/// A node that connected at least once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRow {
    pub name: NodeName,
    /// SHA-256 fingerprint of its current certificate.
    pub fingerprint: String,
    pub version: String,
    pub device: String,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
}

/// What went wrong with the store. Every message names the cause and what to do next.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "coordinator database {path}: {op}: {source}; check that the state directory is on a local disk, writable by the coordinator, with space left (every commit before this error is intact)"
    )]
    Sqlite { path: PathBuf, op: &'static str, source: rusqlite::Error },
    #[error(
        "coordinator database {path} cannot be made durable: {reason}; keep the state directory on a local file system that supports SQLite's write-ahead log (not NFS)"
    )]
    Durability { path: PathBuf, reason: String },
    #[error(
        "postgresql: {op}: {source}; check that the server is up, reachable at store.url, and that its role may read and write the sanctum tables (every commit before this error is intact)"
    )]
    Postgres { op: &'static str, source: ::postgres::Error },
    #[error(
        "the coordinator's {backend} database is at schema version {found}, newer than this sanctum-coordinator, which knows versions up to {supported}: it was upgraded by a newer release; run that release (or a newer one), or restore the backup taken before the upgrade"
    )]
    TooNew { backend: &'static str, found: u32, supported: u32 },
    #[error("run {run_id} is already in the database: a run id is never given out twice; draw a fresh one")]
    DuplicateRun { run_id: String },
    #[error(
        "plan {plan_id} already has a run number {number} (run {existing}); number a new run after the plan's last one"
    )]
    DuplicateRunNumber { plan_id: String, number: u32, existing: String },
    #[error(
        "round {round} of run {run_id} is already committed; nothing was changed (a resumed run continues after its last committed round)"
    )]
    RoundExists { run_id: String, round: u32 },
    #[error("node '{node}' already sent its receipt for round {round} of run {run_id}; the first one is kept")]
    ReceiptExists { run_id: String, round: u32, node: String },
    #[error("run {run_id} is not in the database; record it with insert_run first")]
    UnknownRun { run_id: String },
    #[error("run {run_id} already finished ({status}); a finished run takes no more rounds and is not finished twice")]
    AlreadyFinished { run_id: String, status: RunStatus },
    #[error("run {run_id} cannot be finished as 'running'; give succeeded, failed, cancelled or interrupted")]
    NotFinal { run_id: String },
    #[error(
        "the checkpoint is for run {checkpoint_run} but the round for run {round_run}; commit a round with its own run's checkpoint"
    )]
    Mismatch { round_run: String, checkpoint_run: String },
    #[error("{field} cannot be stored: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(
        "the database holds a value this coordinator cannot read ({what}: {reason}); it was changed outside sanctum-coordinator: restore it from a backup"
    )]
    Corrupt { what: &'static str, reason: String },
    #[error("cannot import the old run registry: {0}")]
    Import(RunFileError),
    #[error(
        "{path} holds {missing} run(s) that the database does not (e.g. {example}): an older sanctum-coordinator ran on this state directory after the upgrade; stop it, keep a copy of the file, and move it away to start (its run ids are then no longer reserved)"
    )]
    LegacyDiverged { path: PathBuf, missing: usize, example: String },
    #[error(
        "cannot rename {from} to {to} after importing its runs: {source}; rename it by hand (its runs are already in the database)"
    )]
    Retire { from: PathBuf, to: PathBuf, source: std::io::Error },
    #[error("store.password_file {path}: {reason}")]
    PasswordFile { path: PathBuf, reason: String },
    #[error("cannot use the state directory {path}: {source}; create it, writable by the coordinator")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("store: {0}")]
    Config(String),
}

/// The coordinator's durable state. Every method is one transaction: when it returns `Ok` the
/// change is durable; when it returns `Err` nothing of it was written.
pub trait StateStore: Send {
    /// Records a new run; refuses a run id already present ([`DbError::DuplicateRun`]) and a
    /// number the plan already used ([`DbError::DuplicateRunNumber`]).
    fn insert_run(&mut self, run: &RunRow) -> Result<(), DbError>;
    /// Every run, oldest first (in the order they were inserted).
    fn runs(&mut self) -> Result<Vec<RunRow>, DbError>;
    fn run(&mut self, run_id: &RunId) -> Result<Option<RunRow>, DbError>;
    /// A plan's runs, by number.
    fn runs_of_plan(&mut self, plan_id: &PlanId) -> Result<Vec<RunRow>, DbError>;
    /// Ends a running run; a run that already finished is refused ([`DbError::AlreadyFinished`]).
    fn finish_run(
        &mut self,
        run_id: &RunId,
        status: RunStatus,
        reason: &str,
        final_model: Option<&str>,
        finished_ms: u64,
    ) -> Result<(), DbError>;
    /// Records a closed round and the engine's state at its end, in one transaction. A round
    /// already committed is [`DbError::RoundExists`] and changes nothing; a run that finished
    /// takes no more rounds.
    fn commit_round(&mut self, round: &RoundRow, checkpoint: &Checkpoint) -> Result<(), DbError>;
    /// Replaces the run's checkpoint outside a round boundary (recruiting done, etc.).
    fn save_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), DbError>;
    fn checkpoint(&mut self, run_id: &RunId) -> Result<Option<Checkpoint>, DbError>;
    /// A run's closed rounds, by round.
    fn rounds(&mut self, run_id: &RunId) -> Result<Vec<RoundRow>, DbError>;
    /// Records a node's decision; the latest per (run, node) is the one in force, earlier ones
    /// stay as history.
    fn record_decision(&mut self, d: &DecisionRow) -> Result<(), DbError>;
    /// The decision in force per node of a run (the latest recorded), by node name.
    fn decisions(&mut self, run_id: &RunId) -> Result<Vec<DecisionRow>, DbError>;
    /// Every decision of a run, in the order recorded.
    fn decision_history(&mut self, run_id: &RunId) -> Result<Vec<DecisionRow>, DbError>;
    /// Records a receipt; one per (run, round, node), a second is [`DbError::ReceiptExists`].
    fn record_receipt(&mut self, r: &ReceiptRow) -> Result<(), DbError>;
    /// A run's receipts, by round then node.
    fn receipts(&mut self, run_id: &RunId) -> Result<Vec<ReceiptRow>, DbError>;
    /// Appends an event (opaque bytes: a prost-encoded `PlanEvent`); returns its number in the
    /// run, 1 for the first.
    fn append_event(&mut self, run_id: &RunId, event: &[u8]) -> Result<u64, DbError>;
    /// At most `limit` events of a run numbered after `after_seq`, in order.
    fn events(&mut self, run_id: &RunId, after_seq: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, DbError>;
    /// Records a node, or updates it: fingerprint, version and device are the latest given,
    /// `first_seen_ms` the earliest and `last_seen_ms` the latest ever given.
    fn upsert_node(&mut self, n: &NodeRow) -> Result<(), DbError>;
    /// Every node, by name.
    fn nodes(&mut self) -> Result<Vec<NodeRow>, DbError>;
}

/// Opens (creating and migrating as needed) the store `cfg` names. SQLite lives in
/// `state_dir/coordinator.sqlite3`; `state_dir/runs.json`, if any, is imported either way.
/// Call it from the thread that will use the store, never from an async worker.
pub fn open(cfg: &StoreConfig, state_dir: &Path) -> Result<Box<dyn StateStore>, DbError> {
    cfg.validate().map_err(|e| DbError::Config(e.to_string()))?;
    match cfg.backend {
        StoreBackend::Sqlite => Ok(Box::new(sqlite::SqliteStore::open(state_dir)?)),
        StoreBackend::Postgres => Ok(Box::new(postgres::PgStore::open(postgres::connect_config(cfg)?, state_dir)?)),
    }
}

/// The migrations still to apply to a database at `found` (None: a fresh one), or the refusal
/// of one newer than `migrations` know.
fn pending(
    backend: &'static str,
    found: Option<u32>,
    migrations: &'static [Migration],
) -> Result<Vec<Migration>, DbError> {
    let supported = migrations.iter().map(|m| m.version).max().unwrap_or(0);
    let found = found.unwrap_or(0);
    if found > supported {
        return Err(DbError::TooNew { backend, found, supported });
    }
    Ok(migrations.iter().filter(|m| m.version > found).copied().collect())
}

/// The old registry, when `state_dir/runs.json` exists: its path and its runs as rows.
struct Legacy {
    path: PathBuf,
    rows: Vec<RunRow>,
}

fn legacy_runs(state_dir: &Path) -> Result<Option<Legacy>, DbError> {
    let path = state_dir.join("runs.json");
    if !path.exists() {
        return Ok(None);
    }
    let registry = RunFile::new(state_dir).load().map_err(DbError::Import)?;
    let mut rows = Vec::new();
    for (plan_id, ids) in &registry.plans {
        for (i, run_id) in ids.iter().enumerate() {
            // runs.json kept only the ids, in order per plan: the rest is unknown.
            rows.push(RunRow {
                run_id: run_id.clone(),
                plan_id: plan_id.clone(),
                number: u32::try_from(i + 1).unwrap_or(u32::MAX),
                name: String::new(),
                wire_toml: String::new(),
                submitted_by: String::new(),
                submitted_ms: 0,
                rounds_planned: 0,
                status: RunStatus::Interrupted,
                reason: "imported from runs.json".into(),
                final_model: None,
                finished_ms: None,
            });
        }
    }
    Ok(Some(Legacy { path, rows }))
}

/// Renames the imported `runs.json` out of the way, durably.
fn retire_legacy(path: &Path) -> Result<(), DbError> {
    let to = path.with_extension("json.imported");
    let err = |source| DbError::Retire { from: path.to_path_buf(), to: to.clone(), source };
    std::fs::rename(path, &to).map_err(err)?;
    sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(err)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A u64 as the databases' signed 64-bit integer.
fn int(field: &'static str, v: u64) -> Result<i64, DbError> {
    i64::try_from(v).map_err(|_| DbError::Invalid { field, reason: format!("{v} is beyond 2^63 - 1") })
}

fn u64_of(what: &'static str, v: i64) -> Result<u64, DbError> {
    u64::try_from(v).map_err(|_| DbError::Corrupt { what, reason: format!("{v} is negative") })
}

fn u32_of(what: &'static str, v: i64) -> Result<u32, DbError> {
    u32::try_from(v).map_err(|_| DbError::Corrupt { what, reason: format!("{v} is not a 32-bit count") })
}

fn names_json(names: &[NodeName]) -> Result<String, DbError> {
    serde_json::to_string(names).map_err(|e| DbError::Invalid { field: "node names", reason: e.to_string() })
}

/// A list of node names as stored (a JSON array of strings); each is checked as it is read.
fn names_of(what: &'static str, text: &str) -> Result<Vec<NodeName>, DbError> {
    serde_json::from_str(text).map_err(|e| DbError::Corrupt { what, reason: e.to_string() })
}

/// A stored id read back: one not of its form was written outside sanctum-coordinator.
fn id_of<T: TryFrom<String, Error = IdError>>(what: &'static str, text: String) -> Result<T, DbError> {
    T::try_from(text).map_err(|e| DbError::Corrupt { what, reason: e.to_string() })
}

/// Refuses what a database would not give back unchanged (SQLite stores NaN as NULL).
fn check_decision(d: &DecisionRow) -> Result<(), DbError> {
    for (field, v) in [("decision epsilon", d.epsilon), ("decision delta", d.delta)] {
        if let Some(v) = v
            && !(v.is_finite() && v >= 0.0)
        {
            return Err(DbError::Invalid { field, reason: format!("{v} is not a finite, non-negative number") });
        }
    }
    Ok(())
}

fn check_final(run_id: &RunId, status: RunStatus) -> Result<(), DbError> {
    if status == RunStatus::Running {
        return Err(DbError::NotFinal { run_id: run_id.to_string() });
    }
    Ok(())
}

fn check_pair(round: &RoundRow, checkpoint: &Checkpoint) -> Result<(), DbError> {
    if round.run_id != checkpoint.run_id {
        return Err(DbError::Mismatch {
            round_run: round.run_id.to_string(),
            checkpoint_run: checkpoint.run_id.to_string(),
        });
    }
    Ok(())
}

/// A run row as both databases return it, before its values are checked.
struct RawRun {
    run_id: String,
    plan_id: String,
    number: i64,
    name: String,
    wire_toml: String,
    submitted_by: String,
    submitted_ms: i64,
    rounds_planned: i64,
    status: String,
    reason: String,
    final_model: Option<String>,
    finished_ms: Option<i64>,
}

/// The run columns, in [`RawRun`]'s order.
const RUN_COLUMNS: &str = "run_id, plan_id, number, name, wire_toml, submitted_by, submitted_ms, rounds_planned, status, reason, final_model, finished_ms";

impl RawRun {
    fn into_row(self) -> Result<RunRow, DbError> {
        Ok(RunRow {
            number: u32_of("runs.number", self.number)?,
            submitted_ms: u64_of("runs.submitted_ms", self.submitted_ms)?,
            rounds_planned: u32_of("runs.rounds_planned", self.rounds_planned)?,
            status: RunStatus::parse(&self.status).ok_or_else(|| DbError::Corrupt {
                what: "runs.status",
                reason: format!("unknown status '{}'", self.status),
            })?,
            finished_ms: self.finished_ms.map(|v| u64_of("runs.finished_ms", v)).transpose()?,
            run_id: id_of("runs.run_id", self.run_id)?,
            plan_id: id_of("runs.plan_id", self.plan_id)?,
            name: self.name,
            wire_toml: self.wire_toml,
            submitted_by: self.submitted_by,
            reason: self.reason,
            final_model: self.final_model,
        })
    }
}

struct RawRound {
    run_id: String,
    round: i64,
    model_sha256: String,
    reported: String,
    dropped: String,
    record_line: String,
    closed_ms: i64,
}

const ROUND_COLUMNS: &str = "run_id, round, model_sha256, reported, dropped, record_line, closed_ms";

impl RawRound {
    fn into_row(self) -> Result<RoundRow, DbError> {
        Ok(RoundRow {
            round: u32_of("rounds.round", self.round)?,
            reported: names_of("rounds.reported", &self.reported)?,
            dropped: names_of("rounds.dropped", &self.dropped)?,
            closed_ms: u64_of("rounds.closed_ms", self.closed_ms)?,
            run_id: id_of("rounds.run_id", self.run_id)?,
            model_sha256: self.model_sha256,
            record_line: self.record_line,
        })
    }
}

const DECISION_COLUMNS: &str = "run_id, node, accept, reason, epsilon, delta, at_ms";
const RECEIPT_COLUMNS: &str = "run_id, round, node, agrees, reason, signature, at_ms";
const NODE_COLUMNS: &str = "name, fingerprint, version, device, first_seen_ms, last_seen_ms";

#[allow(clippy::too_many_arguments)]
fn decision_row(
    run_id: String,
    node: String,
    accept: bool,
    reason: String,
    epsilon: Option<f64>,
    delta: Option<f64>,
    at_ms: i64,
) -> Result<DecisionRow, DbError> {
    Ok(DecisionRow {
        run_id: id_of("decisions.run_id", run_id)?,
        node: id_of("decisions.node", node)?,
        accept,
        reason,
        epsilon,
        delta,
        at_ms: u64_of("decisions.at_ms", at_ms)?,
    })
}
