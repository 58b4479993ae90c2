//! Coordinate-wise median (Yin et al., ICML 2018): on each coordinate, the middle of the round's
//! n values (for even n, the mean of the two middle ones), unweighted. Up to ⌈n/2⌉ − 1 arbitrary
//! updates cannot move a coordinate outside the range of the honest ones.

use super::robust::{RobustError, RobustRule, UpdateSource, coordinatewise};

#[derive(Debug, Clone, Copy)]
pub struct Median;

/// The median of `values` (finite, at least one), reordering them.
pub fn median(values: &mut [f32]) -> f64 {
    values.sort_unstable_by(f32::total_cmp);
    let n = values.len();
    if n % 2 == 1 { f64::from(values[n / 2]) } else { (f64::from(values[n / 2 - 1]) + f64::from(values[n / 2])) / 2.0 }
}

impl RobustRule for Median {
    fn name(&self) -> &'static str {
        "median"
    }

    fn combine(&self, updates: &dyn UpdateSource, block: usize) -> Result<Vec<f64>, RobustError> {
        coordinatewise(updates, block, median)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::robust::InMemory;

    #[test]
    fn odd_n_takes_the_middle_value_and_even_n_the_mean_of_the_two_middle_ones() {
        let odd = InMemory::uniform(vec![vec![1.0, -4.0], vec![100.0, 2.0], vec![3.0, 0.5]]);
        // Coordinate 0: {1, 100, 3} → 3; coordinate 1: {-4, 2, 0.5} → 0.5.
        assert_eq!(Median.combine(&odd, 1).unwrap(), [3.0, 0.5]);
        let even = InMemory::uniform(vec![vec![1.0], vec![100.0], vec![3.0], vec![-7.0]]);
        // {-7, 1, 3, 100} → (1 + 3) / 2.
        assert_eq!(Median.combine(&even, 4).unwrap(), [2.0]);
        assert!(matches!(Median.combine(&InMemory::uniform(vec![]), 4), Err(RobustError::NoUpdate)));
    }
}
