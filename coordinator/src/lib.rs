//! Sanctum's coordinator: it recruits hospital nodes into a plan, runs its rounds, aggregates
//! their updates as they arrive, and serves the consortium lead.
//!
//! # Layout
//! - [`round`]: the plan/round state machine (sans-IO; time is an argument).
//! - [`aggregate`]: the streaming weighted sum and the server optimizers (plain arithmetic).
//! - [`runs`]: runs of plans (a plan that runs again is a new run) and their registry file.
//! - [`db`]: the durable state (runs, rounds with their checkpoints, decisions, receipts, events,
//!   nodes) behind one trait, in SQLite (default) or PostgreSQL, with schema migrations.
//! - [`store`]: content-addressed models, the upload spool and exports, written atomically.
//! - [`robust_spool`]: the robust aggregators' open round's updates on disk, a file each, read back
//!   a coordinate block at a time.
//! - [`strategy`]: the server step of every strategy and the robust aggregators' rules.
//! - [`service`]: the gRPC services (one file each), the transport, the revocation follower and the
//!   driver task that applies the state machine's actions.
//! - [`web`]: the read-only status page and Prometheus endpoint on a listener of their own;
//!   [`metrics`]: the registry and typed handles the services and the driver increment.
//! - [`watch`]: the lead's live view of a plan (progress bar and per-round lines).
//! - [`config`]: the coordinator's and the lead's config files.
//! - [`pki`]: `pki init` and `pki sign`, the consortium CA's file handling.
//! - [`plan_files`]: the schema and TorchScript files a lead's plan names, read and checked once.
//! - [`receipts`]: countersigned round records: which countersignature is taken (one per node and
//!   round, signed over the verdict), and their offline re-verification for the report.
//! - [`simulate`]: the coordinator plus one real `sanctum-node` process per hospital on loopback.
//! - [`status`]: what `plan list | status` and `nodes list` show, assembled (pure) from what the
//!   service holds, and the resolution of a run id, plan id or prefix into one run.
//! - [`admin_cli`]: the lead's and auditors' admin commands (`plan list | status | cancel | watch`,
//!   `nodes list`, `model export`): calls, text and JSON output, the export's hash checks.
//! - [`plan_cli`], [`pki_cli`], [`audit_cli`]: the binary's `plan`/`nodes`/`model`, `pki` and
//!   `audit` subcommands (clap types and what each runs and prints), so `main.rs` only parses,
//!   serves and dispatches.

pub mod admin_cli;
pub mod aggregate;
pub mod audit_cli;
pub mod config;
pub mod db;
pub mod engine;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod metrics;
pub mod pki;
pub mod pki_cli;
pub mod plan_cli;
pub mod plan_files;
pub mod receipts;
pub mod recovery;
pub mod report;
pub mod robust_spool;
pub mod round;
pub mod runs;
pub mod secure;
pub mod service;
pub mod simulate;
pub mod status;
pub mod store;
pub mod strategy;
#[cfg(test)]
mod test_ids;
pub mod watch;
pub mod web;
