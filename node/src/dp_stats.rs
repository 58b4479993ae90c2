//! Standardisation statistics estimated under differential privacy (`[standardize] with = "dp"`):
//! each node releases a noised mean and standard deviation of every standardised feature of its
//! kept rows by one Gaussian mechanism, and charges it to its ledger before anything that
//! depends on it leaves. Pure: the caller supplies the noise source and charges the cost.
//!
//! # Mechanism
//! For feature j with declared bounds [minⱼ, maxⱼ], centre cⱼ = (minⱼ + maxⱼ)/2 and half-range
//! rⱼ = (maxⱼ − minⱼ)/2, each row's value is clipped to [minⱼ, maxⱼ] (a non-finite value counts as
//! cⱼ) and normalised, uⱼ = (clip(xⱼ) − cⱼ)/rⱼ ∈ [−1, 1] (uⱼ = 0 when rⱼ = 0). Each row contributes
//! φ(x) = (1, u₁, …, u_d, u₁², …, u_d²) and the node releases, for all features jointly,
//!
//!   ṽ = Σ_rows φ(x) + N(0, (z·Δ)²·I),   Δ = √(1 + 2d),
//!
//! noise drawn by [`SecureGaussian`] (AES-256-CTR keyed from the OS, the floating-point hardening
//! of Holohan and Braghin), never a seeded generator: ñ = ṽ₀ is the noised count, S̃₁ⱼ, S̃₂ⱼ the noised sums.
//!
//! # Sensitivity
//! Neighbouring datasets differ by adding or removing one row (the schema's privacy unit; a
//! patient with several rows is refused under example-level DP before this runs, see
//! [`crate::data::admit`]). The sums run over every row the node kept, train and test together:
//! a split by a hash of the row number moves later rows between the splits when one row is
//! added, which would break a train-only bound, while the union changes by exactly that row
//! whatever the split rule. Then v(D) − v(D') = ±φ(x) for that row, and
//!
//!   ‖φ(x)‖₂² = 1 + Σⱼ (uⱼ² + uⱼ⁴) ≤ 1 + Σⱼ (1 + 1) = 1 + 2d,
//!
//! with equality when every |uⱼ| = 1 (a row at a corner of the box), so Δ = √(1 + 2d) is the
//! exact L2 sensitivity. Before normalisation the same vector (1, x − c, (x − c)²) has sensitivity
//! √(1 + Σ rⱼ² + Σ rⱼ⁴); normalising changes nothing in the guarantee (it is a fixed linear map of
//! public numbers) but puts every coordinate on one scale, where the raw form would noise the
//! count with rⱼ² times its own scale (cholesterol with r = 400 mg/dl: σ·160 000 on a count).
//!
//! # Accounting
//! ṽ is the Gaussian mechanism with noise multiplier z on a sensitivity-Δ query, which is exactly
//! one un-subsampled Gaussian step (`SampledGaussian { sampling_rate: 1, noise_multiplier: z,
//! steps: 1 }` for the repo's accountants). Its privacy curve has a closed form, the analytic
//! Gaussian mechanism (Balle and Wang, ICML 2018, Theorem 8): k such releases are μ-GDP with
//! μ = √k/z (Dong, Roth and Su 2022, Corollary 2.3: Gaussian mechanisms compose exactly), and
//!
//!   δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2).
//!
//! [`epsilon_after`] solves it for ε by bisection, answering the upper end (ε on the safe side);
//! [`cost_for`] finds the least z (to 0.1 %, upper end) whose ε is at most the schema's, and the
//! charge is ε at that z, ≤ the schema's ε, at the plan's δ. The PLD accountant would answer the
//! same question as an upper bound on this exact curve (checked in the tests, within its grid),
//! at ~10³ times the cost per evaluation. k estimates in one run (a node restarted mid-run
//! estimates again) compose exactly by the same formula with k. The run's DP-SGD or client-level
//! releases are computed on data standardised by these statistics, a row-wise map fixed once they
//! are released; they add to this charge by basic composition, as the ledger sums run keys.
//!
//! # Post-processing (no further privacy cost)
//! ñ⁺ = max(ñ, 1); m = clamp(S̃₁/ñ⁺, −1, 1); q = clamp(S̃₂/ñ⁺, 0, 1);
//! var = max(q − m², [`MIN_STD_FRACTION`]²); s = min(√var, 1); mean = c + r·m ∈ [min, max] and
//! std = r·s ∈ [r/100, r] ⊂ (0, max − min]. A value in [min, max] has standard deviation at most r,
//! so the upper clamp loses nothing true; the floor keeps std > 0 when noise makes the variance
//! negative, and bounds a standardised value by |x − mean|/std ≤ 2r/(r/100) = 200. A feature with
//! r = 0 (min = max: every valid value is min) gets mean = min and std = 1.
//! The variance is the population variance (divisor n): at these noise levels ddof is immaterial.

