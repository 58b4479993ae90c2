//! The privacy budget's decisions (pure): what one more release costs a run, and whether the
//! hospital's caps let it be charged. The daemon reads the ledger and the release store, asks
//! here, and only then writes the charge (fsync'd) and sends; nothing here touches a file.
//!
//! The rules: a run's price is its cumulative ε after one more release than it already made
//! (every release counts, whatever round numbers the coordinator sends; the release store and
//! the ledger are both asked and the larger count wins, so a cost is never understated); runs
//! add up on a dataset by basic composition, and `policy.max_epsilon` / `policy.max_delta` cap
//! that sum with the run being priced left out (its own earlier charges are inside its ε).

use std::collections::BTreeSet;

use sanctum_protocol::plan::Plan;
use sanctum_protocol::privacy::{self, Accountant, PrivacyError, SampledGaussian};

use crate::config::Policy;
use crate::ledger::Spent;
use crate::train::DpSetup;

/// What example-level DP costs this node for a plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpPlan {
    pub setup: DpSetup,
    /// The sampling rate ε is accounted at: the real q, or, when the policy withholds dataset
    /// sizes, q at the hospital's public lower bound on its rows (≥ the real q, so an upper bound
    /// on ε that no decision or charge can give the real size away by).
    pub accounted_rate: f64,
    pub delta: f64,
    /// DP-SGD steps over the whole plan.
    pub steps: u64,
    /// ε for every step of the plan (PLD accountant): what the node agreed to spend.
    pub epsilon: f64,
}

impl DpPlan {
    /// ε after `steps` steps (PLD accountant); infinite where the accountant fails, so a failed
    /// account can only refuse.
    pub fn epsilon_after(&self, steps: u64) -> f64 {
        let run = SampledGaussian {
            sampling_rate: self.accounted_rate,
            noise_multiplier: self.setup.noise_multiplier,
            steps,
        };
        privacy::epsilon_with(Accountant::Pld, &run, self.delta).unwrap_or(f64::INFINITY)
    }
}

/// What client-level DP with distributed noise costs this node's dataset for a plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DdgPlan {
    pub noise_multiplier: f64,
    pub delta: f64,
    /// ε after every round of the plan (each round the ρ of `encode::round_rho`).
    pub epsilon: f64,
}

/// One release's privacy cost, as the ledger records it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    /// ε of the run (or of its ledger key) after this release.
    pub epsilon: f64,
    pub delta: f64,
    pub steps: u64,
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
    pub accountant: &'static str,
    /// ε of the whole plan, for the log line.
    pub plan_epsilon: f64,
}

/// The accountant named in the ledger for distributed noise.
pub const DDG_ACCOUNTANT: &str = "distributed discrete Gaussian, zCDP (Kairouz et al.; opendp's conversion)";

/// Why a release may not be charged (so nothing is sent).
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum BudgetError {
    #[error(
        "round {round} would bring dataset '{dataset}' to ε = {total:.3}, above policy.max_epsilon = {cap}; nothing is sent"
    )]
    EpsilonCap { round: u32, dataset: String, total: f64, cap: f64 },
    #[error("plan's δ = {delta:e} would bring this hospital's data to δ = {total:e}; policy.max_delta is {cap:e}")]
    DeltaCap { delta: f64, total: f64, cap: f64 },
    /// Kairouz et al.'s theorem does not apply to the plan or round (protocol's wording).
    #[error("{0}")]
    Distributed(String),
    /// The accountant could not price a noised test metric (its wording).
    #[error("{0}")]
    Metric(String),
}

/// ε after `rounds` rounds of distributed noise with noise multiplier `sigma`: each round the ρ
/// of `encode::round_rho`, the same function the coordinator's reported ε comes from; an error
/// (the plan or round is refused) where Kairouz et al.'s theorem does not apply.
pub fn ddg_epsilon(plan: &Plan, sigma: f64, rounds: u32, delta: f64) -> Result<f64, BudgetError> {
    sanctum_protocol::secagg::encode::distributed_epsilon(plan, sigma, rounds, delta)
        .map_err(|e| BudgetError::Distributed(e.to_string()))
}

/// Rounds of a run released before `round`: by the release store (`released`, every round it
/// ever listed for the run) or by the ledger (`charged` rounds, `round_charged` whether `round`
/// is one of them), whichever counts more, so the cost of the next release is never understated.
pub fn releases_before(released: &BTreeSet<u32>, round: u32, charged: u32, round_charged: bool) -> u32 {
    let by_store = released.iter().filter(|&&r| r != round).count() as u32;
    let by_ledger = charged.saturating_sub(u32::from(round_charged));
    by_store.max(by_ledger)
}

