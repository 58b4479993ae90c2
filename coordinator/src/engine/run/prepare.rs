//! A submission checked before a run is recorded, and what the plan state machine needs of it.

use std::time::Duration;

use sanctum_protocol::plan::{Plan, PrivacyMode};
use sanctum_protocol::privacy::{self, Accountant, SampledGaussian};

use crate::aggregate::ClientDp;
use crate::engine::{PlanId, SubmitRefused};
use crate::round::RunConfig;

/// What client-level DP guarantees each hospital for the whole plan.
#[derive(Clone, Copy, Debug)]
pub(in crate::engine) struct ClientDpCost {
    pub(in crate::engine) noise_multiplier: f64,
    pub(in crate::engine) epsilon: f64,
    pub(in crate::engine) delta: f64,
}

/// A submission that passed every check and may start a run.
#[derive(Debug)]
pub struct Prepared {
    pub plan: Plan,
    pub plan_id: PlanId,
    pub wire_toml: String,
    pub(super) client_dp: Option<(ClientDp, ClientDpCost)>,
    pub(super) secagg_noise: Option<f64>,
}

impl Prepared {
    /// Checks everything that can refuse the plan before a run is recorded.
    pub(in crate::engine) fn new(plan: Plan, model_file: &[u8]) -> Result<Self, SubmitRefused> {
        let invalid = SubmitRefused::Invalid;
        // The lead's handler parsed it, but `Coordinator::submit` takes a `Plan` from any caller:
        // every number the run computes with must be within the plan limits.
        plan.validate().map_err(|e| invalid(e.to_string()))?;
        let wire_toml = plan.to_wire_toml().map_err(|e| invalid(e.to_string()))?;
        let plan_id = PlanId::of_hash(&Plan::id_of(&wire_toml));
        let client_dp =
            if plan.secure_aggregation { None } else { client_dp_for(&plan).map_err(|e| invalid(e.to_string()))? };
        let secagg_noise =
            sanctum_protocol::secagg::encode::distributed_noise(&plan).map_err(|e| invalid(e.to_string()))?;
        crate::plan_files::check_model_file(&plan, model_file).map_err(|e| invalid(e.to_string()))?;
        Ok(Self { plan, plan_id, wire_toml, client_dp, secagg_noise })
    }
}

/// Sets up DP-FedAvg for a plan in client mode: the noise multiplier (given, or the smallest that
/// meets the target over all rounds by the PLD accountant, with every hospital in every round)
/// and the resulting ε.
fn client_dp_for(plan: &Plan) -> Result<Option<(ClientDp, ClientDpCost)>, crate::engine::ClientDpSetupError> {
    let p = &plan.privacy;
    if p.mode != PrivacyMode::Client {
        return Ok(None);
    }
    let (Some(delta), Some(clip)) = (p.delta, p.clip_norm) else {
        return Err(crate::engine::ClientDpSetupError::NoDeltaOrClip);
    };
    let rounds = u64::from(plan.rounds);
    let sigma = match (p.noise_multiplier, p.target_epsilon) {
        (Some(s), _) => s,
        (None, Some(target)) => privacy::noise_for_epsilon(Accountant::Pld, target, 1.0, rounds, delta)?,
        (None, None) => return Err(crate::engine::ClientDpSetupError::NoNoise),
    };
    let run = SampledGaussian { sampling_rate: 1.0, noise_multiplier: sigma, steps: rounds };
    let epsilon = privacy::epsilon_with(Accountant::Pld, &run, delta)?;
    let dp = ClientDp::new(sigma, clip, p.adaptive_clipping.clone())?;
    Ok(Some((dp, ClientDpCost { noise_multiplier: sigma, epsilon, delta })))
}

/// What the plan state machine needs of a plan; `evaluation_deadline` and `heartbeat_timeout`
/// are the coordinator's.
pub(in crate::engine) fn run_config(
    plan: &Plan,
    evaluation_deadline: Duration,
    heartbeat_timeout: Duration,
) -> RunConfig {
    RunConfig {
        rounds: plan.rounds,
        min_nodes: plan.min_nodes,
        recruit_deadline: Duration::from_secs(plan.recruit_deadline_secs),
        round_deadline: Duration::from_secs(plan.round_deadline_secs),
        evaluation_deadline,
        retries: plan.retries,
        heartbeat_timeout,
    }
}
