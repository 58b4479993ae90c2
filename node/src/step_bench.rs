//! One model and one batch, to time a plain SGD step against a DP-SGD step on the same work
//! (`cargo bench -p sanctum-node --bench dpsgd`): the node's own layers, clipping and noisy
//! update ([`crate::train`], [`crate::dpsgd`]), without a round around them.

use sanctum_protocol::dataset::Task;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};

use crate::correction::Correction;
use crate::loss::LossTargets;
use crate::noise_pool::NoisePool;
use crate::train::{Net, TrainError, noisy_sgd_update};

/// A model, a random batch and an optimiser, stepped plainly or privately.
pub struct StepBench {
    net: Net,
    params: Vec<Tensor>,
    opt: nn::Optimizer,
    x: Tensor,
    y: Tensor,
    task: Task,
    noise: NoisePool,
}

impl StepBench {
    /// A model from `spec` and a random batch of `batch` examples: binary labels for one output,
    /// class labels for several; the DP step's noise drawn ahead on the cores libtorch leaves free.
    pub fn new(spec: &sanctum_protocol::model::ModelSpec, batch: i64, device: Device) -> Result<Self, TrainError> {
        let net = Net::new(spec, &spec.init(0), device)?;
        let params = net.params();
        let opt = nn::Sgd::default().build(&net.vs, 0.01)?;
        let x = Tensor::f_randn([batch, spec.inputs() as i64], (Kind::Float, device))?;
        let outputs = spec.outputs();
        let task = if outputs == 1 { Task::Binary } else { Task::Multiclass { classes: outputs } };
        let y = Tensor::f_randint(outputs.max(2) as i64, [batch], (Kind::Float, device))?;
        let noise = NoisePool::new(NoisePool::threads_beside_torch(device));
        Ok(Self { net, params, opt, x, y, task, noise })
    }

    /// Forward, mean loss, backward, SGD step.
    pub fn plain_step(&mut self) -> Result<(), TrainError> {
        let out = self.net.forward(&self.x)?;
        let loss = crate::loss::batch_loss(self.task, &out, &LossTargets::Labels(&self.y), None)
            .map_err(|e| TrainError::Model(e.to_string()))?;
        self.opt.zero_grad();
        loss.f_backward()?;
        self.opt.step();
        Ok(())
    }

    /// The clipped per-example sum alone (no noise, no update): the clipping's share of a DP step.
    pub fn clip_only(&mut self, clip_norm: f64) -> Result<(), TrainError> {
        crate::dpsgd::clipped_sum(&self.net, &self.x, &self.y, clip_norm, self.task, None)?;
        Ok(())
    }

    /// Clipped per-example sum by ghost norms, secure Gaussian noise (drawn during the step before,
    /// as in a DP round), SGD step.
    pub fn dp_step(&mut self, noise_multiplier: f64, clip_norm: f64) -> Result<(), TrainError> {
        let sums = crate::dpsgd::clipped_sum(&self.net, &self.x, &self.y, clip_norm, self.task, None)?.grads;
        let batch = self.x.size()[0] as f64;
        noisy_sgd_update(
            &self.params,
            sums,
            (&mut self.noise, noise_multiplier * clip_norm, true),
            batch,
            0.01,
            &Correction::none(),
        )?;
        Ok(())
    }
}
