//! A privacy-loss-distribution (PLD) accountant for the Poisson-subsampled Gaussian, for a
//! tight ε.
//!
//! For each neighbouring relation (removing or adding one example) the single-step privacy
//! loss is discretised on a grid of width `interval` with the *connect-the-dots* construction
//! (Doroshenko, Ghazi, Kamath, Kumar and Manurangsi, "Connect the Dots: Tighter Discrete
//! Approximations of Privacy Loss Distributions", PETS 2022): the discrete distribution's
//! hockey-stick curve δ(ε) equals the true one at every grid point and is linear in e^ε between
//! them, which upper-bounds the true (convex in e^ε) curve, so every ε we report is an upper
//! bound. The T-fold composition is one FFT, a pointwise power and an inverse FFT, over a window
//! chosen by a Chernoff bound; the mass outside the window is added to δ, never dropped.
//!
//! Where the time goes, and what keeps it short without loosening the bound: the Chernoff
//! bound's cumulant generating function is a polynomial evaluated by Horner's rule with its
//! rounding added back (the window is never narrower than the exact bound's); the transforms
//! are planned once per process, on the smallest 5-smooth length that holds the window; the
//! power is taken on half the spectrum (the input is real); ε is found in one pass down the
//! composed grid and then certified by the term-by-term δ sum; the remove and add relations run
//! on two threads. The straightforward version is kept under `#[cfg(test)]` (`reference`) and a
//! property test holds the two together.
//!
//! This is the approach of Google's `dp_accounting` (`PLDAccountant`), written from the papers;
//! `protocol/testdata/privacy/epsilon_reference.json` holds its values and Opacus's PRV bounds.

use std::sync::{Arc, Mutex, OnceLock};

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

use super::special::ndtr;
use super::{PrivacyError, SampledGaussian};

/// Most points a discretised distribution (one step's, or the composed window's FFT buffer) may
/// have: 2²⁴, 256 MiB of complex `f64`. The grid grows as 1/(σ²·interval) for one step and as
/// √T/(σ·interval) for T steps, so a tiny noise multiplier or an absurd step count would
/// otherwise ask for gigabytes; such a run is refused instead, naming the cause.
pub const MAX_GRID_POINTS: usize = 1 << 24;

/// The refusal of a grid of `points` (a float, as it may not fit an integer).
fn too_large(what: &str, points: f64, sigma: f64) -> PrivacyError {
    PrivacyError::Accounting(format!(
        "the {what} would need {points:.3e} grid points (at most {MAX_GRID_POINTS}) at noise multiplier {sigma}; \
         use more noise, fewer steps or the RDP accountant"
    ))
}

/// Grid indices `floor(lo/h) ..= ceil(hi/h)` (at least two), refused unless finite and within
/// [`MAX_GRID_POINTS`]; computed in `f64` before any integer arithmetic, so nothing wraps.
fn grid_span(what: &str, lo: f64, hi: f64, h: f64, sigma: f64) -> Result<(i64, i64), PrivacyError> {
    let (a, b) = ((lo / h).floor(), (hi / h).ceil());
    // The bound on |index| keeps every later product with a step count inside i64 too (see compose).
    let limit = 2f64.powi(52);
    if !(a.is_finite() && b.is_finite() && a.abs() < limit && b.abs() < limit && b >= a) {
        return Err(PrivacyError::Accounting(format!(
            "the {what} spans losses {lo:e} to {hi:e}, which no grid holds, at noise multiplier {sigma}"
        )));
    }
    let points = b - a + 1.0;
    if points > MAX_GRID_POINTS as f64 {
        return Err(too_large(what, points, sigma));
    }
    // Exact: both are integers below 2⁵² in magnitude.
    let (k_lo, k_hi) = (a as i64, b as i64);
    Ok((k_lo, k_hi.max(k_lo + 1)))
}

/// Grid and truncation settings.
#[derive(Clone, Debug)]
pub struct Discretisation {
    /// Width of the privacy-loss grid (dp_accounting's `value_discretization_interval`).
    pub interval: f64,
    /// The single-step losses are represented for x within this many σ of the means; the mass
    /// beyond is moved to the end of the grid that makes ε larger (or counted as infinite loss).
    pub tail_sigmas: f64,
    /// Probability bound on the composed loss falling outside the FFT window; added to δ.
    pub window_tail: f64,
}

impl Default for Discretisation {
    fn default() -> Self {
        Self { interval: 1e-4, tail_sigmas: 10.0, window_tail: 1e-15 }
    }
}

#[derive(Clone, Copy, Debug)]
enum Relation {
    /// P: the mixture (1−q)·N(0, σ²) + q·N(1, σ²); Q: N(0, σ²).
    Remove,
    /// P: N(0, σ²); Q: the mixture.
    Add,
}

/// x such that ln(1 − q + q·exp((2x − 1)/(2σ²))) = u, for u > ln(1 − q).
fn x_of(q: f64, sigma: f64, u: f64) -> f64 {
    let log_num = u + (-(1.0 - q) * (-u).exp()).ln_1p();
    sigma * sigma * (log_num - q.ln()) + 0.5
}

