//! SCAFFOLD's server step (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
//! Federated Learning", ICML 2020, Algorithm 1).
//!
//! The global model carries the server control variate c after the model's own tensors
//! (`Plan::global_layout`), so c is published, checkpointed and content-addressed with the model,
//! and each update carries (Δyᵢ, Δcᵢ) in the same order. With Δ the combined update of the P
//! model coordinates and the P control-variate ones:
//!   x ← x + η_g·Δ_y,   c ← c + (|S|/N)·Δ_c,
//! where |S| is the number of updates combined and N the round's participants. The paper averages
//! uniformly; with `weighting = "samples"` both halves are the sample-weighted mean, so c tracks
//! the sample-weighted mean of the cᵢ, the same weights the global objective gives each hospital.
//! No state of its own beyond the model.

use super::{RoundShape, ServerStrategy};

#[derive(Debug)]
pub struct Scaffold {
    server_learning_rate: f64,
    /// P: the model's own coordinates; those from P on are c.
    model_params: usize,
}

impl Scaffold {
    /// `num_params` counts the global model with its control variate (2P).
    pub fn new(server_learning_rate: f64, num_params: usize) -> Self {
        Self { server_learning_rate, model_params: num_params / 2 }
    }
}

impl ServerStrategy for Scaffold {
    fn state_len(&self) -> usize {
        0
    }

    fn state(&self) -> Vec<f64> {
        Vec::new()
    }

    fn load_state(&mut self, _values: &[f64]) {}

    fn weight(&self, i: usize, w: f32, d: f64, round: RoundShape) -> f32 {
        let scale = if i < self.model_params {
            self.server_learning_rate
        } else {
            round.reported as f64 / round.participants.max(1) as f64
        };
        (f64::from(w) + scale * d) as f32
    }

    fn commit(&mut self, _i: usize, _d: f64, _round: RoundShape) {}
}
