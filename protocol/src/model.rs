//! The model zoo's parameter layouts, their initialisation, and the safetensors encoding the
//! coordinator publishes global models in.
//!
//! A model is a flat `f32` vector plus a layout (names and shapes in a fixed order). Updates on
//! the wire are that vector's difference, in the same order, so both sides agree on it without
//! sending names.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

/// A built-in architecture and its hyper-parameters, as a plan names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSpec {
    /// `Linear(inputs, 1)`; the output is a logit.
    LogisticRegression { inputs: usize },
    /// `Linear(inputs, h1) → ReLU → … → Linear(hk, 1)`; the output is a logit.
    Mlp { inputs: usize, hidden: Vec<usize> },
    /// A small CNN: each feature row is read as a `channels × height × width` image (row-major),
    /// then `Conv2d(k×k, same padding) → ReLU` per entry of `filters`, then `Linear(…, 1)`.
    Cnn { channels: usize, height: usize, width: usize, filters: Vec<usize>, kernel_size: usize },
}

/// One named tensor in a model's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// The parameter's name, as in PyTorch's `state_dict` (`fc.weight`).
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of scalars in the tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What can be wrong with a model or its encoding.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model needs at least one input and every hidden layer at least one unit")]
    EmptyLayer,
    #[error("model has {got} parameters, the layout needs {want}")]
    Size { got: usize, want: usize },
    #[error("model file is not valid safetensors: {0}")]
    Format(String),
    #[error("model file lacks tensor '{0}' that the plan's model needs")]
    Missing(String),
    #[error("tensor '{name}' has shape {got:?} and dtype {dtype}, the plan's model needs {want:?} f32")]
    Shape { name: String, got: Vec<usize>, want: Vec<usize>, dtype: String },
}

impl ModelSpec {
    /// The layers as (name prefix, fan_in, fan_out), in order; a convolution's fan_in is
    /// C·k·k and its weight is [O, C, k, k] (see [`ModelSpec::layout`]).
    fn linear_layers(&self) -> Vec<(String, usize, usize)> {
        match self {
            ModelSpec::Cnn { channels, height, width, filters, kernel_size } => {
                let mut layers = Vec::new();
                let mut c = *channels;
                for (i, &f) in filters.iter().enumerate() {
                    layers.push((format!("conv.{i}"), c * kernel_size * kernel_size, f));
                    c = f;
                }
                layers.push(("out".into(), c * height * width, 1));
                layers
            }
            ModelSpec::LogisticRegression { inputs } => vec![("fc".into(), *inputs, 1)],
            ModelSpec::Mlp { inputs, hidden } => {
                let mut layers = Vec::new();
                let mut fan_in = *inputs;
                for (i, &h) in hidden.iter().enumerate() {
                    layers.push((format!("hidden.{i}"), fan_in, h));
                    fan_in = h;
                }
                layers.push(("out".into(), fan_in, 1));
                layers
            }
        }
    }

    /// Number of input features the model expects.
    pub fn inputs(&self) -> usize {
        match self {
            ModelSpec::LogisticRegression { inputs } | ModelSpec::Mlp { inputs, .. } => *inputs,
            ModelSpec::Cnn { channels, height, width, .. } => channels * height * width,
        }
    }

    /// `(channels, height, width)` for a CNN, whose flat feature rows are reshaped to images.
    pub fn image_shape(&self) -> Option<(usize, usize, usize)> {
        match self {
            ModelSpec::Cnn { channels, height, width, .. } => Some((*channels, *height, *width)),
            _ => None,
        }
    }