/// ln(1 − q + q·exp((2x − 1)/(2σ²))).
fn mix_log_ratio(q: f64, sigma: f64, x: f64) -> f64 {
    let t = (2.0 * x - 1.0) / (2.0 * sigma * sigma);
    if q == 1.0 {
        return t;
    }
    super::special::log_add((1.0 - q).ln(), q.ln() + t)
}

/// The true hockey-stick divergence δ(ε) = P(L > ε) − e^ε·Q(L > ε) of one step.
fn delta_one_step(rel: Relation, q: f64, sigma: f64, eps: f64) -> f64 {
    let log_1mq = (1.0 - q).ln(); // −∞ when q = 1
    let d = match rel {
        Relation::Remove => {
            if eps <= log_1mq {
                return -eps.exp_m1();
            }
            let x = x_of(q, sigma, eps);
            let (cdf_q, cdf_p1) = (ndtr(x / sigma), ndtr((x - 1.0) / sigma));
            if x < 0.0 {
                // 1 − e^ε + e^ε·Q(X ≤ x) − P(X ≤ x): no cancellation between values near 1.
                -eps.exp_m1() + (eps.exp() * cdf_q - ((1.0 - q) * cdf_q + q * cdf_p1))
            } else {
                let (sf_q, sf_p1) = (ndtr(-x / sigma), ndtr((1.0 - x) / sigma));
                (1.0 - q) * sf_q + q * sf_p1 - eps.exp() * sf_q
            }
        }
        Relation::Add => {
            if eps >= -log_1mq {
                return 0.0;
            }
            let x = x_of(q, sigma, -eps);
            let (cdf0, cdf1) = (ndtr(x / sigma), ndtr((x - 1.0) / sigma));
            cdf0 * (1.0 - eps.exp() * (1.0 - q)) - eps.exp() * q * cdf1
        }
    };
    // A NaN stays NaN (f64::max would turn it into 0, the unsafe direction): discretise refuses it.
    if d.is_nan() { d } else { d.max(0.0) }
}

/// The largest one-step privacy loss the grid represents: beyond it e^ε leaves the f64 range
/// (e^709.8 overflows), so δ and the slopes would be infinite or NaN.
const MAX_ONE_STEP_LOSS: f64 = 700.0;

/// One step's loss range worth representing.
fn loss_range(rel: Relation, q: f64, sigma: f64, z: f64) -> (f64, f64) {
    match rel {
        Relation::Remove => (mix_log_ratio(q, sigma, -z * sigma), mix_log_ratio(q, sigma, 1.0 + z * sigma)),
        Relation::Add => (-mix_log_ratio(q, sigma, 1.0 + z * sigma), -mix_log_ratio(q, sigma, -z * sigma)),
    }
}

/// A discrete privacy-loss distribution: `mass[i]` at loss `(offset + i)·interval`, plus mass at
/// +∞.
#[derive(Clone, Debug)]
struct DiscretePld {
    offset: i64,
    mass: Vec<f64>,
    infinite: f64,
}

/// Connect-the-dots discretisation of one step.
fn discretise(rel: Relation, q: f64, sigma: f64, d: &Discretisation) -> Result<DiscretePld, PrivacyError> {
    let h = d.interval;
    let (lo, hi) = loss_range(rel, q, sigma, d.tail_sigmas);
    if !(lo.abs() <= MAX_ONE_STEP_LOSS && hi.abs() <= MAX_ONE_STEP_LOSS) {
        return Err(PrivacyError::Accounting(format!(
            "one step's privacy loss spans {lo:e} to {hi:e} at noise multiplier {sigma}, beyond the ±{MAX_ONE_STEP_LOSS} \
             a double-precision grid holds; use more noise or the RDP accountant"
        )));
    }
    let (k_lo, k_hi) = grid_span("one step's privacy loss", lo, hi, h, sigma)?;
    // Within MAX_GRID_POINTS + 1 by grid_span.
    let n = (k_hi - k_lo + 1) as usize;
    let eps: Vec<f64> = (0..n).map(|i| (k_lo + i as i64) as f64 * h).collect();
    let delta: Vec<f64> = eps.iter().map(|&e| delta_one_step(rel, q, sigma, e)).collect();
    // Slopes of δ as a function of e^ε between grid points; w[i] = −slope on [εᵢ, εᵢ₊₁].
    let w: Vec<f64> = (0..n - 1).map(|i| -(delta[i + 1] - delta[i]) / (eps[i + 1].exp() - eps[i].exp())).collect();
    let mut mass = vec![0.0; n];
    for j in 1..n {
        let w_next = if j < n - 1 { w[j] } else { 0.0 };
        mass[j] = (eps[j].exp() * (w[j - 1] - w_next)).max(0.0);
    }
    let infinite = delta[n - 1];
    let rest: f64 = mass[1..].iter().sum::<f64>() + infinite;
    // Every value finite, or no answer: a NaN clamped to zero mass would lower ε.
    if !(rest.is_finite() && delta.iter().all(|v| v.is_finite()) && w.iter().all(|v| v.is_finite())) {
        return Err(PrivacyError::Accounting(format!(
            "one step's privacy-loss distribution is not finite at noise multiplier {sigma} and sampling rate {q}; \
             use more noise or the RDP accountant"
        )));
    }
    mass[0] = (1.0 - rest).max(0.0);
    Ok(DiscretePld { offset: k_lo, mass, infinite })
}

