//! What a run keeps across a coordinator restart: its state at the end of its last completed
//! round (or at its start), serialised as JSON. The global model and the server optimizer's
//! moments are content-addressed files named here by hash, so a checkpoint is small whatever the
//! model's size. A restored run offers itself again to the nodes that had accepted and opens the
//! round after the last completed one: a round in flight at the crash is run again from its start,
//! and nodes answer a round they already released with the same bytes (their ledgers charge each
//! round once), so no round is lost or counted twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sanctum_protocol::audit::AuditEvent;
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::model::Weights;
use sanctum_protocol::plan::Plan;
use serde::{Deserialize, Serialize};

use super::effects::{Actor, Effect};
use super::run::{Prepared, RunEngine};
use super::{Engine, Millis, NodeName, PlanId, RunId, short};
use crate::aggregate::ClientDp;
use crate::round::PlanRun;
use crate::strategy::ServerState;

/// The checkpoint format this build writes and reads.
pub const FORMAT: u32 = 1;

/// A run's state at a round boundary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunCheckpoint {
    pub format: u32,
    pub plan_id: PlanId,
    pub run_id: RunId,
    pub run_number: u32,
    /// The plan as it was offered (its SHA-256 is the plan id).
    pub wire_toml: String,
    pub rounds_completed: u32,
    /// SHA-256 of the global model after `rounds_completed` rounds, and its size.
    pub model: String,
    pub model_bytes: u64,
    /// Hash of the initial model and of every completed round's result.
    pub lineage: Vec<String>,
    /// SHA-256 of the server optimizer's moments (adaptive strategies only).
    pub moments: Option<String>,
    pub accepted: BTreeSet<NodeName>,
    pub refused: BTreeMap<NodeName, String>,
    /// Client-level DP's state (its adaptive clip norm moves from round to round).
    pub client_dp: Option<ClientDp>,
    /// zCDP ρ released so far under distributed DP.
    pub secagg_rho: f64,
    /// The round this checkpoint closed, with its record: a restart writes whatever of its audit
    /// records a crash right after the commit left out (`crate::recovery`).
    #[serde(default)]
    pub last_round: Option<ClosedRound>,
    /// The final evaluation's metrics received so far, by node (after the last round only): a
    /// restart during the final evaluation asks only the nodes not in here, since a node
    /// evaluates a model once and refuses a second request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub final_metrics: BTreeMap<NodeName, Vec<SavedMetric>>,
}

/// A metric a node reported on the final model, as a checkpoint keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedMetric {
    pub name: String,
    pub value: f64,
    pub samples: u64,
}

/// The engine's final metrics from a checkpoint's.
pub(super) fn metrics_from_saved(
    saved: &BTreeMap<NodeName, Vec<SavedMetric>>,
) -> BTreeMap<NodeName, Vec<sanctum_protocol::proto::Metric>> {
    saved
        .iter()
        .map(|(node, ms)| {
            let ms = ms
                .iter()
                .map(|m| sanctum_protocol::proto::Metric { name: m.name.clone(), value: m.value, samples: m.samples })
                .collect();
            (node.clone(), ms)
        })
        .collect()
}

/// The round a checkpoint closes, as the store records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClosedRound {
    pub round: u32,
    pub model_sha256: String,
    pub reported: Vec<NodeName>,
    pub dropped: Vec<NodeName>,
    /// The parameters of its `round_record` audit record, which the nodes that reported
    /// countersign.
    pub record: super::Params,
}

/// Why a checkpoint cannot be restored; the run is marked interrupted with this reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "checkpoint format {found} is not the format {FORMAT} this coordinator reads; run it with the version that wrote it"
    )]
    Format { found: u32 },
    #[error("the checkpoint's plan no longer parses ({0}); the run cannot go on")]
    Plan(String),
    #[error("the checkpoint's plan hashes to {found}, not to its plan id {plan_id}: the checkpoint is corrupt")]
    PlanId { plan_id: PlanId, found: PlanId },
    #[error("global model {model}: {reason}")]
    Model { model: String, reason: String },
    #[error("server optimizer moments: {0}")]
    Moments(String),
    #[error("a run of plan {0} is already going on")]
    AlreadyRunning(String),
}

