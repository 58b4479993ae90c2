//! The hospital's local rules. Whatever the coordinator asks, the node only takes part in a plan
//! its policy allows; anything the policy does not mention is refused (fail closed).

use sanctum_protocol::plan::{Plan, Weighting};

use crate::config::{DatasetConfig, NodeConfig};

/// Why the hospital's policy refuses a plan; the text is the reason the coordinator gets, so it
/// names the plan's figures and the policy's settings, never anything of the data.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefused {
    /// `allowed` is the policy's list, comma-separated, or "empty".
    #[error("model '{model}' is not in this hospital's policy.allowed_models ({allowed})")]
    Model { model: String, allowed: String },
    #[error("plan asks for {asked} rounds; policy.max_rounds is {max}")]
    Rounds { asked: u32, max: u32 },
    #[error("plan's model has {parameters} parameters; this hospital's policy.max_model_parameters is {max}")]
    Parameters { parameters: u64, max: u64 },
    #[error("plan asks for {asked} local steps per round; this hospital's policy.max_local_steps is {max}")]
    LocalSteps { asked: u32, max: u32 },
    #[error(
        "plan sends each hospital's update in the clear; this hospital's policy.min_cohort = {min} requires secure aggregation (secure_aggregation = true)"
    )]
    InTheClear { min: usize },
    #[error(
        "plan lets secure aggregation release the sum of as few as {least} hospitals' updates; this hospital's policy.min_cohort is {min} (raise secagg.threshold or min_nodes)"
    )]
    SmallCohort { least: usize, min: usize },
    #[error(
        "plan weights updates by sample count, which this hospital's policy withholds (policy.share_sample_counts = false)"
    )]
    SampleCounts,
    #[error("plan names no schema file (data.schema_sha256); this node trains only on a schema it holds")]
    NoSchemaHash,
    /// One wording whether or not a schema of that name is held here (see [`check`]).
    #[error("this hospital has no dataset with schema '{schema}' (SHA-256 {sha256})")]
    NoDataset { schema: String, sha256: String },
}

/// Checks a plan against the node's policy; returns the dataset to use or the reason to refuse.
pub fn check<'a>(plan: &Plan, cfg: &'a NodeConfig) -> Result<&'a DatasetConfig, PolicyRefused> {
    let model = plan.model.name();
    if !cfg.policy.allowed_models.iter().any(|m| m == model) {
        let allowed = if cfg.policy.allowed_models.is_empty() {
            "empty".to_string()
        } else {
            cfg.policy.allowed_models.join(", ")
        };
        return Err(PolicyRefused::Model { model: model.to_string(), allowed });
    }
    if plan.rounds > cfg.policy.max_rounds {
        return Err(PolicyRefused::Rounds { asked: plan.rounds, max: cfg.policy.max_rounds });
    }
    // Both figures are the plan's and the policy's own: nothing of the data.
    let parameters = plan.model_parameters();
    if parameters > cfg.policy.max_model_parameters {
        return Err(PolicyRefused::Parameters { parameters, max: cfg.policy.max_model_parameters });
    }
    if plan.local.steps > cfg.policy.max_local_steps {
        return Err(PolicyRefused::LocalSteps { asked: plan.local.steps, max: cfg.policy.max_local_steps });
    }
    if let Some(min) = cfg.policy.min_cohort {
        if !plan.secure_aggregation {
            return Err(PolicyRefused::InTheClear { min });
        }
        // The smallest threshold any round of the plan can have (a round with n participants uses
        // at least this).
        let least = plan.secagg_threshold(0);
        if least < min {
            return Err(PolicyRefused::SmallCohort { least, min });
        }
    }
    // Even masked, sample weights leak: the decoded sum holds Σ n / max_samples over each round's
    // survivors, and a coordinator choosing the participants can solve for every hospital's n.
    if plan.strategy.weighting() == Weighting::Samples && !cfg.policy.share_sample_counts {
        return Err(PolicyRefused::SampleCounts);
    }
    let Some(sha) = plan.data.schema_sha256.as_deref() else {
        return Err(PolicyRefused::NoSchemaHash);
    };
    if let Some(d) = cfg.dataset_with_schema(sha) {
        return Ok(d);
    }
    // One wording whether or not a schema of that name is held here: a coordinator guessing names
    // learns nothing of what else this hospital holds ([`other_version`] tells the local log).
    Err(PolicyRefused::NoDataset { schema: plan.data.schema.clone(), sha256: sha.to_string() })
}

