//! The model zoo on libtorch (through `tch`), local training and evaluation.
//!
//! Variables are named exactly as the plan's layout names them (`fc.weight`), so a global model
//! from the coordinator loads by name and the update is read back in the same order. Every
//! libtorch call uses tch's fallible `f_*` form: a libtorch error is an error, not a crash.

use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use sanctum_protocol::dataset::Task;
use sanctum_protocol::model::{ModelSpec, TensorSpec, Weights};
use sanctum_protocol::plan::{LocalOptimizer, Plan};
use sanctum_protocol::privacy::noise::SecureGaussian;
use tch::nn::OptimizerConfig;
use tch::{Device, TchError, Tensor, nn};

use crate::correction::Correction;
use crate::data::LocalData;
use crate::loss::LossTargets;
use crate::noise_pool::NoisePool;

/// Why training or evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
    #[error("model: {0}")]
    Model(String),
    #[error("training diverged: the update has non-finite values (lower local.learning_rate)")]
    Diverged,
    #[error("DP-SGD noise: {0}")]
    Noise(#[from] crate::noise_pool::NoiseWorkerPanicked),
}

// The device setting moved to its own module; re-exported so `train::parse_device` still names it.
pub use crate::device::{DeviceError, check_device, device_name, parse_device};

/// One trainable layer: its weight and bias, and what kind of layer the weight's shape says.
pub(crate) enum Layer {
    /// weight [out, in]
    Linear { w: Tensor, b: Tensor },
    /// weight [out, in, k, k]; ReLU, then `pool` = (window, stride) max-pooling when set
    Conv { w: Tensor, b: Tensor, stride: i64, padding: i64, pool: Option<(i64, i64)> },
}

impl Layer {
    pub(crate) fn params(&self) -> [&Tensor; 2] {
        match self {
            Layer::Linear { w, b } | Layer::Conv { w, b, .. } => [w, b],
        }
    }
}

/// A feed-forward net built from a layout of `(…weight, …bias)` pairs, ReLU between layers:
/// 2-D weights are linear layers, 4-D weights convolutions, whose strides, paddings and pools
/// come from the model ([`ModelSpec::conv_geometry`]). Flat feature rows are reshaped to images
/// before the first convolution and flattened again before the first linear layer.
pub(crate) struct Net {
    pub(crate) vs: nn::VarStore,
    pub(crate) layers: Vec<Layer>,
    /// (channels, height, width) of the input image, for CNNs.
    image: Option<[i64; 3]>,
    layout: Vec<TensorSpec>,
}