/// What releasing one more round costs a run that already released `released_before`: the run's
/// cumulative ε after that release. `None` without DP.
pub fn round_cost(
    plan: &Plan,
    dp: Option<&DpPlan>,
    ddg: Option<&DdgPlan>,
    released_before: u32,
) -> Result<Option<Cost>, BudgetError> {
    let releases = u64::from(released_before) + 1;
    if let Some(dp) = dp {
        let steps = releases * u64::from(plan.local.steps);
        return Ok(Some(Cost {
            epsilon: dp.epsilon_after(steps),
            delta: dp.delta,
            steps,
            sampling_rate: dp.accounted_rate,
            noise_multiplier: dp.setup.noise_multiplier,
            accountant: "pld",
            plan_epsilon: dp.epsilon,
        }));
    }
    if let Some(ddg) = ddg {
        let rounds = u32::try_from(releases).unwrap_or(u32::MAX);
        let spent = ddg_epsilon(plan, ddg.noise_multiplier, rounds, ddg.delta)?;
        return Ok(Some(Cost {
            epsilon: spent,
            delta: ddg.delta,
            steps: releases,
            sampling_rate: 1.0,
            noise_multiplier: ddg.noise_multiplier,
            accountant: DDG_ACCOUNTANT,
            plan_epsilon: ddg.epsilon,
        }));
    }
    Ok(None)
}

/// The cost of the `releases`-th noised test metric of a run at noise `noise` per count
/// ([`crate::metrics`]), charged under the run's `RUN/metrics` key.
pub fn metric_cost(noise: f64, releases: u32, delta: f64) -> Result<Cost, BudgetError> {
    let epsilon = crate::metrics::epsilon_of_releases(noise, u64::from(releases), delta)
        .map_err(|e: PrivacyError| BudgetError::Metric(e.to_string()))?;
    Ok(Cost {
        epsilon,
        delta,
        steps: u64::from(releases),
        sampling_rate: 1.0,
        noise_multiplier: noise / std::f64::consts::SQRT_2,
        accountant: "pld, noised test metric",
        plan_epsilon: epsilon,
    })
}

/// The cost of the `releases`-th release of DP standardisation statistics of a run
/// ([`crate::dp_stats`]), whose composed ε is `epsilon`, charged under `RUN/statistics`.
pub fn statistics_cost(noise_multiplier: f64, releases: u32, delta: f64, epsilon: f64) -> Cost {
    Cost {
        epsilon,
        delta,
        steps: u64::from(releases),
        sampling_rate: 1.0,
        noise_multiplier,
        accountant: "pld, DP standardisation statistics",
        plan_epsilon: epsilon,
    }
}

/// Refuses when a δ would take the dataset past `policy.max_delta` (δ adds up across runs).
pub fn check_delta(policy: &Policy, already: f64, delta: f64) -> Result<(), BudgetError> {
    match policy.max_delta {
        Some(cap) if already + delta > cap => Err(BudgetError::DeltaCap { delta, total: already + delta, cap }),
        _ => Ok(()),
    }
}

