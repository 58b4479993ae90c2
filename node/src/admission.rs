//! Admission of an offered plan (pure): given the offer, the plan, the hospital's policy, what
//! the node knows of its data (its training rows) and what its ledger says the dataset already
//! spent, accept with the run's planned privacy cost or refuse with a reason. The daemon reads
//! files (the data, the approvals, the ledger) and asks here; the reason it sends the coordinator
//! is a [`Refusal`]'s text, which never holds a value of the data (with sizes withheld, every
//! figure is accounted at the public bound on the rows). [`admit`] decides, from the schema
//! alone, which statistics a plan's privacy lets the features be standardised with.

use sanctum_protocol::dataset::{PatientRows, PrivacyUnit, Schema, SplitRule, Standardization};
use sanctum_protocol::plan::limits::{MAX_DELTA, MIN_DELTA};
use sanctum_protocol::plan::{Plan, PlanError, PrivacyMode};
use sanctum_protocol::privacy::{self, Accountant};
use sanctum_protocol::secagg::encode::distributed_noise;

use crate::approvals::ModelRefused;
use crate::budget::{self, BudgetError, DdgPlan, DpPlan};
use crate::config::Policy;
use crate::data::Standardize;
use crate::ledger::Spent;
use crate::policy::PolicyRefused;
use crate::train::DpSetup;

/// Why this node refuses an offered plan; the text is the reason the coordinator gets.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("plan_id does not match the SHA-256 of the plan")]
    PlanId,
    #[error(
        "the offer has no valid run id (1 to 128 of A-Z, a-z, 0-9, '_' and '-'); this node takes part only in identified runs"
    )]
    RunId,
    #[error("run {run:?} of this plan already ended here; a plan that runs again must be a new run")]
    RunEnded { run: String },
    #[error("plan is not valid: {0}")]
    InvalidPlan(#[source] PlanError),
    /// The hospital's policy ([`crate::policy::check`]), in its words.
    #[error(transparent)]
    Policy(#[from] PolicyRefused),
    /// The TorchScript approvals ([`crate::approvals::check_model`]), in their words.
    #[error(transparent)]
    Model(#[from] ModelRefused),
    #[error("this hospital's schema file for the plan was not read")]
    SchemaNotRead,
    #[error("plan does not fit schema '{schema}': {reason}")]
    SchemaFit { schema: String, reason: String },
    /// The data's rules: the schema under the plan's privacy, or the table's public reason.
    #[error("{0}")]
    Data(String),
    #[error("local data has {local} features, the plan's model takes {model}")]
    Features { local: usize, model: usize },
    #[error(
        "this node takes part in one secure-aggregation plan at a time and is in plan '{other}' now; run this plan once that one has ended"
    )]
    SecAggBusy { other: String },
    #[error("plan has no differential privacy (privacy.mode = none); this hospital's policy requires {cap}")]
    NoDp { cap: String },
    #[error(
        "plan's privacy is client-level, added by the coordinator, which this node cannot enforce; this hospital's policy requires example-level DP (privacy.mode = \"example\") or client-level DP under secure aggregation, with {cap}"
    )]
    CoordinatorDp { cap: String },
    #[error("plan's [privacy] section lacks delta or clip_norm")]
    MissingDeltaOrClip,
    #[error("plan's [privacy] section lacks delta")]
    MissingDelta,
    /// The figures are for the node's own log only: they would give the size away.
    #[error(
        "policy.public_min_train_rows does not hold for this hospital's data; the hospital's node log has the detail"
    )]
    PublicBound { train_rows: usize, bound: u64 },
    #[error("cannot meet target_epsilon {target} on this hospital's data: {reason}")]
    TargetEpsilon { target: f64, reason: String },
    #[error("plan's [privacy] section has neither noise_multiplier nor target_epsilon")]
    NoNoise,
    #[error(
        "plan would spend ε = {epsilon:.3} (δ = {delta:e}, {steps} DP-SGD steps at q = {rate:.4}, σ = {sigma:.3}) on this hospital's data, which has already spent ε = {already:.3}; policy.max_epsilon is {cap}"
    )]
    ExampleEpsilonCap { epsilon: f64, delta: f64, steps: u64, rate: f64, sigma: f64, already: f64, cap: f64 },
    /// Distributed noise outside Kairouz et al.'s theorem (protocol's wording).
    #[error("{0}")]
    Distributed(String),
    #[error(
        "plan would spend ε = {epsilon:.3} (client-level, δ = {delta:e}, {rounds} rounds of distributed noise at σ = {sigma:.3}) on this hospital's data, which has already spent ε = {already:.3}; policy.max_epsilon is {cap}"
    )]
    DistributedEpsilonCap { epsilon: f64, delta: f64, rounds: u32, sigma: f64, already: f64, cap: f64 },
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error(
        "schema '{schema}' has each node estimate its standardisation statistics under DP (ε = {epsilon}), which needs the plan's δ: set privacy.delta (at least {min:e}, below {max})",
        min = MIN_DELTA,
        max = MAX_DELTA
    )]
    StatisticsDelta { schema: String, epsilon: f64 },
    #[error(
        "plan would spend ε = {training:.3} on training and ε = {statistics:.3} (δ = {delta:e}) on schema '{schema}''s DP standardisation statistics on this hospital's data, which has already spent ε = {already:.3}; policy.max_epsilon is {cap}"
    )]
    StatisticsCap { training: f64, statistics: f64, delta: f64, schema: String, already: f64, cap: f64 },
    /// The DP statistics could not be set up or estimated (dp_stats' wording).
    #[error("{0}")]
    Statistics(String),
    #[error("the standardisation statistics could not be charged, so the plan is refused: {0}")]
    StatisticsCharge(String),
    #[error("the dataset loaded for this offer is shared; offer the plan again")]
    SharedData,
    #[error("cannot fetch TorchScript model {sha256}: {reason}")]
    ScriptFetch { sha256: String, reason: String },
    #[error("cannot store TorchScript model {sha256}: {reason}")]
    ScriptStore { sha256: String, reason: String },
    #[error("loading the TorchScript model failed: {0}")]
    ScriptJoin(String),
    #[error("the plan's TorchScript model {sha256} does not load here: {reason}")]
    ScriptLoad { sha256: String, reason: String },
}

