//! Reconnect delays (pure): "full jitter" from the AWS architecture blog's "Exponential Backoff
//! And Jitter": sleep a uniformly random time in [0, min(cap, base · 2^attempt)]. After a
//! coordinator restart fifty hospitals then come back spread over the window instead of all at
//! once on the same doubling schedule.

use std::time::Duration;

/// The first retry's window (the node's former fixed first delay).
pub const BASE: Duration = Duration::from_millis(500);
/// The longest window (the node's former longest delay).
pub const CAP: Duration = Duration::from_secs(30);

/// The delay before retry `attempt` (0 for the first retry after a failure), given `unit`, a
/// uniform draw in [0, 1): `unit · min(cap, base · 2^attempt)`. A draw outside [0, 1] (or NaN)
/// is clamped into it, so the delay never exceeds the window.
pub fn full_jitter(base: Duration, cap: Duration, attempt: u32, unit: f64) -> Duration {
    let window = base.checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX)).map_or(cap, |w| w.min(cap));
    let unit = if unit.is_nan() { 0.0 } else { unit.clamp(0.0, 1.0) };
    window.mul_f64(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_is_a_fraction_of_a_doubling_window_up_to_the_cap() {
        let ms = Duration::from_millis;
        // (attempt, uniform draw, delay)
        let cases: &[(u32, f64, Duration)] = &[
            (0, 0.0, ms(0)),
            (0, 0.5, ms(250)),
            (0, 1.0, ms(500)),
            (1, 1.0, ms(1000)),
            (3, 0.25, ms(1000)),
            (5, 1.0, ms(16_000)),
            // 500 ms · 2^6 = 32 s, above the cap.
            (6, 1.0, ms(30_000)),
            (6, 0.5, ms(15_000)),
            (40, 0.1, ms(3_000)),
            (u32::MAX, 1.0, ms(30_000)),
            (2, -1.0, ms(0)),
            (2, 7.0, ms(2_000)),
            (2, f64::NAN, ms(0)),
        ];
        for &(attempt, unit, want) in cases {
            assert_eq!(full_jitter(BASE, CAP, attempt, unit), want, "attempt {attempt}, draw {unit}");
        }
    }

    #[test]
    fn fifty_nodes_restarting_together_do_not_reconnect_in_lock_step() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..50).map(|_| full_jitter(BASE, CAP, 4, rng.random::<f64>())).collect();
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 45, "{} distinct delays of 50", distinct.len());
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(8)), "within the 8 s window of attempt 4");
    }
}
