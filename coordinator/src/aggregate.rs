//! Streaming aggregation and the server optimizers, as plain arithmetic with no I/O.
//!
//! Updates are folded into one running weighted sum as each one is admitted, so memory is
//! O(model size) whatever the number of nodes. The server optimizer then moves the global model
//! by the weighted mean update (FedAvg) or uses it as a pseudo-gradient for FedAdam, FedYogi or
//! FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

use sanctum_protocol::plan::{AdaptiveClipping, ServerOptimizer, Strategy};

/// Why an update cannot be folded in.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum AggregateError {
    #[error("update has {got} parameters, the model has {want}")]
    Shape { got: usize, want: usize },
    #[error("update contains a non-finite value (NaN or infinity) at parameter {index}")]
    NonFinite { index: usize },
    #[error("aggregation weight {0} is not a positive finite number")]
    Weight(f64),
}

/// A running weighted sum of updates, in f64 so the order of arrival barely matters.
#[derive(Debug)]
pub struct Accumulator {
    sum: Vec<f64>,
    total_weight: f64,
    count: usize,
}

impl Accumulator {
    /// An empty sum for a model of `num_params` scalars.
    pub fn new(num_params: usize) -> Self {
        Self { sum: vec![0.0; num_params], total_weight: 0.0, count: 0 }
    }

    /// Checks an update without folding it in: shape and finiteness.
    pub fn check(&self, update: &[f32]) -> Result<(), AggregateError> {
        if update.len() != self.sum.len() {
            return Err(AggregateError::Shape { got: update.len(), want: self.sum.len() });
        }
        if let Some(index) = update.iter().position(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite { index });
        }
        Ok(())
    }

    /// Folds in one update with its weight; nothing changes if it is refused.
    pub fn add(&mut self, update: &[f32], weight: f64) -> Result<(), AggregateError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::Weight(weight));
        }
        self.check(update)?;
        for (s, u) in self.sum.iter_mut().zip(update) {
            *s += weight * f64::from(*u);
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    /// How many updates were folded in.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The running weighted sum.
    pub fn sum(&self) -> &[f64] {
        &self.sum
    }

    /// The weighted mean update, or `None` when nothing was added.
    pub fn mean(&self) -> Option<Vec<f64>> {
        if self.count == 0 {
            return None;
        }
        Some(self.sum.iter().map(|s| s / self.total_weight).collect())
    }
}

/// Client-level DP at the coordinator (DP-FedAvg, McMahan et al. 2018), with fixed or adaptive
/// clipping (Andrew et al. 2021).
///
/// Each admitted update is scaled to norm at most C; at the end of the round the sum gets
/// N(0, (σ_Δ·C)²) noise on every coordinate and is divided by the number of participants the
/// round opened with (public, unlike the number that reported). With adaptive clipping the count
/// of updates that needed no clipping is released with N(0, σ_b²) noise and moves C towards the
/// target quantile: C ← C·exp(−η·(b̃ − γ)); the update noise is σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2), so
/// the pair is exactly as private as one Gaussian release with the plan's σ.
#[derive(Debug)]
pub struct ClientDp {
    clip: f64,
    update_sigma: f64,
    adaptive: Option<AdaptiveClipping>,
    /// Updates this round whose norm was at most the clip norm.
    unclipped: u64,
}

impl ClientDp {
    /// `sigma` is the plan's noise multiplier; adaptive clipping needs 2σ_b > σ.
    pub fn new(sigma: f64, clip: f64, adaptive: Option<AdaptiveClipping>) -> Result<Self, String> {
        let update_sigma = match &adaptive {
            None => sigma,
            Some(a) => {
                let rest = sigma.powi(-2) - (2.0 * a.count_noise_multiplier).powi(-2);
                if rest <= 0.0 {
                    return Err(format!(
                        "adaptive clipping's count_noise_multiplier {} must exceed half the noise multiplier {sigma}",
                        a.count_noise_multiplier
                    ));
                }
                rest.powf(-0.5)
            }
        };
        Ok(Self { clip, update_sigma, adaptive, unclipped: 0 })
    }

    /// The clip norm this round uses.
    pub fn clip_norm(&self) -> f64 {
        self.clip
    }

    /// The noise multiplier applied to the sum of updates.
    pub fn update_noise_multiplier(&self) -> f64 {
        self.update_sigma
    }

    /// Scales `update` to norm at most C; returns its norm before clipping.
    pub fn clip(&mut self, update: &mut [f32]) -> f64 {
        let norm = update.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        if norm <= self.clip {
            self.unclipped += 1;
        } else {
            let scale = self.clip / norm;
            for v in update.iter_mut() {
                *v = (f64::from(*v) * scale) as f32;
            }
        }
        norm
    }