/// Whether a coordinator-chosen run id is one this node takes: 1 to 128 of `[A-Za-z0-9_-]`, so it
/// can neither collide with the ledger's `RUN/metrics` keys nor forge lines in logs.
pub fn valid_run_id(run: &str) -> bool {
    (1..=128).contains(&run.len()) && run.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The offer itself: its id is the plan's hash, its run id is one this node takes and has not
/// seen end (`run_closed`, from the release store), and the plan parses.
pub fn parse_offer(plan_id: &str, plan_toml: &str, run: &str, run_closed: bool) -> Result<Plan, Refusal> {
    if Plan::id_of(plan_toml).to_hex() != plan_id {
        return Err(Refusal::PlanId);
    }
    if !valid_run_id(run) {
        return Err(Refusal::RunId);
    }
    if run_closed {
        return Err(Refusal::RunEnded { run: run.to_string() });
    }
    Plan::parse(plan_toml).map_err(Refusal::InvalidPlan)
}

/// The loaded data's width against the plan's model.
pub fn check_features(local: usize, model: usize) -> Result<(), Refusal> {
    if local != model {
        return Err(Refusal::Features { local, model });
    }
    Ok(())
}

/// A secure-aggregation plan while another plan's secure-aggregation run is accepted here: the
/// node holds one secure-aggregation round at a time (its keys, its masked input, its training),
/// so two such plans would take turns breaking each other's rounds. `accepted` lists the node's
/// accepted plans as (plan id, name, uses secure aggregation); the offered plan itself (a
/// re-offer after a reconnect) does not count.
pub fn check_one_secure_aggregation<'a>(
    plan: &Plan,
    plan_id: &str,
    accepted: impl IntoIterator<Item = (&'a str, &'a str, bool)>,
) -> Result<(), Refusal> {
    if !plan.secure_aggregation {
        return Ok(());
    }
    match accepted.into_iter().find(|(id, _, secagg)| *secagg && *id != plan_id) {
        Some((_, other, _)) => Err(Refusal::SecAggBusy { other: other.to_string() }),
        None => Ok(()),
    }
}