/// Σⱼ cⱼ·rʲ for 0 < r ≤ 1 and cⱼ ≥ 0, by Horner's rule in four interleaved lanes (powers
/// r⁴ᵏ⁺ˡ), so four independent multiply-adds are in flight instead of one chain.
fn poly_at(c: &[f64], r: f64) -> f64 {
    let r4 = (r * r) * (r * r);
    let full = c.len() / 4;
    let mut s = [0.0f64; 4];
    s[..c.len() - 4 * full].copy_from_slice(&c[4 * full..]);
    for chunk in c[..4 * full].chunks_exact(4).rev() {
        for (acc, &cj) in s.iter_mut().zip(chunk) {
            *acc = *acc * r4 + cj;
        }
    }
    s[0] + r * (s[1] + r * (s[2] + r * s[3]))
}

/// An upper bound on ln Σᵢ massᵢ·e^{λ·lossᵢ}, the cumulant generating function of the finite
/// part, for λ ≠ 0; `rev` is `p.mass` reversed.
///
/// The sum is taken relative to the largest loss for λ > 0 (the smallest for λ < 0), as a
/// polynomial in r = e^{−|λ|·h} ∈ (0, 1) with non-negative coefficients: one multiply-add per
/// point instead of a logarithm and an exponential (profile: those were 60–75 % of an ε). Every
/// term is non-negative, so the computed sum is below the exact one by at most a relative
/// (1 + u)^{4n} − 1 ≤ 16·n·u (rounding of r, of its powers and of each step, u = 2⁻⁵³, n ≤ 2²⁴)
/// and an absolute n·2⁻¹⁰²² from underflow; both are added back, so the window from this
/// bound is never narrower than the exact bound's.
fn log_mgf(p: &DiscretePld, rev: &[f64], h: f64, lambda: f64) -> f64 {
    let n = p.mass.len();
    let r = (-lambda.abs() * h).exp();
    let (shift, sum) = if lambda > 0.0 {
        ((p.offset + n as i64 - 1) as f64 * h, poly_at(rev, r))
    } else {
        (p.offset as f64 * h, poly_at(&p.mass, r))
    };
    let slack = 16.0 * n as f64 * f64::EPSILON / 2.0;
    lambda * shift + (sum * (1.0 + slack) + n as f64 * f64::MIN_POSITIVE).ln()
}

/// The composed distribution on a window, as masses at losses `(first + i)·h`.
struct Composed {
    first: i64,
    mass: Vec<f64>,
    /// Mass at +∞ plus the bound on mass above the window.
    extra_delta: f64,
    h: f64,
}

impl Composed {
    fn delta(&self, eps: f64) -> f64 {
        let mut d = self.extra_delta;
        for (i, m) in self.mass.iter().enumerate() {
            let loss = (self.first + i as i64) as f64 * self.h;
            if loss > eps {
                d += m * -(eps - loss).exp_m1();
            }
        }
        d
    }