    /// The noised mean of the round's clipped updates; `gaussian(std)` draws N(0, std²).
    /// Adapts the clip norm for the next round.
    pub fn release(&mut self, sum: &[f64], participants: usize, gaussian: &mut dyn FnMut(f64) -> f64) -> Vec<f64> {
        let n = participants.max(1) as f64;
        let std = self.update_sigma * self.clip;
        let mean = sum.iter().map(|s| (s + gaussian(std)) / n).collect();
        if let Some(a) = &self.adaptive {
            let b = (self.unclipped as f64 + gaussian(a.count_noise_multiplier)) / n;
            self.clip *= (-a.learning_rate * (b - a.target_quantile)).exp();
        }
        self.unclipped = 0;
        mean
    }
}

/// The server-side optimizer state that lives across rounds.
#[derive(Debug)]
pub struct ServerState {
    strategy: Strategy,
    /// First moment of the pseudo-gradient (adaptive strategies only).
    m: Vec<f64>,
    /// Second moment, started at τ² as in Reddi et al.
    v: Vec<f64>,
}

impl ServerState {
    pub fn new(strategy: Strategy, num_params: usize) -> Self {
        // FedAvg keeps no moments: no memory for them either.
        let (n, tau) = match &strategy {
            Strategy::Fedadam(o) | Strategy::Fedyogi(o) | Strategy::Fedadagrad(o) => (num_params, o.tau),
            Strategy::Fedavg { .. } => (0, 0.0),
        };
        Self { strategy, m: vec![0.0; n], v: vec![tau * tau; n] }
    }

    /// Moves the global model by one server step, given the mean update Δ (local − global).
    pub fn step(&mut self, global: &mut [f32], delta: &[f64]) -> Result<(), AggregateError> {
        if delta.len() != global.len() {
            return Err(AggregateError::Shape { got: delta.len(), want: global.len() });
        }
        let (m, v) = (&mut self.m, &mut self.v);
        match &self.strategy {
            Strategy::Fedavg { .. } => {
                for (w, d) in global.iter_mut().zip(delta) {
                    *w = (f64::from(*w) + d) as f32;
                }
            }
            Strategy::Fedadam(o) => adaptive(global, delta, m, v, o, |v, d2, b2| b2 * v + (1.0 - b2) * d2),
            Strategy::Fedyogi(o) => {
                adaptive(global, delta, m, v, o, |v, d2, b2| v - (1.0 - b2) * d2 * (v - d2).signum())
            }
            Strategy::Fedadagrad(o) => adaptive(global, delta, m, v, o, |v, d2, _| v + d2),
        }
        Ok(())
    }
}

