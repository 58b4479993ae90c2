//! Accounting for client-level DP with distributed discrete Gaussian noise under secure
//! aggregation (Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for
//! Federated Learning with Secure Aggregation", ICML 2021).
//!
//! Every node adds N_Z(0, σ_node²) to each integer coordinate of its quantised, clipped update, so
//! the sum over any t survivors carries at least t·σ_node² of noise. A sum of discrete Gaussians is
//! not itself discrete Gaussian; Kairouz et al. (Theorem 1) bound it: with Δ the L2 sensitivity in
//! integer units, d the dimension and τ = 10·Σ_{k=1}^{t−1} exp(−2π²σ_node²·k/(k+1)), one round is
//! ½ε²-zCDP with ε = min(√(Δ²/(tσ_node²) + τd/2), Δ/(√t·σ_node) + τ√d).
//!
//! opendp does the rest: the discrete Gaussian's own zCDP (`make_gaussian` on integer vectors,
//! ρ = Δ²/(2·scale²), Canonne, Kamath and Steinke 2020), the composition over rounds
//! (`make_composition`) and the conversion of zCDP to (ε, δ) (`make_zCDP_to_approxDP`,
//! `make_fix_delta`). The nodes' noise itself is sampled by opendp's exact discrete Gaussian
//! sampler through the same measurement.

use opendp::combinators::{make_composition, make_fix_delta, make_zCDP_to_approxDP};
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;

use super::PrivacyError;

/// One round of distributed discrete Gaussian noise, in integer units.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistributedGaussian {
    /// L2 sensitivity of one node's quantised input (integer units).
    pub sensitivity: f64,
    /// Each node's discrete Gaussian scale σ_node (integer units).
    pub node_scale: f64,
    /// The fewest nodes whose noise is in a released sum (t).
    pub min_survivors: usize,
    /// Coordinates per input.
    pub dimension: usize,
}

fn opendp_err(e: impl std::fmt::Display) -> PrivacyError {
    PrivacyError::Accounting(e.to_string())
}

impl DistributedGaussian {
    /// ρ of one round (zCDP), with Kairouz et al.'s correction for summing discrete Gaussians.
    pub fn rho_per_round(&self) -> Result<f64, PrivacyError> {
        let t = self.min_survivors as f64;
        if !(self.node_scale.is_finite() && self.node_scale > 0.0) || self.min_survivors == 0 {
            return Err(PrivacyError::NoiseMultiplier(self.node_scale));
        }
        // ρ of one discrete Gaussian with the survivors' total scale, from opendp.
        let total_scale = self.node_scale * t.sqrt();
        let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            VectorDomain::new(AtomDomain::<i64>::default()),
            L2Distance::<f64>::default(),
            total_scale,
            None,
        )
        .map_err(opendp_err)?;
        let rho_dg = m.map(&self.sensitivity).map_err(opendp_err)?;
        let sigma2 = self.node_scale * self.node_scale;
        let tau: f64 = 10.0
            * (1..self.min_survivors)
                .map(|k| {
                    let k = k as f64;
                    (-2.0 * std::f64::consts::PI.powi(2) * sigma2 * k / (k + 1.0)).exp()
                })
                .sum::<f64>();
        let d = self.dimension as f64;
        let eps_a = (2.0 * rho_dg + 0.5 * tau * d).sqrt();
        let eps_b = (2.0 * rho_dg).sqrt() + tau * d.sqrt();
        let eps = eps_a.min(eps_b);
        Ok(0.5 * eps * eps)
    }

    /// (ε, δ) after `rounds` rounds: zCDP composed by opendp, converted at `delta` by opendp.
    pub fn epsilon(&self, rounds: u32, delta: f64) -> Result<f64, PrivacyError> {
        if !(delta > 0.0 && delta < 1.0) {
            return Err(PrivacyError::Delta(delta));
        }
        let rho = self.rho_per_round()?;
        // A Gaussian measurement with sensitivity 1 and ρ = 1/(2·scale²) stands for each round.
        let scale = (1.0 / (2.0 * rho)).sqrt();
        let round = || {
            make_gaussian::<_, _, ZeroConcentratedDivergence>(
                VectorDomain::new(AtomDomain::<i64>::default()),
                L2Distance::<f64>::default(),
                scale,
                None,
            )
        };
        let rounds: Vec<_> = (0..rounds.max(1)).map(|_| round()).collect::<Result<_, _>>().map_err(opendp_err)?;
        let composed = make_composition(rounds).map_err(opendp_err)?;
        let approx =
            make_fix_delta(&make_zCDP_to_approxDP(composed).map_err(opendp_err)?, delta).map_err(opendp_err)?;
        let (eps, _) = approx.map(&1.0).map_err(opendp_err)?;
        Ok(eps)
    }
}

/// (ε, δ) of a mechanism that is ρ-zCDP in total, by opendp's conversion.
pub fn epsilon_for_rho(rho: f64, delta: f64) -> Result<f64, PrivacyError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::Delta(delta));
    }
    if !(rho.is_finite() && rho > 0.0) {
        return Err(PrivacyError::Accounting(format!("ρ = {rho} is not a positive number")));
    }
    let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L2Distance::<f64>::default(),
        (1.0 / (2.0 * rho)).sqrt(),
        None,
    )
    .map_err(opendp_err)?;
    let approx = make_fix_delta(&make_zCDP_to_approxDP(m).map_err(opendp_err)?, delta).map_err(opendp_err)?;
    Ok(approx.map(&1.0).map_err(opendp_err)?.0)
}

