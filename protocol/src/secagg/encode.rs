//! What a node puts into secure aggregation and what the coordinator gets back.
//!
//! A node's input is its update clipped to L2 norm ≤ C, multiplied by its aggregation weight w,
//! followed by w itself, all quantised to integers mod 2³² ([`super::quantize`]). Under sample
//! weighting w = min(samples, max_samples) / max_samples, so the coordinator learns only Σw and
//! the weighted sum; under uniform weighting w = 1. Without client-level DP every coordinate is
//! within ±B, B = max(C, 1) (the weight is at most 1), and γ leaves room for the round's n inputs;
//! a decoded coordinate of the sum is off by at most n·γ from rounding.
//!
//! # Client-level DP: one ρ per round, the same for every party
//!
//! With client-level DP the weight coordinate is 0 (the survivors are counted instead) and each
//! node adds discrete Gaussian noise to every word, drawn exactly ([`crate::privacy::discrete`])
//! from the same CSPRNG as its rounding, so the unmasked sum is already private. The encoding is
//! then a function of the plan alone (σ, C and the input's d words), never of a round's n
//! participants or threshold t, so one round's privacy is a plan constant, [`round_rho`]: the
//! node charges k·ρ after k releases without remembering earlier rounds' cohorts, the ε it shows
//! when it accepts is exactly what its charges will add up to, and the coordinator reports the
//! same number. How:
//!
//! - **γ** is sized for N = [`MAX_DP_PARTICIPANTS`] inputs with every coordinate within ±C (the
//!   weight is 0) plus 20 standard deviations of the summed noise. A round under DP needs a
//!   majority threshold, 2t > n (a smaller one would also let two disjoint survivor lists each
//!   unmask); then n nodes' noise, each of standard deviation σC/(γ√t), sums to less than
//!   √2·σ·C/γ, and N·(C/γ + 1) + 20·√2·σ·C/γ ≤ 2³¹ − 1 rules out a wrap (below 10⁻⁸⁸ per
//!   coordinate). A round with n > N or 2t ≤ n is refused by [`Encoding::new`].
//! - **Sensitivity.** A node's quantised input x̃ has ‖x̃‖₂ ≤ C·(1 + 2⁻²⁰)/γ + √d: the clipped
//!   update's floating-point rounding (well below 2⁻²⁰ relative), then randomised rounding,
//!   which moves each coordinate by less than one step (Kairouz et al.'s unconditional bound
//!   c/γ + √d for randomised rounding). Adding or removing a hospital moves the sum by x̃.
//! - **Noise.** Each node adds N_Z(0, ⌈σ_t²⌉) to every word, σ_t = σC/(γ√t) in integer steps, so t
//!   honest survivors carry at least scale σ·C/γ: σ·C in model units, the plan's noise.
//! - **The bound.** Theorem 1 with n = t summands of scale σ_t has ‖Δ‖²/(tσ_t²) = (‖Δ‖γ/(σC))²,
//!   the same for every t, and a τ that grows with t (more terms, each larger as σ_t² = K/t
//!   shrinks); so the theorem at t = N bounds every round, and that is [`round_rho`]. Its
//!   preconditions (σ_N ≥ ½ among them) are checked, and a plan that fails them is refused.

use rand::CryptoRng;

use super::SecAggError;
use super::quantize::Quantizer;
use crate::plan::{Plan, PrivacyMode};
use crate::privacy::PrivacyError;
use crate::privacy::discrete::{self, DiscreteGaussian};
use crate::privacy::distributed::{self, DistributedGaussian};

/// Standard deviations of the summed noise the quantiser leaves room for.
const NOISE_TAIL: f64 = 20.0;

/// The most participants a round with client-level distributed noise may have: the quantiser is
/// sized for this many (cross-silo consortia are tens of hospitals; the secure-aggregation
/// benchmark's 100 nodes fit ten times over). Sizing for N costs precision: with σ = 1 and
/// d = 10⁷ the rounding term makes ρ 0.3 % larger than the continuous Gaussian's 1/(2σ²).
pub const MAX_DP_PARTICIPANTS: usize = 1000;