use sanctum_protocol::privacy::noise::SecureGaussian;
use sanctum_protocol::privacy::{PrivacyError, SampledGaussian};

/// The standard deviation's floor, as a fraction of the half-range r: std ≥ r/100.
pub const MIN_STD_FRACTION: f64 = 0.01;

/// Which input of a row-major row a standardised feature is, and its declared bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounded {
    /// Index of the feature within a row.
    pub index: usize,
    pub min: f64,
    pub max: f64,
}

impl Bounded {
    fn centre(&self) -> f64 {
        0.5 * (self.min + self.max)
    }
    fn half_range(&self) -> f64 {
        0.5 * (self.max - self.min)
    }
    /// u = (clip(x) − c)/r ∈ [−1, 1]; a non-finite value, or r = 0, gives 0.
    fn normalise(&self, x: f64) -> f64 {
        let r = self.half_range();
        if !x.is_finite() || r <= 0.0 {
            return 0.0;
        }
        ((x.clamp(self.min, self.max) - self.centre()) / r).clamp(-1.0, 1.0)
    }
}

/// What the release costs, for the ledger.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    /// ε of one release at `noise_multiplier` and `delta` (at most the schema's ε).
    pub epsilon: f64,
    pub delta: f64,
    /// z: the noise's standard deviation is z·[`sensitivity`].
    pub noise_multiplier: f64,
}

/// The released statistics, one per [`Bounded`] feature, in the order given.
#[derive(Clone, Debug, PartialEq)]
pub struct Released {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// Why the statistics cannot be estimated.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum DpStatsError {
    #[error(
        "feature {index}: the declared bounds [{min}, {max}] are not finite with min ≤ max; fix the schema's min and max"
    )]
    Bounds { index: usize, min: f64, max: f64 },
    #[error("feature {index} is outside the rows' {width} inputs")]
    Index { index: usize, width: usize },
    #[error("cannot calibrate the statistics' noise: {0}")]
    Privacy(#[from] PrivacyError),
}

/// The exact L2 sensitivity of the released vector for `d` features under add/remove-one: √(1 + 2d).
pub fn sensitivity(d: usize) -> f64 {
    (1.0 + 2.0 * d as f64).sqrt()
}