/// For the node's own log when a plan is refused for its schema: the hash of the schema of the
/// same name this hospital holds, if it holds another version.
pub fn other_version(plan: &Plan, cfg: &NodeConfig) -> Option<String> {
    let sha = plan.data.schema_sha256.as_deref()?;
    let held = cfg.dataset(&plan.data.schema)?.schema()?.sha256().to_hex();
    (held != sha).then_some(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(policy: &str) -> NodeConfig {
        let text = format!(
            "coordinator = \"localhost:1\"\nstate_dir = \"state\"\n[tls]\nca = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n.key\"\n\
             [[datasets]]\nschema = \"heart_disease\"\npath = \"heart.csv\"\n\
             [policy]\nallowed_models = [\"logistic_regression\", \"mlp\"]\n{policy}\n"
        );
        let mut cfg: NodeConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        cfg.datasets = vec![DatasetConfig::with_schema(heart(), "heart.csv".into())];
        cfg
    }

    fn heart() -> sanctum_protocol::dataset::Schema {
        sanctum_protocol::dataset::Schema::parse(include_str!("../../examples/heart_disease/schema.toml")).unwrap()
    }

    fn plan(model: &str, steps: u32) -> Plan {
        let sha = heart().sha256().to_hex();
        let text = format!(
            "name = \"p\"\nrounds = 3\nmin_nodes = 1\n[model]\n{model}\n[data]\nschema = \"heart_disease\"\n\
             schema_sha256 = \"{sha}\"\n[local]\nsteps = {steps}\nbatch_size = 4\nlearning_rate = 0.1\n[strategy]\nkind = \"fedavg\"\n"
        );
        Plan::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    const LOGREG: &str = "kind = \"logistic_regression\"\ninputs = 13";
    // 13·11200 + 11200 + 11200² + 11200 + 11200 + 1 = 125,619,201 parameters.
    const BIG_MLP: &str = "kind = \"mlp\"\ninputs = 13\nhidden = [11200, 11200]";

    #[test]
    fn a_plan_over_the_policys_model_size_or_local_steps_is_refused_naming_the_cap() {
        // (policy lines, model, local steps, None = accepted or the words of the refusal)
        let cases: &[(&str, &str, u32, Option<&str>)] = &[
            ("", LOGREG, 100, None),
            ("", LOGREG, 10_000, None),
            (
                "",
                LOGREG,
                10_001,
                Some("plan asks for 10001 local steps per round; this hospital's policy.max_local_steps is 10000"),
            ),
            ("", BIG_MLP, 1, None),
            ("max_local_steps = 5", LOGREG, 5, None),
            ("max_local_steps = 5", LOGREG, 6, Some("policy.max_local_steps is 5")),
            ("max_model_parameters = 14", LOGREG, 1, None),
            (
                "max_model_parameters = 13",
                LOGREG,
                1,
                Some("plan's model has 14 parameters; this hospital's policy.max_model_parameters is 13"),
            ),
            ("max_model_parameters = 1000000", BIG_MLP, 1, Some("plan's model has 125619201 parameters")),
            ("max_model_parameters = 1000000\nmax_local_steps = 1", BIG_MLP, 2, Some("policy.max_model_parameters")),
        ];
        for (policy, model, steps, want) in cases {
            let got = check(&plan(model, *steps), &config(policy)).map(|d| d.name());
            match (want, got) {
                (None, Ok(schema)) => assert_eq!(schema, "heart_disease"),
                (Some(words), Err(reason)) => {
                    let reason = reason.to_string();
                    assert!(reason.contains(words), "{policy:?} {model:?} {steps}: {reason}");
                    // The reason leaves the hospital: it names the plan's figures and the policy's
                    // cap, never the dataset.
                    assert!(!reason.contains("heart.csv"), "{reason}");
                }
                (want, got) => panic!("{policy:?} {model:?} {steps}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    /// A coordinator guessing schema names learns nothing of what the hospital holds: the refusal
    /// for another version of a held schema reads like the one for a schema never held, and names
    /// only what the plan named.
    #[test]
    fn a_schema_refusal_says_nothing_of_what_else_is_held() {
        let cfg = config("");
        let other = "ab".repeat(32);
        let with = |name: &str| {
            let mut p = plan(LOGREG, 1);
            p.data.schema = name.into();
            p.data.schema_sha256 = Some(other.clone());
            p
        };
        let held_name = check(&with("heart_disease"), &cfg).unwrap_err().to_string();
        let unknown = check(&with("breast_cancer"), &cfg).unwrap_err().to_string();
        assert_eq!(held_name.replace("heart_disease", "X"), unknown.replace("breast_cancer", "X"));
        assert!(!held_name.contains(&heart().sha256().to_hex()), "{held_name}");
        // The node's own log may say which version it holds.
        assert_eq!(other_version(&with("heart_disease"), &cfg), Some(heart().sha256().to_hex()));
        assert_eq!(other_version(&with("breast_cancer"), &cfg), None);
    }

    #[test]
    fn the_caps_have_defaults_and_a_cap_of_zero_is_refused() {
        let cfg = config("");
        assert_eq!((cfg.policy.max_model_parameters, cfg.policy.max_local_steps), (1 << 27, 10_000));
        assert!(cfg.validate().is_ok());
        let e = config("max_model_parameters = 0").validate().unwrap_err().to_string();
        assert!(e.contains("policy.max_model_parameters"), "{e}");
        let e = config("max_local_steps = 0").validate().unwrap_err().to_string();
        assert!(e.contains("policy.max_local_steps"), "{e}");
    }
}
