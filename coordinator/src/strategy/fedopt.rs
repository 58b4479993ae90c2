//! The adaptive server optimizers of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021),
//! Algorithm 2: the mean update Δ is a pseudo-gradient; m ← β1·m + (1−β1)·Δ, then
//! FedAdagrad v ← v + Δ², FedAdam v ← β2·v + (1−β2)·Δ², FedYogi v ← v − (1−β2)·Δ²·sign(v − Δ²),
//! and w ← w + η·m/(√v + τ). v starts at τ² as in the paper; no bias correction (as the paper and
//! FLamby's `FedOpt`).

use sanctum_protocol::plan::ServerOptimizer;

use super::{RoundShape, ServerStrategy};

/// Which second-moment rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondMoment {
    Adam,
    Yogi,
    Adagrad,
}

#[derive(Debug)]
pub struct FedOpt {
    rule: SecondMoment,
    o: ServerOptimizer,
    /// First moment of the pseudo-gradient.
    m: Vec<f64>,
    /// Second moment, started at τ².
    v: Vec<f64>,
}

impl FedOpt {
    pub fn new(rule: SecondMoment, o: ServerOptimizer, num_params: usize) -> Self {
        let tau2 = o.tau * o.tau;
        Self { rule, o, m: vec![0.0; num_params], v: vec![tau2; num_params] }
    }

    /// Coordinate `i`'s new weight and moments.
    fn coordinate(&self, i: usize, w: f32, d: f64) -> (f32, f64, f64) {
        let (m, v) = (self.m.get(i).copied().unwrap_or(0.0), self.v.get(i).copied().unwrap_or(0.0));
        let o = &self.o;
        let m = o.beta1 * m + (1.0 - o.beta1) * d;
        let d2 = d * d;
        let v = match self.rule {
            SecondMoment::Adam => o.beta2 * v + (1.0 - o.beta2) * d2,
            SecondMoment::Yogi => v - (1.0 - o.beta2) * d2 * (v - d2).signum(),
            SecondMoment::Adagrad => v + d2,
        };
        let step = o.server_learning_rate * m / (v.sqrt() + o.tau);
        ((f64::from(w) + step) as f32, m, v)
    }
}

impl ServerStrategy for FedOpt {
    fn state_len(&self) -> usize {
        self.m.len() + self.v.len()
    }

    /// m then v.
    fn state(&self) -> Vec<f64> {
        self.m.iter().chain(&self.v).copied().collect()
    }

    fn load_state(&mut self, values: &[f64]) {
        let (m, v) = values.split_at(self.m.len());
        self.m.copy_from_slice(m);
        self.v.copy_from_slice(v);
    }

    fn weight(&self, i: usize, w: f32, d: f64, _round: RoundShape) -> f32 {
        self.coordinate(i, w, d).0
    }

    fn commit(&mut self, i: usize, d: f64, _round: RoundShape) {
        let (_, m, v) = self.coordinate(i, 0.0, d);
        if let (Some(mi), Some(vi)) = (self.m.get_mut(i), self.v.get_mut(i)) {
            (*mi, *vi) = (m, v);
        }
    }
}
