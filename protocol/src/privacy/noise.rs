//! Gaussian noise for DP-SGD and DP-FedAvg from a cryptographically secure generator.
//!
//! - The generator is ChaCha20 seeded from the operating system (`getrandom`), never libtorch's
//!   generator or a seeded PRNG: whoever knows a seed can subtract the noise.
//! - Floating-point attacks (Mironov 2012 on Laplace; Jin et al. 2022 on Gaussian samplers) read
//!   the noise's value back from gaps in the set of representable outputs. Following Holohan and
//!   Braghin ("Secure Random Sampling in Differential Privacy", ESORICS 2021, §5.1 with n = 2), as
//!   Opacus's secure mode does (`_generate_noise`: four `torch.normal` calls of the whole shape,
//!   summed and halved), each sample is the sum of **four independent draws from four different
//!   Box–Muller pairs**, divided by two: the same N(0, σ²), with the output lattice filled in so
//!   that no single draw can be recovered. An attacker must invert 2n − 1 = 3 independent draws
//!   at 53 bits each (about 2¹⁵⁹ work, Opacus's figure) rather than one.
//! - A Box–Muller pair (r·cos θ, r·sin θ) is two independent normals as random variables, but
//!   both are functions of the same two uniforms: a + b = √2·r·sin(θ + π/4) is *one* draw. So the
//!   two halves of a pair never go into the same sample. Samples are made two at a time from four
//!   pairs: the cosines sum into the first, the sines into the second (torch does the same: a
//!   pair's halves land in elements i and i + 8 of each `torch.normal` call). Four uniforms per
//!   sample, as before; a lone sample keeps the other four halves for the next call.
//! - The uniforms carry the full 53 bits of an f64 mantissa; the first one of a pair is in
//!   (0, 1] so its logarithm is finite.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// A source of N(0, σ²) noise that cannot be predicted or replayed.
pub struct SecureGaussian {
    rng: ChaCha20Rng,
    /// The sine halves of the four pairs whose cosine halves made the previous lone sample: a
    /// sum of four draws from four different pairs, ready to be the next one (`None` when spent).
    spare: Option<f64>,
}

impl SecureGaussian {
    /// Seeds ChaCha20 from the operating system.
    pub fn from_os() -> Self {
        Self { rng: ChaCha20Rng::from_os_rng(), spare: None }
    }

