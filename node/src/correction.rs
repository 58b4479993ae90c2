//! The strategies' corrections to every local gradient step: FedProx's proximal term and
//! SCAFFOLD's drift correction. Both are added to the step's gradient after it is computed (and,
//! under DP-SGD, after it is clipped and noised):
//!
//! - FedProx (Li et al. 2020): the local objective is ℓ(w) + (μ/2)·‖w − w_global‖², so the
//!   gradient gains μ·(w − w_global).
//! - SCAFFOLD (Karimireddy et al. 2020, Algorithm 1 line 10): y ← y − η·(g(y) − cᵢ + c), so the
//!   gradient gains c − cᵢ.
//!
//! **Privacy.** Neither term reads the data: w is the current iterate (already a function of the
//! earlier noised steps), w_global and c come from the coordinator, and cᵢ is a function of this
//! node's earlier releases ([`crate::scaffold`]). Under DP-SGD each step is still the Gaussian
//! mechanism on the clipped sum followed by post-processing, so the accountant's ε is unchanged.

use sanctum_protocol::model::Weights;
use tch::{Device, TchError, Tensor};

/// The terms a plan adds to each local gradient, tensor by tensor in layout order.
#[derive(Default)]
pub struct Correction {
    /// FedProx: μ and the global model's tensors.
    prox: Option<(f64, Vec<Tensor>)>,
    /// SCAFFOLD: c − cᵢ.
    drift: Option<Vec<Tensor>>,
}

fn tensors(weights: &Weights, device: Device) -> Result<Vec<Tensor>, TchError> {
    weights
        .tensors()
        .map(|(t, v)| {
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            Tensor::f_from_slice(v)?.f_view(shape.as_slice())?.f_to_device(device)
        })
        .collect()
}

impl Correction {
    /// No correction (FedAvg and the server-side strategies).
    pub fn none() -> Self {
        Self::default()
    }

    /// FedProx's proximal term around `global`; μ = 0 adds nothing.
    pub fn proximal(mu: f64, global: &Weights, device: Device) -> Result<Self, TchError> {
        if mu == 0.0 {
            return Ok(Self::none());
        }
        Ok(Self { prox: Some((mu, tensors(global, device)?)), drift: None })
    }

    /// SCAFFOLD's correction c − cᵢ, given as weights in the model's layout.
    pub fn drift(c_minus_ci: &Weights, device: Device) -> Result<Self, TchError> {
        Ok(Self { prox: None, drift: Some(tensors(c_minus_ci, device)?) })
    }

    /// Whether there is anything to add.
    pub fn is_none(&self) -> bool {
        self.prox.is_none() && self.drift.is_none()
    }

    /// The term for the `k`-th parameter at its current value `p`, or `None`.
    pub fn term(&self, k: usize, p: &Tensor) -> Result<Option<Tensor>, TchError> {
        let mut term: Option<Tensor> = None;
        if let Some((mu, anchor)) = &self.prox
            && let Some(a) = anchor.get(k)
        {
            term = Some(tch::no_grad(|| p.f_detach()?.f_sub(a)?.f_mul_scalar(*mu))?);
        }
        if let Some(d) = self.drift.as_ref().and_then(|d| d.get(k)) {
            term = Some(match term {
                Some(t) => t.f_add(d)?,
                None => d.shallow_clone(),
            });
        }
        Ok(term)
    }

    /// Adds every term to its parameter's gradient (after `backward`, before the optimizer step).
    pub fn add_to_grads(&self, params: &[Tensor]) -> Result<(), TchError> {
        if self.is_none() {
            return Ok(());
        }
        for (k, p) in params.iter().enumerate() {
            if let Some(t) = self.term(k, p)? {
                let mut g = p.grad();
                if g.defined() {
                    tch::no_grad(|| g.f_add_(&t).map(|_| ()))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use sanctum_protocol::dataset::Task;
    use sanctum_protocol::plan::Plan;

    use super::*;
    use crate::data::LocalData;
    use crate::train::train_round;

    const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn plan(steps: u32, lr: f64) -> Plan {
        Plan::parse(&format!(
            "name='t'\nrounds=1\nmin_nodes=1\n[model]\nkind='logistic_regression'\ninputs=2\n[data]\nschema='s'\nschema_sha256='{ZERO}'\n[local]\nsteps={steps}\nbatch_size=8\nlearning_rate={lr}\n[strategy]\nkind='fedavg'\n"
        ))
        .unwrap()
    }

    fn data() -> LocalData {
        let train_x: Vec<f32> = (0..8).flat_map(|i| [i as f32 / 4.0 - 1.0, (i % 3) as f32]).collect();
        let train_y: Vec<f32> = (0..8).map(|i| f32::from(u8::from(i % 2 == 0))).collect();
        LocalData {
            features: 2,
            train_mean: vec![0.0; 2],
            train_std: vec![1.0; 2],
            test_x: train_x.clone(),
            test_y: train_y.clone(),
            train_x,
            train_y,
            task: Task::Binary,
            train_event: vec![],
            test_event: vec![],
            dropped: Default::default(),
        }
    }

    fn close(a: &[f32], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((f64::from(*x) - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    /// One full-batch SGD step: Δ = −η·(g(w₀) + d), so the drift moves the update by exactly −η·d.
    #[test]
    fn scaffold_drift_shifts_every_step_by_c_minus_ci() {
        let (p, d) = (plan(1, 0.5), data());
        let w = p.model.init(3);
        let plain = train_round(&p, &w, &d, Device::Cpu, 1, None, &Correction::none()).unwrap();
        let drift = Weights::new(w.layout().to_vec(), vec![0.25, -1.0, 2.0]).unwrap();
        let corrected =
            train_round(&p, &w, &d, Device::Cpu, 1, None, &Correction::drift(&drift, Device::Cpu).unwrap()).unwrap();
        let want: Vec<f64> =
            plain.delta.iter().zip(drift.values()).map(|(a, c)| f64::from(*a) - 0.5 * f64::from(*c)).collect();
        close(&corrected.delta, &want);
    }

    /// Two full-batch steps: the proximal term is 0 at the global model, then μ·Δ₁ at w₁, so
    /// FedProx's update is FedAvg's minus η·μ·Δ₁ (w₁ is the same in both).
    #[test]
    fn fedprox_pulls_the_second_step_back_towards_the_global_model() {
        let (d, mu, lr) = (data(), 0.8, 0.5);
        let w = plan(1, lr).model.init(3);
        let first = train_round(&plan(1, lr), &w, &d, Device::Cpu, 1, None, &Correction::none()).unwrap();
        let p2 = plan(2, lr);
        let plain = train_round(&p2, &w, &d, Device::Cpu, 1, None, &Correction::none()).unwrap();
        let prox = Correction::proximal(mu, &w, Device::Cpu).unwrap();
        let proximal = train_round(&p2, &w, &d, Device::Cpu, 1, None, &prox).unwrap();
        let want: Vec<f64> =
            plain.delta.iter().zip(&first.delta).map(|(a, d1)| f64::from(*a) - lr * mu * f64::from(*d1)).collect();
        close(&proximal.delta, &want);
        assert!(Correction::proximal(0.0, &w, Device::Cpu).unwrap().is_none(), "μ = 0 is FedAvg");
    }
}