impl Net {
    pub(crate) fn new(model: &ModelSpec, weights: &Weights, device: Device) -> Result<Self, TrainError> {
        let vs = nn::VarStore::new(device);
        let mut vars = Vec::new();
        for (spec, values) in weights.tensors() {
            let (prefix, leaf) = spec
                .name
                .rsplit_once('.')
                .ok_or_else(|| TrainError::Model(format!("tensor name '{}' has no layer prefix", spec.name)))?;
            let path = prefix.split('.').fold(vs.root(), |p, s| p / s);
            let shape: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
            let mut var = path.f_zeros(leaf, &shape)?;
            let src = Tensor::f_from_slice(values)?.f_view(shape.as_slice())?.f_to_device(device)?;
            tch::no_grad(|| var.f_copy_(&src))?;
            vars.push(var);
        }
        if vars.len() % 2 != 0 {
            return Err(TrainError::Model("layout is not (weight, bias) pairs".into()));
        }
        let mut geometry = model.conv_geometry().into_iter();
        let layers = vars
            .chunks(2)
            .map(|c| {
                let (w, b) = (c[0].shallow_clone(), c[1].shallow_clone());
                match w.size().as_slice() {
                    [_, _] => Ok(Layer::Linear { w, b }),
                    [_, _, _, _] => {
                        let g = geometry.next().ok_or_else(|| {
                            TrainError::Model("the layout has more convolutions than the model".into())
                        })?;
                        // Validated plans keep these within the image's sides; refused, not wrapped.
                        let int = |v: usize| {
                            i64::try_from(v)
                                .map_err(|_| TrainError::Model(format!("convolution figure {v} is too large")))
                        };
                        let pool = match g.pool {
                            Some((k, s)) => Some((int(k)?, int(s)?)),
                            None => None,
                        };
                        Ok(Layer::Conv { w, b, stride: int(g.stride)?, padding: int(g.padding)?, pool })
                    }
                    other => Err(TrainError::Model(format!("weight of shape {other:?} is neither linear nor conv"))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let image = model.image_shape().map(|(c, h, w)| [c as i64, h as i64, w as i64]);
        Ok(Self { vs, layers, image, layout: weights.layout().to_vec() })
    }

    /// Every trainable tensor, in layout order.
    pub(crate) fn params(&self) -> Vec<Tensor> {
        self.layers.iter().flat_map(|l| l.params().map(Tensor::shallow_clone)).collect()
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        Ok(self.forward_recorded(x)?.0)
    }

    /// The forward pass, also returning each layer's input (detached: only its value is needed;
    /// 4-D for convolutions, 2-D for linear layers) and output (in the graph, so gradients with
    /// respect to it can be asked for).
    pub(crate) fn forward_recorded(&self, x: &Tensor) -> Result<(Tensor, Vec<(Tensor, Tensor)>), TchError> {
        let mut h = x.shallow_clone();
        let mut record = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let out = match layer {
                Layer::Conv { w, b, stride, padding, .. } => {
                    if h.dim() == 2 {
                        let [c, hh, ww] =
                            self.image.ok_or_else(|| TchError::Kind("convolution without an image shape".into()))?;
                        h = h.f_view([-1, c, hh, ww])?;
                    }
                    let input = h.f_detach()?;
                    let out = h.f_conv2d(w, Some(b), [*stride, *stride], [*padding, *padding], [1, 1], 1)?;
                    record.push((input, out.shallow_clone()));
                    out
                }
                Layer::Linear { w, b } => {
                    if h.dim() > 2 {
                        h = h.f_flatten(1, -1)?;
                    }
                    let input = h.f_detach()?;
                    let out = h.f_linear(w, Some(b))?;
                    record.push((input, out.shallow_clone()));
                    out
                }
            };
            h = if i + 1 < self.layers.len() { out.f_relu()? } else { out };
            if let Layer::Conv { pool: Some((k, s)), .. } = layer {
                h = h.f_max_pool2d([*k, *k], [*s, *s], [0, 0], [1, 1], false)?;
            }
        }
        Ok((h, record))
    }

    fn weights(&self) -> Result<Weights, TrainError> {
        let mut values = Vec::new();
        for t in self.params() {
            let flat = t.f_detach()?.f_to_device(Device::Cpu)?.f_flatten(0, -1)?;
            values.extend(Vec::<f32>::try_from(&flat)?);
        }
        Weights::new(self.layout.clone(), values).map_err(|e| TrainError::Model(e.to_string()))
    }
}

/// The model a round trains: one of the zoo's, or a hospital-approved TorchScript module.
pub(crate) enum Model {
    Zoo(Net),
    Script(Box<crate::torchscript::ScriptNet>),
}

impl Model {
    /// The plan's model at `weights`; a TorchScript model is loaded from `script`, the file this
    /// node fetched by hash and checked when it accepted the plan.
    pub(crate) fn build(
        spec: &ModelSpec,
        weights: &Weights,
        device: Device,
        script: Option<&std::path::Path>,
    ) -> Result<Self, TrainError> {
        match (spec, script) {
            (ModelSpec::Torchscript(t), Some(path)) => {
                let net = crate::torchscript::ScriptNet::load(path, t, weights, device)
                    .map_err(|e| TrainError::Model(e.to_string()))?;
                Ok(Model::Script(Box::new(net)))
            }
            (ModelSpec::Torchscript(t), None) => {
                Err(TrainError::Model(format!("TorchScript model {} was not fetched", t.sha256)))
            }
            (spec, _) => Ok(Model::Zoo(Net::new(spec, weights, device)?)),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        match self {
            Model::Zoo(n) => n.forward(x),
            Model::Script(s) => s.forward(x),
        }
    }

    fn var_store(&self) -> &nn::VarStore {
        match self {
            Model::Zoo(n) => &n.vs,
            Model::Script(s) => s.var_store(),
        }
    }

    fn params(&self) -> Vec<Tensor> {
        match self {
            Model::Zoo(n) => n.params(),
            Model::Script(s) => s.params(),
        }
    }

    fn weights(&self) -> Result<Weights, TrainError> {
        match self {
            Model::Zoo(n) => n.weights(),
            Model::Script(s) => s.weights().map_err(|e| TrainError::Model(e.to_string())),
        }
    }

    /// Evaluation mode (a TorchScript module's `train(False)`: dropout off).
    fn eval_mode(&mut self) -> Result<(), TchError> {
        match self {
            Model::Zoo(_) => Ok(()),
            Model::Script(s) => s.set_training(false),
        }
    }

    /// Σᵢ min(1, C/‖∇ℓᵢ‖)·∇ℓᵢ over the batch: ghost clipping for the zoo, one backward pass per
    /// example for a TorchScript module (whose layers we cannot see into). With it, the batch's
    /// outputs where the clipping's forward pass had them (the zoo's), detached.
    fn clipped_sum(
        &self,
        x: &Tensor,
        y: &Tensor,
        clip: f64,
        task: Task,
        weights: Option<&[f64]>,
    ) -> Result<(Vec<Tensor>, Option<Tensor>), TrainError> {
        match self {
            Model::Zoo(n) => {
                let sum = crate::dpsgd::clipped_sum(n, x, y, clip, task, weights)?;
                Ok((sum.grads, Some(sum.logits)))
            }
            Model::Script(s) => {
                let loss = |out: &Tensor, row: i64| -> Result<Tensor, TchError> {
                    let yi = y.f_narrow(0, row, 1)?;
                    crate::loss::per_example_loss(task, out, &LossTargets::Labels(&yi), weights).map_err(|e| match e {
                        crate::loss::LossError::Torch(t) => t,
                        other => TchError::Kind(other.to_string()),
                    })
                };
                Ok((s.clipped_sum_by_microbatches(x, &loss, clip)?.0, None))
            }
        }
    }
}

pub(crate) fn matrix(values: &[f32], cols: usize, device: Device) -> Result<Tensor, TchError> {
    let rows = (values.len() / cols.max(1)) as i64;
    Tensor::f_from_slice(values)?.f_view([rows, cols as i64])?.f_to_device(device)
}

/// The task's metrics on the local test split, in the task's order (the first is its headline
/// metric), and the split's size.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub metrics: Vec<(&'static str, f64)>,
    pub samples: u64,
}

impl Evaluation {
    /// The headline metric, if it is defined on this split.
    pub fn primary(&self) -> Option<f64> {
        self.metrics.first().map(|(_, v)| *v)
    }

    /// One metric by name.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

/// The model's outputs on the local test split, row-major `[n, outputs]`.
pub fn test_outputs(
    model: &ModelSpec,
    weights: &Weights,
    data: &LocalData,
    device: Device,
    script: Option<&std::path::Path>,
) -> Result<Vec<f32>, TrainError> {
    let mut net = Model::build(model, weights, device, script)?;
    net.eval_mode()?;
    let x = matrix(&data.test_x, data.features, device)?;
    let out = tch::no_grad(|| net.forward(&x))?;
    let flat = out.f_to_device(Device::Cpu)?.f_contiguous()?.f_view([-1])?;
    Ok(Vec::<f32>::try_from(&flat)?)
}

/// The task's metrics ([`crate::scores::task_metrics`]) of a model on the local test split.
pub fn evaluate(
    model: &ModelSpec,
    weights: &Weights,
    data: &LocalData,
    device: Device,
    script: Option<&std::path::Path>,
) -> Result<Evaluation, TrainError> {
    let outputs = test_outputs(model, weights, data, device, script)?;
    let targets = match data.task {
        Task::Survival => crate::scores::Targets::Survival { time: &data.test_y, event: &data.test_event },
        _ => crate::scores::Targets::Labels(&data.test_y),
    };
    let metrics =
        crate::scores::task_metrics(data.task, &outputs, &targets).map_err(|e| TrainError::Model(e.to_string()))?;
    Ok(Evaluation { metrics, samples: data.test_len() as u64 })
}

/// The class weights a plan asks for on this node's data: declared ones as they are; balanced
/// ones as scikit-learn's `class_weight="balanced"`, n / (k · n_c) over the train split (a class
/// absent here gets the weight of one example). Only classification tasks have any.
pub fn class_weights(plan: &Plan, data: &LocalData) -> Option<Vec<f64>> {
    use sanctum_protocol::plan::{ClassWeights, WeightRule};
    let classes = match data.task {
        Task::Binary => 2,
        Task::Multiclass { classes } => classes,
        Task::Regression | Task::Survival => return None,
    };
    match plan.local.class_weights.as_ref()? {
        ClassWeights::Declared(w) => Some(w.clone()),
        ClassWeights::Rule(WeightRule::Balanced) => {
            let mut counts = vec![0u64; classes];
            for &y in &data.train_y {
                if let Some(c) = counts.get_mut(y as usize) {
                    *c += 1;
                }
            }
            let n = data.train_len() as f64;
            Some(counts.iter().map(|&c| n / (classes as f64 * c.max(1) as f64)).collect())
        }
    }
}

/// A batch's targets as tensors: labels, or survival times and events.
pub(crate) struct BatchTargets {
    y: Tensor,
    event: Option<Tensor>,
}

impl BatchTargets {
    fn of(data: &LocalData, device: Device) -> Result<Self, TchError> {
        let y = Tensor::f_from_slice(&data.train_y)?.f_to_device(device)?;
        let event = if data.task == Task::Survival {
            let e: Vec<f32> = data.train_event.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
            Some(Tensor::f_from_slice(&e)?.f_to_device(device)?)
        } else {
            None
        };
        Ok(Self { y, event })
    }

    fn select(&self, idx: &Tensor) -> Result<Self, TchError> {
        Ok(Self {
            y: self.y.f_index_select(0, idx)?,
            event: self.event.as_ref().map(|e| e.f_index_select(0, idx)).transpose()?,
        })
    }

    pub(crate) fn as_loss_targets(&self) -> LossTargets<'_> {
        match &self.event {
            Some(event) => LossTargets::Survival { time: &self.y, event },
            None => LossTargets::Labels(&self.y),
        }
    }
}

/// The task's mean loss on a batch.
fn task_loss(task: Task, out: &Tensor, t: &BatchTargets, weights: Option<&[f64]>) -> Result<Tensor, TrainError> {
    crate::loss::batch_loss(task, out, &t.as_loss_targets(), weights).map_err(|e| TrainError::Model(e.to_string()))
}

/// What one round of local training produced.
pub struct RoundResult {
    /// local − global, in layout order.
    pub delta: Vec<f32>,
    pub mean_loss: f64,
    /// Wall time of the local steps, the model's construction from the global weights included.
    pub seconds: f64,
    /// Wall time of evaluating the starting model, where the caller evaluated it first (the
    /// daemon's round job); 0 otherwise.
    pub evaluate_seconds: f64,
}

/// The update local − global, refused if training diverged.
fn finish_round(
    net: &Model,
    global: &Weights,
    plan: &Plan,
    loss_sum: f64,
    started: Instant,
) -> Result<RoundResult, TrainError> {
    let local = net.weights()?;
    let delta: Vec<f32> = local.values().iter().zip(global.values()).map(|(l, g)| l - g).collect();
    if delta.iter().any(|v| !v.is_finite()) {
        return Err(TrainError::Diverged);
    }
    Ok(RoundResult {
        delta,
        mean_loss: loss_sum / f64::from(plan.local.steps.max(1)),
        seconds: started.elapsed().as_secs_f64(),
        evaluate_seconds: 0.0,
    })
}

/// Runs the plan's local steps from `global` on the train split and returns the update.
/// Batches follow a seeded shuffle per epoch (a DataLoader with `shuffle=True`); the last batch
/// of an epoch may be smaller. `correction` is added to every step's gradient (FedProx, SCAFFOLD).
pub fn train_round(
    plan: &Plan,
    global: &Weights,
    data: &LocalData,
    device: Device,
    seed: u64,
    script: Option<&std::path::Path>,
    correction: &Correction,
) -> Result<RoundResult, TrainError> {
    let started = Instant::now();
    let net = Model::build(&plan.model, global, device, script)?;
    let lr = plan.local.learning_rate;
    let mut opt = match plan.local.optimizer {
        LocalOptimizer::Sgd => nn::Sgd::default().build(net.var_store(), lr)?,
        LocalOptimizer::Adam => nn::Adam::default().build(net.var_store(), lr)?,
    };
    let x = matrix(&data.train_x, data.features, device)?;
    let targets = BatchTargets::of(data, device)?;
    let weights = class_weights(plan, data);
    let n = data.train_len();
    let batch = plan.local.batch_size as usize;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut order: Vec<i64> = (0..n as i64).collect();
    let mut pos = n;
    let mut loss_sum = 0.0;
    let params = net.params();
    for _ in 0..plan.local.steps {
        if pos >= n {
            order.shuffle(&mut rng);
            pos = 0;
        }
        let end = (pos + batch).min(n);
        let idx = Tensor::f_from_slice(&order[pos..end])?.f_to_device(device)?;
        pos = end;
        let xb = x.f_index_select(0, &idx)?;
        let tb = targets.select(&idx)?;
        let out = net.forward(&xb)?;
        let loss = task_loss(data.task, &out, &tb, weights.as_deref())?;
        opt.zero_grad();
        loss.f_backward()?;
        correction.add_to_grads(&params)?;
        opt.step();
        loss_sum += loss.f_double_value(&[])?;
    }
    finish_round(&net, global, plan, loss_sum, started)
}

/// The DP-SGD settings a node derived for a plan from its own data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpSetup {
    /// Poisson sampling rate q = batch_size / train examples (at most 1).
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
    pub clip_norm: f64,
}

/// One round of DP-SGD from `global`: each step samples every training example independently
/// with probability q, clips each example's gradient to `clip_norm` (ghost clipping, see
/// [`crate::dpsgd`]), adds N(0, (σ·C)²) noise from the OS-seeded CSPRNG to the sum, divides by
/// the expected batch size q·n, and takes an SGD step. Each step's noise is drawn while the step
/// before it computes ([`NoisePool`]). Batches are drawn from the secure stream too, so a DP
/// round is deliberately not reproducible from the plan's seed.
pub fn train_round_dp(
    plan: &Plan,
    global: &Weights,
    data: &LocalData,
    device: Device,
    dp: &DpSetup,
    script: Option<&std::path::Path>,
    correction: &Correction,
) -> Result<RoundResult, TrainError> {
    let started = Instant::now();
    let net = Model::build(&plan.model, global, device, script)?;
    let x = matrix(&data.train_x, data.features, device)?;
    let targets = BatchTargets::of(data, device)?;
    if targets.event.is_some() {
        // The plan check refuses this first; kept so no caller can clip what has no per-example loss.
        return Err(TrainError::Model(
            "a survival task has no per-example gradient for DP-SGD: use client-level DP".into(),
        ));
    }
    let weights = class_weights(plan, data);
    let n = data.train_len();
    let expected_batch = dp.sampling_rate * n as f64;
    let lr = plan.local.learning_rate;
    let std = dp.noise_multiplier * dp.clip_norm;
    let mut secure = SecureGaussian::from_os();
    let mut noise = NoisePool::new(NoisePool::threads_beside_torch(device));
    let mut loss_sum = 0.0;
    let params = net.params();
    for step in 0..plan.local.steps {
        let idx: Vec<i64> = (0..n as i64).filter(|_| secure.uniform() < dp.sampling_rate).collect();
        let sums: Vec<Tensor> = if idx.is_empty() {
            params.iter().map(|p| p.f_zeros_like()).collect::<Result<_, _>>()?
        } else {
            let idx = Tensor::f_from_slice(&idx)?.f_to_device(device)?;
            let (xb, tb) = (x.f_index_select(0, &idx)?, targets.select(&idx)?);
            let (sums, logits) = net.clipped_sum(&xb, &tb.y, dp.clip_norm, data.task, weights.as_deref())?;
            // The zoo's clipping already ran the forward pass: its outputs give the loss (a
            // TorchScript module's per-example passes do not, so it runs once more).
            loss_sum += tch::no_grad(|| -> Result<f64, TrainError> {
                let out = match logits {
                    Some(out) => out,
                    None => net.forward(&xb)?,
                };
                Ok(task_loss(data.task, &out, &tb, weights.as_deref())?.f_double_value(&[])?)
            })?;
            sums
        };
        let more = step + 1 < plan.local.steps;
        noisy_sgd_update(&params, sums, (&mut noise, std, more), expected_batch, lr, correction)?;
    }
    finish_round(&net, global, plan, loss_sum, started)
}

/// θ ← θ − lr·((Σ clipped + N(0, std²))/(expected batch) + correction), parameter by parameter:
/// the correction reads no data, so it comes after the noise (see [`crate::correction`]). The
/// noise for every parameter is one buffer from `pool`, which starts drawing the next step's
/// when `more` steps follow.
pub(crate) fn noisy_sgd_update(
    params: &[Tensor],
    sums: Vec<Tensor>,
    (pool, std, more): (&mut NoisePool, f64, bool),
    expected_batch: f64,
    lr: f64,
    correction: &Correction,
) -> Result<(), TrainError> {
    let noise = pool.take(sums.iter().map(Tensor::numel).sum(), std, more)?;
    let mut rest = noise.as_slice();
    for (k, (p, sum)) in params.iter().zip(sums).enumerate() {
        let (mine, after) = rest.split_at(sum.numel());
        rest = after;
        let noise = Tensor::f_from_slice(mine)?.f_view(sum.size().as_slice())?.f_to_device(sum.device())?;
        let mut grad = sum.f_add(&noise)?.f_div_scalar(expected_batch)?;
        if let Some(term) = correction.term(k, p)? {
            grad = grad.f_add(&term)?;
        }
        let mut p = p.shallow_clone();
        tch::no_grad(|| p.f_sub_(&grad.f_mul_scalar(lr)?).map(|_| ()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use sanctum_protocol::model::ModelSpec;

    use super::*;

    const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn toy_plan(steps: u32, lr: f64, model: &str) -> Plan {
        Plan::parse(&format!(
            "name='t'\nrounds=1\nmin_nodes=1\n[model]\n{model}\n[data]\nschema='heart_disease'\nschema_sha256='{ZERO}'\n[local]\nsteps={steps}\nbatch_size=4\nlearning_rate={lr}\n[strategy]\nkind='fedavg'\n"
        ))
        .unwrap()
    }

    /// Linearly separable along feature 0.
    fn toy_data() -> LocalData {
        let d = 13;
        let mut train_x = vec![0.0f32; 40 * d];
        let mut train_y = vec![0.0f32; 40];
        for i in 0..40 {
            let v = if i % 2 == 0 { 1.0 } else { -1.0 };
            train_x[i * d] = v;
            train_y[i] = if v > 0.0 { 1.0 } else { 0.0 };
        }
        LocalData {
            features: d,
            train_mean: vec![0.0; d],
            train_std: vec![1.0; d],
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

    /// The global weights moved by a round's update.
    fn applied(w: &Weights, r: &RoundResult) -> Weights {
        let mut t = w.clone();
        for (v, d) in t.values_mut().iter_mut().zip(&r.delta) {
            *v += d;
        }
        t
    }

    #[test]
    fn weights_roundtrip_through_libtorch_by_name() {
        let spec = ModelSpec::Mlp { inputs: 13, hidden: vec![5], outputs: 1 };
        let w = spec.init(3);
        let net = Net::new(&spec, &w, Device::Cpu).unwrap();
        assert_eq!(net.weights().unwrap(), w);
        let names: Vec<String> = net.vs.variables().keys().cloned().collect();
        assert!(names.contains(&"hidden.0.weight".to_string()), "{names:?}");
    }

    #[test]
    fn training_learns_a_separable_problem_and_is_reproducible() {
        let plan = toy_plan(60, 0.5, "kind='logistic_regression'\ninputs=13");
        let data = toy_data();
        let w = plan.model.init(0);
        let r1 = train_round(&plan, &w, &data, Device::Cpu, 9, None, &Correction::none()).unwrap();
        let r2 = train_round(&plan, &w, &data, Device::Cpu, 9, None, &Correction::none()).unwrap();
        assert_eq!(r1.delta, r2.delta, "same seed, same update");
        let trained = applied(&w, &r1);
        let e = evaluate(&plan.model, &trained, &data, Device::Cpu, None).unwrap();
        assert_eq!(e.samples, 40);
        assert_eq!(e.primary(), Some(1.0));
        assert_eq!(e.metrics.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["accuracy", "balanced_accuracy", "auroc"]);
    }

    #[test]
    fn mlp_trains_too() {
        let plan = toy_plan(80, 0.1, "kind='mlp'\ninputs=13\nhidden=[8]");
        let data = toy_data();
        let w = plan.model.init(1);
        let r = train_round(&plan, &w, &data, Device::Cpu, 1, None, &Correction::none()).unwrap();
        let trained = applied(&w, &r);
        assert!(evaluate(&plan.model, &trained, &data, Device::Cpu, None).unwrap().primary().unwrap() >= 0.95);
    }

    #[test]
    fn dp_sgd_learns_with_mild_noise_and_drowns_in_huge_noise() {
        let plan = toy_plan(60, 0.5, "kind='logistic_regression'\ninputs=13");
        let data = toy_data();
        let w = plan.model.init(0);
        let apply = |r: &RoundResult| {
            evaluate(&plan.model, &applied(&w, r), &data, Device::Cpu, None).unwrap().primary().unwrap()
        };
        let mild = DpSetup { sampling_rate: 0.25, noise_multiplier: 0.5, clip_norm: 1.0 };
        let r = train_round_dp(&plan, &w, &data, Device::Cpu, &mild, None, &Correction::none()).unwrap();
        assert!(apply(&r) >= 0.95, "DP-SGD with mild noise should still separate the toy data");
        // Two runs draw different batches and noise: the secure stream is not replayable.
        let r2 = train_round_dp(&plan, &w, &data, Device::Cpu, &mild, None, &Correction::none()).unwrap();
        assert_ne!(r.delta, r2.delta);
        // With σ = 1e4 the step is noise: its size matches lr·σ·C/(q·n) per coordinate per step.
        // An MLP gives ~1,000 coordinates, so the sample RMS is within a few % of its expectation.
        let mlp = toy_plan(60, 0.5, "kind='mlp'\ninputs=13\nhidden=[64]");
        let loud = DpSetup { sampling_rate: 0.25, noise_multiplier: 1e4, clip_norm: 1.0 };
        let r = train_round_dp(&mlp, &mlp.model.init(0), &data, Device::Cpu, &loud, None, &Correction::none()).unwrap();
        let rms = (r.delta.iter().map(|d| f64::from(*d).powi(2)).sum::<f64>() / r.delta.len() as f64).sqrt();
        let want = 0.5 * 1e4 / (0.25 * 40.0) * 60f64.sqrt();
        assert!((rms / want - 1.0).abs() < 0.2, "rms step {rms}, expected about {want}");
    }

    #[test]
    fn cnn_trains_too() {
        let plan = toy_plan(80, 0.1, "kind='cnn'\nchannels=1\nheight=13\nwidth=1\nfilters=[4]\nkernel_size=3");
        let data = toy_data();
        let w = plan.model.init(2);
        let r = train_round(&plan, &w, &data, Device::Cpu, 1, None, &Correction::none()).unwrap();
        let trained = applied(&w, &r);
        assert!(evaluate(&plan.model, &trained, &data, Device::Cpu, None).unwrap().primary().unwrap() >= 0.95);
    }
}
