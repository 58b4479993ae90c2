//! PyTorch's own initial weights, bit for bit: what `torch.manual_seed(seed)` followed by
//! creating the model's `nn.Linear`/`nn.Conv2d` layers in order draws on the CPU, so a plan with
//! `init = "pytorch"` starts from the model a PyTorch baseline (FLamby's) starts from with the
//! same seed.
//!
//! PyTorch's CPU generator is MT19937 seeded by `init_genrand(seed mod 2³²)`
//! (`aten/src/ATen/core/MT19937RNGEngine.h`). `Tensor.uniform_(a, b)` on float32 draws one 32-bit
//! word per element, in order, and returns `float((w & (2²⁴ − 1))·2⁻²⁴·(b − a) + a)` with the
//! product in double and `b − a` in float (`uniform_real` in `TransformationHelper.h`).
//! `nn.Linear` and `nn.Conv2d` call `kaiming_uniform_(weight, a=√5)`, whose bound is
//! √3·(gain/√fan_in) with gain = √(2/(1 + a²)) computed in double as Python does, then
//! `uniform_(bias, −1/√fan_in, 1/√fan_in)`. Checked against PyTorch 2.11.0's output in the tests.
//! This is model initialisation, not privacy noise.

use crate::model::{TensorSpec, Weights};

/// MT19937 (Matsumoto and Nishimura 1998), seeded as PyTorch seeds it.
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        // PyTorch keeps the low 32 bits of the seed.
        state[0] = seed as u32;
        for j in 1..624 {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Self { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for k in 0..624 {
                let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % 624] & 0x7fff_ffff);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.state[k] = self.state[(k + 397) % 624] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `Tensor.uniform_(from, to)` on float32, one element.
    fn uniform(&mut self, from: f32, to: f32) -> f32 {
        let x = f64::from(self.next_u32() & 0x00ff_ffff) * (1.0 / f64::from(1u32 << 24));
        (x * f64::from(to - from) + f64::from(from)) as f32
    }
}

/// The bound `kaiming_uniform_(w, a=√5)` draws a weight of fan-in `fan_in` from, as Python
/// computes it.
fn kaiming_bound(fan_in: usize) -> f64 {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a.powi(2))).sqrt();
    let std = gain / (fan_in as f64).sqrt();
    3f64.sqrt() * std
}

/// PyTorch's initial weights over a layout of (weight, bias) layers in creation order: a weight
/// of two or more dimensions from `kaiming_uniform_(a=√5)` (fan-in the product of its dimensions
/// after the first), `X.bias` from ±1/√fan_in of `X.weight`, a one-dimensional `X.weight` ones and
/// anything else zeros (neither draws from the generator, as in PyTorch's norm layers).
pub fn pytorch_init(layout: Vec<TensorSpec>, seed: u64) -> Weights {
    let mut rng = Mt19937::new(seed);
    let fan_in_of = |t: &TensorSpec| (t.shape.len() >= 2).then(|| t.shape[1..].iter().product::<usize>());
    let mut values = Vec::with_capacity(layout.iter().map(TensorSpec::numel).sum());
    for t in &layout {
        let sibling = t
            .name
            .strip_suffix(".bias")
            .and_then(|prefix| layout.iter().find(|w| w.name == format!("{prefix}.weight")))
            .and_then(fan_in_of);
        let bound = match (fan_in_of(t), sibling) {
            (Some(fan_in), _) if !t.name.ends_with(".bias") => Some(kaiming_bound(fan_in)),
            (_, Some(fan_in)) => Some(1.0 / (fan_in.max(1) as f64).sqrt()),
            _ => None,
        };
        match bound {
            Some(b) => {
                let (from, to) = (-b as f32, b as f32);
                values.extend((0..t.numel()).map(|_| rng.uniform(from, to)));
            }
            None if t.name.ends_with(".weight") => values.extend(std::iter::repeat_n(1.0f32, t.numel())),
            None => values.extend(std::iter::repeat_n(0.0f32, t.numel())),
        }
    }
    // The values fill the layout by construction.
    let n = values.len();
    Weights::new(layout, values).unwrap_or_else(|_| unreachable_weights(n))
}

fn unreachable_weights(n: usize) -> Weights {
    // `Weights::new` only refuses a length that differs from the layout's; the loop above pushes
    // exactly each tensor's numel.
    Weights::new(vec![TensorSpec { name: "values".into(), shape: vec![n] }], vec![0.0; n])
        .unwrap_or_else(|_| unreachable_weights(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;

    /// Reference values printed by PyTorch 2.11.0 (the PyPI wheel `scripts/env.sh` installs, CPU):
    /// `torch.manual_seed(42); torch.empty(3).uniform_(-0.5, 0.5)` and
    /// `torch.manual_seed(42); m = torch.nn.Linear(39, 1)`.
    #[test]
    fn matches_pytorch_bit_for_bit() {
        let mut rng = Mt19937::new(42);
        let u: Vec<f32> = (0..3).map(|_| rng.uniform(-0.5, 0.5)).collect();
        assert_eq!(u, [0.382_269_26_f32, 0.415_003_96, -0.117_136_24]);
        let w = pytorch_init(ModelSpec::Cox { inputs: 39 }.layout(), 42);
        assert_eq!(&w.values()[..4], &[0.122_424_14_f32, 0.132_907_63, -0.037_513_617, 0.147_095_52]);
        assert_eq!(w.values()[39], -0.050_500_125_f32, "the bias comes after the 39 weights");
        // `torch.manual_seed(7); nn.Linear(13, 1)`: weight[12], bias.
        let w = pytorch_init(ModelSpec::LogisticRegression { inputs: 13, outputs: 1 }.layout(), 7);
        assert_eq!(w.values()[12..14], [-0.118_240_445_855_279_66_f64 as f32, -0.162_904_694_676_399_23_f64 as f32]);
        // `torch.manual_seed(3); nn.Linear(13, 16); o = nn.Linear(16, 2)`: o.weight[1, 15], o.bias[1].
        let w = pytorch_init(ModelSpec::Mlp { inputs: 13, hidden: vec![16], outputs: 2 }.layout(), 3);
        let out = 13 * 16 + 16;
        assert_eq!(w.values()[out + 31], -0.217_263_460_159_301_76_f64 as f32);
        assert_eq!(w.values()[out + 33], 0.202_390_164_136_886_6_f64 as f32);
        // `torch.manual_seed(5); nn.Conv2d(1, 4, 3, padding=1)`: weight.flatten()[35], bias[3].
        let cnn = ModelSpec::Cnn { channels: 1, height: 13, width: 1, filters: vec![4], kernel_size: 3, outputs: 1 };
        let w = pytorch_init(cnn.layout(), 5);
        assert_eq!(w.values()[35], 0.162_124_365_568_161_f64 as f32);
        assert_eq!(w.values()[39], 0.324_543_356_895_446_8_f64 as f32);
        // Another seed, another model; the same seed, the same one.
        let cox = ModelSpec::Cox { inputs: 39 }.layout();
        assert_ne!(pytorch_init(cox.clone(), 43), pytorch_init(cox.clone(), 42));
        assert_eq!(pytorch_init(cox.clone(), 42), pytorch_init(cox, 42));
    }
}