/// How far rounding can take a clipped update's norm above C: 2⁻²⁴ relative per coordinate for
/// the f32 values, plus the f64 error of the norm the clip divides by (d·2⁻⁵³ relative, below
/// 1.2·10⁻⁷ up to 10⁹ coordinates); 2⁻²⁰ covers both.
const F32_CLIP_SLACK: f64 = 1.0 + 1.0 / (1u64 << 20) as f64;

/// How updates are turned into secure-aggregation inputs for one round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Encoding {
    clip_norm: f64,
    max_samples: u64,
    participants: usize,
    threshold: usize,
    /// Client-level distributed DP: the noise multiplier of the sum over t survivors.
    noise_multiplier: Option<f64>,
    quantizer: Quantizer,
}

/// A node's weight under the plan's weighting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Weight {
    Samples(u64),
    Uniform,
}

/// The quantiser under client-level DP: a function of σ and C only (see the module doc).
fn dp_quantizer(noise_multiplier: f64, clip_norm: f64) -> Result<Quantizer, PrivacyError> {
    if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
        return Err(PrivacyError::NoiseMultiplier(noise_multiplier));
    }
    Quantizer::with_headroom(clip_norm, MAX_DP_PARTICIPANTS, NOISE_TAIL * std::f64::consts::SQRT_2 * noise_multiplier)
        .map_err(|e| {
            PrivacyError::Accounting(format!(
                "no quantiser fits noise multiplier {noise_multiplier} and clip norm {clip_norm} in 32 bits: {e}"
            ))
        })
}

/// ρ (zCDP) of one round of client-level distributed noise: Kairouz et al.'s Theorem 1 for the
/// encoding a plan with noise multiplier σ, clip norm C and inputs of `dimension` words gets, at
/// t = [`MAX_DP_PARTICIPANTS`] (a bound for every t, see the module doc). The node's ledger
/// charge and the coordinator's reported ε both come from this function and nowhere else.
pub fn round_rho(noise_multiplier: f64, clip_norm: f64, dimension: usize) -> Result<f64, PrivacyError> {
    if !(clip_norm.is_finite() && clip_norm > 0.0) {
        return Err(PrivacyError::Theorem(format!("clip norm {clip_norm} is not a positive number")));
    }
    let gamma = dp_quantizer(noise_multiplier, clip_norm)?.gamma();
    DistributedGaussian {
        l2_sensitivity: clip_norm * F32_CLIP_SLACK / gamma + (dimension as f64).sqrt(),
        node_scale: noise_multiplier * clip_norm / (gamma * (MAX_DP_PARTICIPANTS as f64).sqrt()),
        summands: MAX_DP_PARTICIPANTS,
        dimension,
    }
    .rho()
}

impl Encoding {
    /// The encoding every party derives from the plan and the round's participant count.
    pub fn new(
        clip_norm: f64,
        max_samples: u64,
        participants: usize,
        threshold: usize,
        noise_multiplier: Option<f64>,
    ) -> Result<Self, SecAggError> {
        let bad = |why: String| SecAggError::Protocol(why);
        if !(clip_norm.is_finite() && clip_norm > 0.0) || max_samples == 0 || threshold == 0 || threshold > participants
        {
            return Err(bad(format!(
                "encoding parameters out of range (clip {clip_norm}, max_samples {max_samples}, t {threshold} of {participants})"
            )));
        }
        let quantizer = match noise_multiplier {
            None => Quantizer::with_headroom(clip_norm.max(1.0), participants, 0.0).map_err(|e| bad(e.to_string()))?,
            Some(sigma) => {
                if participants > MAX_DP_PARTICIPANTS {
                    return Err(bad(format!(
                        "{participants} participants: client-level distributed noise is sized for at most {MAX_DP_PARTICIPANTS}"
                    )));
                }
                if 2 * threshold <= participants {
                    return Err(bad(format!(
                        "threshold {threshold} of {participants} is not a majority; client-level distributed noise needs 2t > n"
                    )));
                }
                dp_quantizer(sigma, clip_norm).map_err(|e| bad(e.to_string()))?
            }
        };
        Ok(Self { clip_norm, max_samples, participants, threshold, noise_multiplier, quantizer })
    }

