//! [`Plan::validate`]: the rules types alone do not hold (names, counts, deadlines, the model's
//! size, privacy and secure-aggregation numbers within [`super::limits`]), and
//! [`Plan::check_schema`], the plan against its dataset schema. Every error names the field.

use std::collections::BTreeSet;

use super::{
    ClassWeights, LocalOptimizer, PLAN_NAME_RULE, Plan, PlanError, PrivacyMode, SCHEMA_NAME_RULE, Strategy, WeightRule,
    Weighting, invalid, is_sha256_hex, limits,
};
use crate::model::ModelSpec;

/// A finite number in `min ..= max`, or the error naming `field` and the bounds.
fn check_range(field: &'static str, value: f64, min: f64, max: f64) -> Result<(), PlanError> {
    if !(value.is_finite() && (min..=max).contains(&value)) {
        return Err(invalid(field, format!("is {value:?}; it must be a number from {min:?} to {max:?}")));
    }
    Ok(())
}

/// Checks a plan name against [`PLAN_NAME_RULE`]. The name becomes a file name under
/// `state/exports`, so it can hold no path separator, no `..`, and no leading dot.
pub fn validate_plan_name(name: &str) -> Result<(), PlanError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !first_ok || !rest_ok || name.len() > limits::MAX_NAME_CHARS || name.contains("..") {
        return Err(invalid("name", format!("{:?} {PLAN_NAME_RULE}", shorten(name, limits::MAX_NAME_CHARS))));
    }
    Ok(())
}

/// At most `max` characters of `text` (never cut inside a character), with `…` when cut.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// A whole number of seconds in `1 ..= limits::MAX_DEADLINE_SECS`.
fn check_deadline(field: &'static str, secs: u64) -> Result<(), PlanError> {
    if !(1..=limits::MAX_DEADLINE_SECS).contains(&secs) {
        return Err(invalid(
            field,
            format!("is {secs}; it must be 1 to {} seconds (30 days)", limits::MAX_DEADLINE_SECS),
        ));
    }
    Ok(())
}

/// A count in `1 ..= max`.
fn check_count(field: &'static str, value: u64, max: u64) -> Result<(), PlanError> {
    if !(1..=max).contains(&value) {
        return Err(invalid(field, format!("is {value}; it must be 1 to {max}")));
    }
    Ok(())
}

impl Plan {
    /// Cross-field rules that types alone do not hold.
    pub fn validate(&self) -> Result<(), PlanError> {
        validate_plan_name(&self.name)?;
        check_count("rounds", u64::from(self.rounds), u64::from(limits::MAX_ROUNDS))?;
        check_count("min_nodes", self.min_nodes as u64, limits::MAX_NODES as u64)?;
        check_deadline("round_deadline_secs", self.round_deadline_secs)?;
        check_deadline("recruit_deadline_secs", self.recruit_deadline_secs)?;
        if self.retries > limits::MAX_RETRIES {
            return Err(invalid(
                "retries",
                format!("is {}; it must be 0 to {} (attempts after a failed round)", self.retries, limits::MAX_RETRIES),
            ));
        }
        // The size first: `inputs()` and the layout multiply the model's dimensions unchecked.
        self.validate_model_size()?;
        self.validate_data()?;
        self.model.validate().map_err(|e| invalid("model", e.to_string()))?;
        check_count("local.steps", u64::from(self.local.steps), u64::from(limits::MAX_LOCAL_STEPS))?;
        check_count("local.batch_size", u64::from(self.local.batch_size), u64::from(limits::MAX_BATCH_SIZE))?;
        if !(self.local.learning_rate.is_finite() && self.local.learning_rate > 0.0) {
            return Err(invalid("local.learning_rate", "must be a positive number"));
        }
        if let Strategy::Fedadam(o) | Strategy::Fedyogi(o) | Strategy::Fedadagrad(o) = &self.strategy {
            if !(o.server_learning_rate.is_finite() && o.server_learning_rate > 0.0) {
                return Err(invalid("strategy.server_learning_rate", "must be a positive number"));
            }
            for (field, b) in [("strategy.beta1", o.beta1), ("strategy.beta2", o.beta2)] {
                if !(0.0..1.0).contains(&b) {
                    return Err(invalid(field, format!("is {b}; it must be in [0, 1)")));
                }
            }
            if !(o.tau.is_finite() && o.tau > 0.0) {
                return Err(invalid("strategy.tau", "must be a positive number"));
            }
        }
        self.validate_privacy()?;
        self.validate_secagg()?;
        self.validate_strategy()?;
        if let Some(sim) = &self.simulation {
            let mut seen = BTreeSet::new();
            for h in &sim.hospitals {
                crate::pki::validate_name(&h.name).map_err(|e| invalid("simulation.hospitals.name", e.to_string()))?;
                if !seen.insert(&h.name) {
                    return Err(invalid("simulation.hospitals", format!("'{}' is listed twice", h.name)));
                }
            }
            if sim.hospitals.len() < self.min_nodes {
                return Err(invalid(
                    "simulation.hospitals",
                    format!("lists {} hospitals but min_nodes is {}", sim.hospitals.len(), self.min_nodes),
                ));
            }
        }
        Ok(())
    }