    /// Smallest ε ≥ 0 with δ(ε) ≤ `delta` (∞ if none), on the safe side of rounding.
    ///
    /// One pass down the grid finds the grid interval where δ crosses `delta`, and solves
    /// exactly within it, instead of a bisection summing the whole window ~40 times (profile: a
    /// quarter of an ε on windows of 10⁶ points). With Dₖ = δ(lossₖ) − extra and
    /// Aₖ = Σ_{j>k} mⱼ, Dₖ = −expm1(−h)·Aₖ + e^{−h}·Dₖ₊₁ and, for Cₖ = Σ_{j>k} mⱼ·e^{−(j−k)h},
    /// Cₖ = e^{−h}·(mₖ₊₁ + Cₖ₊₁): every term non-negative, no cancellation. On
    /// [lossₖ, lossₖ₊₁) the masses above ε are fixed, so δ(lossₖ + x) − extra = Dₖ − expm1(x)·Cₖ and
    /// x = ln1p((Dₖ − target)/Cₖ). The answer is then checked against [`Self::delta`] (the
    /// term-by-term sum) and, should rounding have put it a hair below the crossing, moved up
    /// until that sum meets `delta`: the reported ε is never below what the direct sum certifies.
    fn epsilon(&self, delta: f64) -> f64 {
        if self.extra_delta > delta {
            return f64::INFINITY;
        }
        let target = delta - self.extra_delta;
        let h = self.h;
        let (decay, gain) = ((-h).exp(), -(-h).exp_m1());
        let (mut a, mut dk, mut ck) = (0.0f64, 0.0f64, 0.0f64);
        let mut found = None;
        // k runs from the last grid point down to one below the first: at k = first − 1 every
        // mass is above, and the formula holds for every ε below first·h too.
        for i in (0..=self.mass.len()).rev() {
            // Grid point k = first + i − 1; mass[i] sits at k + 1.
            if i < self.mass.len() {
                a += self.mass[i];
                dk = gain * a + decay * dk;
                ck = decay * (self.mass[i] + ck);
            }
            let k = self.first + i as i64 - 1;
            if dk > target || i == 0 {
                found = Some((k, ck, dk));
                if dk > target {
                    break;
                }
            }
        }
        let Some((k, c, dk)) = found else { return 0.0 };
        let x = if c > 0.0 { ((dk - target) / c).max(-1.0).ln_1p() } else { f64::NEG_INFINITY };
        let mut eps = (k as f64 * h + x).max(0.0);
        if !eps.is_finite() {
            eps = 0.0;
        }
        if eps == 0.0 && self.delta(0.0) <= delta {
            return 0.0;
        }
        // Safe side: the direct sum must certify it; a step of 10⁻¹² (doubling) fixes rounding.
        let mut step = 1e-12 * eps.max(1.0);
        while self.delta(eps) > delta {
            eps += step;
            step *= 2.0;
        }
        eps
    }
}

/// The smallest 2ᵃ·3ᵇ·5ᶜ ≥ `min`: rustfft is as fast per point on these as on powers of two, and
/// the next power of two is up to twice the window (profile: the transforms and the power are
/// linear in the length).
fn fft_len(min: usize) -> usize {
    let mut best = min.next_power_of_two();
    let mut p5 = 1;
    while p5 < best {
        let mut p35 = p5;
        while p35 < best {
            let mut n = p35;
            while n < min {
                n *= 2;
            }
            best = best.min(n);
            p35 *= 3;
        }
        p5 *= 5;
    }
    best
}

/// Most transform points the process-wide planner keeps plans for (each plan holds about n
/// complex twiddles): past it the planner starts afresh, so a long-running daemon that accounts
/// for plan after plan, each with its own lengths, does not grow without bound.
const MAX_PLANNED_POINTS: usize = 1 << 24;

/// The forward and inverse transforms of length `n`, planned once per process: planning
/// computes twiddles and picks algorithms, repeated for every ε before.
fn plans(n: usize) -> (Arc<dyn Fft<f64>>, Arc<dyn Fft<f64>>) {
    struct Planned {
        planner: FftPlanner<f64>,
        lengths: std::collections::BTreeSet<usize>,
    }
    static PLANNER: OnceLock<Mutex<Planned>> = OnceLock::new();
    let mut planned = PLANNER
        .get_or_init(|| Mutex::new(Planned { planner: FftPlanner::new(), lengths: Default::default() }))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if !planned.lengths.contains(&n) && planned.lengths.iter().sum::<usize>().saturating_add(n) > MAX_PLANNED_POINTS {
        *planned = Planned { planner: FftPlanner::new(), lengths: Default::default() };
    }
    planned.lengths.insert(n);
    let planner = &mut planned.planner;
    (planner.plan_fft_forward(n), planner.plan_fft_inverse(n))
}

/// zᵗ by polar form. A modulus below e^{−708} (where `exp` leaves the normal range) is set to
/// zero without computing its angle: each output mass moves by less than 10⁻³⁰⁰, far below the
/// transforms' own rounding (about 10⁻¹⁶ of the total mass), and the output masses are clamped at
/// zero afterwards in any case.
fn power(z: Complex<f64>, t: f64) -> Complex<f64> {
    let (r, theta) = z.to_polar();
    // `powf` rather than exp(t·ln r): the latter's error grows with t·|ln r| (10⁻¹³ at T = 500),
    // which the inverse transform spreads into the small tail masses that decide ε.
    // r = 0 gives −∞, below the threshold. A non-finite r cannot come from finite masses, and
    // compose refuses a non-finite output rather than let `max(0.0)` turn it into zero mass.
    if (t * r.ln()).partial_cmp(&-708.0) != Some(std::cmp::Ordering::Greater) {
        return Complex::new(0.0, 0.0);
    }
    Complex::from_polar(r.powf(t), theta * t)
}