/// A schema-level rule that refuses a plan's privacy before any data is read. The message names
/// the rule and the schema and nothing of the hospital's data, so it may go to the lead as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuleBroken {
    #[error(
        "rule dp-split-by-id: schema '{schema}' splits train from test by a hash of the row number, so one row added or removed moves many others between the splits and DP-SGD's ε would not hold; the consortium should key the split by a patient id ([privacy] id_column), or use client-level DP"
    )]
    HashSplitWithoutId { schema: String },
    #[error(
        "rule dp-public-standardization: under differential privacy a node standardises only with public statistics declared with the schema, and schema '{schema}' declares none (its own train-split mean and standard deviation would leave in the model uncharged); run the plan without DP or declare the statistics in the schema"
    )]
    NoDeclaredStatistics { schema: String },
    #[error(
        "rule dp-privacy-unit: schema '{schema}' protects patients and a patient may have several rows (column '{id_column}'), but DP-SGD here samples and clips rows, so ε would not bound what the model reveals about a patient; use client-level DP or a plan without DP"
    )]
    SeveralRowsPerPatient { schema: String, id_column: String },
}

/// The standardisation a plan with this privacy may use on `schema`, or the rule that refuses
/// the plan. Plans without DP keep per-node statistics so non-DP results stay FLamby's.
/// Client-level DP is not refused for several rows per patient: it clips and noises a hospital's
/// whole update, which bounds every row of every patient at once.
pub fn admit(schema: &Schema, privacy: PrivacyMode) -> Result<Standardize, RuleBroken> {
    if let (PrivacyMode::Example, PrivacyUnit::Patient(PatientRows::Several { id_column })) =
        (privacy, schema.privacy_unit())
    {
        let id_column = schema.columns().get(id_column).map(|c| c.name().to_string()).unwrap_or_default();
        return Err(RuleBroken::SeveralRowsPerPatient { schema: schema.name().to_string(), id_column });
    }
    // A hash split keyed by the row number: adding or removing one row shifts every later row's
    // key, so neighbouring tables differ in many train rows, not one, and DP-SGD's ε would not
    // hold. Keyed by a patient id, one patient moves only themself.
    if privacy == PrivacyMode::Example
        && matches!(schema.split(), SplitRule::Hash { .. })
        && schema.privacy_unit().id_column().is_none()
    {
        return Err(RuleBroken::HashSplitWithoutId { schema: schema.name().to_string() });
    }
    match (schema.standardization(), privacy) {
        (Standardization::None, _) => Ok(Standardize::Off),
        (Standardization::PerNodeTrain | Standardization::Declared(_), PrivacyMode::None) => Ok(Standardize::PerNode),
        (Standardization::Declared(stats), PrivacyMode::Example | PrivacyMode::Client) => {
            Ok(Standardize::Declared(stats.clone()))
        }
        (Standardization::PerNodeTrain, PrivacyMode::Example | PrivacyMode::Client) => {
            Err(RuleBroken::NoDeclaredStatistics { schema: schema.name().to_string() })
        }
        // Charged whatever the plan's privacy: the consortium chose to count what they reveal.
        (Standardization::Dp { epsilon }, _) => Ok(Standardize::EstimateDp { epsilon: *epsilon }),
    }
}

