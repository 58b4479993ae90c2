//! Rényi DP of the Poisson-subsampled Gaussian mechanism (Mironov, Talwar and Zhang 2019,
//! "Rényi Differential Privacy of the Sampled Gaussian Mechanism"), computed as Opacus computes
//! it, for integer and fractional orders, and the improved RDP → (ε, δ) conversion
//! (Balle et al. 2020, Theorem 21) that Opacus uses.
//!
//! Everything is in log space; the fractional-order series is summed until its terms fall below
//! e⁻³⁰, as Opacus does.

use super::special::{log_add, log_binomial, log_erfc, log_sub};

/// Opacus's default orders: 1.1, 1.2, …, 10.9, then 12, 13, …, 63.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((12..64).map(f64::from));
    orders
}

/// ln A_α for integer α (Mironov et al., Section 3.3).
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let a = alpha as f64;
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let i = i as f64;
        let log_coef = log_binomial(a, i) + i * q.ln() + (a - i) * (1.0 - q).ln();
        log_a = log_add(log_a, log_coef + (i * i - i) / (2.0 * sigma * sigma));
    }
    log_a
}

/// ln A_α for fractional α (Mironov et al., Section 3.3), as a two-sided series.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let mut coef = 1.0f64; // generalised binomial C(α, i), built up term by term
    let mut i = 0.0f64;
    // The series converges geometrically; the cap only guards against a non-finite input.
    for _ in 0..100_000 {
        let j = alpha - i;
        let log_coef = coef.abs().ln();
        let log_t0 = log_coef + i * q.ln() + j * (1.0 - q).ln();
        let log_t1 = log_coef + j * q.ln() + i * (1.0 - q).ln();
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if coef > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            // The alternating tail never exceeds the running sum; if rounding says otherwise the
            // term is negligible and is dropped (rounding the sum up, never down).
            log_a0 = log_sub(log_a0, log_s0).unwrap_or(log_a0);
            log_a1 = log_sub(log_a1, log_s1).unwrap_or(log_a1);
        }
        coef *= (alpha - i) / (i + 1.0);
        i += 1.0;
        if log_s0.max(log_s1) < -30.0 {
            break;
        }
    }
    log_add(log_a0, log_a1)
}

/// RDP at order `alpha` of one step of the Poisson-subsampled Gaussian with sampling rate `q`
/// and noise multiplier `sigma` (noise std / sensitivity).
pub fn rdp_one_step(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 || alpha.is_infinite() {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 { log_a_int(q, sigma, alpha as u64) } else { log_a_frac(q, sigma, alpha) };
    log_a / (alpha - 1.0)
}

/// RDP after `steps` compositions, at each order.
pub fn rdp(q: f64, sigma: f64, steps: u64, orders: &[f64]) -> Vec<f64> {
    orders.iter().map(|&a| rdp_one_step(q, sigma, a) * steps as f64).collect()
}

/// The smallest ε over the orders for a target δ, and the order that gives it
/// (ε = RDP − (ln δ + ln α)/(α − 1) + ln((α − 1)/α)).
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::NAN);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = r - (delta.ln() + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln();
        if eps < best.0 {
            best = (eps, a);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Reference {
        orders: Vec<f64>,
        cases: Vec<Case>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        q: f64,
        sigma: f64,
        steps: u64,
        rdp: Vec<f64>,
        delta: f64,
        epsilon: f64,
        best_order: f64,
    }

    /// Opacus 1.6.0 on its default orders (testdata/privacy/generate.py).
    #[test]
    fn rdp_agrees_with_opacus_to_1e6_relative() {
        let r: Reference = serde_json::from_str(include_str!("../../testdata/privacy/rdp_opacus.json")).unwrap();
        assert_eq!(r.orders, default_orders());
        for c in &r.cases {
            let ours = rdp(c.q, c.sigma, c.steps, &r.orders);
            for ((&a, &want), &got) in r.orders.iter().zip(&c.rdp).zip(&ours) {
                let rel = if want == 0.0 { got.abs() } else { ((got - want) / want).abs() };
                assert!(
                    rel <= 1e-6 || (want.is_infinite() && got == want),
                    "q={} σ={} T={} α={a}: ours {got}, Opacus {want} (rel {rel:e})",
                    c.q,
                    c.sigma,
                    c.steps
                );
            }
            let (eps, order) = epsilon(&r.orders, &ours, c.delta);
            assert!(((eps - c.epsilon) / c.epsilon).abs() <= 1e-6, "ε {eps} vs {}", c.epsilon);
            assert_eq!(order, c.best_order);
        }
    }

    #[test]
    fn public_check_value() {
        let orders = default_orders();
        let (eps, _) = epsilon(&orders, &rdp(256.0 / 60000.0, 1.1, 14040, &orders), 1e-5);
        assert!((eps - 2.594).abs() < 5e-4, "{eps}");
    }
}