impl RunEngine {
    /// This run's checkpoint, and the moments' bytes it names (stored by the executor).
    pub(super) fn checkpoint(&self, last_round: Option<ClosedRound>) -> (RunCheckpoint, Option<Arc<Vec<u8>>>) {
        let moments = self.server.moments_bytes();
        let moments = (!moments.is_empty()).then(|| Arc::new(moments));
        let cp = RunCheckpoint {
            format: FORMAT,
            plan_id: self.plan_id.clone(),
            run_id: self.run_id.clone(),
            run_number: self.run_number,
            wire_toml: self.wire_toml.clone(),
            rounds_completed: self.run.rounds_completed(),
            model: self.model.to_hex(),
            model_bytes: self.model_bytes,
            lineage: self.lineage.iter().map(|h| h.to_hex()).collect(),
            moments: moments.as_ref().map(|m| ContentHash::of(m).to_hex()),
            accepted: self.run.accepted().clone(),
            refused: self.run.refusals().clone(),
            client_dp: self.client_dp.as_ref().map(|(dp, _)| dp.clone()),
            secagg_rho: self.secagg_rho,
            last_round: last_round.or_else(|| self.last_closed.clone()),
            final_metrics: self
                .final_metrics
                .iter()
                .map(|(node, ms)| {
                    let ms = ms
                        .iter()
                        .map(|m| SavedMetric { name: m.name.clone(), value: m.value, samples: m.samples })
                        .collect();
                    (node.clone(), ms)
                })
                .collect(),
        };
        (cp, moments)
    }

    /// The effect that makes this run's state durable, with the round it closes (if any; a later
    /// checkpoint of the run keeps naming it).
    pub(super) fn checkpoint_effect(&mut self, closed: Option<ClosedRound>) -> Effect {
        if closed.is_some() {
            self.last_closed = closed.clone();
        }
        let (state, moments) = self.checkpoint(closed.clone());
        Effect::Checkpoint { state: Box::new(state), moments, closed, required: true }
    }
}

impl Engine {
    /// Restores a run from its checkpoint, given the bytes of the model and moments it names;
    /// returns what to do (offer the run again to the connected nodes that had accepted it).
    pub fn restore(
        &mut self,
        now: Millis,
        cp: RunCheckpoint,
        model: &[u8],
        moments: Option<&[u8]>,
    ) -> Result<Vec<Effect>, RestoreError> {
        if cp.format != FORMAT {
            return Err(RestoreError::Format { found: cp.format });
        }
        if self.running().any(|r| *r.plan_id() == cp.plan_id) {
            return Err(RestoreError::AlreadyRunning(short(&cp.plan_id).to_string()));
        }
        let plan = Plan::parse(&cp.wire_toml).map_err(|e| RestoreError::Plan(e.to_string()))?;
        let prepared = Prepared::new(plan, &[]).map_err(|e| RestoreError::Plan(e.to_string()))?;
        if prepared.plan_id != cp.plan_id {
            return Err(RestoreError::PlanId { plan_id: cp.plan_id, found: prepared.plan_id });
        }
        let model_err = |reason: String| RestoreError::Model { model: short(&cp.model).to_string(), reason };
        if ContentHash::of(model).to_hex() != cp.model {
            return Err(model_err("the stored file does not hash to the checkpoint's model".into()));
        }
        let global = Weights::from_safetensors(model, &prepared.plan.global_layout())
            .map_err(|e| model_err(format!("{e} (it is not the plan's model)")))?;
        let num_params = global.values().len();
        let server = match (&cp.moments, moments) {
            (None, _) => ServerState::new(prepared.plan.strategy.clone(), num_params),
            (Some(hash), Some(bytes)) if ContentHash::of(bytes).to_hex() == *hash => {
                ServerState::with_moments(prepared.plan.strategy.clone(), num_params, bytes)
                    .map_err(|e| RestoreError::Moments(e.to_string()))?
            }
            (Some(hash), _) => {
                return Err(RestoreError::Moments(format!("file {} is missing or does not match", short(hash))));
            }
        };
        let cfg = super::run::run_config(&prepared.plan, self.evaluation_deadline, self.heartbeat_timeout);
        let (run, actions) = PlanRun::resume(
            cfg,
            cp.accepted.clone(),
            cp.refused.clone(),
            cp.rounds_completed,
            self.connected.iter().cloned(),
            0,
        );
        let lineage = cp
            .lineage
            .iter()
            .map(|h| ContentHash::parse(h).map_err(|e| model_err(format!("lineage: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut fx = vec![Effect::Audit {
            actor: Actor::Coordinator,
            event: AuditEvent::PlanResumed {
                plan_id: cp.plan_id.to_string(),
                run: cp.run_id.to_string(),
                rounds_completed: cp.rounds_completed,
                model_sha256: cp.model.to_string(),
            },
        }];
        tracing::info!(
            plan = prepared.plan.name,
            run = short(&cp.run_id),
            rounds_completed = cp.rounds_completed,
            "run resumed from its checkpoint"
        );
        // A robust run's buffer starts empty: its interrupted round runs again from its start.
        let mut engine = RunEngine::restored(
            prepared,
            &cp,
            run,
            global,
            server,
            lineage,
            now,
            (self.epoch, self.epoch_unix_ms),
            &*self.buffers,
        );
        engine.apply(actions, now, &mut fx);
        self.runs.insert(cp.run_id.clone(), engine);
        Ok(fx)
    }
}
