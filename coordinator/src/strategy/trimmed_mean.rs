//! Coordinate-wise trimmed mean (Yin et al., ICML 2018): on each coordinate the k = ⌊β·n⌋
//! largest and k smallest of the round's n values are dropped and the other n − 2k averaged,
//! unweighted. β ∈ [0, 0.5) (the plan checks it), so at least one value is left; β = 0 is the
//! plain mean.

use super::robust::{RobustError, RobustRule, UpdateSource, coordinatewise};

#[derive(Debug, Clone, Copy)]
pub struct TrimmedMean {
    /// β: the fraction dropped from each end, in [0, 0.5).
    pub trim: f64,
}

impl TrimmedMean {
    /// Values dropped from each end of a coordinate's n: ⌊β·n⌋, and never so many that none is left.
    pub fn dropped(&self, n: usize) -> usize {
        let k = (self.trim * n as f64).floor();
        // β < 0.5 gives 2k < n; the clamp holds even for a β the plan did not check.
        if k.is_finite() && k > 0.0 { (k as usize).min(n.saturating_sub(1) / 2) } else { 0 }
    }
}

impl RobustRule for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed_mean"
    }

    fn combine(&self, updates: &dyn UpdateSource, block: usize) -> Result<Vec<f64>, RobustError> {
        let k = self.dropped(updates.count());
        coordinatewise(updates, block, |values| {
            values.sort_unstable_by(f32::total_cmp);
            let kept = &values[k..values.len() - k];
            kept.iter().map(|v| f64::from(*v)).sum::<f64>() / kept.len() as f64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::robust::InMemory;

    #[test]
    fn the_floor_of_beta_n_largest_and_smallest_are_dropped_per_coordinate() {
        // n = 5, β = 0.2 → k = 1. Coordinate 0: {-50, 1, 2, 3, 90} → mean(1, 2, 3) = 2;
        // coordinate 1: {0, 0, 1, 1, 10} → mean(0, 1, 1) = 2/3.
        let u =
            InMemory::uniform(vec![vec![1.0, 10.0], vec![-50.0, 0.0], vec![2.0, 1.0], vec![90.0, 0.0], vec![3.0, 1.0]]);
        let got = TrimmedMean { trim: 0.2 }.combine(&u, 1).unwrap();
        assert_eq!(got[0], 2.0);
        assert!((got[1] - 2.0 / 3.0).abs() < 1e-12, "{got:?}");
        // β = 0.19: ⌊0.95⌋ = 0, nothing dropped: the plain mean (-50+1+2+3+90)/5 = 9.2.
        let got = TrimmedMean { trim: 0.19 }.combine(&u, 2).unwrap();
        assert!((got[0] - 9.2).abs() < 1e-12, "{got:?}");
        assert_eq!(TrimmedMean { trim: 0.49 }.dropped(4), 1);
        assert_eq!(TrimmedMean { trim: 0.49 }.dropped(2), 0);
    }
}
