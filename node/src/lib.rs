//! Sanctum's hospital node: it dials out to the coordinator, checks every plan against the
//! hospital's own policy and data, trains on the hospital's data with libtorch, and sends only
//! model updates and metrics, writing down every byte that leaves.
//!
//! # Layout
//! - [`config`]: the node's one config file (coordinator, TLS, datasets, policy, device).
//! - [`data`]: loading and validating a local CSV against a plan's schema.
//! - [`policy`]: the local rules a plan must satisfy before the node takes part (fails closed).
//! - [`admission`]: accept an offered plan with its planned privacy cost, or refuse it (pure).
//! - [`budget`]: what a release costs its run and whether the caps let it be charged (pure).
//! - [`train`]: the model zoo on tch, local training and evaluation.
//! - [`device`]: the libtorch device setting (`auto`, `cpu`, `cuda:N`) and its checks.
//! - [`scores`]: the metrics of every task (pure), agreeing with scikit-learn and lifelines.
//! - [`loss`]: the loss of every task on tensors (per example, and the batch's).
//! - [`dp_stats`]: standardisation statistics released under DP (`[standardize] with = "dp"`).
//! - [`download`]: a model download kept on disk while it arrives, so a broken one resumes.
//! - [`dpsgd`]: DP-SGD's per-example clipping by ghost norms (no loop over examples).
//! - [`torchscript`]: TorchScript models by hash, checked against the plan, DP-SGD by micro-batches.
//! - [`approvals`]: the hospital's approved TorchScript models (by SHA-256), fail closed.
//! - [`cli_evaluate`]: `sanctum-node evaluate`, a released model on the hospital's own test split.
//! - [`cli_model`]: `sanctum-node model approve | list | revoke | inspect`.
//! - [`ledger`]: the privacy ledger, charged and fsync'd before an update leaves.
//! - [`state_lock`]: the state directory's lock, one node process per state directory.
//! - [`step_bench`]: one plain or DP-SGD step on a random batch, for `cargo bench --bench dpsgd`.
//! - [`release`]: each open run's latest release, kept so a repeated round re-sends the same bytes.
//! - [`rounds`]: which round and evaluation directives the node obeys (pure decisions).
//! - [`metrics`]: test-split metrics as a noised, charged release (`policy.test_metrics = "noised"`).
//! - [`receipt`]: whether a round record lists exactly what the node sent, and the statement it
//!   signs to countersign it (verdict and reason included; pure).
//! - [`egress`]: the append-only record of everything the node sent and the rule that allowed it.
//! - [`link`]: the only holder of the gRPC client; records each message in the egress log first.
//! - [`backoff`]: reconnect delays with full jitter (pure).
//! - [`daemon`]: the gRPC client loop that ties them together.
//! - `faults` (only with the `fault-injection` feature): the end-to-end tests' hooks, handed to
//!   the daemon by `main` as a `FaultOptions`.

pub mod admission;
pub mod approvals;
pub mod backoff;
pub mod budget;
pub mod cli_data;
pub mod cli_evaluate;
pub mod cli_model;
pub mod config;
pub mod correction;
pub mod daemon;
pub mod data;
pub mod device;
pub mod download;
pub mod dp_stats;
pub mod dpsgd;
pub mod egress;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod ledger;
pub mod link;
pub mod loss;
pub mod metrics;
pub mod noise_pool;
pub mod policy;
pub mod receipt;
pub mod release;
pub mod rounds;
pub mod scaffold;
pub mod scores;
pub mod state_lock;
pub mod step_bench;
pub mod table;
pub mod torchscript;
pub mod train;
