//! Fixed-point encoding of clipped updates into integers mod 2³², for secure aggregation.
//!
//! Each coordinate v is scaled by 1/γ and rounded *randomly* to ⌊v/γ⌋ or ⌊v/γ⌋ + 1 with the
//! probabilities that make the rounding unbiased (E[q] = v/γ), then stored as a two's-complement
//! u32. Sums of such words wrap mod 2³² exactly like the masks do, and decode back through i32 as
//! long as the true integer sum stays within ±2³¹.
//!
//! Error, per coordinate of a sum over n nodes: unbiased; never more than n·γ in absolute value;
//! variance at most n·γ²/4. [`Quantizer::for_bound`] picks the smallest γ for which n updates of
//! norm at most C can never overflow (every |coordinate| ≤ C, so every |sum| ≤ n·(C/γ + 1)).

use rand::RngCore;

/// Why a quantiser cannot be built or a value encoded.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum QuantizeError {
    #[error("clip bound {0} and node count {1} must be positive")]
    Parameters(f64, usize),
    #[error("value {value} at coordinate {index} exceeds the bound {bound} the quantiser was built for")]
    OutOfRange { index: usize, value: f32, bound: f64 },
}

/// The scale γ and the per-coordinate bound it was chosen for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantizer {
    gamma: f64,
    bound: f64,
}

impl Quantizer {
    /// The finest γ for which `nodes` updates with every coordinate within ±`clip` sum without
    /// overflow: n·(C/γ + 1) ≤ 2³¹ − 1.
    pub fn for_bound(clip: f64, nodes: usize) -> Result<Self, QuantizeError> {
        if !(clip.is_finite() && clip > 0.0) || nodes == 0 {
            return Err(QuantizeError::Parameters(clip, nodes));
        }
        let n = nodes as f64;
        let room = f64::from(i32::MAX) / n - 1.0;
        if room <= 0.0 {
            return Err(QuantizeError::Parameters(clip, nodes));
        }
        Ok(Self { gamma: clip / room, bound: clip })
    }

    /// The finest γ for which `nodes` inputs with every coordinate within ±`bound`, plus noise whose
    /// sum never exceeds `noise_per_unit`·(bound/γ) in absolute value, sum without overflow:
    /// n·(B/γ + 1) + noise_per_unit·B/γ ≤ 2³¹ − 1.
    pub fn with_headroom(bound: f64, nodes: usize, noise_per_unit: f64) -> Result<Self, QuantizeError> {
        if !(bound.is_finite() && bound > 0.0) || nodes == 0 || !(noise_per_unit.is_finite() && noise_per_unit >= 0.0) {
            return Err(QuantizeError::Parameters(bound, nodes));
        }
        let n = nodes as f64;
        let room = (f64::from(i32::MAX) - n) / (n + noise_per_unit);
        if room <= 1.0 {
            return Err(QuantizeError::Parameters(bound, nodes));
        }
        Ok(Self { gamma: bound / room, bound })
    }

    /// The scale γ: one integer step.
    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    /// Encodes with unbiased randomised rounding; `rng` should be a CSPRNG (the rounding is
    /// hidden only inside the sum).
    pub fn encode(&self, values: &[f32], rng: &mut impl RngCore) -> Result<Vec<u32>, QuantizeError> {
        values
            .iter()
            .enumerate()
            .map(|(index, &v)| {
                // NaN fails this test too.
                if !v.is_finite() || f64::from(v).abs() > self.bound {
                    return Err(QuantizeError::OutOfRange { index, value: v, bound: self.bound });
                }
                let scaled = f64::from(v) / self.gamma;
                let floor = scaled.floor();
                let frac = scaled - floor;
                let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                let q = if u < frac { floor + 1.0 } else { floor };
                Ok((q as i64) as i32 as u32)
            })
            .collect()
    }

    /// Decodes a sum of encoded words (mod 2³²) back to real numbers.
    pub fn decode(&self, sum: &[u32]) -> Vec<f64> {
        sum.iter().map(|&w| f64::from(w as i32) * self.gamma).collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    use super::*;

    proptest! {
        #[test]
        fn sums_decode_within_n_gamma_and_never_overflow(
            n in 1usize..20,
            clip in 0.001f64..100.0,
            seed in any::<u64>(),
            extreme in any::<bool>(),
        ) {
            let q = Quantizer::for_bound(clip, n).unwrap();
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let d = 16;
            let mut sum = vec![0u32; d];
            let mut truth = vec![0f64; d];
            for _ in 0..n {
                // Either random values or every coordinate at the bound (the overflow worst case).
                let x: Vec<f32> = (0..d)
                    .map(|_| if extreme { clip as f32 * 0.999_999 } else { ((rng.next_u32() as f64 / f64::from(u32::MAX)) * 2.0 - 1.0) as f32 * clip as f32 })
                    .collect();
                for (t, v) in truth.iter_mut().zip(&x) { *t += f64::from(*v); }
                for (s, w) in sum.iter_mut().zip(q.encode(&x, &mut rng).unwrap()) { *s = s.wrapping_add(w); }
            }
            for (got, want) in q.decode(&sum).iter().zip(&truth) {
                prop_assert!((got - want).abs() <= n as f64 * q.gamma() * (1.0 + 1e-9), "{got} vs {want}, γ = {}", q.gamma());
            }
        }
    }

    #[test]
    fn rounding_is_unbiased() {
        let q = Quantizer::for_bound(1.0, 4).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let v = 0.3 * q.gamma() as f32 + 17.0 * q.gamma() as f32;
        let trials = 100_000;
        let mean: f64 =
            (0..trials).map(|_| q.decode(&q.encode(&[v], &mut rng).unwrap())[0]).sum::<f64>() / f64::from(trials);
        // Bernoulli(0.3) rounding: standard error γ·√(0.21/trials) ≈ 0.0014·γ.
        assert!((mean - f64::from(v)).abs() < 0.01 * q.gamma(), "mean {mean} vs {v}");
        assert!(q.encode(&[2.0], &mut rng).is_err(), "values beyond the bound are refused");
        assert!(q.encode(&[f32::NAN], &mut rng).is_err());
    }
}
