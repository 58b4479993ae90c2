//! FedAvgM (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data Distribution
//! for Federated Visual Classification"): server momentum on the mean update,
//! v ← β·v + Δ, w ← w + η·v, with v starting at 0 (Flower's `FedAvgM` and FedJAX's server
//! momentum use the same form). With β = 0 and η = 1 it is FedAvg.

use super::{RoundShape, ServerStrategy};

#[derive(Debug)]
pub struct FedAvgM {
    server_learning_rate: f64,
    momentum: f64,
    velocity: Vec<f64>,
}

impl FedAvgM {
    pub fn new(server_learning_rate: f64, momentum: f64, num_params: usize) -> Self {
        Self { server_learning_rate, momentum, velocity: vec![0.0; num_params] }
    }

    fn next_velocity(&self, i: usize, d: f64) -> f64 {
        self.momentum * self.velocity.get(i).copied().unwrap_or(0.0) + d
    }
}

impl ServerStrategy for FedAvgM {
    fn state_len(&self) -> usize {
        self.velocity.len()
    }

    fn state(&self) -> Vec<f64> {
        self.velocity.clone()
    }

    fn load_state(&mut self, values: &[f64]) {
        self.velocity.copy_from_slice(values);
    }

    fn weight(&self, i: usize, w: f32, d: f64, _round: RoundShape) -> f32 {
        (f64::from(w) + self.server_learning_rate * self.next_velocity(i, d)) as f32
    }

    fn commit(&mut self, i: usize, d: f64, _round: RoundShape) {
        let v = self.next_velocity(i, d);
        if let Some(slot) = self.velocity.get_mut(i) {
            *slot = v;
        }
    }
}