    /// One integer step.
    pub fn gamma(&self) -> f64 {
        self.quantizer.gamma()
    }

    /// Each node's discrete Gaussian scale in integer units, σ·C/(γ·√t), so that t survivors'
    /// noise sums to scale σ·C/γ.
    pub fn node_noise_scale(&self) -> Option<f64> {
        self.noise_multiplier.map(|s| s * self.clip_norm / (self.gamma() * (self.threshold as f64).sqrt()))
    }

    /// The discrete Gaussian each node samples: the variance σ_t² rounded up to an integer (with
    /// room for the f64 rounding of σ_t² itself), so the noise is never less than accounted.
    fn node_noise(&self) -> Result<Option<DiscreteGaussian>, SecAggError> {
        let Some(scale) = self.node_noise_scale() else {
            return Ok(None);
        };
        let variance = (scale * scale * (1.0 + 1.0 / (1u64 << 50) as f64)).ceil();
        if !(variance.is_finite() && variance >= 1.0 && variance <= discrete::MAX_VARIANCE as f64) {
            return Err(SecAggError::Protocol(format!("noise variance {variance} is out of the sampler's range")));
        }
        DiscreteGaussian::with_variance(variance as u128)
            .map(Some)
            .map_err(|e| SecAggError::Protocol(format!("noise: {e}")))
    }

    /// This round's own mechanism, at its threshold t (for comparison with [`Self::round_rho`],
    /// which bounds it for every t).
    pub fn round_mechanism(&self, dimension: usize) -> Option<DistributedGaussian> {
        let node_scale = self.node_noise_scale()?;
        let l2_sensitivity = self.clip_norm * F32_CLIP_SLACK / self.gamma() + (dimension as f64).sqrt();
        Some(DistributedGaussian { l2_sensitivity, node_scale, summands: self.threshold, dimension })
    }

    /// The ρ every party charges for a round of inputs of `dimension` words under client-level
    /// DP ([`round_rho`]); `None` without it.
    pub fn round_rho(&self, dimension: usize) -> Result<Option<f64>, SecAggError> {
        self.noise_multiplier
            .map(|s| round_rho(s, self.clip_norm, dimension))
            .transpose()
            .map_err(|e| SecAggError::Protocol(e.to_string()))
    }

    /// A node's input: clip, weigh, quantise, add its noise share, all randomness from `rng` (a
    /// CSPRNG: the node passes ChaCha20 seeded by the OS). Returns the words and the update's
    /// norm before clipping.
    pub fn encode(
        &self,
        update: &[f32],
        weight: Weight,
        rng: &mut impl CryptoRng,
    ) -> Result<(Vec<u32>, f64), SecAggError> {
        let norm = update.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        if !norm.is_finite() {
            return Err(SecAggError::Protocol("the update holds a non-finite value".into()));
        }
        let scale = if norm > self.clip_norm { self.clip_norm / norm } else { 1.0 };
        let w = match (self.noise_multiplier, weight) {
            (Some(_), _) => 1.0,
            (None, Weight::Uniform) => 1.0,
            (None, Weight::Samples(n)) => n.min(self.max_samples) as f64 / self.max_samples as f64,
        };
        let mut values: Vec<f32> = update.iter().map(|v| (f64::from(*v) * scale * w) as f32).collect();
        // The clipped, weighted values can exceed C by an f32 rounding; stay inside the bound.
        let bound = if self.noise_multiplier.is_some() { self.clip_norm } else { self.clip_norm.max(1.0) } as f32;
        for v in &mut values {
            *v = v.clamp(-bound, bound);
        }
        values.push(if self.noise_multiplier.is_some() { 0.0 } else { w as f32 });
        let mut words = self.quantizer.encode(&values, rng).map_err(|e| SecAggError::Protocol(e.to_string()))?;
        if let Some(noise) = self.node_noise()? {
            let mut z = vec![0i64; words.len()];
            noise.fill(&mut z, rng).map_err(|e| SecAggError::Protocol(format!("noise: {e}")))?;
            for (w, z) in words.iter_mut().zip(z) {
                *w = w.wrapping_add(z as u64 as u32);
            }
        }
        Ok((words, norm))
    }