/// Whether `cost` may be charged to `dataset` for `round`, given what every other run of the
/// dataset spent (`others`: the ledger's sum leaving out the run being charged).
pub fn check_charge(
    policy: &Policy,
    others: &Spent,
    dataset: &str,
    round: u32,
    cost: &Cost,
) -> Result<(), BudgetError> {
    if let Some(cap) = policy.max_epsilon
        && others.epsilon + cost.epsilon > cap
    {
        return Err(BudgetError::EpsilonCap {
            round,
            dataset: dataset.to_string(),
            total: others.epsilon + cost.epsilon,
            cap,
        });
    }
    check_delta(policy, others.delta, cost.delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(privacy: &str, secagg: bool, steps: u32) -> Plan {
        let text = format!(
            "name = \"p\"\nrounds = 5\nmin_nodes = 3\nsecure_aggregation = {secagg}\n[model]\nkind = \"logistic_regression\"\ninputs = 13\n\
             [data]\nschema = \"heart_disease\"\nschema_sha256 = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n[local]\nsteps = {steps}\nbatch_size = 4\nlearning_rate = 0.1\n\
             [strategy]\nkind = \"fedavg\"\n{privacy}"
        );
        Plan::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    const CLIENT: &str = "weighting = \"uniform\"\n[privacy]\nmode = \"client\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n";

    fn dp() -> DpPlan {
        let setup = DpSetup { sampling_rate: 0.02, noise_multiplier: 1.1, clip_norm: 1.0 };
        let mut dp = DpPlan { setup, accounted_rate: 0.02, delta: 1e-5, steps: 50, epsilon: 0.0 };
        dp.epsilon = dp.epsilon_after(50);
        dp
    }

    fn policy(max_epsilon: Option<f64>, max_delta: Option<f64>) -> Policy {
        Policy { max_epsilon, max_delta, ..Policy::default() }
    }

    #[test]
    fn releases_before_takes_the_larger_of_store_and_ledger() {
        let set = |r: &[u32]| r.iter().copied().collect::<BTreeSet<u32>>();
        // (released rounds in the store, round, ledger's charged rounds, round charged, expected)
        let cases: &[(&[u32], u32, u32, bool, u32)] = &[
            (&[], 1, 0, false, 0),
            (&[1, 2], 3, 2, false, 2),
            (&[1, 2, 3], 3, 3, true, 2),
            (&[1, 2], 2, 2, true, 1),
            // The store lost a round (kept only the latest) but the ledger remembers all three.
            (&[3], 4, 3, false, 3),
            // Charged but not listed by the store (a crash between the two): the ledger counts.
            (&[], 5, 4, false, 4),
            // A round number the coordinator reused: it is never counted as its own predecessor.
            (&[7], 7, 1, true, 0),
        ];
        for &(store, round, charged, round_charged, want) in cases {
            assert_eq!(
                releases_before(&set(store), round, charged, round_charged),
                want,
                "{store:?} round {round} charged {charged} ({round_charged})"
            );
        }
    }

    #[test]
    fn a_round_costs_the_runs_epsilon_after_one_more_release() {
        let p = plan("", false, 10);
        let dp = dp();
        assert_eq!(round_cost(&p, None, None, 3), Ok(None), "no DP, no cost");
        for before in [0, 1, 4, 9] {
            let Ok(Some(cost)) = round_cost(&p, Some(&dp), None, before) else { panic!("a DP plan has a cost") };
            let steps = u64::from(before + 1) * 10;
            assert_eq!(cost.steps, steps, "every step taken counts");
            assert_eq!(cost.epsilon, dp.epsilon_after(steps));
            assert_eq!((cost.accountant, cost.delta, cost.plan_epsilon), ("pld", 1e-5, dp.epsilon));
            assert_eq!((cost.sampling_rate, cost.noise_multiplier), (0.02, 1.1));
        }
        let more = |b| round_cost(&p, Some(&dp), None, b).ok().flatten().map(|c| c.epsilon).unwrap_or(f64::NAN);
        assert!(more(0) < more(1) && more(1) < more(9), "ε grows with the releases");
        // Client-level DP by distributed noise: one release per round, no sampling.
        let sa = plan(CLIENT, true, 10);
        let ddg = DdgPlan { noise_multiplier: 1.0, delta: 1e-5, epsilon: 9.0 };
        let Ok(Some(c)) = round_cost(&sa, None, Some(&ddg), 2) else { panic!("a distributed-DP plan has a cost") };
        assert_eq!((c.steps, c.sampling_rate, c.accountant, c.plan_epsilon), (3, 1.0, DDG_ACCOUNTANT, 9.0));
        assert_eq!(Ok(c.epsilon), ddg_epsilon(&sa, 1.0, 3, 1e-5));
        // Example-level DP wins when both are set (as the daemon always priced it).
        let both = round_cost(&p, Some(&dp), Some(&ddg), 0).ok().flatten().map(|c| c.accountant);
        assert_eq!(both, Some("pld"));
    }

    #[test]
    fn a_charge_is_checked_against_both_caps_leaving_the_run_out() {
        let cost = Cost {
            epsilon: 1.0,
            delta: 1e-5,
            steps: 1,
            sampling_rate: 1.0,
            noise_multiplier: 1.0,
            accountant: "pld",
            plan_epsilon: 1.0,
        };
        let spent = |epsilon, delta| Spent { epsilon, delta };
        // (max ε, max δ, others' ε, others' δ, None = allowed or the words of the refusal)
        type Case<'a> = (Option<f64>, Option<f64>, f64, f64, Option<&'a str>);
        let cases: &[Case<'_>] = &[
            (None, None, 100.0, 0.5, None),
            (Some(3.0), None, 2.0, 0.0, None),
            (
                Some(3.0),
                None,
                2.5,
                0.0,
                Some("round 4 would bring dataset 'heart' to ε = 3.500, above policy.max_epsilon = 3; nothing is sent"),
            ),
            (None, Some(2e-5), 0.0, 1e-5, None),
            (
                None,
                Some(2e-5),
                0.0,
                1.5e-5,
                Some("plan's δ = 1e-5 would bring this hospital's data to δ = 2.5e-5; policy.max_delta is 2e-5"),
            ),
            (Some(3.0), Some(1e-6), 2.0, 0.0, Some("policy.max_delta is 1e-6")),
        ];
        for &(eps, delta, se, sd, want) in cases {
            let got = check_charge(&policy(eps, delta), &spent(se, sd), "heart", 4, &cost);
            match (want, got) {
                (None, Ok(())) => {}
                (Some(words), Err(e)) => assert!(e.to_string().contains(words), "{e}"),
                (want, got) => panic!("caps {eps:?}/{delta:?} spent {se}/{sd}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn metric_and_statistics_costs_name_their_accountant() {
        let m = metric_cost(2.0, 3, 1e-5).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.steps, m.accountant, m.noise_multiplier), (3, "pld, noised test metric", 2.0 / 2f64.sqrt()));
        assert_eq!(m.epsilon, crate::metrics::epsilon_of_releases(2.0, 3, 1e-5).unwrap_or(f64::NAN));
        let s = statistics_cost(4.0, 2, 1e-6, 0.7);
        assert_eq!((s.steps, s.epsilon, s.plan_epsilon), (2, 0.7, 0.7));
        assert_eq!(s.accountant, "pld, DP standardisation statistics");
    }
}