    /// A uniform in (0, 1] with 53 random bits.
    fn uniform_open0(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent standard normals from one pair of uniforms (Box–Muller).
    fn standard_pair(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.uniform_open0().ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * self.uniform_open0();
        (r * theta.cos(), r * theta.sin())
    }

    /// Two independent standard normals, each half the sum of four draws from four different
    /// Box–Muller pairs (the first takes each pair's cosine, the second its sine).
    fn standard_two(&mut self) -> (f64, f64) {
        let (a0, a1) = self.standard_pair();
        let (b0, b1) = self.standard_pair();
        let (c0, c1) = self.standard_pair();
        let (d0, d1) = self.standard_pair();
        ((a0 + b0 + c0 + d0) * 0.5, (a1 + b1 + c1 + d1) * 0.5)
    }

    /// One N(0, `std`²) sample: four draws from four different pairs, summed and halved.
    pub fn sample(&mut self, std: f64) -> f64 {
        let z = match self.spare.take() {
            Some(z) => z,
            None => {
                let (z, next) = self.standard_two();
                self.spare = Some(next);
                z
            }
        };
        z * std
    }

    /// Fills `out` with independent N(0, `std`²) samples, two at a time, on every core for large
    /// buffers: each thread draws from its own ChaCha20 generator seeded from this one's output.
    pub fn fill(&mut self, out: &mut [f32], std: f64) {
        const PER_THREAD_MIN: usize = 1 << 15;
        let threads =
            std::thread::available_parallelism().map_or(1, |n| n.get()).min(out.len() / PER_THREAD_MIN).max(1);
        if threads == 1 {
            self.fill_here(out, std);
            return;
        }
        // Even chunks, so that only the last one can end on a lone sample.
        let chunk = out.len().div_ceil(threads).next_multiple_of(2);
        let mut workers: Vec<SecureGaussian> =
            (0..threads).map(|_| SecureGaussian { rng: ChaCha20Rng::from_rng(&mut self.rng), spare: None }).collect();
        std::thread::scope(|scope| {
            for (part, worker) in out.chunks_mut(chunk).zip(workers.iter_mut()) {
                scope.spawn(move || worker.fill_here(part, std));
            }
        });
    }

    /// [`Self::fill`] on the calling thread.
    fn fill_here(&mut self, out: &mut [f32], std: f64) {
        let mut pairs = out.chunks_exact_mut(2);
        for two in &mut pairs {
            let (z0, z1) = self.standard_two();
            two[0] = (z0 * std) as f32;
            two[1] = (z1 * std) as f32;
        }
        for v in pairs.into_remainder() {
            *v = self.sample(std) as f32;
        }
    }

    /// A uniform in [0, 1) for Poisson sampling, from the same secure stream.
    pub fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl SecureGaussian {
        /// A generator with a known seed, so a test can replay its stream (never in production).
        fn seeded(seed: u64) -> Self {
            Self { rng: ChaCha20Rng::seed_from_u64(seed), spare: None }
        }
    }

    /// Φ, the standard normal CDF.
    fn phi(x: f64) -> f64 {
        0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    /// Mean, variance, kurtosis and the Kolmogorov–Smirnov distance to N(0, σ²), with bounds that
    /// a correct sampler exceeds with probability below 10⁻⁸ each (so the test never flakes).
    fn check_normal(values: &[f64], sigma: f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let kurt = values.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n / (var * var);
        // Six standard errors: σ/√n for the mean, σ²·√(2/n) for the variance, √(24/n) for the
        // kurtosis (P ≈ 2·10⁻⁹ each under normality).
        assert!(mean.abs() < 6.0 * sigma / n.sqrt(), "mean {mean}");
        assert!((var / (sigma * sigma) - 1.0).abs() < 6.0 * (2.0 / n).sqrt(), "variance {var}, want {}", sigma * sigma);
        assert!((kurt - 3.0).abs() < 6.0 * (24.0 / n).sqrt(), "kurtosis {kurt}");
        // Kolmogorov: P(√n·D > x) ≤ 2·exp(−2x²) (Massart's constant), so x = 3.3 fails a correct
        // sampler with probability below 10⁻⁹.
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let d = sorted
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = phi(x / sigma);
                (((i + 1) as f64 / n) - f).max(f - i as f64 / n)
            })
            .fold(0.0, f64::max);
        assert!(d * n.sqrt() < 3.3, "Kolmogorov–Smirnov distance {d} (√n·D = {})", d * n.sqrt());
    }

    #[test]
    fn samples_follow_the_normal_distribution_by_moments_and_kolmogorov_smirnov() {
        // `fill` on a buffer large enough for every core, and lone `sample` calls (which alternate
        // fresh draws and kept halves).
        let mut g = SecureGaussian::from_os();
        let mut v = vec![0f32; 200_000];
        g.fill(&mut v, 3.0);
        check_normal(&v.iter().map(|x| f64::from(*x)).collect::<Vec<_>>(), 3.0);
        let lone: Vec<f64> = (0..100_001).map(|_| g.sample(0.5)).collect();
        check_normal(&lone, 0.5);
        let mut w = vec![0f32; 16];
        SecureGaussian::from_os().fill(&mut w, 1.0);
        assert_ne!(&v[..16], &w[..], "two generators seeded from the OS produced the same noise");
    }

    /// The hardening is four draws from four *different* Box–Muller pairs: the two halves of one
    /// pair are one draw in disguise (a + b = √2·r·sin(θ + π/4)), so they must never meet in one
    /// sample. Replays the same ChaCha20 stream pair by pair and checks which halves were summed.
    #[test]
    fn each_sample_sums_one_half_of_four_different_pairs() {
        let replay = |seed: u64| {
            let mut r = SecureGaussian::seeded(seed);
            let p: Vec<(f64, f64)> = (0..4).map(|_| r.standard_pair()).collect();
            ((p[0].0 + p[1].0 + p[2].0 + p[3].0) * 0.5, (p[0].1 + p[1].1 + p[2].1 + p[3].1) * 0.5)
        };
        let (first, second) = replay(7);
        let mut g = SecureGaussian::seeded(7);
        assert_eq!(g.sample(3.0), first * 3.0, "a lone sample is the cosines of four pairs");
        assert_eq!(g.sample(3.0), second * 3.0, "the next lone sample is their sines");
        let (first, second) = replay(8);
        let mut out = [0f32; 2];
        SecureGaussian::seeded(8).fill(&mut out, 2.0);
        assert_eq!(out, [(first * 2.0) as f32, (second * 2.0) as f32], "fill pairs samples the same way");
    }
}