/// [`admit`] with the plan's own choice of statistics (`[data] standardize`): `declared` uses the
/// schema's public statistics also without DP; `per_node` is refused under DP.
pub fn admit_plan(schema: &Schema, plan: &sanctum_protocol::plan::Plan) -> Result<Standardize, RuleBroken> {
    use sanctum_protocol::plan::StandardizeWith;
    let default = admit(schema, plan.privacy.mode)?;
    let refuse = || RuleBroken::NoDeclaredStatistics { schema: schema.name().to_string() };
    match (plan.data.standardize, plan.privacy.mode, schema.standardization()) {
        (None, ..) => Ok(default),
        (Some(StandardizeWith::Declared), _, Standardization::Declared(stats)) => {
            Ok(Standardize::Declared(stats.clone()))
        }
        (Some(StandardizeWith::Declared), ..) => Err(refuse()),
        (Some(StandardizeWith::PerNode), PrivacyMode::None, _) => Ok(default),
        (Some(StandardizeWith::PerNode), ..) => Err(refuse()),
    }
}

/// Derives this node's DP-SGD settings for a plan from its `train_rows` and checks them against
/// the policy's caps, with `already` what every other run spent on the dataset. `None` when the
/// plan has no example-level DP and the policy allows that.
pub fn example_dp(plan: &Plan, policy: &Policy, train_rows: usize, already: &Spent) -> Result<Option<DpPlan>, Refusal> {
    let p = &plan.privacy;
    match (p.mode, policy.cap_text()) {
        (PrivacyMode::None, Some(cap)) => return Err(Refusal::NoDp { cap }),
        (PrivacyMode::Client, Some(_)) if plan.secure_aggregation => return Ok(None),
        (PrivacyMode::Client, Some(cap)) => return Err(Refusal::CoordinatorDp { cap }),
        (PrivacyMode::None | PrivacyMode::Client, None) => return Ok(None),
        (PrivacyMode::Example, _) => {}
    }
    let (Some(delta), Some(clip_norm)) = (p.delta, p.clip_norm) else {
        return Err(Refusal::MissingDeltaOrClip);
    };
    let batch = f64::from(plan.local.batch_size);
    let sampling_rate = (batch / train_rows as f64).min(1.0);
    let accounted_rate = if policy.share_sample_counts {
        sampling_rate
    } else {
        // Only public numbers decide: the declared lower bound on the rows, or none (q = 1).
        let bound = policy.public_min_train_rows.unwrap_or(1);
        if bound > train_rows as u64 {
            return Err(Refusal::PublicBound { train_rows, bound });
        }
        (batch / bound as f64).min(1.0)
    };
    let steps = u64::from(plan.rounds) * u64::from(plan.local.steps);
    let noise_multiplier = match (p.noise_multiplier, p.target_epsilon) {
        (Some(sigma), _) => sigma,
        (None, Some(target)) => privacy::noise_for_epsilon(Accountant::Pld, target, accounted_rate, steps, delta)
            .map_err(|e| Refusal::TargetEpsilon { target, reason: e.to_string() })?,
        (None, None) => return Err(Refusal::NoNoise),
    };
    let setup = DpSetup { sampling_rate, noise_multiplier, clip_norm };
    let mut dp = DpPlan { setup, accounted_rate, delta, steps, epsilon: 0.0 };
    dp.epsilon = dp.epsilon_after(steps);
    if let Some(cap) = policy.max_epsilon
        && already.epsilon + dp.epsilon > cap
    {
        // With sizes withheld, q here is the public bound's, so the figures reveal nothing.
        return Err(Refusal::ExampleEpsilonCap {
            epsilon: dp.epsilon,
            delta,
            steps,
            rate: accounted_rate,
            sigma: noise_multiplier,
            already: already.epsilon,
            cap,
        });
    }
    budget::check_delta(policy, already.delta, delta)?;
    Ok(Some(dp))
}

