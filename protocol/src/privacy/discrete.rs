//! Exact sampling from the discrete Gaussian N_Z(0, σ²), each node's share of the distributed
//! noise under secure aggregation (Canonne, Kamath and Steinke, "The Discrete Gaussian for
//! Differential Privacy", NeurIPS 2020: Algorithm 1 for Bernoulli(exp(−γ)), Algorithm 2 for the
//! discrete Laplace, Algorithm 3 for the discrete Gaussian by rejection from it).
//!
//! - **Why our own.** opendp 0.16 implements the same algorithms (`traits/samplers/cks20`), but
//!   takes its random bits from `fill_bytes`, which is OpenSSL's `RAND_priv_bytes` only with the
//!   `use-openssl` feature (the system library, or a vendored C build); without it, as Sanctum
//!   builds it so that a fresh machine needs no OpenSSL, it is `rand::thread_rng()` under the
//!   doc comment "Non-securely fill a byte buffer with random bits. Enable `use-openssl` for a
//!   secure implementation." Its authors do not stand behind that build. Here the bits come from
//!   the caller's generator, whose type must be a [`CryptoRng`]; the node passes the same
//!   OS-seeded ChaCha20 stream that does its randomised rounding.
//! - **Exact.** Every step is integer arithmetic on `u128`, with no floating point, so given
//!   uniform bits the output is exactly N_Z(0, σ²): P[x] ∝ exp(−x²/(2σ²)). The variance parameter
//!   is an integer; callers round the σ² their accountant assumed *up* (more noise is never less
//!   private). Every product is checked: an overflow needs a Laplace candidate beyond 2⁶⁴/t, or
//!   Algorithm 1 running past k = 2¹⁴ (probability below 1/(2¹⁴)!), and is an error, never a
//!   biased sample.

use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::PrivacyError;

/// The largest variance the sampler accepts: 2σ²·t² (t ≈ σ) and its multiples by Algorithm 1's
/// counter stay far inside `u128`.
pub const MAX_VARIANCE: u128 = 1 << 56;

/// N_Z(0, σ²) for an integer σ² ≥ 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscreteGaussian {
    /// σ², in [1, [`MAX_VARIANCE`]].
    variance: u128,
    /// The Laplace scale t = ⌊σ⌋ + 1 of Algorithm 3 (any t > 0 is exact; this one is fastest).
    laplace_scale: u128,
}

fn overflow() -> PrivacyError {
    PrivacyError::Sampler("integer overflow in the discrete Gaussian sampler (a draw far in the tail); retry".into())
}

impl DiscreteGaussian {
    /// The discrete Gaussian with variance parameter σ² = `variance`.
    pub fn with_variance(variance: u128) -> Result<Self, PrivacyError> {
        if !(1..=MAX_VARIANCE).contains(&variance) {
            return Err(PrivacyError::Sampler(format!(
                "variance {variance} is outside [1, 2⁵⁶]; the plan's noise per node is out of range"
            )));
        }
        Ok(Self { variance, laplace_scale: isqrt(variance) + 1 })
    }

    /// σ².
    pub fn variance(&self) -> u128 {
        self.variance
    }

    /// One draw (Algorithm 3): a discrete Laplace candidate Y with scale t, accepted with
    /// probability exp(−(|Y| − σ²/t)²/(2σ²)) = exp(−(|Y|·t − σ²)²/(2σ²t²)).
    pub fn sample(&self, rng: &mut impl CryptoRng) -> Result<i64, PrivacyError> {
        let (s2, t) = (self.variance, self.laplace_scale);
        let den = 2u128.checked_mul(s2).and_then(|v| v.checked_mul(t * t)).ok_or_else(overflow)?;
        loop {
            let (negative, magnitude) = discrete_laplace(t, rng)?;
            let scaled = magnitude.checked_mul(t).ok_or_else(overflow)?;
            let gap = scaled.abs_diff(s2);
            let num = gap.checked_mul(gap).ok_or_else(overflow)?;
            if bernoulli_exp(num, den, rng)? {
                let m = i64::try_from(magnitude).map_err(|_| overflow())?;
                return Ok(if negative { -m } else { m });
            }
        }
    }