/// T-fold self-composition by FFT over a window that holds all but `window_tail` of the mass.
fn compose(p: &DiscretePld, steps: u64, d: &Discretisation, sigma: f64) -> Result<Composed, PrivacyError> {
    let h = d.interval;
    // The product T·offset below is checked too; plans bound T by rounds × local steps (≤ 10⁹).
    let steps_i64 = i64::try_from(steps)
        .map_err(|_| PrivacyError::Accounting(format!("{steps} steps are more than any accountant composes")))?;
    let t = steps as f64;
    let width = p.mass.len() as i64;
    let (min_loss, max_loss) = (p.offset as f64 * h, (p.offset + width - 1) as f64 * h);
    // Chernoff: P(S ≥ s) ≤ exp(T·K(λ) − λs) for λ > 0, P(S ≤ s) ≤ exp(T·K(λ) − λs) for λ < 0.
    let log_tail = d.window_tail.ln();
    let rev: Vec<f64> = p.mass.iter().rev().copied().collect();
    let mut s_hi = t * max_loss;
    let mut s_lo = t * min_loss;
    // Any λ gives a valid bound; a coarse grid only makes the window a little wider.
    for i in 0..=60 {
        let lambda = 10f64.powf(-4.0 + f64::from(i) * 0.1);
        let up = (t * log_mgf(p, &rev, h, lambda) - log_tail) / lambda;
        if up.is_finite() {
            s_hi = s_hi.min(up);
        }
        let down = (t * log_mgf(p, &rev, h, -lambda) - log_tail) / -lambda;
        if down.is_finite() {
            s_lo = s_lo.max(down);
        }
    }
    let (m_lo, m_hi) = grid_span("composed privacy loss", s_lo, s_hi, h, sigma)?;
    // Both at most MAX_GRID_POINTS + 1, so the sum and the transform length cannot overflow.
    let n = fft_len((m_hi - m_lo + 1).max(width) as usize + 1);
    if n > MAX_GRID_POINTS {
        return Err(too_large("composed privacy loss", n as f64, sigma));
    }
    let mut buf: Vec<Complex<f64>> = vec![Complex::new(0.0, 0.0); n];
    for (i, m) in p.mass.iter().enumerate() {
        buf[i % n].re += m;
    }
    let (forward, inverse) = plans(n);
    forward.process(&mut buf);
    // The input is real, so the spectrum is Hermitian (Xₙ₋ₖ = conj Xₖ): raise the first half
    // to the T-th power and mirror it (profile: sincos, atan2 and pow here were a third of an ε).
    let half = n / 2;
    for z in &mut buf[..=half] {
        *z = power(*z, t);
    }
    let (low, high) = buf.split_at_mut(half + 1);
    for (hi, lo) in high.iter_mut().rev().zip(&low[1..]) {
        *hi = lo.conj();
    }
    inverse.process(&mut buf);
    // Never from finite masses; but `max(0.0)` below would silently turn a NaN into zero mass,
    // and so a smaller ε, so it is refused outright.
    if buf.iter().any(|z| !z.re.is_finite()) {
        return Err(PrivacyError::Accounting(format!(
            "the composed privacy loss is not finite at noise multiplier {sigma}"
        )));
    }
    let base = p.offset.checked_mul(steps_i64).ok_or_else(|| {
        PrivacyError::Accounting(format!("{steps} steps of this loss grid overflow its index; take fewer steps"))
    })?;
    let mass: Vec<f64> = (m_lo..=m_hi)
        .map(|m| {
            // In i128, as m − base may leave i64 when |base| is near its end.
            let j = (i128::from(m) - i128::from(base)).rem_euclid(n as i128) as usize;
            // Rounding noise can dip below zero; a mass is never negative.
            (buf[j].re / n as f64).max(0.0)
        })
        .collect();
    // Mass at +∞ after T steps: 1 − (1 − p∞)^T.
    let infinite = -(t * (-p.infinite).ln_1p()).exp_m1();
    Ok(Composed { first: m_lo, mass, extra_delta: infinite + d.window_tail, h })
}

/// The tight ε of `run` at `delta`: the larger of the remove and add relations. Refuses a run
/// whose parameters are out of range or whose grid would exceed [`MAX_GRID_POINTS`].
pub fn epsilon(run: &SampledGaussian, delta: f64, d: &Discretisation) -> Result<f64, PrivacyError> {
    run.validate()?;
    let (q, sigma) = (run.sampling_rate, run.noise_multiplier);
    if run.steps == 0 {
        return Ok(0.0);
    }
    let one = |rel| -> Result<f64, PrivacyError> {
        Ok(compose(&discretise(rel, q, sigma, d)?, run.steps, d, sigma)?.epsilon(delta))
    };
    // The two relations are independent: the add relation on a second thread (profile: an ε is
    // two equal halves, each discretise, window, transforms and search).
    let (remove, add) = std::thread::scope(|s| {
        let add = s.spawn(|| one(Relation::Add));
        (one(Relation::Remove), add.join())
    });
    let add = add.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    Ok(remove?.max(add?))
}

/// δ of `run` at `eps`: the larger of the remove and add relations.
pub fn delta(run: &SampledGaussian, eps: f64, d: &Discretisation) -> Result<f64, PrivacyError> {
    run.validate()?;
    let (q, sigma) = (run.sampling_rate, run.noise_multiplier);
    let mut worst = 0.0f64;
    for rel in [Relation::Remove, Relation::Add] {
        worst = worst.max(compose(&discretise(rel, q, sigma, d)?, run.steps, d, sigma)?.delta(eps));
    }
    Ok(worst)
}

