//! Test-split metrics as a DP release (`policy.test_metrics = "noised"`). Test patients are
//! patients: an exact accuracy on a small test split tells the coordinator about them, and a
//! curious coordinator can choose the model it asks about. Under this policy the node releases
//! the accuracy through the Gaussian mechanism and charges it to its ledger before it leaves.
//!
//! Mechanism: the pair (correct predictions c, test examples n) plus independent N(0, s²) noise
//! on each, from the OS-seeded CSPRNG with the floating-point hardening of
//! [`SecureGaussian`]. Adding or removing one patient changes c by at most 1 and n by exactly 1,
//! so the pair's L2 sensitivity is √2 and the release is the Gaussian mechanism with noise
//! multiplier z = s / √2. The reported accuracy c̃ / max(ñ, 1), clamped to [0, 1], and the
//! reported count max(ñ, 0) are post-processing. k releases in one run compose by the PLD
//! accountant (sampling rate 1, z, k steps); across the run's DP-SGD updates they add by basic
//! composition (the ledger sums them), an upper bound.

use sanctum_protocol::privacy::noise::SecureGaussian;
use sanctum_protocol::privacy::{self, Accountant, PrivacyError, SampledGaussian};

use crate::config::{Policy, TestMetrics};
use crate::train::Evaluation;