    /// Fills `out` with independent draws, on every core for large buffers: each thread uses its
    /// own ChaCha20 generator seeded from `rng`.
    pub fn fill(&self, out: &mut [i64], rng: &mut impl CryptoRng) -> Result<(), PrivacyError> {
        const PER_THREAD_MIN: usize = 1 << 14;
        let threads =
            std::thread::available_parallelism().map_or(1, |n| n.get()).min(out.len() / PER_THREAD_MIN).max(1);
        if threads == 1 {
            return out.iter_mut().try_for_each(|v| self.sample(rng).map(|x| *v = x));
        }
        let chunk = out.len().div_ceil(threads);
        let mut workers: Vec<ChaCha20Rng> = (0..threads).map(|_| ChaCha20Rng::from_rng(&mut *rng)).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = out
                .chunks_mut(chunk)
                .zip(workers.iter_mut())
                .map(|(part, worker)| {
                    scope.spawn(move || part.iter_mut().try_for_each(|v| self.sample(worker).map(|x| *v = x)))
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().map_err(|_| PrivacyError::Sampler("a sampling thread panicked".into()))?)
        })
    }
}

/// ⌊√n⌋, exactly.
fn isqrt(n: u128) -> u128 {
    // A float guess, corrected: n ≤ 2⁵⁶ so the guess is within one of the root.
    let mut r = (n as f64).sqrt() as u128;
    while r * r > n {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= n {
        r += 1;
    }
    r
}

/// A uniform integer in [0, n), n ≥ 1, by rejection on the fewest whole words.
fn uniform_below(n: u128, rng: &mut impl RngCore) -> u128 {
    let max = n - 1;
    if max == 0 {
        return 0;
    }
    let mask = u128::MAX >> max.leading_zeros();
    loop {
        let x = if mask <= u128::from(u64::MAX) {
            u128::from(rng.next_u64())
        } else {
            u128::from(rng.next_u64()) | (u128::from(rng.next_u64()) << 64)
        } & mask;
        if x <= max {
            return x;
        }
    }
}

/// Bernoulli(num/den), 0 ≤ num ≤ den, den ≥ 1.
fn bernoulli(num: u128, den: u128, rng: &mut impl RngCore) -> bool {
    uniform_below(den, rng) < num
}

/// Bernoulli(exp(−num/den)) for num/den ∈ [0, 1] (Algorithm 1): the first k ≥ 1 with a failed
/// Bernoulli(γ/k) is odd with probability exp(−γ).
fn bernoulli_exp_le1(num: u128, den: u128, rng: &mut impl RngCore) -> Result<bool, PrivacyError> {
    let mut k: u128 = 1;
    loop {
        let d = den.checked_mul(k).ok_or_else(overflow)?;
        if bernoulli(num, d, rng) {
            k += 1;
        } else {
            return Ok(k % 2 == 1);
        }
    }
}

/// Bernoulli(exp(−num/den)) for any num/den ≥ 0: ⌊γ⌋ draws of Bernoulli(exp(−1)) that must all
/// succeed, then one of Bernoulli(exp(−(γ − ⌊γ⌋))).
fn bernoulli_exp(num: u128, den: u128, rng: &mut impl RngCore) -> Result<bool, PrivacyError> {
    let (whole, rest) = (num / den, num % den);
    let mut i: u128 = 0;
    while i < whole {
        if !bernoulli_exp_le1(1, 1, rng)? {
            return Ok(false);
        }
        i += 1;
    }
    bernoulli_exp_le1(rest, den, rng)
}

/// The discrete Laplace with scale t, P[y] ∝ exp(−|y|/t) (Algorithm 2 with s = 1), as
/// (negative, |y|): U uniform in [0, t) kept with probability exp(−U/t), plus t times a
/// geometric count of Bernoulli(exp(−1)) successes; −0 is rejected so 0 is not counted twice.
fn discrete_laplace(t: u128, rng: &mut impl RngCore) -> Result<(bool, u128), PrivacyError> {
    loop {
        let u = uniform_below(t, rng);
        if !bernoulli_exp_le1(u, t, rng)? {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_le1(1, 1, rng)? {
            v += 1;
        }
        let magnitude = t.checked_mul(v).and_then(|x| x.checked_add(u)).ok_or_else(overflow)?;
        let negative = rng.next_u32() & 1 == 1;
        if negative && magnitude == 0 {
            continue;
        }
        return Ok((negative, magnitude));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    #[test]
    fn bernoulli_exp_has_probability_exp_minus_gamma() {
        let mut r = rng(1);
        let trials = 200_000u32;
        for (num, den) in [(0u128, 1u128), (3, 10), (1, 1), (17, 10), (5, 3), (7, 1)] {
            let hits = (0..trials).filter(|_| bernoulli_exp(num, den, &mut r).unwrap()).count() as f64;
            let p = (-(num as f64) / den as f64).exp();
            // Six standard errors of a binomial proportion (a correct sampler fails with P ≈ 2·10⁻⁹).
            let se = (p * (1.0 - p) / f64::from(trials)).sqrt();
            assert!(
                (hits / f64::from(trials) - p).abs() <= 6.0 * se + 1e-12,
                "γ = {num}/{den}: {} vs {p}",
                hits / f64::from(trials)
            );
        }
    }

    /// Against the exact probability mass function: Pearson's χ² over every value with an
    /// expected count of at least 20, the two tails pooled. The bound is the mean (degrees of
    /// freedom k) plus ten of its standard deviations √(2k), which a correct sampler exceeds
    /// with probability far below 10⁻⁹ whatever the seed.
    #[test]
    fn small_variances_match_the_exact_probability_mass_function() {
        let mut r = rng(2);
        for variance in [1u128, 2, 7, 30] {
            let g = DiscreteGaussian::with_variance(variance).unwrap();
            let n = 200_000usize;
            let mut counts = std::collections::BTreeMap::<i64, usize>::new();
            for _ in 0..n {
                *counts.entry(g.sample(&mut r).unwrap()).or_default() += 1;
            }
            let s2 = variance as f64;
            let span = (40.0 * s2.sqrt()) as i64 + 40;
            let mass = |x: i64| (-(x as f64).powi(2) / (2.0 * s2)).exp();
            let z: f64 = (-span..=span).map(mass).sum();
            let cells: Vec<i64> = (-span..=span).filter(|&x| mass(x) / z * n as f64 >= 20.0).collect();
            let (lo, hi) = (cells[0], cells[cells.len() - 1]);
            let mut chi2 = 0.0;
            let mut cell = |observed: usize, p: f64| {
                let e = p * n as f64;
                chi2 += (observed as f64 - e).powi(2) / e;
            };
            for &x in &cells {
                cell(counts.get(&x).copied().unwrap_or(0), mass(x) / z);
            }
            let tails: usize = counts.iter().filter(|(x, _)| **x < lo || **x > hi).map(|(_, c)| c).sum();
            cell(tails, 1.0 - cells.iter().map(|&x| mass(x) / z).sum::<f64>());
            let k = cells.len() as f64;
            assert!(chi2 < k + 10.0 * (2.0 * k).sqrt(), "σ² = {variance}: χ² = {chi2} over {k} degrees of freedom");
        }
    }

    #[test]
    fn large_variances_have_the_requested_moments_on_every_core() {
        // The discrete Gaussian's variance is below σ² by a gap that decays like exp(−2π²σ²)
        // (Canonne et al., §2), nothing at σ = 10⁶: the continuous standard errors apply.
        let g = DiscreteGaussian::with_variance(1_000_000_000_000).unwrap();
        let mut v = vec![0i64; 100_000];
        g.fill(&mut v, &mut rng(3)).unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 6.0 * 1e6 / n.sqrt(), "mean {mean}");
        assert!((var / 1e12 - 1.0).abs() < 6.0 * (2.0 / n).sqrt(), "variance {var}");
        assert!(v.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn out_of_range_variances_are_refused_and_roots_are_exact() {
        assert!(DiscreteGaussian::with_variance(0).is_err());
        assert!(DiscreteGaussian::with_variance(MAX_VARIANCE + 1).is_err());
        for n in [1u128, 3, 4, 15, 16, 17, (1 << 56) - 1, 1 << 56, 999_999_999_999] {
            let r = isqrt(n);
            assert!(r * r <= n && (r + 1) * (r + 1) > n, "⌊√{n}⌋ = {r}");
        }
    }
}