    /// The coordinator's reading of an unmasked sum over `survivors` nodes: the mean update
    /// (weighted sum / Σw, or sum / survivors with client-level DP).
    pub fn decode_mean(&self, sum: &[u32], survivors: usize) -> Result<Vec<f64>, SecAggError> {
        let decoded = self.quantizer.decode(sum);
        let Some((weight, values)) = decoded.split_last() else {
            return Err(SecAggError::Protocol("empty sum".into()));
        };
        let total = if self.noise_multiplier.is_some() { survivors as f64 } else { *weight };
        // Σw is at least one node's weight less rounding; anything smaller means no input.
        let least = 1.0 / self.max_samples as f64 - self.participants as f64 * self.gamma();
        if !(total > 0.0 && total >= least) {
            return Err(SecAggError::Protocol(format!("the summed weight {total} is not positive")));
        }
        Ok(values.iter().map(|v| v / total).collect())
    }
}

/// Words in a node's input for `plan`: the model's parameters and the weight.
pub fn input_dimension(plan: &Plan) -> usize {
    plan.model.num_params() + 1
}

/// Why a plan's client-level distributed DP cannot be set up.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PlanNoiseError {
    /// A `[privacy]` field client-level DP needs is missing.
    #[error("client-level privacy needs privacy.{0}: add it to the plan's [privacy] section")]
    Missing(&'static str),
    #[error(
        "client-level privacy needs noise_multiplier or target_epsilon: set one of them in the plan's [privacy] section"
    )]
    NoNoise,
    /// The theorem's preconditions or the accountant refused the numbers (its own wording).
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
}

/// One round's ρ for `plan` at noise multiplier σ ([`round_rho`] with the plan's clip norm and
/// input size).
pub fn plan_round_rho(plan: &Plan, noise_multiplier: f64) -> Result<f64, PlanNoiseError> {
    let clip = plan.privacy.clip_norm.ok_or(PlanNoiseError::Missing("clip_norm"))?;
    Ok(round_rho(noise_multiplier, clip, input_dimension(plan))?)
}

/// ε at δ after `rounds` releases of `plan` with distributed noise at multiplier σ: what a node
/// charges, and what the coordinator reports after as many released rounds.
pub fn distributed_epsilon(plan: &Plan, noise_multiplier: f64, rounds: u32, delta: f64) -> Result<f64, PlanNoiseError> {
    Ok(distributed::epsilon_after_rounds(plan_round_rho(plan, noise_multiplier)?, rounds, delta)?)
}

/// The noise multiplier of client-level distributed DP for a plan (from the plan, checked against
/// the theorem's preconditions, or the smallest that meets its target over all rounds); `None`
/// without client-level privacy.
pub fn distributed_noise(plan: &Plan) -> Result<Option<f64>, PlanNoiseError> {
    let p = &plan.privacy;
    if !plan.secure_aggregation || p.mode != PrivacyMode::Client {
        return Ok(None);
    }
    let delta = p.delta.ok_or(PlanNoiseError::Missing("delta"))?;
    match (p.noise_multiplier, p.target_epsilon) {
        (Some(s), _) => plan_round_rho(plan, s).map(|_| Some(s)),
        (None, Some(target)) => {
            let clip = p.clip_norm.ok_or(PlanNoiseError::Missing("clip_norm"))?;
            let d = input_dimension(plan);
            Ok(Some(distributed::noise_for_epsilon(target, plan.rounds, delta, |s| round_rho(s, clip, d))?))
        }
        (None, None) => Err(PlanNoiseError::NoNoise),
    }
}