    /// Rejects degenerate architectures.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.linear_layers().iter().any(|(_, i, o)| *i == 0 || *o == 0) {
            return Err(ModelError::EmptyLayer);
        }
        if let ModelSpec::Cnn { kernel_size, filters, .. } = self
            && (kernel_size % 2 == 0 || filters.is_empty())
        {
            return Err(ModelError::EmptyLayer);
        }
        Ok(())
    }

    /// The model's tensors, in the canonical order updates use.
    pub fn layout(&self) -> Vec<TensorSpec> {
        let kernel = match self {
            ModelSpec::Cnn { kernel_size, .. } => Some(*kernel_size),
            _ => None,
        };
        self.linear_layers()
            .into_iter()
            .flat_map(|(name, fan_in, fan_out)| {
                let weight = match kernel {
                    Some(k) if name.starts_with("conv.") => vec![fan_out, fan_in / (k * k), k, k],
                    _ => vec![fan_out, fan_in],
                };
                [
                    TensorSpec { name: format!("{name}.weight"), shape: weight },
                    TensorSpec { name: format!("{name}.bias"), shape: vec![fan_out] },
                ]
            })
            .collect()
    }

    /// Total number of scalars, in checked arithmetic: `None` when a product of the dimensions
    /// overflows a `u64`. [`crate::plan::Plan::validate`] bounds this before anything else reads
    /// the layout, whose own arithmetic (here and in [`ModelSpec::inputs`]) is unchecked.
    pub fn checked_num_params(&self) -> Option<u64> {
        let u = |v: usize| u64::try_from(v).ok();
        // (fan_in, fan_out) per layer, as `linear_layers` has them; a layer holds
        // fan_in·fan_out weights and fan_out biases.
        let mut layers: Vec<(u64, u64)> = Vec::new();
        match self {
            ModelSpec::LogisticRegression { inputs } => layers.push((u(*inputs)?, 1)),
            ModelSpec::Mlp { inputs, hidden } => {
                let mut fan_in = u(*inputs)?;
                for &h in hidden {
                    layers.push((fan_in, u(h)?));
                    fan_in = u(h)?;
                }
                layers.push((fan_in, 1));
            }
            ModelSpec::Cnn { channels, height, width, filters, kernel_size } => {
                let k2 = u(*kernel_size)?.checked_mul(u(*kernel_size)?)?;
                let mut c = u(*channels)?;
                for &f in filters {
                    layers.push((c.checked_mul(k2)?, u(f)?));
                    c = u(f)?;
                }
                layers.push((c.checked_mul(u(*height)?)?.checked_mul(u(*width)?)?, 1));
                // `inputs()` multiplies these three too.
                u(*channels)?.checked_mul(u(*height)?)?.checked_mul(u(*width)?)?;
            }
        }
        layers.into_iter().try_fold(0u64, |total, (fan_in, fan_out)| {
            total.checked_add(fan_in.checked_mul(fan_out)?.checked_add(fan_out)?)
        })
    }

    /// Total number of scalars.
    pub fn num_params(&self) -> usize {
        self.layout().iter().map(TensorSpec::numel).sum()
    }

    /// A short name for tables and logs.
    pub fn name(&self) -> &'static str {
        match self {
            ModelSpec::LogisticRegression { .. } => "logistic_regression",
            ModelSpec::Mlp { .. } => "mlp",
            ModelSpec::Cnn { .. } => "cnn",
        }
    }

    /// Initial weights as PyTorch's `nn.Linear` and `nn.Conv2d` draw them (weight and bias
    /// uniform in ±1/√fan_in), from a seeded generator so that a plan's seed reproduces its run.
    /// This is model initialisation, not privacy noise: a seeded generator is right here.
    pub fn init(&self, seed: u64) -> Weights {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut values = Vec::with_capacity(self.num_params());
        for (_, fan_in, fan_out) in self.linear_layers() {
            let bound = 1.0 / (fan_in as f64).sqrt();
            for _ in 0..(fan_in * fan_out + fan_out) {
                values.push(rng.random_range(-bound..bound) as f32);
            }
        }
        Weights { layout: self.layout(), values }
    }
}

/// A model's parameters: a layout and the flat values in layout order.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    layout: Vec<TensorSpec>,
    values: Vec<f32>,
}

impl Weights {
    /// Wraps values that must match the layout's size.
    pub fn new(layout: Vec<TensorSpec>, values: Vec<f32>) -> Result<Self, ModelError> {
        let want: usize = layout.iter().map(TensorSpec::numel).sum();
        if values.len() != want {
            return Err(ModelError::Size { got: values.len(), want });
        }
        Ok(Self { layout, values })
    }