/// The accountant as it was before the optimisations (commit cb075c0), kept as the slow,
/// straightforward reference the fast path is tested against: logarithm-and-exponential cumulant
/// generating function, full-spectrum `powf`, and a 100-step bisection of ε.
#[cfg(test)]
mod reference {
    use rustfft::FftPlanner;
    use rustfft::num_complex::Complex;

    use super::{Composed, DiscretePld, Discretisation, MAX_GRID_POINTS, PrivacyError, grid_span, too_large};

    impl Composed {
        /// Smallest ε ≥ 0 with δ(ε) ≤ `delta` (∞ if none).
        pub(super) fn epsilon_by_bisection(&self, delta: f64) -> f64 {
            if self.extra_delta > delta {
                return f64::INFINITY;
            }
            if self.delta(0.0) <= delta {
                return 0.0;
            }
            let (mut lo, mut hi) = (0.0, (self.first + self.mass.len() as i64) as f64 * self.h);
            for _ in 0..100 {
                let mid = 0.5 * (lo + hi);
                if self.delta(mid) > delta {
                    lo = mid;
                } else {
                    hi = mid;
                }
                if hi - lo < 1e-9 {
                    break;
                }
            }
            hi
        }
    }

    /// ln Σᵢ massᵢ·e^{λ·lossᵢ}, the cumulant generating function of the finite part.
    fn log_mgf(p: &DiscretePld, h: f64, lambda: f64) -> f64 {
        let terms = p
            .mass
            .iter()
            .enumerate()
            .filter(|(_, m)| **m > 0.0)
            .map(|(i, m)| m.ln() + lambda * (p.offset + i as i64) as f64 * h);
        let max = terms.clone().fold(f64::NEG_INFINITY, f64::max);
        max + terms.map(|t| (t - max).exp()).sum::<f64>().ln()
    }

