//! FedAvg's server step (McMahan et al. 2017), also FedProx's (Li et al. 2020: the proximal term
//! lives in each node's local loss, the server averages as FedAvg) and the robust aggregators'
//! (their rule makes Δ; the model moves by it): w ← w + Δ. No state.

use super::{RoundShape, ServerStrategy};

#[derive(Debug)]
pub struct FedAvg;

impl ServerStrategy for FedAvg {
    fn state_len(&self) -> usize {
        0
    }

    fn state(&self) -> Vec<f64> {
        Vec::new()
    }

    fn load_state(&mut self, _values: &[f64]) {}

    fn weight(&self, _i: usize, w: f32, d: f64, _round: RoundShape) -> f32 {
        (f64::from(w) + d) as f32
    }

    fn commit(&mut self, _i: usize, _d: f64, _round: RoundShape) {}
}
