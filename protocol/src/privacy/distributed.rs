//! Client-level DP by distributed discrete Gaussian noise under secure aggregation (Kairouz,
//! Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
//! Secure Aggregation", ICML 2021): the accounting every party uses.
//!
//! Every node adds N_Z(0, σ_node²) to each integer coordinate of its quantised, clipped update, so
//! a released sum carries the shares of every honest survivor. A sum of discrete Gaussians is not
//! itself discrete Gaussian; Kairouz et al. (Theorem 1) bound it: for σ_node ≥ ½, n ≥ 1 summands,
//! any Δ ∈ ℤᵈ (the difference between neighbouring sums) and
//! τ = 10·Σ_{k=1}^{n−1} exp(−2π²σ_node²·k/(k+1)), the sum Z satisfies
//! D_α(Z ‖ Z + Δ) ≤ α·ε²/2 for all α ≥ 1, i.e. ½ε²-zCDP, with
//! ε = min(√(‖Δ‖₂²/(nσ_node²) + ½τd), ‖Δ‖₂/(√n·σ_node) + τ√d).
//! (Google's `distributed_dp/accounting_utils.py` uses the same τ and, per Rényi order, the
//! refinement of Proposition 14, whose third term is the second branch here.)
//!
//! [`DistributedGaussian::rho`] is that bound with its preconditions checked;
//! [`crate::secagg::encode::round_rho`] applies it to a plan's encoding and is the one place both
//! the node's ledger charge and the coordinator's reported ε come from. Rounds compose by adding
//! ρ (Bun and Steinke 2016, Lemma 2.3), which [`rho_after_rounds`] does in the order a running
//! total adds them, so every party gets the same bits. opendp gives the discrete Gaussian's own
//! ρ = Δ²/(2·scale²) (`make_gaussian` on integer vectors, Canonne, Kamath and Steinke 2020) and
//! converts zCDP to (ε, δ) (`make_zCDP_to_approxDP`, `make_fix_delta`). The noise itself is
//! drawn by [`super::discrete`].

use opendp::combinators::{make_fix_delta, make_zCDP_to_approxDP};
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;

use super::PrivacyError;

/// One round of distributed discrete Gaussian noise, in integer units, as Theorem 1 sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistributedGaussian {
    /// ‖Δ‖₂: the L2 sensitivity of one node's quantised input, rounding included (integer units).
    pub l2_sensitivity: f64,
    /// σ_node: the discrete Gaussian scale each of the summands adds (integer units).
    pub node_scale: f64,
    /// n: how many nodes' noise the released sum is assumed to carry (honest survivors).
    pub summands: usize,
    /// d: coordinates per input (every one carries noise).
    pub dimension: usize,
}

fn opendp_err(e: impl std::fmt::Display) -> PrivacyError {
    PrivacyError::Accounting(e.to_string())
}

/// opendp's Gaussian measurement on integer vectors, under zCDP.
type IntegerGaussian =
    opendp::core::Measurement<VectorDomain<AtomDomain<i64>>, L2Distance<f64>, ZeroConcentratedDivergence, Vec<i64>>;

/// opendp's Gaussian measurement on integer vectors with this scale.
fn integer_gaussian(scale: f64) -> Result<IntegerGaussian, PrivacyError> {
    make_gaussian::<_, _, ZeroConcentratedDivergence>(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L2Distance::<f64>::default(),
        scale,
        None,
    )
    .map_err(opendp_err)
}

