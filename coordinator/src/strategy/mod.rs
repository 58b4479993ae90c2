//! The server side of every aggregation strategy, behind one trait ([`ServerStrategy`]), one
//! file each: FedAvg and FedProx ([`fedavg`]), FedAvgM ([`fedavgm`]), FedAdam, FedYogi and
//! FedAdagrad ([`fedopt`]) and SCAFFOLD ([`scaffold`]). Plain arithmetic, no I/O.
//!
//! A round's updates are first combined into one Δ: the weighted mean ([`crate::aggregate`]'s
//! `Accumulator`, or client-level DP's noised mean), or for the robust aggregators a rule over
//! every update on its own. A strategy then moves the global model by Δ, coordinate by
//! coordinate. [`ServerState::step`] computes every new weight before it writes any: a step that
//! would leave a non-finite weight is refused and changes nothing, model or state.

use sanctum_protocol::plan::Strategy;

use crate::aggregate::AggregateError;

pub mod fedavg;
pub mod fedavgm;
pub mod fedopt;
pub mod median;
pub mod multi_krum;
pub mod robust;
pub mod scaffold;
pub mod trimmed_mean;

/// What a server step knows of its round beyond Δ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundShape {
    /// Updates combined into Δ.
    pub reported: usize,
    /// Participants the round opened with.
    pub participants: usize,
}

/// One strategy's server step: its state across rounds and how one coordinate moves.
pub trait ServerStrategy: Send + std::fmt::Debug {
    /// How many f64s of state the strategy keeps (0 for FedAvg), for a checkpoint.
    fn state_len(&self) -> usize;
    /// The state, in a fixed order, for a checkpoint.
    fn state(&self) -> Vec<f64>;
    /// Loads a checkpoint's state; `values` has exactly [`ServerStrategy::state_len`] entries.
    fn load_state(&mut self, values: &[f64]);
    /// Coordinate `i`'s new weight, given its weight `w` and its combined update `d`, without
    /// writing any state.
    fn weight(&self, i: usize, w: f32, d: f64, round: RoundShape) -> f32;
    /// Records coordinate `i`'s state after the step was accepted.
    fn commit(&mut self, i: usize, d: f64, round: RoundShape);
}

/// The plan's strategy, with its server state.
pub fn server_strategy(strategy: &Strategy, num_params: usize) -> Box<dyn ServerStrategy> {
    match strategy {
        Strategy::Fedavg { .. }
        | Strategy::Fedprox { .. }
        | Strategy::Median
        | Strategy::TrimmedMean { .. }
        | Strategy::MultiKrum { .. } => Box::new(fedavg::FedAvg),
        Strategy::Fedavgm { server_learning_rate, momentum, .. } => {
            Box::new(fedavgm::FedAvgM::new(*server_learning_rate, *momentum, num_params))
        }
        Strategy::Fedadam(o) => Box::new(fedopt::FedOpt::new(fedopt::SecondMoment::Adam, o.clone(), num_params)),
        Strategy::Fedyogi(o) => Box::new(fedopt::FedOpt::new(fedopt::SecondMoment::Yogi, o.clone(), num_params)),
        Strategy::Fedadagrad(o) => Box::new(fedopt::FedOpt::new(fedopt::SecondMoment::Adagrad, o.clone(), num_params)),
        Strategy::Scaffold { server_learning_rate, .. } => {
            Box::new(scaffold::Scaffold::new(*server_learning_rate, num_params))
        }
    }
}

/// The server-side optimizer state that lives across rounds.
#[derive(Debug)]
pub struct ServerState {
    inner: Box<dyn ServerStrategy>,
}

impl ServerState {
    pub fn new(strategy: Strategy, num_params: usize) -> Self {
        Self { inner: server_strategy(&strategy, num_params) }
    }

    /// The state as bytes (little-endian f64, in the strategy's order), for a checkpoint; empty
    /// for a strategy that keeps none.
    pub fn moments_bytes(&self) -> Vec<u8> {
        self.inner.state().iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// The state a checkpoint saved with [`ServerState::moments_bytes`]; refused unless it holds
    /// exactly the state this strategy keeps for `num_params` parameters.
    pub fn with_moments(strategy: Strategy, num_params: usize, bytes: &[u8]) -> Result<Self, AggregateError> {
        let mut state = Self::new(strategy, num_params);
        let want = state.inner.state_len();
        if bytes.len() != want * 8 {
            return Err(AggregateError::Shape { got: bytes.len() / 8, want });
        }
        let values: Vec<f64> =
            bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        state.inner.load_state(&values);
        Ok(state)
    }

    /// Moves the global model by one server step, given the combined update Δ (local − global).
    ///
    /// Refused, with nothing changed (model and state), when any new weight would not be a finite
    /// f32: the step is computed twice, once to check and once to write, so a refusal costs no
    /// copy of the model (which can be hundreds of MB).
    pub fn step(&mut self, global: &mut [f32], delta: &[f64], round: RoundShape) -> Result<(), AggregateError> {
        if delta.len() != global.len() {
            return Err(AggregateError::Shape { got: delta.len(), want: global.len() });
        }
        for (i, (w, d)) in global.iter().zip(delta).enumerate() {
            // f64 → f32 overflows to ±infinity, which this refuses.
            if !self.inner.weight(i, *w, *d, round).is_finite() {
                return Err(AggregateError::NonFiniteModel { index: i });
            }
        }
        for (i, (w, d)) in global.iter_mut().zip(delta).enumerate() {
            *w = self.inner.weight(i, *w, *d, round);
            self.inner.commit(i, *d, round);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
