//! Gaussian noise for DP-SGD and DP-FedAvg from a cryptographically secure generator.
//!
//! - The generator is ChaCha20 seeded from the operating system (`getrandom`), never libtorch's
//!   generator or a seeded PRNG: whoever knows a seed can subtract the noise.
//! - Floating-point attacks (Mironov 2012 on Laplace; Jin et al. 2022 on Gaussian samplers) read
//!   the noise's value back from gaps in the set of representable outputs. Following Holohan and
//!   Braghin ("Secure Random Sampling in Differential Privacy", ESORICS 2021), as Opacus's secure
//!   mode does, each sample is the sum of four independent Box–Muller draws divided by two: the
//!   same N(0, σ²), with the output lattice filled in so no single draw can be recovered. The
//!   uniforms carry the full 53 bits of an f64 mantissa.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// A source of N(0, σ²) noise that cannot be predicted or replayed.
pub struct SecureGaussian {
    rng: ChaCha20Rng,
}

impl SecureGaussian {
    /// Seeds ChaCha20 from the operating system.
    pub fn from_os() -> Self {
        Self { rng: ChaCha20Rng::from_os_rng() }
    }

    /// A uniform in (0, 1] with 53 random bits.
    fn uniform_open0(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent standard normals (Box–Muller).
    fn standard_pair(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.uniform_open0().ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * self.uniform_open0();
        (r * theta.cos(), r * theta.sin())
    }

    /// One N(0, `std`²) sample: four independent draws, summed and halved.
    pub fn sample(&mut self, std: f64) -> f64 {
        let (a, b) = self.standard_pair();
        let (c, d) = self.standard_pair();
        (a + b + c + d) * 0.5 * std
    }

    /// Fills `out` with independent N(0, `std`²) samples, on every core for large buffers: each
    /// thread draws from its own ChaCha20 generator seeded from this one's output.
    pub fn fill(&mut self, out: &mut [f32], std: f64) {
        const PER_THREAD_MIN: usize = 1 << 15;
        let threads =
            std::thread::available_parallelism().map_or(1, |n| n.get()).min(out.len() / PER_THREAD_MIN).max(1);
        if threads == 1 {
            for v in out.iter_mut() {
                *v = self.sample(std) as f32;
            }
            return;
        }
        let chunk = out.len().div_ceil(threads);
        let mut workers: Vec<SecureGaussian> =
            (0..threads).map(|_| SecureGaussian { rng: ChaCha20Rng::from_rng(&mut self.rng) }).collect();
        std::thread::scope(|scope| {
            for (part, worker) in out.chunks_mut(chunk).zip(workers.iter_mut()) {
                scope.spawn(move || {
                    for v in part.iter_mut() {
                        *v = worker.sample(std) as f32;
                    }
                });
            }
        });
    }

    /// A uniform in [0, 1) for Poisson sampling, from the same secure stream.
    pub fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_have_the_requested_moments_and_never_repeat_across_generators() {
        let mut g = SecureGaussian::from_os();
        let mut v = vec![0f32; 200_000];
        g.fill(&mut v, 3.0);
        let n = v.len() as f64;
        let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
        let var = v.iter().map(|x| (f64::from(*x) - mean).powi(2)).sum::<f64>() / n;
        let kurt = v.iter().map(|x| (f64::from(*x) - mean).powi(4)).sum::<f64>() / n / (var * var);
        // Standard errors: mean 3/√n ≈ 0.0067, variance ≈ 9·√(2/n) ≈ 0.028, kurtosis ≈ √(24/n) ≈ 0.011.
        assert!(mean.abs() < 0.04, "mean {mean}");
        assert!((var - 9.0).abs() < 0.15, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.08, "kurtosis {kurt}");
        let mut w = vec![0f32; 16];
        SecureGaussian::from_os().fill(&mut w, 1.0);
        assert_ne!(&v[..16], &w[..], "two generators seeded from the OS produced the same noise");
    }
}
