//! The server steps, strategy by strategy: hand-computed first steps, refusals that change
//! nothing, and properties of the algebra.

use proptest::prelude::*;
use sanctum_protocol::plan::{ServerOptimizer, Strategy, Weighting};

use super::*;
use crate::aggregate::Accumulator;

fn opt() -> ServerOptimizer {
    ServerOptimizer { server_learning_rate: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3, weighting: Weighting::Samples }
}

const ONE: RoundShape = RoundShape { reported: 1, participants: 1 };

#[test]
fn a_step_to_a_non_finite_model_is_refused_and_changes_nothing() {
    // FedAvg: finite f32 weights and a finite mean whose sum leaves f32's range.
    let mut s = ServerState::new(Strategy::Fedavg { weighting: Weighting::Samples }, 3);
    let mut w = [1.0f32, f32::MAX, -2.0];
    let e = s.step(&mut w, &[0.5, f64::from(f32::MAX), 0.0], ONE).unwrap_err();
    assert_eq!(e, AggregateError::NonFiniteModel { index: 1 });
    assert!(e.to_string().contains("not stored or published"), "{e}");
    assert_eq!(w, [1.0, f32::MAX, -2.0], "a refused step leaves every weight as it was");
    // FedAdam: a NaN in the mean (an overflowed sum upstream) poisons m and v; refused, and
    // the moments stay as they were, so the same state still takes a good step.
    let mut s = ServerState::new(Strategy::Fedadam(opt()), 2);
    let mut w = [0.0f32, 0.0];
    assert_eq!(s.step(&mut w, &[0.5, f64::NAN], ONE), Err(AggregateError::NonFiniteModel { index: 1 }));
    assert_eq!(w, [0.0, 0.0]);
    assert_eq!(s.moments_bytes(), ServerState::new(Strategy::Fedadam(opt()), 2).moments_bytes());
    s.step(&mut w, &[0.5, 0.5], ONE).unwrap();
    let mut fresh = ServerState::new(Strategy::Fedadam(opt()), 2);
    let mut w2 = [0.0f32, 0.0];
    fresh.step(&mut w2, &[0.5, 0.5], ONE).unwrap();
    assert_eq!(w, w2, "the refused step left no trace in the optimizer's state");
    // Infinity in Δ for an adaptive step: m/√v is NaN.
    let mut s = ServerState::new(Strategy::Fedyogi(opt()), 1);
    assert!(matches!(s.step(&mut [0.0], &[f64::INFINITY], ONE), Err(AggregateError::NonFiniteModel { .. })));
}

#[test]
fn fedadam_first_step_matches_hand_computation() {
    let mut s = ServerState::new(Strategy::Fedadam(opt()), 1);
    let mut w = [0.0f32];
    s.step(&mut w, &[0.5], ONE).unwrap();
    // m = 0.05, v = 0.99·1e-6 + 0.01·0.25, step = 0.1·m/(√v + τ)
    let v: f64 = 0.99e-6 + 0.0025;
    let want = 0.1 * 0.05 / (v.sqrt() + 1e-3);
    assert!((f64::from(w[0]) - want).abs() < 1e-6, "{} vs {want}", w[0]);
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
        ServerState::new(Strategy::Fedavg { weighting: Weighting::Samples }, 4).step(&mut global, &mean, ONE).unwrap();
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
            s.step(&mut w, &[d], ONE).unwrap();
            prop_assert_eq!(w[0].signum() as f64, d.signum());
            // |m| ≤ (1−β1)|d| and √v ≥ √(1−β2)|d| bound the first step.
            prop_assert!(f64::from(w[0].abs()) <= 0.1 * 0.1 / 0.01f64.sqrt() + 1e-6);
        }
    }
}

#[test]
fn fedavgm_accumulates_momentum_and_survives_a_checkpoint() {
    let s = || Strategy::Fedavgm { server_learning_rate: 0.5, momentum: 0.9, weighting: Weighting::Samples };
    let mut st = ServerState::new(s(), 2);
    let mut w = [0.0f32, 1.0];
    st.step(&mut w, &[1.0, -2.0], ONE).unwrap();
    // v = Δ, w = 0.5·Δ.
    assert_eq!(w, [0.5, 0.0]);
    // A restart from the checkpointed velocity takes the same next step.
    let mut restored = ServerState::with_moments(s(), 2, &st.moments_bytes()).unwrap();
    let mut w2 = w;
    st.step(&mut w, &[1.0, 0.0], ONE).unwrap();
    restored.step(&mut w2, &[1.0, 0.0], ONE).unwrap();
    // v = 0.9·(1, −2) + (1, 0) = (1.9, −1.8); w += 0.5·v.
    assert_eq!(w, [0.5 + 0.95, -0.9]);
    assert_eq!(w, w2);
    assert!(ServerState::with_moments(s(), 3, &st.moments_bytes()).is_err(), "a checkpoint of another size is refused");
    // β = 0, η = 1 is FedAvg.
    let mut m = ServerState::new(
        Strategy::Fedavgm { server_learning_rate: 1.0, momentum: 0.0, weighting: Weighting::Samples },
        1,
    );
    let mut a = ServerState::new(Strategy::Fedavg { weighting: Weighting::Samples }, 1);
    let (mut wm, mut wa) = ([0.25f32], [0.25f32]);
    for d in [0.5, -0.25, 0.125] {
        m.step(&mut wm, &[d], ONE).unwrap();
        a.step(&mut wa, &[d], ONE).unwrap();
    }
    assert_eq!(wm, wa);
}

#[test]
fn scaffold_moves_the_model_by_the_server_rate_and_c_by_the_share_that_reported() {
    let mut s = ServerState::new(Strategy::Scaffold { server_learning_rate: 0.5, weighting: Weighting::Samples }, 4);
    // [x₀, x₁, c₀, c₁]
    let mut g = [1.0f32, 2.0, 0.0, 0.5];
    s.step(&mut g, &[0.5, -1.0, 2.0, 1.0], RoundShape { reported: 3, participants: 4 }).unwrap();
    assert_eq!(g, [1.25, 1.5, 1.5, 1.25], "x += η_g·Δy, c += (3/4)·Δc");
    assert!(s.moments_bytes().is_empty(), "c lives in the global model, not in the optimizer state");
}
