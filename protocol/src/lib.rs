//! The contract between Sanctum's parties: what the coordinator, the hospital nodes and the
//! consortium lead agree on, with no I/O policy of its own.
//!
//! # Layout
//! - [`proto`]: the gRPC wire types and services generated from `proto/sanctum.proto`. Only this
//!   crate defines wire types; the other crates convert at their edges.
//! - [`plan`]: the training plan a lead submits (TOML), its validation and its content address.
//! - [`privacy`]: DP accountants (RDP and PLD) for the Poisson-subsampled Gaussian, no I/O.
//! - [`dataset`]: dataset schemas as TOML files (columns, types, ranges, missing values, target,
//!   task, split, preprocessing), named by SHA-256, and the pure per-cell reading a node uses.
//! - [`model`]: the model zoo's parameter layouts, initialisation and the safetensors encoding.
//! - [`secagg`]: secure-aggregation primitives (Shamir sharing, pairwise masks), no I/O.
//! - [`hash`]: SHA-256 content addresses for models, plans and updates.
//! - [`ids`]: typed ids (`PlanId`, `RunId`, `NodeName`), each parsed once at the trust boundary.
//! - [`transfer`]: chunking rules shared by uploads and downloads (no message-size ceiling).
//! - [`receipt`]: the message a hospital signs to countersign a round record (record hash, verdict,
//!   reason), and its check.
//! - [`pki`]: the consortium CA, certificate requests, signing, and identity read from certificates.
//! - [`tls`]: mutual TLS 1.3 (rustls + ring) for both ends of a tonic channel, and the role guard.
//! - [`errors`]: an error printed with its causes on one line ([`errors::Chain`]).

pub mod audit;
pub mod dataset;
pub mod errors;
pub mod hash;
pub mod ids;
pub mod model;
pub mod pki;
pub mod plan;
pub mod privacy;
pub mod receipt;
/// The former built-in heart-disease schema, kept as the golden values its schema file is tested
/// against (`dataset::tests`).
#[cfg(test)]
#[allow(dead_code, unreachable_pub)]
pub(crate) mod schema;
pub mod secagg;
pub mod tls;
pub mod torch_init;
pub mod transfer;

/// Generated gRPC types and services (`sanctum.v1`).
#[allow(unreachable_pub, clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("sanctum.v1");
}

/// Re-exported so other crates encode wire types with the same prost.
pub use prost;

/// The software version both binaries report, so a lead can see who runs what.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The least time between two heartbeats of one node in one round that both count, in ms: the
/// coordinator's round machine refuses the second as too frequent.
pub const HEARTBEAT_MIN_GAP_MS: u64 = 1000;

/// Heartbeats a node may send at once before the coordinator's rate limit of one a second
/// (a token bucket per node, refilled at one token per [`HEARTBEAT_MIN_GAP_MS`]) refuses them.
pub const HEARTBEAT_BURST: f64 = 4.0;

/// The metric a node sends with each update for the ε its data has spent on the run so far
/// (its `samples` are the DP steps taken); never a test metric, so never a run's headline.
pub const EPSILON_SPENT_METRIC: &str = "epsilon_spent";