    /// T-fold self-composition by FFT over a window that holds all but `window_tail` of the mass.
    pub(super) fn compose(
        p: &DiscretePld,
        steps: u64,
        d: &Discretisation,
        sigma: f64,
    ) -> Result<Composed, PrivacyError> {
        let h = d.interval;
        // The product T·offset below is checked too; plans bound T by rounds × local steps (≤ 10⁹).
        let steps_i64 = i64::try_from(steps)
            .map_err(|_| PrivacyError::Accounting(format!("{steps} steps are more than any accountant composes")))?;
        let t = steps as f64;
        let width = p.mass.len() as i64;
        let (min_loss, max_loss) = (p.offset as f64 * h, (p.offset + width - 1) as f64 * h);
        // Chernoff: P(S ≥ s) ≤ exp(T·K(λ) − λs) for λ > 0, P(S ≤ s) ≤ exp(T·K(λ) − λs) for λ < 0.
        let log_tail = d.window_tail.ln();
        let mut s_hi = t * max_loss;
        let mut s_lo = t * min_loss;
        // Any λ gives a valid bound; a coarse grid only makes the window a little wider.
        for i in 0..=60 {
            let lambda = 10f64.powf(-4.0 + f64::from(i) * 0.1);
            let up = (t * log_mgf(p, h, lambda) - log_tail) / lambda;
            if up.is_finite() {
                s_hi = s_hi.min(up);
            }
            let down = (t * log_mgf(p, h, -lambda) - log_tail) / -lambda;
            if down.is_finite() {
                s_lo = s_lo.max(down);
            }
        }
        let (m_lo, m_hi) = grid_span("composed privacy loss", s_lo, s_hi, h, sigma)?;
        // Both at most MAX_GRID_POINTS + 1, so the sum and the power of two cannot overflow.
        let n = ((m_hi - m_lo + 1).max(width) as usize + 1).next_power_of_two();
        if n > MAX_GRID_POINTS {
            return Err(too_large("composed privacy loss", n as f64, sigma));
        }
        let mut buf: Vec<Complex<f64>> = vec![Complex::new(0.0, 0.0); n];
        for (i, m) in p.mass.iter().enumerate() {
            buf[i % n].re += m;
        }
        let mut planner = FftPlanner::<f64>::new();
        planner.plan_fft_forward(n).process(&mut buf);
        for z in &mut buf {
            let (r, theta) = z.to_polar();
            *z = if r == 0.0 { Complex::new(0.0, 0.0) } else { Complex::from_polar(r.powf(t), theta * t) };
        }
        planner.plan_fft_inverse(n).process(&mut buf);
        let base = p.offset.checked_mul(steps_i64).ok_or_else(|| {
            PrivacyError::Accounting(format!("{steps} steps of this loss grid overflow its index; take fewer steps"))
        })?;
        let mass: Vec<f64> = (m_lo..=m_hi)
            .map(|m| {
                // In i128, as m − base may leave i64 when |base| is near its end.
                let j = (i128::from(m) - i128::from(base)).rem_euclid(n as i128) as usize;
                // Rounding noise can dip below zero; a mass is never negative.
                (buf[j].re / n as f64).max(0.0)
            })
            .collect();
        // Mass at +∞ after T steps: 1 − (1 − p∞)^T.
        let infinite = -(t * (-p.infinite).ln_1p()).exp_m1();
        Ok(Composed { first: m_lo, mass, extra_delta: infinite + d.window_tail, h })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Reference {
        cases: Vec<Case>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        q: f64,
        sigma: f64,
        steps: u64,
        delta: f64,
        pld_epsilon_dp_accounting: f64,
        prv_epsilon_opacus: Prv,
    }

    #[derive(serde::Deserialize)]
    struct Prv {
        lower: f64,
    }

    /// dp_accounting 0.6.0's PLD accountant and Opacus 1.6.0's PRV lower bound
    /// (testdata/privacy/generate.py).
    #[test]
    fn tight_epsilon_within_1_percent_of_dp_accounting_and_above_the_prv_lower_bound() {
        let r: Reference = serde_json::from_str(include_str!("../../testdata/privacy/epsilon_reference.json")).unwrap();
        for c in &r.cases {
            let run = SampledGaussian { sampling_rate: c.q, noise_multiplier: c.sigma, steps: c.steps };
            let ours = epsilon(&run, c.delta, &Discretisation::default()).unwrap();
            let want = c.pld_epsilon_dp_accounting;
            let rel = (ours - want) / want;
            println!(
                "q={:.5} σ={} T={} δ={}: ours {ours:.5}, dp_accounting {want:.5} ({:+.3} %), PRV lower {:.5}",
                c.q,
                c.sigma,
                c.steps,
                c.delta,
                rel * 100.0,
                c.prv_epsilon_opacus.lower
            );
            assert!(rel.abs() <= 0.01, "ours {ours} vs dp_accounting {want}");
            assert!(
                ours >= c.prv_epsilon_opacus.lower,
                "ours {ours} below the PRV lower bound {}",
                c.prv_epsilon_opacus.lower
            );
        }
    }

    /// The fast path (Horner cumulant generating function, Hermitian half-spectrum power, one-pass
    /// ε) against the straightforward one it replaced (`reference`), on random runs. On the same
    /// composed distribution the one-pass ε equals the bisection's to 10⁻⁹ (the bisection's
    /// absolute tolerance; relative for ε ≥ 1) and the direct δ sum certifies it. End to end the
    /// two differ by the transforms' rounding too (mirroring the half spectrum is not bit-equal
    /// to raising the computed other half), which grows as δ rests on ever smaller masses: up to
    /// 1.1·10⁻⁹ relative at q = 1, δ = 7·10⁻⁷, ε ≈ 650, and up to 2.2·10⁻⁸ at δ ≈ 10⁻⁷ on random
    /// draws (either side: neither rounding order is the safer one), so 10⁻⁷ relative is asserted,
    /// far below the 10⁻³ to which ε is reported and compared with dp_accounting. A coarse interval
    /// keeps the grids, and the test, small; the code is the same at any interval.
    #[test]
    fn the_fast_path_matches_the_straightforward_one() {
        use proptest::prelude::*;
        let d = Discretisation { interval: 1e-3, ..Discretisation::default() };
        // A fixed seed: the FFT-rounding differences below are a property of the inputs, and a
        // suite that passes must pass again.
        let mut runner = proptest::test_runner::TestRunner::new_with_rng(
            proptest::test_runner::Config { cases: 12, ..Default::default() },
            proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
        );
        let strategy = (-3.0f64..0.0, 0.7f64..4.0, 1u64..3000, -7.0f64..-3.0);
        runner
            .run(&strategy, |(log_q, sigma, steps, log_delta)| {
                let (q, delta) = (10f64.powf(log_q), 10f64.powf(log_delta));
                for rel in [Relation::Remove, Relation::Add] {
                    let p = discretise(rel, q, sigma, &d).unwrap();
                    let fast = compose(&p, steps, &d, sigma).unwrap();
                    let slow = reference::compose(&p, steps, &d, sigma).unwrap();
                    let case = format!("{rel:?} q={q} σ={sigma} T={steps} δ={delta}");
                    prop_assert_eq!((fast.first, fast.mass.len()), (slow.first, slow.mass.len()), "{}", case);
                    let (e_fast, e_slow) = (fast.epsilon(delta), slow.epsilon_by_bisection(delta));
                    let one_pass = slow.epsilon(delta);
                    prop_assert!((one_pass - e_slow).abs() <= 1e-9 * e_slow.max(1.0), "{case}: {one_pass} vs {e_slow}");
                    prop_assert!(slow.delta(one_pass) <= delta, "{case}");
                    prop_assert!(e_fast.is_infinite() || fast.delta(e_fast) <= delta, "{case}");
                    prop_assert!(
                        (e_fast - e_slow).abs() <= 1e-7 * e_slow.max(1.0),
                        "{case}: fast {e_fast}, reference {e_slow}"
                    );
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn transform_lengths_are_the_smallest_5_smooth_ones() {
        let smooth = |mut n: usize| {
            for p in [2, 3, 5] {
                while n.is_multiple_of(p) {
                    n /= p;
                }
            }
            n == 1
        };
        for min in 1..5000 {
            let n = fft_len(min);
            assert!(n >= min && smooth(n), "{min} → {n}");
            assert!((min..n).all(|m| !smooth(m)), "{min} → {n}");
        }
    }

    #[test]
    fn one_step_curves_are_valid() {
        for rel in [Relation::Remove, Relation::Add] {
            for (q, sigma) in [(0.01, 1.0), (0.3, 0.7), (1.0, 2.0)] {
                let mut prev = f64::INFINITY;
                for k in -200..200 {
                    let eps = f64::from(k) * 0.05;
                    let d = delta_one_step(rel, q, sigma, eps);
                    assert!((0.0..=1.0).contains(&d) && d <= prev + 1e-15, "{rel:?} q={q} σ={sigma} ε={eps}: δ={d}");
                    prev = d;
                }
                let p = discretise(rel, q, sigma, &Discretisation::default()).unwrap();
                let total: f64 = p.mass.iter().sum::<f64>() + p.infinite;
                assert!((total - 1.0).abs() < 1e-6, "{rel:?} q={q} σ={sigma}: total mass {total}");
            }
        }
    }

    /// A plan's careless σ: 10⁻³ would need ~10¹⁰ points for one step, 10⁻³⁰⁰ underflows σ²
    /// (the old code cast ±∞ to i64 and overflowed the grid's length); each is refused at once.
    #[test]
    fn a_noise_multiplier_needing_an_enormous_grid_is_refused_not_allocated() {
        let d = Discretisation::default();
        for sigma in [1e-3, 1e-300, f64::MIN_POSITIVE] {
            for q in [1.0, 0.01] {
                let run = SampledGaussian { sampling_rate: q, noise_multiplier: sigma, steps: 10 };
                let e = epsilon(&run, 1e-5, &d).unwrap_err();
                assert!(matches!(e, PrivacyError::Accounting(_)), "σ={sigma} q={q}: {e}");
                assert!(delta(&run, 1.0, &d).is_err(), "σ={sigma} q={q}");
            }
        }
        // One step fits, but composing 10⁹ of them needs a window beyond the cap.
        let run = SampledGaussian { sampling_rate: 1.0, noise_multiplier: 0.1, steps: 1_000_000_000 };
        let e = epsilon(&run, 1e-5, &d).unwrap_err().to_string();
        assert!(e.contains("grid points"), "{e}");
        // Steps beyond i64 are refused rather than wrapped.
        let run = SampledGaussian { sampling_rate: 0.01, noise_multiplier: 1.0, steps: u64::MAX };
        assert!(epsilon(&run, 1e-5, &d).is_err());
        // Non-finite or non-positive σ never reaches the grid.
        for sigma in [f64::NAN, f64::INFINITY, 0.0, -1.0] {
            let run = SampledGaussian { sampling_rate: 0.5, noise_multiplier: sigma, steps: 1 };
            assert!(matches!(epsilon(&run, 1e-5, &d), Err(PrivacyError::NoiseMultiplier(_))), "σ={sigma}");
        }
        // A grid that fits but whose losses leave exp's range (e^709.8 overflows) is refused,
        // not clamped: its δ would be NaN or infinite, and a NaN taken as zero mass lowers ε.
        let run = SampledGaussian { sampling_rate: 1.0, noise_multiplier: 0.032, steps: 1 };
        let e = epsilon(&run, 1e-5, &d).unwrap_err().to_string();
        assert!(e.contains("double-precision"), "{e}");
        // The smallest σ a plan may name is answered.
        let run = SampledGaussian { sampling_rate: 1.0, noise_multiplier: 0.1, steps: 1 };
        assert!(epsilon(&run, 1e-5, &d).unwrap().is_finite());
    }

    #[test]
    fn one_full_batch_step_is_the_gaussian_mechanism() {
        // q = 1: the loss is N(μ, 2μ) with μ = 1/(2σ²); δ(ε) = Φ(−ε/√(2μ)+√(μ/2)) − e^ε·Φ(−ε/√(2μ)−√(μ/2)).
        let sigma = 2.0;
        let mu: f64 = 1.0 / (2.0 * sigma * sigma);
        let eps = 0.5;
        let s = (2.0 * mu).sqrt();
        let exact = ndtr(-eps / s + s / 2.0) - eps.exp() * ndtr(-eps / s - s / 2.0);
        let run = SampledGaussian { sampling_rate: 1.0, noise_multiplier: sigma, steps: 1 };
        let ours = delta(&run, eps, &Discretisation::default()).unwrap();
        assert!(ours >= exact && ours < exact * 1.001 + 1e-12, "ours {ours}, exact {exact}");
    }
}
