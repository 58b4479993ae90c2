//! Log-space special functions the accountants need, accurate far into the tails where the
//! direct formulas underflow.

use std::f64::consts::{LN_2, PI, SQRT_2};

/// ln Φ(x), the log of the standard normal CDF, accurate for very negative x.
pub(crate) fn log_ndtr(x: f64) -> f64 {
    if x > 6.0 {
        // Φ(x) = 1 − Φ(−x) with Φ(−x) tiny: ln(1 − t) without cancellation.
        return (-0.5 * libm::erfc(x / SQRT_2)).ln_1p();
    }
    if x > -20.0 {
        return (0.5 * libm::erfc(-x / SQRT_2)).ln();
    }
    // Asymptotic series: Φ(x) = φ(x)/|x| · (1 − 1/x² + 3/x⁴ − 15/x⁶ + …); at |x| ≥ 20 ten terms
    // are far below f64 precision.
    let x2 = x * x;
    let (mut term, mut sum) = (1.0, 1.0);
    for k in 1..10 {
        term *= -f64::from(2 * k - 1) / x2;
        sum += term;
    }
    -0.5 * x2 - (-x).ln() - 0.5 * (2.0 * PI).ln() + sum.ln()
}

/// Φ(x), the standard normal CDF.
pub(crate) fn ndtr(x: f64) -> f64 {
    0.5 * libm::erfc(-x / SQRT_2)
}

/// ln erfc(x), as Opacus computes it (`log(2) + log_ndtr(−x·√2)`).
pub(crate) fn log_erfc(x: f64) -> f64 {
    LN_2 + log_ndtr(-x * SQRT_2)
}

/// ln(eˣ + eʸ) without overflow.
pub(crate) fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// ln(eˣ − eʸ) for x ≥ y; `None` when the difference would be negative.
pub(crate) fn log_sub(x: f64, y: f64) -> Option<f64> {
    if x < y {
        return None;
    }
    if y == f64::NEG_INFINITY {
        return Some(x);
    }
    if x == y {
        return Some(f64::NEG_INFINITY);
    }
    let d = x - y;
    // expm1 overflows past ~709: then eˣ − eʸ ≈ eˣ.
    if d > 700.0 { Some(x) } else { Some(d.exp_m1().ln() + y) }
}

/// ln C(n, k) for integers, through ln Γ.
pub(crate) fn log_binomial(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ndtr_matches_known_values_and_is_continuous_at_the_switches() {
        // scipy.special.log_ndtr reference values (scipy 1.17.1).
        let cases = [
            (0.0, -std::f64::consts::LN_2),
            (-1.0, -1.841_021_645_009_263_4),
            (-10.0, -53.231_285_150_512_48),
            (-30.0, -454.321_243_956_343_27),
            (3.0, -0.001_350_809_964_748_192_5),
        ];
        for (x, want) in cases {
            let got = log_ndtr(x);
            assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "log_ndtr({x}) = {got}, want {want}");
        }
        for edge in [-20.0f64, 6.0] {
            let (a, b) = (log_ndtr(edge - 1e-9), log_ndtr(edge + 1e-9));
            assert!((a - b).abs() < 1e-7 * a.abs().max(1e-6), "jump at {edge}: {a} vs {b}");
        }
    }

    #[test]
    fn log_add_sub_roundtrip() {
        let (x, y) = (3.0f64, 1.0f64);
        let s = log_add(x, y);
        assert!((s - (x.exp() + y.exp()).ln()).abs() < 1e-14);
        assert!((log_sub(s, y).unwrap() - x).abs() < 1e-12);
        assert_eq!(log_sub(1.0, 2.0), None);
        assert_eq!(log_sub(2.0, 2.0), Some(f64::NEG_INFINITY));
        assert!((log_binomial(10.0, 3.0) - 120f64.ln()).abs() < 1e-12);
    }
}
