//! What a node puts into secure aggregation and what the coordinator gets back.
//!
//! A node's input is its update clipped to L2 norm ≤ C, multiplied by its aggregation weight w,
//! followed by w itself, all quantised to integers mod 2³² ([`super::quantize`]). Under sample
//! weighting w = min(samples, max_samples) / max_samples, so the coordinator learns only Σw and
//! the weighted sum; under uniform weighting w = 1. With client-level DP the weight coordinate is
//! 0 (the survivors are counted instead) and each node adds discrete Gaussian noise to every word
//! ([`crate::privacy::distributed`]), so the unmasked sum is already private.
//!
//! Bounds: every coordinate is within ±B with B = max(C, 1); γ leaves room for n such inputs plus
//! 20 standard deviations of the summed noise (probability of a wrap below 10⁻⁸⁸ per coordinate),
//! and a decoded coordinate of the sum is off by at most n·γ from rounding.

use rand::RngCore;

use super::SecAggError;
use super::quantize::Quantizer;
use crate::plan::{Plan, PrivacyMode};
use crate::privacy::distributed::{self, DistributedGaussian};

/// Standard deviations of the summed noise the quantiser leaves room for.
const NOISE_TAIL: f64 = 20.0;

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
        let bound = clip_norm.max(1.0);
        // Σ noise over n nodes has std σ·C/γ·√(n/t); in units of B/γ that is σ·(C/B)·√(n/t).
        let noise_per_unit = noise_multiplier
            .map(|s| NOISE_TAIL * s * (clip_norm / bound) * (participants as f64 / threshold as f64).sqrt())
            .unwrap_or(0.0);
        let quantizer =
            Quantizer::with_headroom(bound, participants, noise_per_unit).map_err(|e| bad(e.to_string()))?;
        Ok(Self { clip_norm, max_samples, participants, threshold, noise_multiplier, quantizer })
    }

    /// One integer step.
    pub fn gamma(&self) -> f64 {
        self.quantizer.gamma()
    }

    /// Each node's discrete Gaussian scale in integer units: σ·C/(γ·√t), so that t survivors'
    /// noise sums to scale σ·C/γ.
    pub fn node_noise_scale(&self) -> Option<f64> {
        self.noise_multiplier.map(|s| s * self.clip_norm / (self.gamma() * (self.threshold as f64).sqrt()))
    }

    /// The privacy of one round's sum for the accountant, when the plan adds distributed noise.
    pub fn distributed_gaussian(&self, dimension: usize) -> Option<DistributedGaussian> {
        let node_scale = self.node_noise_scale()?;
        // Randomised rounding moves each coordinate by less than one step.
        let sensitivity = self.clip_norm / self.gamma() + (dimension as f64).sqrt();
        Some(DistributedGaussian { sensitivity, node_scale, min_survivors: self.threshold, dimension })
    }

    /// A node's input: clip, weigh, quantise, add its noise share. Returns the words and the
    /// update's norm before clipping.
    pub fn encode(
        &self,
        update: &[f32],
        weight: Weight,
        rng: &mut impl RngCore,
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
        let bound = self.clip_norm.max(1.0) as f32;
        for v in &mut values {
            *v = v.clamp(-bound, bound);
        }
        values.push(if self.noise_multiplier.is_some() { 0.0 } else { w as f32 });
        let mut words = self.quantizer.encode(&values, rng).map_err(|e| SecAggError::Protocol(e.to_string()))?;
        if let Some(scale) = self.node_noise_scale() {
            let noise = distributed::sample_discrete_gaussian(words.len(), scale)
                .map_err(|e| SecAggError::Protocol(format!("noise: {e}")))?;
            for (w, z) in words.iter_mut().zip(noise) {
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

/// The noise multiplier of client-level distributed DP for a plan (from the plan, or the smallest
/// that meets its target over all rounds); `None` without client-level privacy.
pub fn distributed_noise(plan: &Plan) -> Result<Option<f64>, String> {
    let p = &plan.privacy;
    if !plan.secure_aggregation || p.mode != PrivacyMode::Client {
        return Ok(None);
    }
    let delta = p.delta.ok_or("client-level privacy needs privacy.delta")?;
    match (p.noise_multiplier, p.target_epsilon) {
        (Some(s), _) => Ok(Some(s)),
        (None, Some(target)) => {
            distributed::noise_for_epsilon(target, plan.rounds, delta).map(Some).map_err(|e| e.to_string())
        }
        (None, None) => Err("client-level privacy needs noise_multiplier or target_epsilon".into()),
    }
}

/// The encoding every party derives for a round with `participants` nodes and threshold `t`.
pub fn encoding_for(plan: &Plan, participants: usize, t: usize, noise: Option<f64>) -> Result<Encoding, String> {
    let s = plan.secagg_settings();
    let clip = match (noise, plan.privacy.clip_norm) {
        (Some(_), Some(c)) => c,
        _ => s.clip_norm,
    };
    Encoding::new(clip, s.max_samples, participants, t, noise).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    fn sum(inputs: &[Vec<u32>]) -> Vec<u32> {
        let mut s = vec![0u32; inputs[0].len()];
        for x in inputs {
            for (a, b) in s.iter_mut().zip(x) {
                *a = a.wrapping_add(*b);
            }
        }
        s
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
        // ε of the distributed mechanism behaves: more rounds cost more, and it is close to the
        // continuous Gaussian's (the discreteness corrections vanish at these scales).
        let dg = enc.distributed_gaussian(d + 1).unwrap();
        let e1 = dg.epsilon(1, 1e-5).unwrap();
        let e10 = dg.epsilon(10, 1e-5).unwrap();
        assert!(e10 > e1 && e1 > 0.0);
        let rho = dg.rho_per_round().unwrap();
        let rho_continuous = 1.0 / (2.0 * sigma * sigma);
        assert!(rho >= rho_continuous && rho < rho_continuous * 1.001, "ρ {rho} vs {rho_continuous}");
    }
}