impl DistributedGaussian {
    /// ρ (zCDP) of one round by Theorem 1, or why the theorem does not apply.
    pub fn rho(&self) -> Result<f64, PrivacyError> {
        let refuse = |why: String| Err(PrivacyError::Theorem(why));
        if self.summands == 0 {
            return refuse("the sum carries no node's noise (n = 0)".into());
        }
        if self.dimension == 0 {
            return refuse("the input has no coordinates (d = 0)".into());
        }
        if !(self.l2_sensitivity.is_finite() && self.l2_sensitivity > 0.0) {
            return refuse(format!("the sensitivity {} is not a positive number", self.l2_sensitivity));
        }
        // Theorem 1 assumes σ ≥ ½ (the τ bound on how far a sum of discrete Gaussians is from
        // one needs it); below that the bound says nothing.
        if !(self.node_scale.is_finite() && self.node_scale >= 0.5) {
            return refuse(format!(
                "each node's noise scale {} is below ½ of an integer step; raise the noise multiplier or the clip norm",
                self.node_scale
            ));
        }
        let n = self.summands as f64;
        // ‖Δ‖₂²/(2nσ²): the discrete Gaussian with the summands' total scale σ·√n, by opendp.
        let rho_dg = integer_gaussian(self.node_scale * n.sqrt())?.map(&self.l2_sensitivity).map_err(opendp_err)?;
        let sigma2 = self.node_scale * self.node_scale;
        let tau = 10.0
            * (1..self.summands)
                .map(|k| {
                    let k = k as f64;
                    (-2.0 * std::f64::consts::PI.powi(2) * sigma2 * k / (k + 1.0)).exp()
                })
                .sum::<f64>();
        let d = self.dimension as f64;
        let eps_a = (2.0 * rho_dg + 0.5 * tau * d).sqrt();
        let eps_b = (2.0 * rho_dg).sqrt() + tau * d.sqrt();
        let eps = eps_a.min(eps_b);
        let rho = 0.5 * eps * eps;
        if !(rho.is_finite() && rho > 0.0) {
            return refuse(format!("the bound is not a finite positive number (ρ = {rho})"));
        }
        Ok(rho)
    }
}

/// ρ after `rounds` rounds of `rho_per_round` each, summed one round at a time from zero: the
/// same f64 additions as a running total (`total += rho` per released round), so a party that
/// counts rounds and one that accumulates them agree to the bit.
pub fn rho_after_rounds(rho_per_round: f64, rounds: u32) -> f64 {
    (0..rounds).fold(0.0, |total, _| total + rho_per_round)
}

/// (ε, δ) of a mechanism that is ρ-zCDP in total, by opendp's conversion.
pub fn epsilon_for_rho(rho: f64, delta: f64) -> Result<f64, PrivacyError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::Delta(delta));
    }
    if !(rho.is_finite() && rho > 0.0) {
        return Err(PrivacyError::Accounting(format!("ρ = {rho} is not a positive number")));
    }
    // A Gaussian measurement with sensitivity 1 and scale 1/√(2ρ) is ρ-zCDP: it stands for the
    // whole mechanism in opendp's conversion.
    let m = integer_gaussian((1.0 / (2.0 * rho)).sqrt())?;
    let approx = make_fix_delta(&make_zCDP_to_approxDP(m).map_err(opendp_err)?, delta).map_err(opendp_err)?;
    Ok(approx.map(&1.0).map_err(opendp_err)?.0)
}

/// ε at `delta` after `rounds` rounds of `rho_per_round` (at least one round).
pub fn epsilon_after_rounds(rho_per_round: f64, rounds: u32, delta: f64) -> Result<f64, PrivacyError> {
    epsilon_for_rho(rho_after_rounds(rho_per_round, rounds.max(1)), delta)
}

