//! Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer, NeurIPS 2017). With n updates of
//! which at most f are Byzantine (n ≥ 2f + 3), each update i is scored by
//! s(i) = Σ ‖Vᵢ − Vⱼ‖² over its n − f − 2 nearest others j; the m lowest-scored (ties to the
//! earlier slot; m is the plan's `selected`, default and at most n − f) are averaged with the
//! plan's weighting.
//!
//! The n² squared distances (f64) are summed block by block, coordinate after coordinate in the
//! same order whatever the block size, so the selection does not depend on it; a second pass
//! averages the selected updates, block by block again.

use super::robust::{RobustError, RobustRule, UpdateSource, read_blocks};

#[derive(Debug, Clone, Copy)]
pub struct MultiKrum {
    /// f: the Byzantine updates tolerated.
    pub byzantine: usize,
    /// m: the updates averaged; `None` for n − f.
    pub selected: Option<usize>,
}

/// Each update's score and the slots selected, lowest score first.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub scores: Vec<f64>,
    pub selected: Vec<usize>,
}

impl MultiKrum {
    /// Squared L2 distances between every pair of updates, row-major n × n.
    pub fn distances(updates: &dyn UpdateSource, block: usize) -> Result<Vec<f64>, RobustError> {
        let (n, dim, block) = (updates.count(), updates.dim(), block.max(1));
        let mut d = vec![0.0f64; n * n];
        let mut buf = Vec::new();
        let mut start = 0;
        while start < dim {
            let len = block.min(dim - start);
            read_blocks(updates, start, len, &mut buf)?;
            for i in 0..n {
                let a = &buf[i * len..(i + 1) * len];
                for j in i + 1..n {
                    let b = &buf[j * len..(j + 1) * len];
                    let cell = &mut d[i * n + j];
                    for (x, y) in a.iter().zip(b) {
                        let diff = f64::from(*x) - f64::from(*y);
                        *cell += diff * diff;
                    }
                }
            }
            start += len;
        }
        for i in 0..n {
            for j in 0..i {
                d[i * n + j] = d[j * n + i];
            }
        }
        Ok(d)
    }

    /// The scores and the selection; refused when n < 2f + 3.
    pub fn select(&self, updates: &dyn UpdateSource, block: usize) -> Result<Selection, RobustError> {
        let n = updates.count();
        if n == 0 {
            return Err(RobustError::NoUpdate);
        }
        let need = self.byzantine.saturating_mul(2).saturating_add(3);
        if n < need {
            return Err(RobustError::TooFewForKrum { byzantine: self.byzantine, need, got: n });
        }
        let d = Self::distances(updates, block)?;
        // n ≥ 2f + 3, so n − f − 2 ≥ f + 1 ≥ 1 neighbours.
        let neighbours = n - self.byzantine - 2;
        let scores: Vec<f64> = (0..n)
            .map(|i| {
                let mut row: Vec<f64> = (0..n).filter(|j| *j != i).map(|j| d[i * n + j]).collect();
                row.sort_unstable_by(f64::total_cmp);
                row[..neighbours].iter().sum()
            })
            .collect();
        let m = self.selected.unwrap_or(n - self.byzantine).clamp(1, n - self.byzantine);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]).then(a.cmp(b)));
        order.truncate(m);
        Ok(Selection { scores, selected: order })
    }
}

impl RobustRule for MultiKrum {
    fn name(&self) -> &'static str {
        "multi_krum"
    }

    fn combine(&self, updates: &dyn UpdateSource, block: usize) -> Result<Vec<f64>, RobustError> {
        let Selection { selected, .. } = self.select(updates, block)?;
        let total: f64 = selected.iter().map(|s| updates.weight(*s)).sum();
        if !(total.is_finite() && total > 0.0) {
            return Err(RobustError::Weights(total));
        }
        let (dim, block) = (updates.dim(), block.max(1));
        let mut out = vec![0.0f64; dim];
        let mut buf = vec![0.0f32; block.min(dim)];
        for &slot in &selected {
            let w = updates.weight(slot) / total;
            let mut start = 0;
            while start < dim {
                let len = block.min(dim - start);
                let chunk = &mut buf[..len];
                updates.read_block(slot, start, chunk).map_err(|source| RobustError::Read {
                    slot,
                    count: updates.count(),
                    source,
                })?;
                for (o, v) in out[start..start + len].iter_mut().zip(chunk.iter()) {
                    *o += w * f64::from(*v);
                }
                start += len;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::robust::InMemory;

    #[test]
    fn scores_are_sums_of_squared_distances_to_the_nearest_n_minus_f_minus_2() {
        // Five 1-d updates 0, 1, 2, 3, 100 with f = 1: each is scored over its n − f − 2 = 2
        // nearest. 0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 1 = 2; 3: 1 + 4 = 5; 100: 97² + 98² =
        // 9409 + 9604 = 19013. m = n − f = 4 drops 100: mean(0, 1, 2, 3) = 1.5.
        let u = InMemory::uniform(vec![vec![0.0], vec![1.0], vec![2.0], vec![3.0], vec![100.0]]);
        let k = MultiKrum { byzantine: 1, selected: None };
        let s = k.select(&u, 1).unwrap();
        assert_eq!(s.scores, [5.0, 2.0, 2.0, 5.0, 19013.0]);
        assert_eq!(s.selected, [1, 2, 0, 3]);
        assert_eq!(k.combine(&u, 1).unwrap(), [1.5]);
        // m = 2 averages the two best (1 and 2, weights 1 and 3): (1 + 6) / 4 = 1.75.
        let weighted = InMemory { weights: vec![1.0, 1.0, 3.0, 1.0, 1.0], ..u.clone() };
        let k2 = MultiKrum { byzantine: 1, selected: Some(2) };
        assert_eq!(k2.combine(&weighted, 1).unwrap(), [1.75]);
        // Two-dimensional distances: ‖(0,0) − (3,4)‖² = 25.
        let d = MultiKrum::distances(&InMemory::uniform(vec![vec![0.0, 0.0], vec![3.0, 4.0]]), 1).unwrap();
        assert_eq!(d, [0.0, 25.0, 25.0, 0.0]);
    }

    #[test]
    fn fewer_than_2f_plus_3_updates_are_refused_with_the_reason() {
        let u = InMemory::uniform(vec![vec![0.0]; 4]);
        let e = MultiKrum { byzantine: 1, selected: None }.combine(&u, 1).unwrap_err();
        assert!(matches!(e, RobustError::TooFewForKrum { byzantine: 1, need: 5, got: 4 }), "{e:?}");
        assert!(e.to_string().contains("needs at least 2f + 3 = 5 updates, 4 were admitted"), "{e}");
        let z = InMemory { weights: vec![0.0; 4], ..u };
        assert!(matches!(MultiKrum { byzantine: 0, selected: None }.combine(&z, 1), Err(RobustError::Weights(_))));
    }
}