/// What of an evaluation may leave, as the hospital's policy decides (pure: the caller charges
/// and noises).
#[derive(Clone, Debug, PartialEq)]
pub enum Release {
    /// Nothing leaves; the reason is for the node's own log.
    Withheld(&'static str),
    /// Every metric as measured, each with the test split's size (0 when sizes are withheld).
    Exact(Vec<(&'static str, f64, u64)>),
    /// The accuracy alone, through the Gaussian mechanism at this noise per count, charged at δ
    /// first. The other metrics (AUROC, C-index, R², …) have no count form this mechanism covers,
    /// so they stay here.
    Noised { accuracy: f64, samples: u64, noise: f64, delta: f64 },
}

/// The release `policy.test_metrics` allows for a plan with (`dp`) or without differential
/// privacy and with the plan's δ.
pub fn release(policy: &Policy, dp: bool, delta: Option<f64>, eval: &Evaluation) -> Release {
    let share = policy.share_sample_counts;
    if !policy.test_metrics.allows(dp, share) {
        return Release::Withheld("policy.test_metrics keeps test metrics here");
    }
    let samples = if share { eval.samples } else { 0 };
    let (TestMetrics::Noised, Some(noise)) = (policy.test_metrics, policy.test_metric_noise) else {
        return Release::Exact(eval.metrics.iter().map(|(n, v)| (*n, *v, samples)).collect());
    };
    let Some(delta) = delta else {
        return Release::Withheld("the plan has no δ to account a noised metric at");
    };
    match eval.get("accuracy") {
        Some(accuracy) => Release::Noised { accuracy, samples: eval.samples, noise, delta },
        None => Release::Withheld("a noised release covers accuracy only, and this task reports none"),
    }
}

/// A noised accuracy, ready to leave.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoisedMetric {
    pub value: f64,
    pub samples: u64,
}

/// Releases `accuracy` measured on `n` test examples with N(0, s²) on the correct count and on
/// the count.
pub fn noised_accuracy(accuracy: f64, n: u64, s: f64, noise: &mut SecureGaussian) -> NoisedMetric {
    let n_f = n as f64;
    let correct = (accuracy.clamp(0.0, 1.0) * n_f).round();
    let c = correct + noise.sample(s);
    let m = n_f + noise.sample(s);
    let value = (c / m.max(1.0)).clamp(0.0, 1.0);
    let samples = if m.is_finite() && m > 0.0 { m.round() as u64 } else { 0 };
    NoisedMetric { value, samples }
}

/// ε of `releases` noised metrics at noise `s` per count, at `delta` (PLD accountant).
pub fn epsilon_of_releases(s: f64, releases: u64, delta: f64) -> Result<f64, PrivacyError> {
    let run = SampledGaussian { sampling_rate: 1.0, noise_multiplier: s / std::f64::consts::SQRT_2, steps: releases };
    privacy::epsilon_with(Accountant::Pld, &run, delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(metrics: TestMetrics, noise: Option<f64>, share: bool) -> Policy {
        Policy { test_metrics: metrics, test_metric_noise: noise, share_sample_counts: share, ..Policy::default() }
    }

    /// Which metrics leave under each policy: all of them exactly, none, or the accuracy alone
    /// noised; sizes only when shared.
    #[test]
    fn the_release_follows_the_policy() {
        let binary =
            Evaluation { metrics: vec![("accuracy", 0.8), ("balanced_accuracy", 0.7), ("auroc", 0.9)], samples: 50 };
        let survival = Evaluation { metrics: vec![("c_index", 0.7)], samples: 50 };
        let exact = policy(TestMetrics::Exact, None, true);
        assert_eq!(
            release(&exact, false, None, &binary),
            Release::Exact(vec![("accuracy", 0.8, 50), ("balanced_accuracy", 0.7, 50), ("auroc", 0.9, 50)])
        );
        assert_eq!(
            release(&policy(TestMetrics::Auto, None, true), true, Some(1e-5), &binary),
            Release::Withheld("policy.test_metrics keeps test metrics here")
        );
        assert!(
            matches!(release(&policy(TestMetrics::Auto, None, true), false, None, &survival), Release::Exact(m) if m.len() == 1)
        );
        assert!(matches!(release(&policy(TestMetrics::None, None, true), false, None, &binary), Release::Withheld(_)));
        let noised = policy(TestMetrics::Noised, Some(3.0), false);
        assert_eq!(
            release(&noised, true, Some(1e-5), &binary),
            Release::Noised { accuracy: 0.8, samples: 50, noise: 3.0, delta: 1e-5 }
        );
        assert!(matches!(release(&noised, true, None, &binary), Release::Withheld(_)));
        assert!(
            matches!(release(&noised, true, Some(1e-5), &survival), Release::Withheld(r) if r.contains("accuracy only"))
        );
    }

    #[test]
    fn the_noised_accuracy_is_unbiased_enough_and_stays_a_probability() {
        let mut g = SecureGaussian::from_os();
        let draws: Vec<NoisedMetric> = (0..4000).map(|_| noised_accuracy(0.75, 400, 2.0, &mut g)).collect();
        let mean = draws.iter().map(|d| d.value).sum::<f64>() / draws.len() as f64;
        // sd of one draw ≈ 2·√(1 + 0.75²)/400 ≈ 0.00625; of the mean over 4000 ≈ 1e-4.
        assert!((mean - 0.75).abs() < 1e-3, "{mean}");
        assert!(draws.iter().all(|d| (0.0..=1.0).contains(&d.value)));
        let spread = draws.iter().map(|d| (d.value - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        assert!(spread.sqrt() > 0.004 && spread.sqrt() < 0.009, "the noise is really there: sd {}", spread.sqrt());
        let tiny = noised_accuracy(1.0, 0, 50.0, &mut g);
        assert!((0.0..=1.0).contains(&tiny.value));
    }

    #[test]
    fn the_cost_is_the_gaussian_mechanism_at_sensitivity_root_two() {
        // One release at s = √2·σ costs what one un-subsampled Gaussian step at σ costs.
        let sigma = 3.0;
        let direct = privacy::epsilon_with(
            Accountant::Pld,
            &SampledGaussian { sampling_rate: 1.0, noise_multiplier: sigma, steps: 1 },
            1e-5,
        )
        .unwrap();
        let ours = epsilon_of_releases(sigma * std::f64::consts::SQRT_2, 1, 1e-5).unwrap();
        assert!((ours - direct).abs() < 1e-9, "{ours} vs {direct}");
        assert!(epsilon_of_releases(4.0, 2, 1e-5).unwrap() > epsilon_of_releases(4.0, 1, 1e-5).unwrap());
    }
}
