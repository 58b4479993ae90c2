//! Privacy accounting for the Poisson-subsampled Gaussian mechanism, without I/O.
//!
//! - [`rdp`]: Rényi DP (Mironov, Talwar and Zhang 2019) as Opacus computes it, with the improved
//!   RDP → (ε, δ) conversion. Fast and simple; loose by 5–15 % in ε.
//! - [`pld`]: a privacy-loss-distribution accountant (connect-the-dots discretisation, FFT
//!   composition) for a tight ε, checked against Google's `dp_accounting`.
//!
//! - [`noise`]: Gaussian noise from an OS-seeded CSPRNG, hardened against floating-point
//!   attacks, for DP-SGD at the nodes and DP-FedAvg at the coordinator.
//! - [`distributed`]: client-level DP by distributed discrete Gaussian noise under secure
//!   aggregation (Kairouz, Liu and Steinke 2021): the bound behind `secagg::encode::round_rho`,
//!   the one function every party charges a round by.
//! - [`discrete`]: an exact discrete Gaussian sampler (Canonne, Kamath and Steinke 2020) on the
//!   caller's CSPRNG, for each node's share of that noise.
//!
//! Both accountants are checked against reference values computed once with Opacus and dp_accounting and
//! committed with their generator in `protocol/testdata/privacy/`.

pub mod cli;
pub mod discrete;
pub mod distributed;
pub mod noise;
pub mod pld;
pub mod rdp;
mod special;

/// What an accountant needs to know about a run of DP-SGD steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampledGaussian {
    /// Poisson sampling rate q ∈ (0, 1].
    pub sampling_rate: f64,
    /// Noise standard deviation divided by the clipping norm (σ > 0).
    pub noise_multiplier: f64,
    /// Number of composed steps.
    pub steps: u64,
}

/// Why an accounting question cannot be answered.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    #[error("sampling rate {0} is not in (0, 1]")]
    SamplingRate(f64),
    #[error("noise multiplier {0} is not a positive finite number")]
    NoiseMultiplier(f64),
    #[error("delta {0} is not in (0, 1)")]
    Delta(f64),
    #[error("accounting failed: {0}")]
    Accounting(String),
    #[error("target epsilon {0} is not a positive finite number")]
    Epsilon(f64),
    #[error(
        "no noise multiplier up to {max} reaches ε = {target} with these parameters; sample less or take fewer steps"
    )]
    Unreachable { target: f64, max: f64 },
    #[error("the distributed discrete Gaussian bound (Kairouz, Liu and Steinke 2021, Theorem 1) does not apply: {0}")]
    Theorem(String),
    #[error("discrete Gaussian sampler: {0}")]
    Sampler(String),
}

impl SampledGaussian {
    /// Checks the parameters' ranges.
    pub fn validate(&self) -> Result<(), PrivacyError> {
        let q = self.sampling_rate;
        if !(q > 0.0 && q <= 1.0) {
            return Err(PrivacyError::SamplingRate(q));
        }
        let s = self.noise_multiplier;
        if !(s.is_finite() && s > 0.0) {
            return Err(PrivacyError::NoiseMultiplier(s));
        }
        Ok(())
    }
}

fn check_delta(delta: f64) -> Result<(), PrivacyError> {
    if delta > 0.0 && delta < 1.0 { Ok(()) } else { Err(PrivacyError::Delta(delta)) }
}

/// ε under both accountants for one run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EpsilonReport {
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
    pub steps: u64,
    pub delta: f64,
    /// RDP accountant's ε and the order that achieved it.
    pub rdp_epsilon: f64,
    pub rdp_order: f64,
    /// PLD accountant's ε (tight).
    pub pld_epsilon: f64,
}

/// ε for `run` at `delta` under RDP and PLD.
pub fn epsilon(run: &SampledGaussian, delta: f64) -> Result<EpsilonReport, PrivacyError> {
    run.validate()?;
    check_delta(delta)?;
    let orders = rdp::default_orders();
    let (rdp_epsilon, rdp_order) =
        rdp::epsilon(&orders, &rdp::rdp(run.sampling_rate, run.noise_multiplier, run.steps, &orders), delta);
    let pld_epsilon = pld::epsilon(run, delta, &pld::Discretisation::default())?;
    Ok(EpsilonReport {
        sampling_rate: run.sampling_rate,
        noise_multiplier: run.noise_multiplier,
        steps: run.steps,
        delta,
        rdp_epsilon,
        rdp_order,
        pld_epsilon,
    })
}