/// Φ, the standard normal CDF (accurate in the tails: erfc, not 1 − erf).
fn phi(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// δ(ε) of a μ-GDP mechanism (the analytic Gaussian mechanism's curve), decreasing in ε.
fn gdp_delta(mu: f64, epsilon: f64) -> f64 {
    phi(-epsilon / mu + mu / 2.0) - epsilon.exp() * phi(-epsilon / mu - mu / 2.0)
}

/// The least noise multiplier (to 0.1 %, answering the upper end) whose one release costs at most
/// `epsilon` at `delta`, and that cost. Within the noise multipliers a plan may name
/// ([`sanctum_protocol::plan::limits`]), as `noise_for_epsilon` searches.
pub fn cost_for(epsilon: f64, delta: f64) -> Result<Cost, DpStatsError> {
    use sanctum_protocol::plan::limits::{MAX_NOISE_MULTIPLIER as MAX, MIN_NOISE_MULTIPLIER as MIN};
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(PrivacyError::Epsilon(epsilon).into());
    }
    let meets = |z: f64| epsilon_after(z, 1, delta).map(|e| e <= epsilon);
    if meets(MIN)? {
        return Ok(Cost { epsilon: epsilon_after(MIN, 1, delta)?, delta, noise_multiplier: MIN });
    }
    if !meets(MAX)? {
        return Err(PrivacyError::Unreachable { target: epsilon, max: MAX }.into());
    }
    let (mut lo, mut hi) = (MIN, MAX);
    while hi - lo > 1e-3 * hi {
        let mid = 0.5 * (lo + hi);
        if meets(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(Cost { epsilon: epsilon_after(hi, 1, delta)?, delta, noise_multiplier: hi })
}

/// ε of `releases` estimates at noise multiplier `z` and `delta`, exactly (μ = √releases / z;
/// bisection to 10⁻¹⁰, the upper end).
pub fn epsilon_after(z: f64, releases: u64, delta: f64) -> Result<f64, PrivacyError> {
    SampledGaussian { sampling_rate: 1.0, noise_multiplier: z, steps: releases }.validate()?;
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::Delta(delta));
    }
    if releases == 0 {
        return Ok(0.0);
    }
    let mu = (releases as f64).sqrt() / z;
    if gdp_delta(mu, 0.0) <= delta {
        return Ok(0.0);
    }
    // δ(ε) ≤ Φ(−ε/μ + μ/2), below any δ ≥ 10⁻³⁰⁰ once ε ≥ μ(μ/2 + 40): a finite upper end.
    let (mut lo, mut hi) = (0.0, mu * (mu / 2.0 + 40.0));
    if !hi.is_finite() {
        return Err(PrivacyError::Accounting(format!("μ = {mu} is too large to account")));
    }
    while hi - lo > 1e-10 {
        let mid = 0.5 * (lo + hi);
        if gdp_delta(mu, mid) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

fn check(rows_width: usize, features: &[Bounded]) -> Result<(), DpStatsError> {
    for f in features {
        if !(f.min.is_finite() && f.max.is_finite() && f.min <= f.max && f.half_range().is_finite()) {
            return Err(DpStatsError::Bounds { index: f.index, min: f.min, max: f.max });
        }
        if f.index >= rows_width {
            return Err(DpStatsError::Index { index: f.index, width: rows_width });
        }
    }
    Ok(())
}

/// The un-noised vector Σ φ(x) = (n, Σu₁, …, Σu_d, Σu₁², …, Σu_d²) over the row-major rows of
/// `width` inputs in `parts` (the train and the test split).
pub fn sums(parts: &[&[f32]], width: usize, features: &[Bounded]) -> Result<Vec<f64>, DpStatsError> {
    check(width, features)?;
    let d = features.len();
    let mut v = vec![0.0; 1 + 2 * d];
    if width == 0 {
        return Ok(v);
    }
    for row in parts.iter().flat_map(|p| p.chunks_exact(width)) {
        v[0] += 1.0;
        for (j, f) in features.iter().enumerate() {
            let u = f.normalise(f64::from(row[f.index]));
            v[1 + j] += u;
            v[1 + d + j] += u * u;
        }
    }
    Ok(v)
}

/// `sums` plus N(0, (z·Δ)²) on every coordinate.
pub fn noised(mut sums: Vec<f64>, noise_multiplier: f64, noise: &mut SecureGaussian) -> Vec<f64> {
    let d = (sums.len().saturating_sub(1)) / 2;
    let sd = noise_multiplier * sensitivity(d);
    for s in &mut sums {
        *s += noise.sample(sd);
    }
    sums
}

/// Post-processing of a noised vector into the statistics (see the module's doc).
pub fn statistics(noised: &[f64], features: &[Bounded]) -> Released {
    let d = features.len();
    let n = noised.first().copied().filter(|n| n.is_finite()).unwrap_or(0.0).max(1.0);
    let at = |i: usize| noised.get(i).copied().filter(|v| v.is_finite()).unwrap_or(0.0);
    let (mut mean, mut std) = (Vec::with_capacity(d), Vec::with_capacity(d));
    for (j, f) in features.iter().enumerate() {
        let (c, r) = (f.centre(), f.half_range());
        if r <= 0.0 {
            mean.push(f.min);
            std.push(1.0);
            continue;
        }
        let m = (at(1 + j) / n).clamp(-1.0, 1.0);
        let q = (at(1 + d + j) / n).clamp(0.0, 1.0);
        let var = (q - m * m).max(MIN_STD_FRACTION * MIN_STD_FRACTION);
        let s = var.sqrt().min(1.0);
        mean.push((c + r * m).clamp(f.min, f.max));
        std.push(r * s);
    }
    Released { mean, std }
}

/// Releases the mean and standard deviation of each of `features` over the row-major rows of
/// `parts` (`width` inputs each; pass the train and the test split) at the noise of `cost` (from
/// [`cost_for`]): the noised sums and their post-processing. Charge `cost` before anything
/// computed from the statistics leaves the node.
pub fn estimate(
    parts: &[&[f32]],
    width: usize,
    features: &[Bounded],
    cost: &Cost,
    noise: &mut SecureGaussian,
) -> Result<Released, DpStatsError> {
    let exact = sums(parts, width, features)?;
    Ok(statistics(&noised(exact, cost.noise_multiplier, noise), features))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use sanctum_protocol::privacy::{self, Accountant};

    use super::*;

    fn l2(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt()
    }

    fn bounds() -> impl Strategy<Value = Vec<(f64, f64)>> {
        proptest::collection::vec((-500.0f64..500.0, 0.0f64..800.0), 1..7)
            .prop_map(|v| v.into_iter().map(|(lo, w)| (lo, lo + w)).collect())
    }

    proptest! {
        /// Add/remove-one neighbours: the un-noised vector moves by at most Δ = √(1 + 2d) in L2,
        /// whatever the rows hold (values far outside the bounds, NaN, infinities); in the raw
        /// units of the brief, (1, x − c, (x − c)²) moves by at most √(1 + Σr² + Σr⁴).
        #[test]
        fn the_sensitivity_bound_holds_on_random_neighbours(
            b in bounds(),
            rows in proptest::collection::vec(proptest::collection::vec(
                prop_oneof![8 => -2000.0f32..2000.0, 1 => Just(f32::NAN), 1 => Just(f32::INFINITY)], 7), 0..20),
            extra in proptest::collection::vec(
                prop_oneof![8 => -2000.0f32..2000.0, 1 => Just(f32::NAN), 1 => Just(f32::NEG_INFINITY)], 7),
        ) {
            let width = 7;
            let features: Vec<Bounded> =
                b.iter().enumerate().map(|(i, &(min, max))| Bounded { index: i, min, max }).collect();
            let d = features.len();
            let flat: Vec<f32> = rows.iter().flatten().copied().collect();
            // The extra row goes in the middle, and the neighbour is read in two parts (train and
            // test) split elsewhere: where the row sits does not matter.
            let k = rows.len() / 2 * width;
            let bigger: Vec<f32> = flat[..k].iter().chain(&extra).chain(&flat[k..]).copied().collect();
            let cut = (rows.len() / 3) * width;
            let v = sums(&[&flat], width, &features).unwrap();
            let w = sums(&[&bigger[..cut], &bigger[cut..]], width, &features).unwrap();
            let moved = l2(&v, &w);
            prop_assert!(moved <= sensitivity(d) * (1.0 + 1e-12), "moved {moved} > {}", sensitivity(d));
            // The raw form: scale coordinate 1 + j by r and 1 + d + j by r², as the brief writes it.
            let raw = |v: &[f64]| -> Vec<f64> {
                let mut out = vec![v[0]];
                out.extend(features.iter().enumerate().map(|(j, f)| v[1 + j] * f.half_range()));
                out.extend(features.iter().enumerate().map(|(j, f)| v[1 + d + j] * f.half_range().powi(2)));
                out
            };
            let raw_bound =
                (1.0 + features.iter().map(|f| f.half_range().powi(2) + f.half_range().powi(4)).sum::<f64>()).sqrt();
            prop_assert!(l2(&raw(&v), &raw(&w)) <= raw_bound * (1.0 + 1e-9));
        }
    }

    /// The bound is attained: a row at a corner of the box moves the vector by exactly Δ.
    #[test]
    fn the_sensitivity_is_attained_at_a_corner() {
        let features = [
            Bounded { index: 0, min: 0.0, max: 120.0 },
            Bounded { index: 1, min: 100.0, max: 600.0 },
            Bounded { index: 2, min: -1.0, max: 1.0 },
        ];
        let corner = [120.0f32, 100.0, 1.0];
        let with = sums(&[&corner], 3, &features).unwrap();
        let without = sums(&[], 3, &features).unwrap();
        assert!((l2(&with, &without) - 7f64.sqrt()).abs() < 1e-12);
        assert_eq!(sensitivity(3), 7f64.sqrt());
    }

    /// The noise is there and of the stated size: ṽ − v has sd z·Δ on every coordinate (200 000
    /// draws; the bounds are six standard errors of a sample variance).
    #[test]
    fn the_noise_has_the_calibrated_standard_deviation() {
        let features = [Bounded { index: 0, min: 0.0, max: 1.0 }, Bounded { index: 1, min: 0.0, max: 10.0 }];
        let exact = sums(&[&[0.5, 3.0], &[1.0, 7.0]], 2, &features).unwrap();
        let z = 2.5;
        let sd = z * sensitivity(2);
        let mut g = SecureGaussian::from_os();
        let k = 40_000;
        let mut sq = vec![0.0; exact.len()];
        for _ in 0..k {
            let v = noised(exact.clone(), z, &mut g);
            for (acc, (a, b)) in sq.iter_mut().zip(v.iter().zip(&exact)) {
                *acc += (a - b).powi(2);
            }
        }
        for s in sq {
            let var = s / k as f64;
            assert!((var / (sd * sd) - 1.0).abs() < 6.0 * (2.0 / k as f64).sqrt(), "variance {var}, want {}", sd * sd);
        }
    }

    /// The analytic Gaussian mechanism against reference values computed independently in
    /// Python (stdlib `math.erfc`, the same closed form, bisection to 200 halvings): ε at z = 2 and
    /// z = 4 for δ = 1e-5, and σ for (ε, δ) = (0.5, 1e-5), (1, 1e-5) (Balle and Wang report
    /// σ ≈ 3.73 for the latter), (2, 1e-5).
    #[test]
    fn the_cost_matches_the_analytic_gaussian_reference_values() {
        for (z, want) in [(1.0, 4.3771780956812245), (2.0, 1.9930914044151207), (4.0, 0.9263415039982289)] {
            let got = epsilon_after(z, 1, 1e-5).unwrap();
            assert!(got >= want - 1e-12 && got < want + 1e-9, "z = {z}: {got} vs {want}");
        }
        for (target, sigma) in [(0.5, 7.031826675582501), (1.0, 3.730631634815938), (2.0, 1.9938124456435358)] {
            let cost = cost_for(target, 1e-5).unwrap();
            assert!(cost.epsilon <= target && cost.delta == 1e-5, "{cost:?}");
            // The least z to 0.1 %, on the safe side.
            assert!(cost.noise_multiplier >= sigma - 1e-9 && cost.noise_multiplier <= sigma * (1.0 + 1e-3), "{cost:?}");
            assert_eq!(cost.epsilon, epsilon_after(cost.noise_multiplier, 1, 1e-5).unwrap());
        }
        // k releases at z are one at z/√k (Gaussian mechanisms compose exactly).
        let two = epsilon_after(3.0, 2, 1e-5).unwrap();
        assert!((two - epsilon_after(3.0 / 2f64.sqrt(), 1, 1e-5).unwrap()).abs() < 1e-9);
        assert!(two > epsilon_after(3.0, 1, 1e-5).unwrap());
    }

    /// The repo's PLD accountant, asked about the same single un-subsampled Gaussian release,
    /// answers an upper bound on the exact curve, within its grid (interval 10⁻⁴).
    #[test]
    fn the_cost_agrees_with_the_pld_accountant_for_one_gaussian_release() {
        let cost = cost_for(1.0, 1e-5).unwrap();
        let one = SampledGaussian { sampling_rate: 1.0, noise_multiplier: cost.noise_multiplier, steps: 1 };
        let pld = privacy::epsilon_with(Accountant::Pld, &one, 1e-5).unwrap();
        assert!(pld >= cost.epsilon - 1e-9 && pld <= cost.epsilon + 2e-3, "pld {pld}, exact {}", cost.epsilon);
    }

    /// As n grows at fixed ε the released mean and std reach the true ones: each error within six
    /// predicted noise sd (delta method on S₁/n and S₂/n − (S₁/n)²), and at n = 10⁶ within 0.2 % of
    /// the range.
    #[test]
    fn the_statistics_converge_to_the_true_ones_as_n_grows() {
        let features = [
            Bounded { index: 0, min: 0.0, max: 120.0 },
            Bounded { index: 1, min: 0.0, max: 800.0 },
            Bounded { index: 2, min: -3.0, max: 5.0 },
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut g = SecureGaussian::from_os();
        for n in [1_000usize, 10_000, 100_000, 1_000_000] {
            let mut rows = Vec::with_capacity(3 * n);
            for _ in 0..n {
                let age = 30.0 + 45.0 * rng.random::<f64>() + 10.0 * rng.random::<f64>();
                let chol = if rng.random::<f64>() < 0.1 { 0.0 } else { 150.0 + 200.0 * rng.random::<f64>() };
                let x = 1.0 + 2.0 * (rng.random::<f64>() - 0.5);
                rows.extend([age as f32, chol as f32, x as f32]);
            }
            let cost = cost_for(1.0, 1e-5).unwrap();
            let released = estimate(&[&rows], 3, &features, &cost, &mut g).unwrap();
            let sd = cost.noise_multiplier * sensitivity(3);
            for (j, f) in features.iter().enumerate() {
                let xs: Vec<f64> = rows.iter().skip(j).step_by(3).map(|&x| f64::from(x)).collect();
                let mean = xs.iter().sum::<f64>() / n as f64;
                let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
                let (r, nf) = (f.half_range(), n as f64);
                let m = (mean - f.centre()) / r;
                let q = var / (r * r) + m * m;
                let sd_mean = r * sd * (1.0 + m * m).sqrt() / nf;
                let sd_var = sd * (1.0 + 4.0 * m * m + (2.0 * m * m - q).powi(2)).sqrt() / nf;
                let sd_std = r * sd_var / (2.0 * (var.sqrt() / r));
                let (em, es) = ((released.mean[j] - mean).abs(), (released.std[j] - var.sqrt()).abs());
                println!("n = {n}, feature {j}: mean err {em:.4} (sd {sd_mean:.4}), std err {es:.4} (sd {sd_std:.4})");
                assert!(em <= 6.0 * sd_mean, "n = {n}, feature {j}: mean {} vs {mean}", released.mean[j]);
                assert!(es <= 6.0 * sd_std, "n = {n}, feature {j}: std {} vs {}", released.std[j], var.sqrt());
                if n == 1_000_000 {
                    assert!(em < 2e-3 * 2.0 * r && es < 2e-3 * 2.0 * r);
                }
            }
        }
    }

    proptest! {
        /// Whatever the noise did (any vector, however wild), the statistics are usable: mean in
        /// [min, max], std in [r/100, r] ⊂ (0, max − min], both finite.
        #[test]
        fn post_processing_keeps_the_statistics_in_range(
            b in bounds(),
            v in proptest::collection::vec(
                prop_oneof![4 => -1e9f64..1e9, 1 => Just(f64::NAN), 1 => Just(f64::INFINITY), 1 => Just(0.0)], 13),
        ) {
            let features: Vec<Bounded> =
                b.iter().enumerate().map(|(i, &(min, max))| Bounded { index: i, min, max }).collect();
            let s = statistics(&v[..1 + 2 * features.len()], &features);
            for (j, f) in features.iter().enumerate() {
                prop_assert!(s.mean[j].is_finite() && s.mean[j] >= f.min && s.mean[j] <= f.max);
                prop_assert!(s.std[j].is_finite() && s.std[j] > 0.0);
                if f.max > f.min {
                    prop_assert!(s.std[j] <= f.max - f.min && s.std[j] >= MIN_STD_FRACTION * f.half_range() * (1.0 - 1e-12));
                } else {
                    prop_assert_eq!(s.std[j], 1.0);
                }
            }
        }
    }

    #[test]
    fn bad_bounds_and_indices_are_errors() {
        let bad = [Bounded { index: 0, min: 2.0, max: 1.0 }];
        assert!(matches!(sums(&[&[1.0]], 1, &bad), Err(DpStatsError::Bounds { .. })));
        let inf = [Bounded { index: 0, min: 0.0, max: f64::INFINITY }];
        assert!(matches!(sums(&[&[1.0]], 1, &inf), Err(DpStatsError::Bounds { .. })));
        let far = [Bounded { index: 3, min: 0.0, max: 1.0 }];
        assert!(matches!(sums(&[&[1.0]], 1, &far), Err(DpStatsError::Index { index: 3, width: 1 })));
        assert!(matches!(cost_for(0.0, 1e-5), Err(DpStatsError::Privacy(PrivacyError::Epsilon(_)))));
        assert!(matches!(cost_for(1.0, 0.0), Err(DpStatsError::Privacy(PrivacyError::Delta(_)))));
    }
}