/// One adaptive server step: m ← β1·m + (1−β1)·Δ, v ← f(v, Δ²), w ← w + η·m/(√v + τ).
fn adaptive(
    global: &mut [f32],
    delta: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    o: &ServerOptimizer,
    second_moment: impl Fn(f64, f64, f64) -> f64,
) {
    for i in 0..global.len() {
        let d = delta[i];
        m[i] = o.beta1 * m[i] + (1.0 - o.beta1) * d;
        v[i] = second_moment(v[i], d * d, o.beta2);
        let step = o.server_learning_rate * m[i] / (v[i].sqrt() + o.tau);
        global[i] = (f64::from(global[i]) + step) as f32;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use sanctum_protocol::plan::{Strategy, Weighting};

    use super::*;

    fn opt() -> ServerOptimizer {
        ServerOptimizer { server_learning_rate: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3, weighting: Weighting::Samples }
    }

    #[test]
    fn weighted_mean_and_refusals_leave_the_sum_untouched() {
        let mut acc = Accumulator::new(2);
        acc.add(&[1.0, 2.0], 1.0).unwrap();
        assert_eq!(acc.add(&[f32::NAN, 0.0], 1.0), Err(AggregateError::NonFinite { index: 0 }));
        assert_eq!(acc.add(&[1.0], 1.0), Err(AggregateError::Shape { got: 1, want: 2 }));
        assert_eq!(acc.add(&[1.0, 1.0], 0.0), Err(AggregateError::Weight(0.0)));
        acc.add(&[4.0, 5.0], 2.0).unwrap();
        assert_eq!(acc.count(), 2);
        assert_eq!(acc.mean().unwrap(), vec![3.0, 4.0]);
        assert!(Accumulator::new(1).mean().is_none());
    }

    #[test]
    fn fedadam_first_step_matches_hand_computation() {
        let mut s = ServerState::new(Strategy::Fedadam(opt()), 1);
        let mut w = [0.0f32];
        s.step(&mut w, &[0.5]).unwrap();
        // m = 0.05, v = 0.99·1e-6 + 0.01·0.25, step = 0.1·m/(√v + τ)
        let v: f64 = 0.99e-6 + 0.0025;
        let want = 0.1 * 0.05 / (v.sqrt() + 1e-3);
        assert!((f64::from(w[0]) - want).abs() < 1e-6, "{} vs {want}", w[0]);
    }

    #[test]
    fn client_dp_clips_noises_and_adapts() {
        let mut dp = ClientDp::new(1.0, 1.0, None).unwrap();
        let mut a = [3.0f32, 4.0];
        assert_eq!(dp.clip(&mut a), 5.0);
        assert!((a[0] - 0.6).abs() < 1e-6 && (a[1] - 0.8).abs() < 1e-6);
        let mut b = [0.3f32, 0.4];
        dp.clip(&mut b);
        assert_eq!(b, [0.3, 0.4], "an update inside the bound is untouched");
        // Without noise the release is the clipped sum over the participants the round opened with.
        let sum = [0.9, 1.2];
        let mean = dp.release(&sum, 3, &mut |_| 0.0);
        assert!((mean[0] - 0.3).abs() < 1e-12 && (mean[1] - 0.4).abs() < 1e-12);
        // The noise has standard deviation σ·C on every coordinate.
        let mut seen = Vec::new();
        dp.release(&sum, 3, &mut |std| {
            seen.push(std);
            0.0
        });
        assert_eq!(seen, vec![1.0, 1.0]);

        // Adaptive: all updates under the bound with target quantile 0.5 shrinks C.
        let adaptive = AdaptiveClipping { target_quantile: 0.5, learning_rate: 0.2, count_noise_multiplier: 10.0 };
        let mut dp = ClientDp::new(1.0, 1.0, Some(adaptive.clone())).unwrap();
        assert!(dp.update_noise_multiplier() > 1.0, "the count's share of the budget raises the update noise");
        let s2 = 1.0 / (1.0f64.powi(-2) - 20.0f64.powi(-2)).sqrt();
        assert!((dp.update_noise_multiplier() - s2).abs() < 1e-12);
        for _ in 0..4 {
            dp.clip(&mut [0.1f32, 0.1]);
        }
        dp.release(&[0.0, 0.0], 4, &mut |_| 0.0);
        assert!((dp.clip_norm() - (-0.2f64 * 0.5).exp()).abs() < 1e-12, "{}", dp.clip_norm());
        assert!(ClientDp::new(1.0, 1.0, Some(AdaptiveClipping { count_noise_multiplier: 0.4, ..adaptive })).is_err());
    }

    proptest! {
        #[test]
        fn clipped_updates_never_exceed_the_bound(v in prop::collection::vec(-100.0f32..100.0, 1..64), c in 0.01f64..10.0) {
            let mut dp = ClientDp::new(1.0, c, None).unwrap();
            let mut v = v;
            dp.clip(&mut v);
            let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            prop_assert!(norm <= c * (1.0 + 1e-6));
        }
    }

    proptest! {
        #[test]
        fn fedavg_moves_by_exactly_the_weighted_mean(
            updates in prop::collection::vec((prop::collection::vec(-10.0f32..10.0, 4), 1.0f64..100.0), 1..8)
        ) {
            let mut acc = Accumulator::new(4);
            for (u, w) in &updates {
                acc.add(u, *w).unwrap();
            }
            let total: f64 = updates.iter().map(|(_, w)| w).sum();
            let mean = acc.mean().unwrap();
            for (i, m) in mean.iter().enumerate() {
                let want: f64 = updates.iter().map(|(u, w)| f64::from(u[i]) * w).sum::<f64>() / total;
                prop_assert!((m - want).abs() < 1e-9);
            }
            let mut global = [1.0f32; 4];
            ServerState::new(Strategy::Fedavg { weighting: Weighting::Samples }, 4).step(&mut global, &mean).unwrap();
            for i in 0..4 {
                prop_assert!((f64::from(global[i]) - (1.0 + mean[i])).abs() < 1e-5);
            }
        }

        #[test]
        fn adaptive_steps_are_bounded_and_follow_the_sign(d in -5.0f64..5.0) {
            prop_assume!(d.abs() > 1e-3);
            for strat in [Strategy::Fedadam(opt()), Strategy::Fedyogi(opt()), Strategy::Fedadagrad(opt())] {
                let mut s = ServerState::new(strat, 1);
                let mut w = [0.0f32];
                s.step(&mut w, &[d]).unwrap();
                prop_assert_eq!(w[0].signum() as f64, d.signum());
                // |m| ≤ (1−β1)|d| and √v ≥ √(1−β2)|d| bound the first step.
                prop_assert!(f64::from(w[0].abs()) <= 0.1 * 0.1 / 0.01f64.sqrt() + 1e-6);
            }
        }
    }
}