/// The encoding every party derives for a round with `participants` nodes and threshold `t`.
pub fn encoding_for(plan: &Plan, participants: usize, t: usize, noise: Option<f64>) -> Result<Encoding, SecAggError> {
    let s = plan.secagg_settings();
    let clip = match (noise, plan.privacy.clip_norm) {
        (Some(_), Some(c)) => c,
        _ => s.clip_norm,
    };
    Encoding::new(clip, s.max_samples, participants, t, noise)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;
    use crate::model::ModelSpec;

    fn sum(inputs: &[Vec<u32>]) -> Vec<u32> {
        let mut s = vec![0u32; inputs[0].len()];
        for x in inputs {
            for (a, b) in s.iter_mut().zip(x) {
                *a = a.wrapping_add(*b);
            }
        }
        s
    }

    const ZERO64: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    /// A client-level DP plan under secure aggregation with the given clip norm and noise.
    fn dp_plan(clip: f64, sigma: f64) -> Plan {
        Plan::parse(&format!(
            "name = \"ddg\"\nseed = 0\nrounds = 15\nmin_nodes = 2\nround_deadline_secs = 300\n\
             secure_aggregation = true\n\
             [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"{ZERO64}\"\n\
             [local]\nsteps = 5\nbatch_size = 4\noptimizer = \"sgd\"\nlearning_rate = 0.01\n\
             [strategy]\nkind = \"fedavg\"\nweighting = \"uniform\"\n\
             [privacy]\nmode = \"client\"\nnoise_multiplier = {sigma}\ndelta = 1e-5\nclip_norm = {clip}\n"
        ))
        .unwrap()
    }

    #[test]
    fn weighted_mean_decodes_within_the_rounding_bound() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let enc = Encoding::new(10.0, 10_000, 4, 3, None).unwrap();
        let updates = [vec![0.5f32, -0.25, 0.125], vec![-1.0, 2.0, 0.0], vec![0.1, 0.2, 0.3]];
        let samples = [104u64, 89, 16];
        let inputs: Vec<Vec<u32>> =
            updates.iter().zip(samples).map(|(u, n)| enc.encode(u, Weight::Samples(n), &mut rng).unwrap().0).collect();
        let mean = enc.decode_mean(&sum(&inputs), 3).unwrap();
        let total: f64 = samples.iter().map(|&n| n as f64).sum();
        for (i, got) in mean.iter().enumerate() {
            let want: f64 = updates.iter().zip(samples).map(|(u, n)| f64::from(u[i]) * n as f64).sum::<f64>() / total;
            // Each of the 3 weighted coordinates and the weight are off by < 3γ.
            let tol = 3.0 * enc.gamma() * 10_000.0 / total * (1.0 + want.abs());
            assert!((got - want).abs() < tol, "coordinate {i}: {got} vs {want} (tol {tol})");
        }
    }

    #[test]
    fn updates_are_clipped_to_the_bound() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let enc = Encoding::new(1.0, 100, 2, 2, None).unwrap();
        let (a, norm) = enc.encode(&[30.0, 40.0], Weight::Uniform, &mut rng).unwrap();
        assert!((norm - 50.0).abs() < 1e-9);
        let (b, _) = enc.encode(&[0.0, 0.0], Weight::Uniform, &mut rng).unwrap();
        let mean = enc.decode_mean(&sum(&[a, b]), 2).unwrap();
        assert!((mean[0] - 0.3).abs() < 1e-6 && (mean[1] - 0.4).abs() < 1e-6, "{mean:?}");
        assert!(enc.encode(&[f32::NAN], Weight::Uniform, &mut rng).is_err());
    }

    #[test]
    fn distributed_noise_sums_to_the_plans_noise_and_never_wraps() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let (n, t, sigma, clip) = (5usize, 3usize, 0.8, 2.0);
        let enc = Encoding::new(clip, 100, n, t, Some(sigma)).unwrap();
        let d = 2000;
        let zeros = vec![0f32; d];
        let inputs: Vec<Vec<u32>> = (0..t).map(|_| enc.encode(&zeros, Weight::Uniform, &mut rng).unwrap().0).collect();
        // The sum of t nodes' noise, decoded, has std σ·C (divided by t survivors in the mean).
        let mean = enc.decode_mean(&sum(&inputs), t).unwrap();
        let var = mean.iter().map(|v| (v * t as f64).powi(2)).sum::<f64>() / d as f64;
        let want = (sigma * clip).powi(2);
        assert!((var / want - 1.0).abs() < 0.1, "noise variance {var}, want {want}");
        // One round's ρ bounds this round's own mechanism (to float rounding: both compute
        // (‖Δ‖γ/(σC))²/2 along different paths) and is close to the continuous Gaussian's (the
        // discreteness and rounding terms are small at these scales).
        let rho = enc.round_rho(d + 1).unwrap().unwrap();
        let own = enc.round_mechanism(d + 1).unwrap().rho().unwrap();
        let rho_continuous = 1.0 / (2.0 * sigma * sigma);
        assert!(own <= rho * (1.0 + 1e-12) && own >= rho_continuous, "ρ {rho}, own {own}");
        assert!(rho < rho_continuous * 1.001, "ρ {rho}");
    }

    /// The node's noise comes from the generator it passes and nowhere else: the same seed gives
    /// the same words, another seed other noise.
    #[test]
    fn the_noise_share_is_drawn_from_the_callers_generator() {
        let enc = Encoding::new(1.0, 100, 3, 2, Some(1.0)).unwrap();
        let update = vec![0.01f32; 500];
        let once = |seed| enc.encode(&update, Weight::Uniform, &mut ChaCha20Rng::seed_from_u64(seed)).unwrap().0;
        assert_eq!(once(9), once(9));
        assert_ne!(once(9), once(10));
    }

    /// Under client-level DP the encoding, and so a round's ρ, depends on the plan only: every
    /// cohort size and majority threshold gets the same γ and the same ρ.
    #[test]
    fn a_rounds_rho_does_not_depend_on_its_cohort() {
        let (sigma, clip, d) = (1.3, 0.5, 1000);
        let want = round_rho(sigma, clip, d).unwrap();
        let gamma = Encoding::new(clip, 100, 2, 2, Some(sigma)).unwrap().gamma();
        for (n, t) in [(2, 2), (4, 3), (5, 3), (100, 51), (100, 100), (MAX_DP_PARTICIPANTS, 501)] {
            let enc = Encoding::new(clip, 100, n, t, Some(sigma)).unwrap();
            assert_eq!(enc.gamma(), gamma, "n {n}, t {t}");
            assert_eq!(enc.round_rho(d).unwrap(), Some(want), "n {n}, t {t}");
            // The round's own mechanism, at its t, is bounded by it (to float rounding).
            assert!(enc.round_mechanism(d).unwrap().rho().unwrap() <= want * (1.0 + 1e-12), "n {n}, t {t}");
        }
        assert_eq!(Encoding::new(clip, 100, 4, 3, None).unwrap().round_rho(d).unwrap(), None);
    }

    #[test]
    fn rounds_and_plans_outside_the_theorem_or_the_sizing_are_refused() {
        assert!(Encoding::new(1.0, 100, MAX_DP_PARTICIPANTS + 1, MAX_DP_PARTICIPANTS, Some(1.0)).is_err());
        let e = Encoding::new(1.0, 100, 100, 50, Some(1.0)).unwrap_err().to_string();
        assert!(e.contains("2t > n"), "{e}");
        assert!(
            Encoding::new(1.0, 100, 100, 50, None).is_ok(),
            "without distributed noise the majority rule is not this module's"
        );
        // σ_N = σ·C/(γ·√N) below ½: the theorem says nothing, so the plan is refused.
        let tiny = 1e-7;
        assert!(matches!(round_rho(tiny, 1.0, 14), Err(PrivacyError::Theorem(_))));
        // Plans refuse σ below 0.1 (plan::limits); this module refuses on its own too.
        let mut plan = dp_plan(1.0, 1.0);
        plan.privacy.noise_multiplier = Some(tiny);
        let e = distributed_noise(&plan).unwrap_err();
        assert!(matches!(e, PlanNoiseError::Privacy(PrivacyError::Theorem(_))), "{e:?}");
        assert!(e.to_string().contains("below ½"), "{e}");
        assert!(distributed_noise(&dp_plan(1.0, 1.0)).unwrap() == Some(1.0));
    }

    /// The case: n = 100, t = 51, C = 0.01, d = 10⁷. The node charges
    /// [`distributed_epsilon`] from its plan; the coordinator adds [`Encoding::round_rho`] of the
    /// round's encoding into a running ρ and converts it. Both must be the same number to the bit,
    /// and equal to Theorem 1 written out here from the quantiser's formula.
    #[test]
    fn the_nodes_charge_equals_the_coordinators_rho_for_100_nodes_threshold_51() {
        let (n, t, clip, d, sigma, delta) = (100usize, 51usize, 0.01f64, 10_000_000usize, 1.0f64, 1e-5);
        let mut plan = dp_plan(clip, sigma);
        plan.model = ModelSpec::LogisticRegression { inputs: d - 2, outputs: 1 };
        assert_eq!(input_dimension(&plan), d, "d counts the model's parameters and the weight word");

        // The node: one round's ρ from its plan, and its ledger charge after k releases.
        let node_rho = plan_round_rho(&plan, sigma).unwrap();
        // The coordinator: the round's encoding (it knows n and t), a running total of ρ.
        let enc = encoding_for(&plan, n, t, Some(sigma)).unwrap();
        let coordinator_rho = enc.round_rho(d).unwrap().unwrap();
        assert_eq!(node_rho.to_bits(), coordinator_rho.to_bits());
        let mut running = 0.0;
        for k in 1..=15u32 {
            running += coordinator_rho;
            let node = distributed_epsilon(&plan, sigma, k, delta).unwrap();
            let coordinator = distributed::epsilon_for_rho(running, delta).unwrap();
            assert_eq!(node.to_bits(), coordinator.to_bits(), "after {k} rounds: {node} vs {coordinator}");
        }

        // Independently: γ = C·(N + 20√2·σ)/(2³¹ − 1 − N) (room for N inputs within ±C and 20
        // standard deviations of √2·σ·C/γ of noise), ‖Δ‖ = C(1 + 2⁻²⁰)/γ + √d, σ_N = σC/(γ√N),
        // τ = 10·Σ_{k<N} exp(−2π²σ_N²·k/(k+1)), ε = min(√(‖Δ‖²/(Nσ_N²) + τd/2), ‖Δ‖/(√N·σ_N) + τ√d).
        let big_n = 1000.0f64;
        let gamma = clip * (big_n + 20.0 * 2f64.sqrt() * sigma) / (f64::from(i32::MAX) - big_n);
        assert!((enc.gamma() / gamma - 1.0).abs() < 1e-12, "γ {} vs {gamma}", enc.gamma());
        let l2 = clip * (1.0 + 2f64.powi(-20)) / gamma + (d as f64).sqrt();
        let s_n = sigma * clip / (gamma * big_n.sqrt());
        let tau: f64 = 10.0
            * (1..1000)
                .map(|k| (-2.0 * std::f64::consts::PI.powi(2) * s_n * s_n * f64::from(k) / f64::from(k + 1)).exp())
                .sum::<f64>();
        let base = l2 * l2 / (big_n * s_n * s_n);
        let eps = (base + 0.5 * tau * d as f64).sqrt().min(base.sqrt() + tau * (d as f64).sqrt());
        let want = 0.5 * eps * eps;
        assert!((node_rho / want - 1.0).abs() < 1e-12, "ρ {node_rho} vs Theorem 1 by hand {want}");
        // It bounds the round's own mechanism at t = 51, and stays within 0.5 % of the
        // continuous Gaussian's 1/(2σ²) for this 10⁷-word model.
        assert!(node_rho * (1.0 + 1e-12) >= enc.round_mechanism(d).unwrap().rho().unwrap());
        assert!(node_rho > 0.5 && node_rho < 0.5 * 1.005, "ρ = {node_rho}");
    }
}