/// The smallest noise multiplier (to 0.1 %) whose `rounds` rounds stay within `target` ε at
/// `delta`, where `rho_of(σ)` is one round's ρ at noise multiplier σ (non-increasing in σ). A σ
/// for which `rho_of` refuses (the theorem does not apply) counts as too little noise, so the
/// answer always has a ρ and meets the target.
pub fn noise_for_epsilon(
    target: f64,
    rounds: u32,
    delta: f64,
    rho_of: impl Fn(f64) -> Result<f64, PrivacyError>,
) -> Result<f64, PrivacyError> {
    if !(target.is_finite() && target > 0.0) {
        return Err(PrivacyError::Epsilon(target));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(PrivacyError::Delta(delta));
    }
    const MAX: f64 = 1e6;
    let eps = |sigma: f64| match rho_of(sigma) {
        Ok(rho) => epsilon_after_rounds(rho, rounds, delta),
        Err(PrivacyError::Theorem(_)) => Ok(f64::INFINITY),
        Err(e) => Err(e),
    };
    let (mut lo, mut hi) = (1e-3, 1.0);
    while eps(hi)? > target {
        hi *= 2.0;
        if hi > MAX {
            return Err(PrivacyError::Unreachable { target, max: MAX });
        }
    }
    while (hi - lo) / hi > 1e-3 {
        let mid = 0.5 * (lo + hi);
        if eps(mid)? > target { lo = mid } else { hi = mid }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::{self, SampledGaussian, rdp};
    use opendp::combinators::make_composition;

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
mod theorem_tests {
    use super::*;
    use opendp::combinators::make_composition;

    fn dg(l2: f64, scale: f64, n: usize, d: usize) -> DistributedGaussian {
        DistributedGaussian { l2_sensitivity: l2, node_scale: scale, summands: n, dimension: d }
    }

    #[test]
    fn the_theorem_is_refused_outside_its_preconditions() {
        for bad in [dg(10.0, 0.49, 5, 10), dg(10.0, f64::NAN, 5, 10), dg(10.0, 1.0, 0, 10), dg(10.0, 1.0, 5, 0)]
            .into_iter()
            .chain([dg(0.0, 1.0, 5, 10), dg(f64::INFINITY, 1.0, 5, 10)])
        {
            assert!(matches!(bad.rho(), Err(PrivacyError::Theorem(_))), "{bad:?} gave {:?}", bad.rho());
        }
        assert!(dg(10.0, 0.5, 5, 10).rho().is_ok(), "σ = ½ is inside the theorem");
    }

    /// Theorem 1 by hand: with a large σ the τ terms vanish and ρ is the continuous Gaussian's
    /// ‖Δ‖²/(2nσ²); with σ = ½ they dominate and the smaller branch is taken.
    #[test]
    fn rho_is_the_theorem_written_out() {
        let want = 1e4f64.powi(2) / (2.0 * 51.0 * 2e5f64.powi(2));
        let got = dg(1e4, 2e5, 51, 1000).rho().unwrap();
        assert!((got / want - 1.0).abs() < 1e-12, "{got} vs {want}");
        let (l2, s, n, d) = (3.0f64, 0.5f64, 4usize, 20usize);
        let tau: f64 = 10.0
            * (1..n)
                .map(|k| (-2.0 * std::f64::consts::PI.powi(2) * s * s * k as f64 / (k as f64 + 1.0)).exp())
                .sum::<f64>();
        let base = l2 * l2 / (n as f64 * s * s);
        let eps = (base + 0.5 * tau * d as f64).sqrt().min(base.sqrt() + tau * (d as f64).sqrt());
        let got = dg(l2, s, n, d).rho().unwrap();
        assert!((got / (0.5 * eps * eps) - 1.0).abs() < 1e-9 && got > 0.5 * base, "{got} vs {}", 0.5 * eps * eps);
    }

    #[test]
    fn rounds_add_up_like_a_running_total_and_like_opendp() {
        let rho = 0.123_456_789_f64;
        let mut running = 0.0;
        for r in 1..=50u32 {
            running += rho;
            assert_eq!(rho_after_rounds(rho, r).to_bits(), running.to_bits(), "round {r}");
        }
        // opendp's composition of the same rounds, converted by the same map.
        let scale = (1.0 / (2.0 * rho)).sqrt();
        let composed = make_composition((0..50).map(|_| integer_gaussian(scale).unwrap()).collect()).unwrap();
        let theirs = make_fix_delta(&make_zCDP_to_approxDP(composed).unwrap(), 1e-5).unwrap().map(&1.0).unwrap().0;
        let ours = epsilon_after_rounds(rho, 50, 1e-5).unwrap();
        assert!((ours / theirs - 1.0).abs() < 1e-9, "{ours} vs opendp {theirs}");
    }

    #[test]
    fn the_noise_found_for_a_target_meets_it_and_is_not_loose() {
        let rho_of = |s: f64| dg(1e6 * 1.001, 1e6 * s / 10.0, 100, 10_000).rho();
        for (target, rounds) in [(1.0, 15u32), (10.0, 15), (3.0, 100)] {
            let sigma = noise_for_epsilon(target, rounds, 1e-5, rho_of).unwrap();
            let at = epsilon_after_rounds(rho_of(sigma).unwrap(), rounds, 1e-5).unwrap();
            assert!(at <= target && at > target * 0.99, "target {target}: σ {sigma} gives {at}");
        }
        // Where the theorem refuses small σ, the search steps over them.
        let picky = |s: f64| if s < 2.0 { Err(PrivacyError::Theorem("σ".into())) } else { rho_of(s) };
        assert!(noise_for_epsilon(1000.0, 1, 1e-5, picky).unwrap() >= 2.0);
    }
}