/// Client-level DP by distributed noise (secure aggregation): the node adds its own share of
/// the noise, so it can account and cap it like DP-SGD. `None` for any other plan.
pub fn distributed_dp(plan: &Plan, policy: &Policy, already: &Spent) -> Result<Option<DdgPlan>, Refusal> {
    let Some(sigma) = distributed_noise(plan).map_err(|e| Refusal::Distributed(e.to_string()))? else {
        return Ok(None);
    };
    let delta = plan.privacy.delta.ok_or(Refusal::MissingDelta)?;
    let epsilon = budget::ddg_epsilon(plan, sigma, plan.rounds, delta)?;
    if let Some(cap) = policy.max_epsilon
        && already.epsilon + epsilon > cap
    {
        return Err(Refusal::DistributedEpsilonCap {
            epsilon,
            delta,
            rounds: plan.rounds,
            sigma,
            already: already.epsilon,
            cap,
        });
    }
    budget::check_delta(policy, already.delta, delta)?;
    Ok(Some(DdgPlan { noise_multiplier: sigma, delta, epsilon }))
}

/// `[standardize] with = "dp"` needs the plan's δ (within the plan limits) to account at.
pub fn statistics_delta(plan: &Plan, schema: &str, epsilon: f64) -> Result<f64, Refusal> {
    plan.privacy
        .delta
        .filter(|d| (MIN_DELTA..MAX_DELTA).contains(d))
        .ok_or_else(|| Refusal::StatisticsDelta { schema: schema.to_string(), epsilon })
}