    pub fn layout(&self) -> &[TensorSpec] {
        &self.layout
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Each tensor's name, shape and values.
    pub fn tensors(&self) -> impl Iterator<Item = (&TensorSpec, &[f32])> {
        let mut offset = 0;
        self.layout.iter().map(move |t| {
            let slice = &self.values[offset..offset + t.numel()];
            offset += t.numel();
            (t, slice)
        })
    }

    /// Encodes as safetensors (little-endian f32), the format global models are published in.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, ModelError> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors()
            .map(|(t, v)| (t.name.clone(), crate::transfer::f32_to_le_bytes(v), t.shape.clone()))
            .collect();
        let views = bytes
            .iter()
            .map(|(name, data, shape)| {
                TensorView::new(Dtype::F32, shape.clone(), data)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| ModelError::Format(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize(views, None).map_err(|e| ModelError::Format(e.to_string()))
    }

    /// Decodes safetensors bytes, checking every tensor the layout needs.
    pub fn from_safetensors(bytes: &[u8], layout: &[TensorSpec]) -> Result<Self, ModelError> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| ModelError::Format(e.to_string()))?;
        let mut values = Vec::with_capacity(layout.iter().map(TensorSpec::numel).sum());
        for spec in layout {
            let t = st.tensor(&spec.name).map_err(|_| ModelError::Missing(spec.name.clone()))?;
            if t.dtype() != Dtype::F32 || t.shape() != spec.shape.as_slice() {
                return Err(ModelError::Shape {
                    name: spec.name.clone(),
                    got: t.shape().to_vec(),
                    want: spec.shape.clone(),
                    dtype: format!("{:?}", t.dtype()),
                });
            }
            values.extend(crate::transfer::le_bytes_to_f32(t.data()).map_err(ModelError::Format)?);
        }
        Self::new(layout.to_vec(), values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_init_match_pytorch_shapes_and_bounds() {
        let mlp = ModelSpec::Mlp { inputs: 13, hidden: vec![16, 8] };
        let names: Vec<String> = mlp.layout().into_iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            ["hidden.0.weight", "hidden.0.bias", "hidden.1.weight", "hidden.1.bias", "out.weight", "out.bias"]
        );
        assert_eq!(mlp.num_params(), 13 * 16 + 16 + 16 * 8 + 8 + 8 + 1);
        let w = mlp.init(7);
        let (first, v) = w.tensors().next().unwrap();
        assert_eq!(first.shape, vec![16, 13]);
        let bound = 1.0 / 13f32.sqrt();
        assert!(v.iter().all(|x| x.abs() <= bound));
        assert_eq!(mlp.init(7), w, "same seed, same weights");
        assert_ne!(mlp.init(8), w);
    }

    #[test]
    fn cnn_layout_is_pytorch_shaped() {
        let cnn = ModelSpec::Cnn { channels: 1, height: 13, width: 1, filters: vec![4, 2], kernel_size: 3 };
        let shapes: Vec<(String, Vec<usize>)> = cnn.layout().into_iter().map(|t| (t.name, t.shape)).collect();
        assert_eq!(
            shapes,
            [
                ("conv.0.weight".to_string(), vec![4, 1, 3, 3]),
                ("conv.0.bias".to_string(), vec![4]),
                ("conv.1.weight".to_string(), vec![2, 4, 3, 3]),
                ("conv.1.bias".to_string(), vec![2]),
                ("out.weight".to_string(), vec![1, 26]),
                ("out.bias".to_string(), vec![1]),
            ]
        );
        assert_eq!(cnn.inputs(), 13);
        assert_eq!(cnn.init(0).values().len(), cnn.num_params());
        assert!(
            ModelSpec::Cnn { channels: 1, height: 2, width: 2, filters: vec![1], kernel_size: 2 }.validate().is_err()
        );
    }

    #[test]
    fn the_checked_parameter_count_is_the_layouts_and_overflow_is_none() {
        let zoo = [
            ModelSpec::LogisticRegression { inputs: 13 },
            ModelSpec::Mlp { inputs: 13, hidden: vec![16, 8] },
            ModelSpec::Mlp { inputs: 13, hidden: vec![11200, 11200] },
            ModelSpec::Cnn { channels: 1, height: 13, width: 1, filters: vec![4, 2], kernel_size: 3 },
            ModelSpec::Cnn { channels: 3, height: 8, width: 8, filters: vec![5], kernel_size: 5 },
        ];
        for spec in zoo {
            assert_eq!(spec.checked_num_params(), Some(spec.num_params() as u64), "{spec:?}");
        }
        let huge = usize::MAX / 2;
        for spec in [
            ModelSpec::LogisticRegression { inputs: usize::MAX },
            ModelSpec::Mlp { inputs: 13, hidden: vec![huge, huge] },
            ModelSpec::Cnn { channels: huge, height: 2, width: 2, filters: vec![1], kernel_size: 3 },
            ModelSpec::Cnn { channels: 1, height: huge, width: huge, filters: vec![1], kernel_size: 1 },
        ] {
            assert_eq!(spec.checked_num_params(), None, "{spec:?}");
        }
    }

    #[test]
    fn safetensors_roundtrip_and_wrong_layout() -> Result<(), ModelError> {
        let spec = ModelSpec::LogisticRegression { inputs: 13 };
        let w = spec.init(1);
        let bytes = w.to_safetensors()?;
        assert_eq!(Weights::from_safetensors(&bytes, &spec.layout())?, w);
        let other = ModelSpec::LogisticRegression { inputs: 12 };
        assert!(matches!(Weights::from_safetensors(&bytes, &other.layout()), Err(ModelError::Shape { .. })));
        assert!(Weights::from_safetensors(b"garbage", &spec.layout()).is_err());
        Ok(())
    }
}
