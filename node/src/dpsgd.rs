//! DP-SGD's clipped gradient sum without a loop over examples ("ghost clipping" and
//! book-keeping: Goodfellow 2015; Li et al. 2022; Bu et al. 2023).
//!
//! For a linear layer z = a·Wᵀ + b, example i's weight gradient is the outer product gᵢ·aᵢᵀ of
//! the gradient of the loss with respect to the layer's output (gᵢ) and the layer's input (aᵢ),
//! so its squared Frobenius norm is ‖gᵢ‖²·‖aᵢ‖², and its bias gradient is gᵢ. One forward pass
//! keeps every aᵢ, one `run_backward` on the summed loss returns every gᵢ, the per-example norms
//! follow by row sums, and the clipped sum is Σᵢ cᵢ·gᵢ·aᵢᵀ = (c ⊙ g)ᵀ·a, one matrix product per
//! layer. The per-example loop survives only as the test oracle.

use sanctum_protocol::dataset::Task;
use tch::{Kind, TchError, Tensor};

use crate::train::{Layer, Net};

/// The clipped sum of a batch's per-example gradients.
pub struct ClippedSum {
    /// One tensor per model variable, in layout order (weight, bias, weight, bias, …).
    pub grads: Vec<Tensor>,
    /// Each example's gradient norm before clipping.
    pub norms: Tensor,
    /// The batch's outputs from the same forward pass (detached), so a caller reads the loss off
    /// them instead of running the model a second time.
    pub logits: Tensor,
}

/// The task's per-example loss, one value per row ([`crate::loss::per_example_loss`]).
fn per_example_loss(logits: &Tensor, y: &Tensor, task: Task, weights: Option<&[f64]>) -> Result<Tensor, TchError> {
    crate::loss::per_example_loss(task, logits, &crate::loss::LossTargets::Labels(y), weights).map_err(|e| match e {
        crate::loss::LossError::Torch(t) => t,
        other => TchError::Kind(other.to_string()),
    })
}

/// Per-example gradient pieces of one layer.
enum PerExample {
    /// Linear: ‖∇Wᵢ‖² = ‖gᵢ‖²·‖aᵢ‖² never needs ∇Wᵢ itself (ghost norm).
    Linear { a: Tensor, g: Tensor },
    /// Convolution: ∇Wᵢ = gᵢ·Uᵢᵀ with Uᵢ the unfolded input patches (book-keeping: the per-example
    /// weight gradients are formed once, by one batched product, and reused for the sum).
    Conv { grads: Tensor, bias: Tensor, shape: Vec<i64> },
}