/// Whether DP standardisation statistics costing `statistics` (composed over this run's
/// releases of them) at `delta` fit the caps together with the run's planned training spend
/// (`planned`: its ε and δ) and what the dataset already spent (`already`, this run left out).
/// After a restart `already` holds this run's earlier estimate too, which `statistics` includes:
/// counted twice here (refusing early, never late); the charge checks the exact sum.
pub fn check_statistics(
    policy: &Policy,
    already: &Spent,
    planned: Option<(f64, f64)>,
    statistics: f64,
    delta: f64,
    schema: &str,
) -> Result<(), Refusal> {
    let (training, training_delta) = planned.unwrap_or((0.0, 0.0));
    if let Some(cap) = policy.max_epsilon
        && already.epsilon + training + statistics > cap
    {
        return Err(Refusal::StatisticsCap {
            training,
            statistics,
            delta,
            schema: schema.to_string(),
            already: already.epsilon,
            cap,
        });
    }
    budget::check_delta(policy, already.delta + training_delta, delta)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_with(head: &str, privacy: &str) -> Plan {
        let text = format!(
            "name = \"p\"\nrounds = 5\nmin_nodes = 3\n{head}\n[model]\nkind = \"logistic_regression\"\ninputs = 13\n\
             [data]\nschema = \"heart_disease\"\nschema_sha256 = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n[local]\nsteps = 10\nbatch_size = 4\nlearning_rate = 0.1\n\
             [strategy]\nkind = \"fedavg\"\n{privacy}"
        );
        Plan::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    const EXAMPLE: &str = "[privacy]\nmode = \"example\"\nnoise_multiplier = 1.1\nclip_norm = 1.0\ndelta = 1e-5\n";
    const TARGET: &str = "[privacy]\nmode = \"example\"\ntarget_epsilon = 2.0\nclip_norm = 1.0\ndelta = 1e-5\n";
    const CLIENT: &str = "weighting = \"uniform\"\n[privacy]\nmode = \"client\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n";

    fn policy(f: impl FnOnce(&mut Policy)) -> Policy {
        let mut p = Policy::default();
        f(&mut p);
        p
    }

    fn none() -> Spent {
        Spent { epsilon: 0.0, delta: 0.0 }
    }

    /// The refusal's words, or "accepted" with what was derived.
    fn outcome<T: std::fmt::Debug>(r: Result<T, Refusal>) -> String {
        match r {
            Ok(v) => format!("accepted {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn run_ids_are_short_and_plain() {
        let long = "a".repeat(128);
        let too_long = "a".repeat(129);
        let cases: &[(&str, bool)] = &[
            ("r1", true),
            ("run_2-b", true),
            (&long, true),
            ("", false),
            (&too_long, false),
            ("r1/metrics", false),
            ("r 1", false),
            ("r1\nforged", false),
            ("é", false),
        ];
        for &(run, ok) in cases {
            assert_eq!(valid_run_id(run), ok, "{run:?}");
        }
    }

    #[test]
    fn an_offer_is_its_plans_hash_with_a_run_not_seen_ending() {
        let toml = "name = \"p\"\nrounds = 1\nmin_nodes = 1\n[model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n[local]\nsteps = 1\nbatch_size = 4\nlearning_rate = 0.1\n[strategy]\nkind = \"fedavg\"\n";
        let id = Plan::id_of(toml).to_hex();
        let bad = "not a plan";
        let bad_id = Plan::id_of(bad).to_hex();
        // (plan id, plan text, run, run closed, the words of the refusal or "accepted")
        let cases: &[(&str, &str, &str, bool, &str)] = &[
            (&id, toml, "r1", false, "accepted"),
            (&bad_id, toml, "r1", false, "plan_id does not match the SHA-256 of the plan"),
            (&id, toml, "", false, "the offer has no valid run id"),
            (&id, toml, "../x", false, "the offer has no valid run id"),
            (
                &id,
                toml,
                "r1",
                true,
                "run \"r1\" of this plan already ended here; a plan that runs again must be a new run",
            ),
            (&bad_id, bad, "r1", false, "plan is not valid: "),
        ];
        for &(plan_id, text, run, closed, words) in cases {
            let got = outcome(parse_offer(plan_id, text, run, closed).map(|p| p.name));
            assert!(got.starts_with(words), "{run:?} closed {closed}: {got}");
        }
    }

    #[test]
    fn example_level_dp_is_derived_from_the_data_and_capped() {
        let example = plan_with("", EXAMPLE);
        let clear = plan_with("", "");
        let coordinator_dp = plan_with("", CLIENT);
        let under_sa = plan_with("secure_aggregation = true", CLIENT);
        let capped = policy(|p| p.max_epsilon = Some(50.0));
        let tight = policy(|p| p.max_epsilon = Some(0.5));
        let delta_cap = policy(|p| p.max_delta = Some(1.5e-5));
        let withheld = policy(|p| {
            p.share_sample_counts = false;
            p.public_min_train_rows = Some(100);
        });
        let spent = Spent { epsilon: 1.0, delta: 1e-5 };
        let open = Policy::default();
        // (plan, policy, train rows, already spent, the start of the refusal, or "accepted")
        let cases: Vec<(&str, &Plan, &Policy, usize, Spent, &str)> = vec![
            ("no DP, no cap", &clear, &open, 200, none(), "accepted None"),
            (
                "no DP under a cap",
                &clear,
                &capped,
                200,
                none(),
                "plan has no differential privacy (privacy.mode = none); this hospital's policy requires ε ≤ 50",
            ),
            ("coordinator's DP, no cap", &coordinator_dp, &open, 200, none(), "accepted None"),
            (
                "coordinator's DP under a cap",
                &coordinator_dp,
                &capped,
                200,
                none(),
                "plan's privacy is client-level, added by the coordinator",
            ),
            ("distributed DP is not DP-SGD", &under_sa, &capped, 200, none(), "accepted None"),
            ("DP-SGD", &example, &capped, 200, none(), "accepted Some"),
            ("over the ε cap", &example, &tight, 200, none(), "plan would spend ε = "),
            (
                "over the δ cap with what was spent",
                &example,
                &delta_cap,
                200,
                spent,
                "plan's δ = 1e-5 would bring this hospital's data to δ = 2e-5; policy.max_delta is 1.5e-5",
            ),
            ("public bound holds", &example, &withheld, 200, none(), "accepted Some"),
            (
                "public bound above the rows",
                &example,
                &withheld,
                99,
                none(),
                "policy.public_min_train_rows does not hold for this hospital's data; the hospital's node log has the detail",
            ),
        ];
        for (what, plan, policy, rows, already, words) in cases {
            let got = outcome(example_dp(plan, policy, rows, &already));
            assert!(got.starts_with(words), "{what}: {got}");
        }
    }

    #[test]
    fn example_level_dp_figures() {
        let example = plan_with("", EXAMPLE);
        let Ok(Some(dp)) = example_dp(&example, &Policy::default(), 200, &none()) else { panic!("accepted") };
        assert_eq!(dp.steps, 50, "rounds × local steps");
        assert_eq!((dp.setup.sampling_rate, dp.accounted_rate), (0.02, 0.02));
        assert_eq!((dp.setup.noise_multiplier, dp.setup.clip_norm, dp.delta), (1.1, 1.0, 1e-5));
        assert_eq!(dp.epsilon, dp.epsilon_after(50));
        // Sizes withheld: accounted at the public bound (q = 4/100), never at the real q.
        let withheld = policy(|p| {
            p.share_sample_counts = false;
            p.public_min_train_rows = Some(100);
        });
        let Ok(Some(w)) = example_dp(&example, &withheld, 200, &none()) else { panic!("accepted") };
        assert_eq!((w.setup.sampling_rate, w.accounted_rate), (0.02, 0.04));
        assert!(w.epsilon > dp.epsilon, "the bound's q is larger, so its ε is too");
        // No bound at all: q = 1.
        let no_bound = policy(|p| p.share_sample_counts = false);
        let Ok(Some(q1)) = example_dp(&example, &no_bound, 200, &none()) else { panic!("accepted") };
        assert_eq!(q1.accounted_rate, 1.0);
        // The refusal over the cap names the plan's figures and what was spent, nothing else.
        let e = example_dp(
            &example,
            &policy(|p| p.max_epsilon = Some(dp.epsilon + 0.5)),
            200,
            &Spent { epsilon: 1.0, delta: 0.0 },
        );
        let words = outcome(e);
        let want = format!(
            "plan would spend ε = {:.3} (δ = 1e-5, 50 DP-SGD steps at q = 0.0200, σ = 1.100) on this hospital's data, which has already spent ε = 1.000; policy.max_epsilon is {}",
            dp.epsilon,
            dp.epsilon + 0.5
        );
        assert_eq!(words, want);
        // A target ε picks the noise that meets it over the whole plan.
        let Ok(Some(t)) = example_dp(&plan_with("", TARGET), &Policy::default(), 200, &none()) else {
            panic!("accepted")
        };
        assert!(t.epsilon <= 2.0 + 1e-6 && t.epsilon > 1.5, "ε {} for a target of 2", t.epsilon);
    }

    #[test]
    fn distributed_noise_is_accounted_and_capped() {
        let under_sa = plan_with("secure_aggregation = true", CLIENT);
        let Ok(Some(d)) = distributed_dp(&under_sa, &Policy::default(), &none()) else { panic!("accepted") };
        assert_eq!((d.noise_multiplier, d.delta), (1.0, 1e-5));
        assert_eq!(Ok(d.epsilon), budget::ddg_epsilon(&under_sa, 1.0, 5, 1e-5));
        // (plan, policy, spent, the start of the refusal, or "accepted")
        let clear = plan_with("", "");
        let coordinator_dp = plan_with("", CLIENT);
        let tight = policy(|p| p.max_epsilon = Some(d.epsilon + 0.25));
        let delta_cap = policy(|p| p.max_delta = Some(1e-5));
        let open = Policy::default();
        let cases: Vec<(&str, &Plan, &Policy, Spent, String)> = vec![
            ("no DP", &clear, &open, none(), "accepted None".into()),
            ("the coordinator's DP", &coordinator_dp, &open, none(), "accepted None".into()),
            ("under the cap", &under_sa, &tight, Spent { epsilon: 0.25, delta: 0.0 }, "accepted Some".into()),
            (
                "over the cap",
                &under_sa,
                &tight,
                Spent { epsilon: 0.5, delta: 0.0 },
                format!(
                    "plan would spend ε = {:.3} (client-level, δ = 1e-5, 5 rounds of distributed noise at σ = 1.000) on this hospital's data, which has already spent ε = 0.500; policy.max_epsilon is {}",
                    d.epsilon,
                    d.epsilon + 0.25
                ),
            ),
            ("over the δ cap", &under_sa, &delta_cap, Spent { epsilon: 0.0, delta: 1e-6 }, "plan's δ = 1e-5".into()),
        ];
        for (what, plan, policy, spent, words) in cases {
            let got = outcome(distributed_dp(plan, policy, &spent));
            assert!(got.starts_with(&words), "{what}: {got}");
        }
    }

    #[test]
    fn features_and_dp_statistics() {
        assert!(check_features(13, 13).is_ok());
        assert_eq!(outcome(check_features(12, 13)), "local data has 12 features, the plan's model takes 13");
        let example = plan_with("", EXAMPLE);
        assert_eq!(statistics_delta(&example, "heart", 1.0).ok(), Some(1e-5));
        let clear = plan_with("", "");
        let e = outcome(statistics_delta(&clear, "heart", 1.0));
        assert!(
            e.starts_with("schema 'heart' has each node estimate its standardisation statistics under DP (ε = 1), which needs the plan's δ: set privacy.delta (at least "),
            "{e}"
        );
        let cap = policy(|p| {
            p.max_epsilon = Some(3.0);
            p.max_delta = Some(1e-4);
        });
        // (already ε, planned training (ε, δ), statistics ε, δ, refusal words or "accepted")
        type Case<'a> = (f64, Option<(f64, f64)>, f64, f64, &'a str);
        let cases: &[Case<'_>] = &[
            (0.0, None, 1.0, 1e-5, "accepted"),
            (1.0, Some((1.0, 1e-5)), 1.0, 1e-5, "accepted"),
            (
                1.0,
                Some((1.5, 1e-5)),
                1.0,
                1e-5,
                "plan would spend ε = 1.500 on training and ε = 1.000 (δ = 1e-5) on schema 'heart''s DP standardisation statistics on this hospital's data, which has already spent ε = 1.000; policy.max_epsilon is 3",
            ),
            (
                0.0,
                Some((1.0, 9.5e-5)),
                1.0,
                1e-5,
                "plan's δ = 1e-5 would bring this hospital's data to δ = 1.05e-4; policy.max_delta is 1e-4",
            ),
        ];
        for &(already, planned, statistics, delta, words) in cases {
            let got = outcome(check_statistics(
                &cap,
                &Spent { epsilon: already, delta: 0.0 },
                planned,
                statistics,
                delta,
                "heart",
            ));
            assert!(got.starts_with(words), "{already} {planned:?}: {got}");
        }
    }

    #[test]
    fn one_secure_aggregation_plan_at_a_time() {
        let sa = plan_with("secure_aggregation = true", CLIENT);
        let plain = plan_with("", EXAMPLE);
        // (what, offered, its id, accepted here, refused)
        type Accepted<'a> = Vec<(&'a str, &'a str, bool)>;
        let cases: [(&str, &Plan, &str, Accepted<'_>, bool); 5] = [
            ("nothing else accepted", &sa, "p2", vec![], false),
            ("a plain plan beside it", &sa, "p2", vec![("p1", "plain", false)], false),
            ("another secure-aggregation plan", &sa, "p2", vec![("p1", "first", true)], true),
            ("its own re-offer after a reconnect", &sa, "p1", vec![("p1", "first", true)], false),
            ("a plain plan beside a secure-aggregation one", &plain, "p2", vec![("p1", "first", true)], false),
        ];
        for (what, plan, id, accepted, refused) in cases {
            let r = check_one_secure_aggregation(plan, id, accepted);
            assert_eq!(r.is_err(), refused, "{what}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("plan 'first'"), "{what}: the reason names the other plan: {e}");
            }
        }
    }
}