    /// `[data]` and `local.class_weights` on their own; [`Plan::check_schema`] checks them against
    /// the schema itself.
    fn validate_data(&self) -> Result<(), PlanError> {
        let d = &self.data;
        if validate_plan_name(&d.schema).is_err() {
            return Err(invalid(
                "data.schema",
                format!("{:?} {SCHEMA_NAME_RULE}", shorten(&d.schema, limits::MAX_NAME_CHARS)),
            ));
        }
        match (&d.schema_sha256, &d.schema_file) {
            (None, None) => {
                return Err(invalid(
                    "data.schema_sha256",
                    "is missing: a plan names its schema file by SHA-256; give data.schema_file (the CLI fills the hash in) or the hash itself",
                ));
            }
            (Some(h), _) if !is_sha256_hex(h) => {
                return Err(invalid(
                    "data.schema_sha256",
                    "must be 64 lowercase hex digits (the schema file's SHA-256)",
                ));
            }
            _ => {}
        }
        match &self.local.class_weights {
            None | Some(ClassWeights::Rule(WeightRule::Balanced)) if self.privacy.mode != PrivacyMode::Example => {}
            None => {}
            Some(ClassWeights::Rule(WeightRule::Balanced)) => {
                return Err(invalid(
                    "local.class_weights",
                    "is \"balanced\", which weighs each class by the node's own class counts: one patient then changes every other patient's weight, which DP-SGD's sensitivity does not cover; declare the weights (class_weights = [w0, w1, ...]) for an example-level DP plan",
                ));
            }
            Some(ClassWeights::Declared(w)) => {
                if w.len() < 2 || w.len() > limits::MAX_CLASSES {
                    return Err(invalid(
                        "local.class_weights",
                        format!("lists {} weights; give one per class, 2 to {}", w.len(), limits::MAX_CLASSES),
                    ));
                }
                if let Some(bad) = w.iter().find(|v| !(v.is_finite() && **v > 0.0 && **v <= 1e6)) {
                    return Err(invalid(
                        "local.class_weights",
                        format!("holds {bad:?}; every weight must be a number in (0, 1e6]"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks the plan against the schema it names: the hash, the name, the model's inputs
    /// (the schema's expanded features) and outputs (the task's), the model kind for the task,
    /// class weights for the task, and the privacy the task allows. Run by the lead's CLI when
    /// the plan gives its schema file, and by every node against the schema file it holds.
    pub fn check_schema(&self, schema: &crate::dataset::Schema) -> Result<(), PlanError> {
        use crate::dataset::Task;
        let hash = schema.sha256().to_hex();
        if let Some(h) = &self.data.schema_sha256
            && *h != hash
        {
            return Err(invalid(
                "data.schema_sha256",
                format!(
                    "is {h}, but the schema file's SHA-256 is {hash}: the plan was written for another version of the schema"
                ),
            ));
        }
        if self.data.schema != schema.name() {
            return Err(invalid(
                "data.schema",
                format!("is '{}', but the schema file is named '{}'", self.data.schema, schema.name()),
            ));
        }
        let features = schema.features().len();
        if self.model.inputs() != features {
            return Err(invalid(
                "model.inputs",
                format!(
                    "is {} but schema '{}' has {features} features (after one-hot encoding)",
                    self.model.inputs(),
                    schema.name()
                ),
            ));
        }
        let task = schema.task();
        if self.model.outputs() != task.outputs() {
            return Err(invalid(
                "model.outputs",
                format!(
                    "is {} but schema '{}' is a {task} task, whose model has {} output(s)",
                    self.model.outputs(),
                    schema.name(),
                    task.outputs()
                ),
            ));
        }
        if matches!(self.model, ModelSpec::Cox { .. }) && task != Task::Survival {
            return Err(invalid(
                "model.kind",
                format!("is cox, a survival model, but schema '{}' is a {task} task", schema.name()),
            ));
        }
        if let Some(ClassWeights::Declared(w)) = &self.local.class_weights {
            let classes = match task {
                Task::Binary => 2,
                Task::Multiclass { classes } => classes,
                Task::Regression | Task::Survival => 0,
            };
            if w.len() != classes {
                return Err(invalid(
                    "local.class_weights",
                    format!(
                        "lists {} weights but schema '{}' is a {task} task with {classes} classes",
                        w.len(),
                        schema.name()
                    ),
                ));
            }
        }
        if self.local.class_weights.is_some() && matches!(task, Task::Regression | Task::Survival) {
            return Err(invalid(
                "local.class_weights",
                format!("applies to classification; schema '{}' is a {task} task", schema.name()),
            ));
        }
        if task == Task::Survival && self.privacy.mode == PrivacyMode::Example {
            return Err(invalid(
                "privacy.mode",
                "is example, but the Cox partial likelihood couples the rows of a batch (each row's loss depends on its risk set), so there is no per-example gradient to clip; use client-level DP (privacy.mode = \"client\"), which clips each hospital's whole update",
            ));
        }
        Ok(())
    }

    /// The model's depth and parameter count within [`limits`], computed without overflow.
    fn validate_model_size(&self) -> Result<(), PlanError> {
        // A convnet's sizes follow from its geometry: one that does not fit has no size to bound.
        self.model.validate_geometry().map_err(|e| invalid("model", e.to_string()))?;
        let layers = match &self.model {
            ModelSpec::LogisticRegression { .. } | ModelSpec::Cox { .. } => 0,
            ModelSpec::Torchscript(t) => t.parameters.len().div_ceil(16),
            ModelSpec::Mlp { hidden, .. } => hidden.len(),
            ModelSpec::Cnn { filters, .. } => filters.len(),
            ModelSpec::Convnet { conv, hidden, .. } => conv.len() + hidden.len(),
        };
        if layers > limits::MAX_MODEL_LAYERS {
            return Err(invalid(
                "model",
                format!("has {layers} layers; a plan's model may have at most {}", limits::MAX_MODEL_LAYERS),
            ));
        }
        // SCAFFOLD's global model and updates carry a control variate as large as the model.
        let factor = if self.strategy.is_scaffold() { 2 } else { 1 };
        match self.model.checked_num_params().and_then(|n| n.checked_mul(factor)) {
            Some(n) if n <= limits::MAX_MODEL_PARAMETERS => Ok(()),
            n => Err(invalid(
                "model",
                format!(
                    "has {} parameters; a plan's model may have at most {} (2^28)",
                    n.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
                    limits::MAX_MODEL_PARAMETERS
                ),
            )),
        }
    }

    /// The parameters a node holds and sends for the plan, which [`Plan::validate`] has bounded by
    /// [`limits::MAX_MODEL_PARAMETERS`] (so it fits a `u64` and a `usize`): the model's, twice
    /// over for SCAFFOLD (its control variate is as large as the model).
    pub fn model_parameters(&self) -> u64 {
        let factor = if self.strategy.is_scaffold() { 2 } else { 1 };
        self.model.checked_num_params().and_then(|n| n.checked_mul(factor)).unwrap_or(u64::MAX)
    }

    fn validate_privacy(&self) -> Result<(), PlanError> {
        let p = &self.privacy;
        match p.mode {
            PrivacyMode::None => {
                if p.noise_multiplier.is_some()
                    || p.target_epsilon.is_some()
                    || p.clip_norm.is_some()
                    || p.adaptive_clipping.is_some()
                {
                    return Err(invalid(
                        "privacy.mode",
                        "is none, but privacy parameters are set; use mode = \"example\"",
                    ));
                }
            }
            PrivacyMode::Example | PrivacyMode::Client => {
                match (p.noise_multiplier, p.target_epsilon) {
                    (Some(_), Some(_)) | (None, None) => {
                        return Err(invalid("privacy", "needs exactly one of noise_multiplier or target_epsilon"));
                    }
                    (Some(sigma), None) => check_range(
                        "privacy.noise_multiplier",
                        sigma,
                        limits::MIN_NOISE_MULTIPLIER,
                        limits::MAX_NOISE_MULTIPLIER,
                    )?,
                    (None, Some(eps)) => {
                        if !(eps.is_finite() && eps > 0.0 && eps <= limits::MAX_TARGET_EPSILON) {
                            return Err(invalid(
                                "privacy.target_epsilon",
                                format!("is {eps:?}; it must be above 0 and at most {:?}", limits::MAX_TARGET_EPSILON),
                            ));
                        }
                    }
                }
                match p.clip_norm {
                    None => {
                        return Err(invalid("privacy.clip_norm", "is required with mode = \"example\" or \"client\""));
                    }
                    Some(c) => check_range("privacy.clip_norm", c, limits::MIN_CLIP_NORM, limits::MAX_CLIP_NORM)?,
                }
                match p.delta {
                    Some(d) if (limits::MIN_DELTA..limits::MAX_DELTA).contains(&d) => {}
                    d => {
                        return Err(invalid(
                            "privacy.delta",
                            format!(
                                "is {}; it is required with mode = \"example\" or \"client\" and must be at least {:?} and below {:?}",
                                d.map_or_else(|| "missing".to_string(), |d| format!("{d:?}")),
                                limits::MIN_DELTA,
                                limits::MAX_DELTA
                            ),
                        ));
                    }
                }
                if p.mode == PrivacyMode::Example && self.local.optimizer != LocalOptimizer::Sgd {
                    return Err(invalid("local.optimizer", "must be sgd with example-level privacy (DP-SGD)"));
                }
                if p.mode == PrivacyMode::Example && p.adaptive_clipping.is_some() {
                    return Err(invalid("privacy.adaptive_clipping", "applies to mode = \"client\" only"));
                }
                if p.mode == PrivacyMode::Client && self.strategy.weighting() != Weighting::Uniform {
                    return Err(invalid(
                        "strategy.weighting",
                        "must be \"uniform\" with client-level privacy: every hospital's update has the same bound",
                    ));
                }
                if let Some(a) = &p.adaptive_clipping {
                    if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) {
                        return Err(invalid("privacy.adaptive_clipping.target_quantile", "must be in (0, 1)"));
                    }
                    if !(a.learning_rate.is_finite()
                        && a.learning_rate > 0.0
                        && a.learning_rate <= limits::MAX_CLIP_LEARNING_RATE)
                    {
                        return Err(invalid(
                            "privacy.adaptive_clipping.learning_rate",
                            format!(
                                "is {:?}; it must be above 0 and at most {:?}",
                                a.learning_rate,
                                limits::MAX_CLIP_LEARNING_RATE
                            ),
                        ));
                    }
                    check_range(
                        "privacy.adaptive_clipping.count_noise_multiplier",
                        a.count_noise_multiplier,
                        limits::MIN_NOISE_MULTIPLIER,
                        limits::MAX_NOISE_MULTIPLIER,
                    )?;
                }
            }
        }
        Ok(())
    }

    fn validate_secagg(&self) -> Result<(), PlanError> {
        if !self.secure_aggregation {
            if self.secagg.is_some() {
                return Err(invalid("secagg", "is set but secure_aggregation is not true"));
            }
            return Ok(());
        }
        let s = self.secagg_settings();
        if self.min_nodes < 2 {
            return Err(invalid(
                "min_nodes",
                "must be at least 2 with secure aggregation (a sum of one is that update)",
            ));
        }
        if self.retries > 0 {
            // A retry would need each node that sent its masked input to mask the same update
            // again under the retry's new keys, and a node never sends a masked input twice.
            return Err(invalid(
                "retries",
                "must be 0 with secure aggregation: a node never sends a round's masked input twice, so a retried round could not count the nodes that reported",
            ));
        }
        if let Some(t) = s.threshold
            && t < 2
        {
            return Err(invalid("secagg.threshold", "must be at least 2"));
        }
        check_range("secagg.clip_norm", s.clip_norm, limits::MIN_CLIP_NORM, limits::MAX_CLIP_NORM)?;
        if let Some(t) = s.threshold
            && t > limits::MAX_NODES
        {
            return Err(invalid("secagg.threshold", format!("is {t}; it must be 2 to {}", limits::MAX_NODES)));
        }
        check_count("secagg.max_samples", s.max_samples, limits::MAX_SAMPLES)?;
        check_deadline("secagg.step_timeout_secs", s.step_timeout_secs)?;
        if self.privacy.adaptive_clipping.is_some() {
            return Err(invalid(
                "privacy.adaptive_clipping",
                "needs each hospital's own update norm, which secure aggregation hides; use a fixed clip_norm",
            ));
        }
        Ok(())
    }

    /// The strategies' own parameters, and the combinations that cannot keep their promise.
    fn validate_strategy(&self) -> Result<(), PlanError> {
        let positive = |field: &'static str, x: f64| {
            if x.is_finite() && x > 0.0 { Ok(()) } else { Err(invalid(field, "must be a positive number")) }
        };
        match &self.strategy {
            Strategy::Fedprox { mu, .. } => {
                if !(mu.is_finite() && *mu >= 0.0) {
                    return Err(invalid("strategy.mu", "must be a number ≥ 0 (0 is FedAvg)"));
                }
                // With plain SGD the proximal term alone moves w − w_global by the factor
                // 1 − η·μ each step: from η·μ ≥ 2 on it grows instead of shrinking.
                let eta_mu = mu * self.local.learning_rate;
                if self.local.optimizer == LocalOptimizer::Sgd && eta_mu >= 2.0 {
                    return Err(invalid(
                        "strategy.mu",
                        format!(
                            "times local.learning_rate is {eta_mu}; from 2 on, SGD's proximal step diverges: lower mu or the learning rate"
                        ),
                    ));
                }
            }
            Strategy::Scaffold { server_learning_rate, .. } => {
                positive("strategy.server_learning_rate", *server_learning_rate)?;
                if self.local.optimizer != LocalOptimizer::Sgd {
                    return Err(invalid(
                        "strategy",
                        "scaffold corrects plain SGD steps (its control variates are average gradients); set local.optimizer = \"sgd\"",
                    ));
                }
                if self.privacy.mode == PrivacyMode::Client {
                    return Err(invalid(
                        "strategy",
                        "scaffold with client-level DP is refused: the control-variate half of each update would need its own clipping and noise, which are not accounted; use example-level DP (the correction is then post-processing of released models) or another strategy",
                    ));
                }
                if self.secure_aggregation {
                    return Err(invalid(
                        "strategy",
                        "scaffold with secure aggregation is refused: its updates carry control variates the secure-aggregation encoding does not bound; use fedavg, fedprox or a server optimizer",
                    ));
                }
            }
            Strategy::Fedavgm { server_learning_rate, momentum, .. } => {
                positive("strategy.server_learning_rate", *server_learning_rate)?;
                if !(0.0..1.0).contains(momentum) {
                    return Err(invalid("strategy.momentum", format!("is {momentum}; it must be in [0, 1)")));
                }
            }
            Strategy::TrimmedMean { trim } => {
                if !(0.0..0.5).contains(trim) {
                    return Err(invalid(
                        "strategy.trim",
                        format!("is {trim}; it must be in [0, 0.5) (the fraction dropped from each end)"),
                    ));
                }
            }
            Strategy::MultiKrum { byzantine, selected, .. } => {
                let need = byzantine.saturating_mul(2).saturating_add(3);
                if self.min_nodes < need {
                    return Err(invalid(
                        "min_nodes",
                        format!(
                            "is {}; multi_krum with byzantine = {byzantine} needs at least 2f + 3 = {need} updates a round: raise min_nodes or lower strategy.byzantine",
                            self.min_nodes
                        ),
                    ));
                }
                if *selected == Some(0) {
                    return Err(invalid("strategy.selected", "must be at least 1"));
                }
            }
            Strategy::Fedavg { .. }
            | Strategy::Fedadam(_)
            | Strategy::Fedyogi(_)
            | Strategy::Fedadagrad(_)
            | Strategy::Median => {}
        }
        if self.strategy.is_robust() {
            if self.secure_aggregation {
                return Err(invalid(
                    "strategy",
                    format!(
                        "{} is refused with secure aggregation: a robust aggregator needs each hospital's update on its own, and secure aggregation reveals only their sum; use fedavg (or a server optimizer) with secure aggregation, or turn it off",
                        self.strategy.name()
                    ),
                ));
            }
            if self.privacy.mode == PrivacyMode::Client {
                return Err(invalid(
                    "strategy",
                    format!(
                        "{} is refused with client-level DP: its noise is calibrated to a mean of clipped updates, not to a median or a selection; use example-level DP (privacy.mode = \"example\") with a robust aggregator",
                        self.strategy.name()
                    ),
                ));
            }
        }
        Ok(())
    }
}