/// Which accountant answers a question.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accountant {
    Rdp,
    Pld,
}

/// The ε an accountant gives for `run`.
pub fn epsilon_with(accountant: Accountant, run: &SampledGaussian, delta: f64) -> Result<f64, PrivacyError> {
    run.validate()?;
    check_delta(delta)?;
    Ok(match accountant {
        Accountant::Rdp => {
            let orders = rdp::default_orders();
            rdp::epsilon(&orders, &rdp::rdp(run.sampling_rate, run.noise_multiplier, run.steps, &orders), delta).0
        }
        Accountant::Pld => pld::epsilon(run, delta, &pld::Discretisation::default())?,
    })
}

/// The smallest noise multiplier (to 0.1 % relative) whose ε does not exceed `target` under
/// `accountant`. The answer is always on the safe side: its ε is at most the target. The search
/// stays within the noise multipliers a plan may name ([`crate::plan::limits`]), so no accountant
/// is ever asked about a σ whose grid or arithmetic a plan could not reach directly.
///
/// Each PLD ε takes milliseconds to tenths of a second, so the search spends few: it starts
/// from the RDP answer (microseconds; RDP's looser ε puts it at or a little above PLD's),
/// brackets the answer by steps of 1.25× (2× from σ = 1 for RDP itself, or where RDP has no
/// answer), then narrows the bracket by interpolating ln ε against ln σ (nearly linear), aiming
/// each probe 0.04 % past the estimate on alternate sides so that one probe either side of the
/// answer closes the 0.1 % bracket; a probe that fails to halve the bracket twice running is
/// replaced by bisection. About half the ε of plain bisection from [0.1, 1], and cheaper ones
/// (none at the lower end, whose grid is the largest).
pub fn noise_for_epsilon(
    accountant: Accountant,
    target: f64,
    sampling_rate: f64,
    steps: u64,
    delta: f64,
) -> Result<f64, PrivacyError> {
    use crate::plan::limits::{MAX_NOISE_MULTIPLIER as MAX, MIN_NOISE_MULTIPLIER as MIN};
    if !(target.is_finite() && target > 0.0) {
        return Err(PrivacyError::Epsilon(target));
    }
    check_delta(delta)?;
    // ε at σ; a σ the accountant cannot answer for (its grid would be too large, which happens
    // only for too little noise) is kept as the error: it counts as missing the target, so the
    // answer always has an ε.
    let eps_at = |sigma: f64| -> Result<Result<f64, PrivacyError>, PrivacyError> {
        match epsilon_with(accountant, &SampledGaussian { sampling_rate, noise_multiplier: sigma, steps }, delta) {
            Ok(e) => Ok(Ok(e)),
            Err(e @ PrivacyError::Accounting(_)) => Ok(Err(e)),
            Err(e) => Err(e),
        }
    };
    let meets = |e: &Result<f64, PrivacyError>| matches!(e, Ok(v) if *v <= target);
    // RDP's answer is within ~15 % of PLD's: bracket it by steps of 1.25; without one, double.
    let (start, step) = match accountant {
        Accountant::Pld => match noise_for_epsilon(Accountant::Rdp, target, sampling_rate, steps, delta) {
            Ok(s) => (s, 1.25),
            Err(_) => (1.0, 2.0),
        },
        Accountant::Rdp => (1.0, 2.0),
    };
    let start = start.clamp(MIN, MAX);
    // (σ, ε at σ): `hi` meets the target, `lo` misses it.
    let first = (start, eps_at(start)?);
    let (mut lo, mut hi);
    if meets(&first.1) {
        hi = first;
        loop {
            if hi.0 <= MIN {
                return Ok(MIN);
            }
            let s = (hi.0 / step).max(MIN);
            let e = eps_at(s)?;
            if meets(&e) {
                hi = (s, e);
            } else {
                lo = (s, e);
                break;
            }
        }
    } else {
        lo = first;
        loop {
            if lo.0 >= MAX {
                return Err(match lo.1 {
                    Err(e) => e,
                    Ok(_) => PrivacyError::Unreachable { target, max: MAX },
                });
            }
            let s = (lo.0 * step).min(MAX);
            let e = eps_at(s)?;
            if meets(&e) {
                hi = (s, e);
                break;
            }
            lo = (s, e);
        }
    }
    let mut toward_hi = true;
    let mut widths = [f64::INFINITY; 2];
    while hi.0 - lo.0 > 1e-3 * hi.0 {
        let width = hi.0 - lo.0;
        let interpolated = match (&lo.1, &hi.1) {
            (Ok(el), Ok(eh)) if *el > 0.0 && *eh > 0.0 && el.is_finite() => {
                let (gl, gh) = ((el / target).ln(), (eh / target).ln());
                let (xl, xh) = (lo.0.ln(), hi.0.ln());
                (gl > gh).then(|| (xl + (xh - xl) * gl / (gl - gh)).exp())
            }
            _ => None,
        };
        let stalled = width > 0.5 * widths[0];
        let probe = match interpolated {
            Some(est) if !stalled => {
                let aim = est + if toward_hi { 4e-4 } else { -4e-4 } * hi.0;
                // Strictly inside, so every probe narrows the bracket.
                aim.clamp(lo.0 + 0.01 * width, hi.0 - 0.01 * width)
            }
            _ => 0.5 * (lo.0 + hi.0),
        };
        widths = [widths[1], width];
        let e = eps_at(probe)?;
        if meets(&e) {
            hi = (probe, e);
            toward_hi = false;
        } else {
            lo = (probe, e);
            toward_hi = true;
        }
    }
    Ok(hi.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::limits;

    /// A huge target used to drive the bisection to σ ≈ 0.07 (and a huge grid); the search now
    /// stops at the least noise a plan may name, and its answer still meets the target.
    #[test]
    fn the_noise_search_stays_within_the_plan_limits() {
        for accountant in [Accountant::Pld, Accountant::Rdp] {
            let sigma = noise_for_epsilon(accountant, 1e6, 1.0, 1, 1e-5).unwrap();
            assert_eq!(sigma, limits::MIN_NOISE_MULTIPLIER, "{accountant:?}");
            let sigma = noise_for_epsilon(accountant, 3.0, 0.05, 100, 1e-5).unwrap();
            assert!((limits::MIN_NOISE_MULTIPLIER..=limits::MAX_NOISE_MULTIPLIER).contains(&sigma));
            let run = SampledGaussian { sampling_rate: 0.05, noise_multiplier: sigma, steps: 100 };
            assert!(epsilon_with(accountant, &run, 1e-5).unwrap() <= 3.0);
        }
        // An ε no σ up to the maximum reaches is refused, naming that maximum.
        let e = noise_for_epsilon(Accountant::Pld, 1e-6, 1.0, 10, 1e-5).unwrap_err();
        assert!(matches!(e, PrivacyError::Unreachable { .. } | PrivacyError::Accounting(_)), "{e}");
        let e = noise_for_epsilon(Accountant::Rdp, 1e-6, 1.0, 10_000, 1e-5).unwrap_err();
        assert_eq!(e, PrivacyError::Unreachable { target: 1e-6, max: limits::MAX_NOISE_MULTIPLIER });
    }

    /// The answer is the safe end of a 0.1 % bracket: its ε meets the target and 0.1 % less noise
    /// misses it, whichever way the interpolating search went (RDP over many runs, PLD over two).
    #[test]
    fn the_noise_search_answers_within_a_tenth_of_a_percent() {
        let mut cases = Vec::new();
        for target in [0.3, 1.0, 3.0, 8.0, 30.0] {
            for (q, steps) in [(0.001, 10_000), (0.01, 1000), (0.1, 100), (1.0, 15), (0.02, 1500)] {
                cases.push((Accountant::Rdp, target, q, steps));
            }
        }
        cases.extend([(Accountant::Pld, 1.0, 0.02, 1500), (Accountant::Pld, 8.0, 0.01, 1000)]);
        for (accountant, target, q, steps) in cases {
            let sigma = noise_for_epsilon(accountant, target, q, steps, 1e-5).unwrap();
            let at = |s: f64| {
                epsilon_with(accountant, &SampledGaussian { sampling_rate: q, noise_multiplier: s, steps }, 1e-5)
                    .unwrap()
            };
            let case = format!("{accountant:?} ε={target} q={q} T={steps}: σ={sigma}");
            assert!(at(sigma) <= target, "{case}");
            if sigma > limits::MIN_NOISE_MULTIPLIER {
                assert!(at(sigma * (1.0 - 1e-3)) > target, "{case}");
            }
        }
    }
}
