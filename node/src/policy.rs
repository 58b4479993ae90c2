//! The hospital's local rules. Whatever the coordinator asks, the node only takes part in a plan
//! its policy allows; anything the policy does not mention is refused (fail closed).

use sanctum_protocol::plan::{Plan, Weighting};

use crate::config::{DatasetConfig, NodeConfig};

/// Checks a plan against the node's policy; returns the dataset to use or the reason to refuse.
pub fn check<'a>(plan: &Plan, cfg: &'a NodeConfig) -> Result<&'a DatasetConfig, String> {
    let model = plan.model.name();
    if !cfg.policy.allowed_models.iter().any(|m| m == model) {
        return Err(format!(
            "model '{model}' is not in this hospital's policy.allowed_models ({})",
            if cfg.policy.allowed_models.is_empty() {
                "empty".to_string()
            } else {
                cfg.policy.allowed_models.join(", ")
            }
        ));
    }
    if plan.rounds > cfg.policy.max_rounds {
        return Err(format!("plan asks for {} rounds; policy.max_rounds is {}", plan.rounds, cfg.policy.max_rounds));
    }
    if let Some(min) = cfg.policy.min_cohort {
        if !plan.secure_aggregation {
            return Err(format!(
                "plan sends each hospital's update in the clear; this hospital's policy.min_cohort = {min} requires secure aggregation (secure_aggregation = true)"
            ));
        }
        // The smallest threshold any round of the plan can have (a round with n participants uses
        // at least this).
        let least = plan.secagg_threshold(0);
        if least < min {
            return Err(format!(
                "plan lets secure aggregation release the sum of as few as {least} hospitals' updates; this hospital's policy.min_cohort is {min} (raise secagg.threshold or min_nodes)"
            ));
        }
    }
    // Even masked, sample weights leak: the decoded sum holds Σ n / max_samples over each round's
    // survivors, and a coordinator choosing the participants can solve for every hospital's n.
    if plan.strategy.weighting() == Weighting::Samples && !cfg.policy.share_sample_counts {
        return Err("plan weights updates by sample count, which this hospital's policy withholds (policy.share_sample_counts = false)".into());
    }
    cfg.dataset(&plan.data.schema)
        .ok_or_else(|| format!("this hospital has no dataset with schema '{}'", plan.data.schema))
}