/// Σᵢ min(1, C/‖∇ℓᵢ‖)·∇ℓᵢ over the batch `x`, `y`, computed from layer inputs and output
/// gradients.
pub(crate) fn clipped_sum(
    net: &Net,
    x: &Tensor,
    y: &Tensor,
    clip_norm: f64,
    task: Task,
    weights: Option<&[f64]>,
) -> Result<ClippedSum, TchError> {
    let (logits, record) = net.forward_recorded(x)?;
    let loss = per_example_loss(&logits, y, task, weights)?.f_sum(Kind::Float)?;
    let outputs: Vec<&Tensor> = record.iter().map(|(_, z)| z).collect();
    let out_grads = Tensor::f_run_backward(&[&loss], &outputs, false, false)?;
    let mut pieces = Vec::with_capacity(record.len());
    let mut sq_norms: Option<Tensor> = None;
    for ((layer, (a, _)), g) in net.layers.iter().zip(&record).zip(out_grads) {
        let (piece, layer_sq) = match layer {
            Layer::Linear { .. } => {
                // ‖∇ℓᵢ‖² gets ‖gᵢ‖²·‖aᵢ‖² (weight) + ‖gᵢ‖² (bias).
                let g2 = g.f_square()?.f_sum_dim_intlist(1, false, Kind::Float)?;
                let a2 = a.f_square()?.f_sum_dim_intlist(1, false, Kind::Float)?;
                let sq = g2.f_mul(&a2.f_add_scalar(1.0)?)?;
                (PerExample::Linear { a: a.shallow_clone(), g }, sq)
            }
            Layer::Conv { w, stride, padding, .. } => {
                let shape = w.size();
                let k = shape[2];
                let (batch, out) = (g.size()[0], g.size()[1]);
                let patches = a.f_im2col([k, k], [1, 1], [*padding, *padding], [*stride, *stride])?; // (B, C·k·k, L)
                let g = g.f_reshape([batch, out, -1])?; // (B, O, L)
                let grads = g.f_bmm(&patches.f_transpose(1, 2)?)?; // (B, O, C·k·k)
                let bias = g.f_sum_dim_intlist(2, false, Kind::Float)?; // (B, O)
                let sq = grads
                    .f_square()?
                    .f_sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float)?
                    .f_add(&bias.f_square()?.f_sum_dim_intlist(1, false, Kind::Float)?)?;
                (PerExample::Conv { grads, bias, shape }, sq)
            }
        };
        sq_norms = Some(match sq_norms {
            None => layer_sq,
            Some(acc) => acc.f_add(&layer_sq)?,
        });
        pieces.push(piece);
    }
    let norms = sq_norms.ok_or_else(|| TchError::Kind("model has no layers".into()))?.f_sqrt()?;
    // cᵢ = min(1, C/‖∇ℓᵢ‖); the 1e-6 keeps a zero gradient finite and only ever shrinks cᵢ.
    let factors = norms.f_add_scalar(1e-6)?.f_reciprocal()?.f_mul_scalar(clip_norm)?.f_clamp_max(1.0)?;
    let mut grads = Vec::with_capacity(2 * pieces.len());
    for piece in pieces {
        match piece {
            PerExample::Linear { a, g } => {
                let scaled = g.f_mul(&factors.f_unsqueeze(1)?)?;
                grads.push(scaled.f_tr()?.f_matmul(&a)?);
                grads.push(scaled.f_sum_dim_intlist(0, false, Kind::Float)?);
            }
            PerExample::Conv { grads: per_example, bias, shape } => {
                let c3 = factors.f_view([-1, 1, 1])?;
                grads.push(per_example.f_mul(&c3)?.f_sum_dim_intlist(0, false, Kind::Float)?.f_view(shape.as_slice())?);
                grads.push(bias.f_mul(&factors.f_unsqueeze(1)?)?.f_sum_dim_intlist(0, false, Kind::Float)?);
            }
        }
    }
    Ok(ClippedSum { grads, norms: norms.f_detach()?, logits: logits.f_detach()? })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use sanctum_protocol::model::{ConvLayer, ModelSpec};
    use tch::Device;

    use super::*;

    /// The oracle: one backward pass per example, clip, sum.
    fn clipped_sum_by_loop(net: &Net, x: &Tensor, y: &Tensor, clip_norm: f64) -> (Vec<Tensor>, Vec<f64>) {
        let params = net.params();
        let mut sum: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect();
        let mut norms = Vec::new();
        for i in 0..x.size()[0] {
            let xi = x.narrow(0, i, 1);
            let yi = y.narrow(0, i, 1);
            let loss = per_example_loss(&net.forward(&xi).unwrap(), &yi, Task::Binary, None).unwrap().sum(Kind::Float);
            let grads = Tensor::run_backward(&[&loss], &params, false, false);
            let norm = grads.iter().map(|g| g.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
            let c = (clip_norm / (norm + 1e-6)).min(1.0);
            for (s, g) in sum.iter_mut().zip(&grads) {
                *s = &*s + g * c;
            }
            norms.push(norm);
        }
        (sum, norms)
    }

    fn batch(n: i64, features: usize, seed: i64) -> (Tensor, Tensor) {
        tch::manual_seed(seed);
        let x = Tensor::randn([n, features as i64], (Kind::Float, Device::Cpu)) * 2.0;
        let y = Tensor::randint(2, [n], (Kind::Float, Device::Cpu));
        (x, y)
    }

    fn net(spec: &ModelSpec, seed: u64) -> Net {
        Net::new(spec, &spec.init(seed), Device::Cpu).unwrap()
    }

    #[test]
    fn ghost_clipping_equals_the_per_example_loop() {
        let models = [
            ModelSpec::LogisticRegression { inputs: 13, outputs: 1 },
            ModelSpec::Mlp { inputs: 13, hidden: vec![16], outputs: 1 },
            ModelSpec::Mlp { inputs: 13, hidden: vec![32, 8], outputs: 1 },
            ModelSpec::Cnn { channels: 1, height: 13, width: 1, filters: vec![4], kernel_size: 3, outputs: 1 },
            ModelSpec::Cnn { channels: 2, height: 6, width: 6, filters: vec![8, 4], kernel_size: 3, outputs: 1 },
            // Strided, padded convolutions with max-pooling between them, then a hidden layer:
            // 8 → conv 3/s2/p1 → 4 → pool 2/1 → 3 → conv 2 → 2, 2·2·2 = 8 features → 5 → 1.
            ModelSpec::Convnet {
                channels: 1,
                height: 8,
                width: 8,
                conv: vec![
                    ConvLayer { filters: 3, kernel: 3, stride: 2, padding: 1, pool: 2, pool_stride: 1 },
                    ConvLayer { filters: 2, kernel: 2, stride: 1, padding: 0, pool: 0, pool_stride: 1 },
                ],
                hidden: vec![5],
                outputs: 1,
            },
        ];
        for (m, spec) in models.iter().enumerate() {
            for clip in [0.05, 1.0, 1e6] {
                let net = net(spec, m as u64);
                let (x, y) = batch(64, spec.inputs(), m as i64);
                let fast = clipped_sum(&net, &x, &y, clip, Task::Binary, None).unwrap();
                let (slow, norms) = clipped_sum_by_loop(&net, &x, &y, clip);
                for (f, s) in fast.grads.iter().zip(&slow) {
                    let diff = (f - s).abs().max().double_value(&[]);
                    assert!(diff <= 1e-5, "{} clip {clip}: max difference {diff}", spec.name());
                }
                let fast_norms = Vec::<f32>::try_from(&fast.norms).unwrap();
                for (a, b) in fast_norms.iter().zip(&norms) {
                    assert!((f64::from(*a) - b).abs() <= 1e-4 * b.max(1.0), "norm {a} vs {b}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn no_clipped_contribution_exceeds_the_clip_norm(seed in 0u64..1000, clip in 0.001f64..10.0, n in 1i64..16) {
            // A batch of one is one example's clipped contribution.
            let specs = [
                ModelSpec::Mlp { inputs: 13, hidden: vec![8], outputs: 1 },
                ModelSpec::Cnn { channels: 1, height: 4, width: 4, filters: vec![3], kernel_size: 3, outputs: 1 },
            ];
            let spec = &specs[(seed % 2) as usize];
            let net = net(spec, seed);
            let (x, y) = batch(n, spec.inputs(), seed as i64);
            for i in 0..n {
                let one = clipped_sum(&net, &x.narrow(0, i, 1), &y.narrow(0, i, 1), clip, Task::Binary, None).unwrap();
                let norm: f64 = one.grads.iter().map(|g| g.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
                prop_assert!(norm <= clip * (1.0 + 1e-5), "contribution {norm} > clip {clip}");
            }
        }
    }
}