/// Margin on ρ for the discreteness of the noise and of the rounding (the exact ρ of each round is
/// computed and charged when the round runs; it stays below this for any model under 10⁸
/// parameters and clip norms above γ·10⁴).
const DISCRETE_MARGIN: f64 = 1.01;

/// The smallest noise multiplier (to 0.1 %) whose `rounds` rounds of distributed noise stay within
/// `target` ε at `delta`: each round ρ = 1/(2σ²), with a margin for discreteness.
pub fn noise_for_epsilon(target: f64, rounds: u32, delta: f64) -> Result<f64, PrivacyError> {
    if !(target.is_finite() && target > 0.0) {
        return Err(PrivacyError::Epsilon(target));
    }
    let eps = |sigma: f64| epsilon_for_rho(f64::from(rounds.max(1)) * DISCRETE_MARGIN / (2.0 * sigma * sigma), delta);
    let (mut lo, mut hi) = (1e-3, 1.0);
    while eps(hi)? > target {
        hi *= 2.0;
        if hi > 1e6 {
            return Err(PrivacyError::Unreachable { target, max: 1e6 });
        }
    }
    while (hi - lo) / hi > 1e-3 {
        let mid = 0.5 * (lo + hi);
        if eps(mid)? > target { lo = mid } else { hi = mid }
    }
    Ok(hi)
}

/// Samples `len` integers from N_Z(0, `scale`²) with opendp's exact sampler.
pub fn sample_discrete_gaussian(len: usize, scale: f64) -> Result<Vec<i64>, PrivacyError> {
    let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L2Distance::<f64>::default(),
        scale,
        None,
    )
    .map_err(opendp_err)?;
    m.invoke(&vec![0i64; len]).map_err(opendp_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::{self, SampledGaussian, rdp};

    /// ε of `steps` compositions of the Gaussian mechanism (sensitivity 1, std σ), by opendp alone.
    fn opendp_epsilon(sigma: f64, steps: u32, delta: f64) -> f64 {
        let one = || {
            make_gaussian::<_, _, ZeroConcentratedDivergence>(
                VectorDomain::new(AtomDomain::<i64>::default()),
                L2Distance::<f64>::default(),
                sigma,
                None,
            )
            .unwrap()
        };
        let composed = make_composition((0..steps).map(|_| one()).collect()).unwrap();
        let approx = make_fix_delta(&make_zCDP_to_approxDP(composed).unwrap(), delta).unwrap();
        approx.map(&1.0).unwrap().0
    }

    /// Cross-check of the hand-written accountants against opendp, an independent implementation,
    /// where both apply: the un-subsampled Gaussian (q = 1), e.g. DP-FedAvg with every hospital in
    /// every round. RDP of the Gaussian is exactly α·ρ; our RDP conversion (over Opacus's orders)
    /// can only be looser than opendp's optimal zCDP conversion, by little; the PLD accountant is
    /// tight, so never above it.
    #[test]
    fn accountants_agree_with_opendp_on_the_gaussian_mechanism() {
        let delta = 1e-5;
        for sigma in [0.7, 1.0, 5.0] {
            for steps in [1u32, 100] {
                let rho = {
                    let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                        VectorDomain::new(AtomDomain::<i64>::default()),
                        L2Distance::<f64>::default(),
                        sigma,
                        None,
                    )
                    .unwrap();
                    m.map(&1.0).unwrap() * f64::from(steps)
                };
                let orders = rdp::default_orders();
                for (alpha, r) in orders.iter().zip(rdp::rdp(1.0, sigma, u64::from(steps), &orders)) {
                    assert!(
                        (r - alpha * rho).abs() <= 1e-9 * r.max(1.0),
                        "σ {sigma}, T {steps}, α {alpha}: {r} vs {}",
                        alpha * rho
                    );
                }
                let theirs = opendp_epsilon(sigma, steps, delta);
                let run = SampledGaussian { sampling_rate: 1.0, noise_multiplier: sigma, steps: u64::from(steps) };
                let report = privacy::epsilon(&run, delta).unwrap();
                assert!(
                    report.rdp_epsilon >= theirs * (1.0 - 1e-6) && report.rdp_epsilon <= theirs * 1.05,
                    "σ {sigma}, T {steps}: RDP ε {} vs opendp {theirs}",
                    report.rdp_epsilon
                );
                assert!(
                    report.pld_epsilon <= theirs * (1.0 + 1e-6),
                    "σ {sigma}, T {steps}: PLD ε {} above opendp's zCDP bound {theirs}",
                    report.pld_epsilon
                );
            }
        }
    }
}

#[cfg(test)]
mod inverse_tests {
    use super::*;

    #[test]
    fn the_noise_found_for_a_target_meets_it_and_is_not_loose() {
        for (target, rounds) in [(1.0, 15u32), (10.0, 15), (3.0, 100)] {
            let sigma = noise_for_epsilon(target, rounds, 1e-5).unwrap();
            let at = epsilon_for_rho(f64::from(rounds) * DISCRETE_MARGIN / (2.0 * sigma * sigma), 1e-5).unwrap();
            assert!(at <= target && at > target * 0.99, "target {target}: σ {sigma} gives {at}");
        }
    }
}
