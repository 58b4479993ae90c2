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

mod conv;
pub use conv::{ConvGeometry, ConvLayer, MAX_UNFOLDED_PER_EXAMPLE};

/// An architecture and its hyper-parameters, as a plan names it: one of the zoo's, or a
/// TorchScript module a consortium wrote itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSpec {
    /// `Linear(inputs, outputs)`; the outputs are logits (one for a binary task, one per class
    /// for a multi-class one: multinomial logistic regression) or a regression's prediction.
    LogisticRegression {
        inputs: usize,
        #[serde(default = "one", skip_serializing_if = "is_one")]
        outputs: usize,
    },
    /// `Linear(inputs, h1) → ReLU → … → Linear(hk, outputs)`.
    Mlp {
        inputs: usize,
        hidden: Vec<usize>,
        #[serde(default = "one", skip_serializing_if = "is_one")]
        outputs: usize,
    },
    /// A small CNN: each feature row is read as a `channels × height × width` image (row-major),
    /// then `Conv2d(k×k, same padding) → ReLU` per entry of `filters`, then `Linear(…, outputs)`.
    Cnn {
        channels: usize,
        height: usize,
        width: usize,
        filters: Vec<usize>,
        kernel_size: usize,
        #[serde(default = "one", skip_serializing_if = "is_one")]
        outputs: usize,
    },
    /// A convolutional net with PyTorch's layer kinds: each entry of `conv` is
    /// `Conv2d(filters, kernel, stride, padding) → ReLU`, then `MaxPool2d(pool, pool_stride)` when
    /// `pool` > 0; the result is flattened, then `Linear → ReLU` per entry of `hidden`, then
    /// `Linear(…, outputs)`. Opacus's MNIST network is `conv = [{16, 5, s2, p2, pool 2/1},
    /// {32, 4, s2, pool 2/1}]`, `hidden = [32]`, `outputs = 10`.
    Convnet {
        channels: usize,
        height: usize,
        width: usize,
        conv: Vec<ConvLayer>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        hidden: Vec<usize>,
        #[serde(default = "one", skip_serializing_if = "is_one")]
        outputs: usize,
    },
    /// The linear Cox proportional-hazards model: `Linear(inputs, 1)` whose output is the log
    /// relative risk (FLamby's Fed-TCGA-BRCA baseline). The bias does not change the partial
    /// likelihood; it is kept so the layout is PyTorch's `nn.Linear(inputs, 1)`.
    Cox { inputs: usize },
    /// A TorchScript module (`torch.jit.script` + `torch.jit.save`), named by the SHA-256 of its
    /// file and fetched by that hash. A hospital trains it only once it has approved the hash.
    Torchscript(TorchScriptSpec),
}

pub(super) fn one() -> usize {
    1
}
pub(super) fn is_one(v: &usize) -> bool {
    *v == 1
}
/// A TorchScript model as a plan names it. The plan states the parameters (names and shapes, in
/// the module's `named_parameters()` order; `sanctum-node model inspect FILE` prints them) so the
/// coordinator, which links no libtorch, can initialise and aggregate the model; each node checks
/// them against the module it loads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorchScriptSpec {
    /// SHA-256 of the `.pt` file, 64 lowercase hex digits.
    pub sha256: String,
    /// Input features (`forward` takes a `[batch, inputs]` float tensor).
    pub inputs: usize,
    /// Outputs per example (`forward` returns `[batch, outputs]`).
    pub outputs: usize,
    /// Every trainable parameter, in order.
    pub parameters: Vec<ParameterSpec>,
    /// Lead side only, like `[simulation]`: where the file is, relative to the plan; never sent.
    #[serde(default, skip_serializing)]
    pub file: Option<std::path::PathBuf>,
}

/// One parameter of a TorchScript model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParameterSpec {
    pub name: String,
    pub shape: Vec<usize>,
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
    #[error("model geometry: {0}")]
    Geometry(String),
    #[error("model has {got} parameters, the layout needs {want}")]
    Size { got: usize, want: usize },
    #[error("model file is not valid safetensors: {0}")]
    Format(String),
    #[error("model file lacks tensor '{0}' that the plan's model needs")]
    Missing(String),
    #[error("torchscript model: {0}")]
    TorchScript(String),
    #[error("tensor '{name}' has shape {got:?} and dtype {dtype}, the plan's model needs {want:?} f32")]
    Shape { name: String, got: Vec<usize>, want: Vec<usize>, dtype: String },
}

impl ModelSpec {
    /// The layers as (name prefix, fan_in, fan_out), in order; a convolution's fan_in is
    /// C·k·k and its weight is [O, C, k, k] (see [`ModelSpec::layout`]).
    fn linear_layers(&self) -> Vec<(String, usize, usize)> {
        match self {
            ModelSpec::Cnn { channels, height, width, filters, kernel_size, outputs } => {
                let mut layers = Vec::new();
                let mut c = *channels;
                for (i, &f) in filters.iter().enumerate() {
                    layers.push((format!("conv.{i}"), c * kernel_size * kernel_size, f));
                    c = f;
                }
                layers.push(("out".into(), c * height * width, *outputs));
                layers
            }
            ModelSpec::Convnet { channels, conv, hidden, outputs, .. } => {
                let mut layers = Vec::new();
                let mut c = *channels;
                for (i, l) in conv.iter().enumerate() {
                    layers.push((format!("conv.{i}"), c * l.kernel * l.kernel, l.filters));
                    c = l.filters;
                }
                let (h, w) = self.conv_output_side().unwrap_or((0, 0));
                let mut fan_in = c * h * w;
                for (i, &units) in hidden.iter().enumerate() {
                    layers.push((format!("hidden.{i}"), fan_in, units));
                    fan_in = units;
                }
                layers.push(("out".into(), fan_in, *outputs));
                layers
            }
            ModelSpec::LogisticRegression { inputs, outputs } => vec![("fc".into(), *inputs, *outputs)],
            ModelSpec::Cox { inputs } => vec![("fc".into(), *inputs, 1)],
            // Not layers of the zoo: its layout is the plan's list.
            ModelSpec::Torchscript(_) => vec![],
            ModelSpec::Mlp { inputs, hidden, outputs } => {
                let mut layers = Vec::new();
                let mut fan_in = *inputs;
                for (i, &h) in hidden.iter().enumerate() {
                    layers.push((format!("hidden.{i}"), fan_in, h));
                    fan_in = h;
                }
                layers.push(("out".into(), fan_in, *outputs));
                layers
            }
        }
    }

    /// A convnet's (height, width) after its last convolution and pooling; `None` for other
    /// models and for a geometry whose kernels or pools do not fit.
    fn conv_output_side(&self) -> Option<(usize, usize)> {
        let ModelSpec::Convnet { height, width, conv, .. } = self else {
            return None;
        };
        conv.iter().try_fold((*height, *width), |(h, w), l| Some((l.out_side(h)?, l.out_side(w)?)))
    }

    /// How a node runs each convolution, in order: the zoo's `cnn` pads to the same size with
    /// stride 1 and no pooling; a `convnet` says each layer's geometry.
    pub fn conv_geometry(&self) -> Vec<ConvGeometry> {
        match self {
            ModelSpec::Cnn { filters, kernel_size, .. } => {
                vec![ConvGeometry { stride: 1, padding: kernel_size / 2, pool: None }; filters.len()]
            }
            ModelSpec::Convnet { conv, .. } => conv
                .iter()
                .map(|l| ConvGeometry {
                    stride: l.stride,
                    padding: l.padding,
                    pool: (l.pool > 0).then_some((l.pool, l.pool_stride)),
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Number of input features the model expects.
    pub fn inputs(&self) -> usize {
        match self {
            ModelSpec::LogisticRegression { inputs, .. }
            | ModelSpec::Mlp { inputs, .. }
            | ModelSpec::Cox { inputs } => *inputs,
            ModelSpec::Cnn { channels, height, width, .. } | ModelSpec::Convnet { channels, height, width, .. } => {
                channels * height * width
            }
            ModelSpec::Torchscript(t) => t.inputs,
        }
    }

    /// Number of outputs per example.
    pub fn outputs(&self) -> usize {
        match self {
            ModelSpec::LogisticRegression { outputs, .. }
            | ModelSpec::Mlp { outputs, .. }
            | ModelSpec::Cnn { outputs, .. }
            | ModelSpec::Convnet { outputs, .. } => *outputs,
            ModelSpec::Cox { .. } => 1,
            ModelSpec::Torchscript(t) => t.outputs,
        }
    }

    /// `(channels, height, width)` for a CNN, whose flat feature rows are reshaped to images.
    pub fn image_shape(&self) -> Option<(usize, usize, usize)> {
        match self {
            ModelSpec::Cnn { channels, height, width, .. } | ModelSpec::Convnet { channels, height, width, .. } => {
                Some((*channels, *height, *width))
            }
            _ => None,
        }
    }

    /// A convnet's kernels, strides, paddings and pools fit its image, layer by layer, in checked
    /// arithmetic (so it may run before the parameter count is bounded); other models pass.
    pub fn validate_geometry(&self) -> Result<(), ModelError> {
        let ModelSpec::Convnet { channels, height, width, conv, .. } = self else {
            return Ok(());
        };
        if conv.is_empty() {
            return Err(ModelError::EmptyLayer);
        }
        let (mut h, mut w) = (*height, *width);
        let mut c = *channels;
        for (i, l) in conv.iter().enumerate() {
            let (Some(nh), Some(nw)) = (l.out_side(h), l.out_side(w)) else {
                return Err(ModelError::Geometry(format!(
                    "convolution {i} (kernel {}, stride {}, padding {}, pool {}/{}) does not fit its {h}×{w} input; \
                     kernel and stride must be 1 to the input's side, padding at most kernel/2, and pool window and \
                     stride 1 to the convolution's output side",
                    l.kernel, l.stride, l.padding, l.pool, l.pool_stride
                )));
            };
            // What DP-SGD's ghost clipping unfolds per example, so a plan cannot ask a node for
            // gigabytes of patches with a small parameter count.
            match l.unfolded(c, h, w) {
                Some(n) if n <= MAX_UNFOLDED_PER_EXAMPLE => {}
                n => {
                    return Err(ModelError::Geometry(format!(
                        "convolution {i} unfolds {} values per example (at most {MAX_UNFOLDED_PER_EXAMPLE}); \
                         use smaller kernels, larger strides or fewer channels",
                        n.map_or_else(|| "more than 2^64".into(), |n| n.to_string())
                    )));
                }
            }
            (h, w, c) = (nh, nw, l.filters);
        }
        Ok(())
    }

    /// Rejects degenerate architectures.
    pub fn validate(&self) -> Result<(), ModelError> {
        if let ModelSpec::Torchscript(t) = self {
            return t.validate();
        }
        self.validate_geometry()?;
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
        if let ModelSpec::Torchscript(t) = self {
            return t.parameters.iter().map(|p| TensorSpec { name: p.name.clone(), shape: p.shape.clone() }).collect();
        }
        let kernels: Vec<usize> = match self {
            ModelSpec::Cnn { kernel_size, filters, .. } => vec![*kernel_size; filters.len()],
            ModelSpec::Convnet { conv, .. } => conv.iter().map(|l| l.kernel).collect(),
            _ => Vec::new(),
        };
        self.linear_layers()
            .into_iter()
            .enumerate()
            .flat_map(|(i, (name, fan_in, fan_out))| {
                // The convolutions come first, one per kernel.
                let weight = match kernels.get(i) {
                    Some(&k) => vec![fan_out, fan_in / (k * k).max(1), k, k],
                    None => vec![fan_out, fan_in],
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
            ModelSpec::LogisticRegression { inputs, outputs } => layers.push((u(*inputs)?, u(*outputs)?)),
            ModelSpec::Cox { inputs } => layers.push((u(*inputs)?, 1)),
            ModelSpec::Torchscript(t) => {
                return t.parameters.iter().try_fold(0u64, |total, p| {
                    total.checked_add(p.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(u(d)?))?)
                });
            }
            ModelSpec::Mlp { inputs, hidden, outputs } => {
                let mut fan_in = u(*inputs)?;
                for &h in hidden {
                    layers.push((fan_in, u(h)?));
                    fan_in = u(h)?;
                }
                layers.push((fan_in, u(*outputs)?));
            }
            ModelSpec::Cnn { channels, height, width, filters, kernel_size, outputs } => {
                let k2 = u(*kernel_size)?.checked_mul(u(*kernel_size)?)?;
                let mut c = u(*channels)?;
                for &f in filters {
                    layers.push((c.checked_mul(k2)?, u(f)?));
                    c = u(f)?;
                }
                layers.push((c.checked_mul(u(*height)?)?.checked_mul(u(*width)?)?, u(*outputs)?));
                // `inputs()` multiplies these three too.
                u(*channels)?.checked_mul(u(*height)?)?.checked_mul(u(*width)?)?;
            }
            ModelSpec::Convnet { channels, conv, hidden, outputs, height, width } => {
                u(*channels)?.checked_mul(u(*height)?)?.checked_mul(u(*width)?)?;
                let mut c = u(*channels)?;
                for l in conv {
                    layers.push((c.checked_mul(u(l.kernel)?.checked_mul(u(l.kernel)?)?)?, u(l.filters)?));
                    c = u(l.filters)?;
                }
                // Out sides never exceed the padded input, so they are bounded by the checks above.
                let (h, w) = self.conv_output_side()?;
                let mut fan_in = c.checked_mul(u(h)?)?.checked_mul(u(w)?)?;
                for &units in hidden {
                    layers.push((fan_in, u(units)?));
                    fan_in = u(units)?;
                }
                layers.push((fan_in, u(*outputs)?));
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
            ModelSpec::Convnet { .. } => "convnet",
            ModelSpec::Cox { .. } => "cox",
            ModelSpec::Torchscript(_) => "torchscript",
        }
    }

    /// Initial weights as PyTorch's `nn.Linear` and `nn.Conv2d` draw them (weight and bias
    /// uniform in ±1/√fan_in), from a seeded generator so that a plan's seed reproduces its run.
    /// This is model initialisation, not privacy noise: a seeded generator is right here.
    /// TorchScript models get the same rule over their declared parameters ([`init_layout`]), so
    /// a TorchScript module with the zoo's layout starts from the zoo's weights.
    pub fn init(&self, seed: u64) -> Weights {
        init_layout(self.layout(), seed)
    }
}

impl TorchScriptSpec {
    /// The declared parameters are well formed: a hash, non-empty names, no duplicate, no empty
    /// tensor, at least one parameter, at most [`crate::plan::limits::MAX_MODEL_LAYERS`]·4 of them.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |why: String| Err(ModelError::TorchScript(why));
        if !crate::plan::is_sha256_hex(&self.sha256) {
            return bad("sha256 must be the 64 lowercase hex digits of the .pt file's SHA-256".into());
        }
        if self.inputs == 0 || self.outputs == 0 {
            return Err(ModelError::EmptyLayer);
        }
        if self.parameters.is_empty() || self.parameters.len() > MAX_TORCHSCRIPT_PARAMETERS {
            return bad(format!("a TorchScript model declares 1 to {MAX_TORCHSCRIPT_PARAMETERS} parameters"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.parameters {
            let name_ok = !p.name.is_empty()
                && p.name.len() <= 256
                && p.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_'));
            if !name_ok {
                return bad(format!(
                    "parameter name {:?} must be 1 to 256 of A-Z, a-z, 0-9, '.' and '_'",
                    p.name.chars().take(64).collect::<String>()
                ));
            }
            if !seen.insert(p.name.as_str()) {
                return bad(format!("parameter '{}' is declared twice", p.name));
            }
            if p.shape.is_empty() || p.shape.len() > 8 || p.shape.contains(&0) {
                return bad(format!("parameter '{}' must have 1 to 8 dimensions, none of them 0", p.name));
            }
        }
        Ok(())
    }
}

/// Most parameters a TorchScript plan may declare.
pub const MAX_TORCHSCRIPT_PARAMETERS: usize = 1024;

/// The zoo's initialisation over any layout, tensor by tensor in layout order: a weight of two or
/// more dimensions is uniform in ±1/√fan_in with fan_in the product of its dimensions after the
/// first (PyTorch's `nn.Linear`/`nn.Conv2d` default); `X.bias` takes the bound of `X.weight`; a
/// one-dimensional `X.weight` (a norm layer's scale) is ones; anything else is zeros.
pub fn init_layout(layout: Vec<TensorSpec>, seed: u64) -> Weights {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let total = layout.iter().map(TensorSpec::numel).sum();
    let mut values = Vec::with_capacity(total);
    let fan_in_of = |t: &TensorSpec| (t.shape.len() >= 2).then(|| t.shape[1..].iter().product::<usize>());
    for t in &layout {
        let sibling = t
            .name
            .strip_suffix(".bias")
            .and_then(|prefix| layout.iter().find(|w| w.name == format!("{prefix}.weight")))
            .and_then(fan_in_of);
        let own = if t.name.ends_with(".weight") || !t.name.ends_with(".bias") { fan_in_of(t) } else { None };
        match own.or(sibling) {
            Some(fan_in) => {
                let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                values.extend((0..t.numel()).map(|_| rng.random_range(-bound..bound) as f32));
            }
            None if t.name.ends_with(".weight") => values.extend(std::iter::repeat_n(1.0f32, t.numel())),
            None => values.extend(std::iter::repeat_n(0.0f32, t.numel())),
        }
    }
    Weights { layout, values }
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
            values.extend(crate::transfer::le_bytes_to_f32(t.data()).map_err(|e| ModelError::Format(e.to_string()))?);
        }
        Self::new(layout.to_vec(), values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_init_match_pytorch_shapes_and_bounds() {
        let mlp = ModelSpec::Mlp { inputs: 13, hidden: vec![16, 8], outputs: 1 };
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
        let cnn = ModelSpec::Cnn { channels: 1, height: 13, width: 1, filters: vec![4, 2], kernel_size: 3, outputs: 1 };
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
            ModelSpec::Cnn { channels: 1, height: 2, width: 2, filters: vec![1], kernel_size: 2, outputs: 1 }
                .validate()
                .is_err()
        );
    }

    /// Opacus's MNIST network (its `examples/mnist.py` SampleConvNet, at the benchmark's 5×5 first
    /// kernel), as a plan writes it.
    fn opacus_mnist_cnn() -> ModelSpec {
        let plan = "kind = 'convnet'\nchannels = 1\nheight = 28\nwidth = 28\nhidden = [32]\noutputs = 10\n\
                    [[conv]]\nfilters = 16\nkernel = 5\nstride = 2\npadding = 2\npool = 2\n\
                    [[conv]]\nfilters = 32\nkernel = 4\nstride = 2\npool = 2\n";
        toml::from_str(plan).expect("the convnet parses")
    }

    #[test]
    fn a_convnet_has_pytorchs_shapes_and_refuses_a_geometry_that_does_not_fit() {
        let cnn = opacus_mnist_cnn();
        cnn.validate().expect("valid");
        let shapes: Vec<(String, Vec<usize>)> = cnn.layout().into_iter().map(|t| (t.name, t.shape)).collect();
        // 28 → conv 5/s2/p2 → 14 → pool 2/1 → 13 → conv 4/s2 → 5 → pool 2/1 → 4: 32·4·4 = 512 features,
        // as torch.nn prints the same network's parameters.
        assert_eq!(
            shapes,
            [
                ("conv.0.weight".to_string(), vec![16, 1, 5, 5]),
                ("conv.0.bias".to_string(), vec![16]),
                ("conv.1.weight".to_string(), vec![32, 16, 4, 4]),
                ("conv.1.bias".to_string(), vec![32]),
                ("hidden.0.weight".to_string(), vec![32, 512]),
                ("hidden.0.bias".to_string(), vec![32]),
                ("out.weight".to_string(), vec![10, 32]),
                ("out.bias".to_string(), vec![10]),
            ]
        );
        // sum(p.numel() for p in net.parameters()) in PyTorch.
        assert_eq!(cnn.num_params(), 25_386);
        assert_eq!(cnn.checked_num_params(), Some(25_386));
        assert_eq!((cnn.inputs(), cnn.outputs(), cnn.name()), (784, 10, "convnet"));
        assert_eq!(cnn.conv_geometry()[0], ConvGeometry { stride: 2, padding: 2, pool: Some((2, 1)) });
        // Serialised back as written (defaults left out), so the coordinator and nodes agree on it.
        let again: ModelSpec = toml::from_str(&toml::to_string(&cnn).expect("serialises")).expect("parses");
        assert_eq!(again, cnn);

        let with = |f: &dyn Fn(&mut ConvLayer)| {
            let mut spec = opacus_mnist_cnn();
            if let ModelSpec::Convnet { conv, .. } = &mut spec {
                f(&mut conv[1]);
            }
            spec
        };
        for (bad, why) in [
            (with(&|l| l.kernel = 14), "a kernel larger than its 13×13 input"),
            (with(&|l| l.stride = 0), "stride 0"),
            (with(&|l| l.padding = 3), "padding over kernel/2"),
            (with(&|l| l.pool = 6), "a pool larger than the 5×5 convolution output"),
            (with(&|l| l.pool_stride = 0), "pool stride 0"),
            (with(&|l| l.kernel = usize::MAX), "a kernel of usize::MAX"),
            (with(&|l| l.stride = 14), "a stride beyond its 13×13 input"),
            (with(&|l| l.stride = 1 << 63), "a stride that would wrap an i64"),
            (with(&|l| l.pool_stride = 6), "a pool stride beyond the 5×5 convolution output"),
        ] {
            let err = bad.validate().expect_err(why);
            assert!(matches!(err, ModelError::Geometry(_)), "{why}: {err}");
            assert!(err.to_string().contains("convolution 1"), "{why}: {err}");
            assert_eq!(bad.checked_num_params(), None, "{why}");
        }
        // The reviewer's hostile plan: a huge kernel padded to fit a 28×28 image.
        let mut huge = opacus_mnist_cnn();
        if let ModelSpec::Convnet { conv, .. } = &mut huge {
            (conv[0].kernel, conv[0].padding) = (8191, 4095);
        }
        assert!(matches!(huge.validate(), Err(ModelError::Geometry(_))));
        // Few parameters, but 64·3²·256² = 37.7 M values unfolded per example.
        let wide = ModelSpec::Convnet {
            channels: 64,
            height: 256,
            width: 256,
            conv: vec![ConvLayer { filters: 1, kernel: 3, stride: 1, padding: 1, pool: 0, pool_stride: 1 }],
            hidden: vec![],
            outputs: 1,
        };
        let err = wide.validate_geometry().expect_err("too much unfolded");
        assert!(err.to_string().contains("unfolds 37748736 values per example"), "{err}");
        let mut empty = opacus_mnist_cnn();
        if let ModelSpec::Convnet { conv, .. } = &mut empty {
            conv.clear();
        }
        assert!(matches!(empty.validate(), Err(ModelError::EmptyLayer)));
    }

    #[test]
    fn the_checked_parameter_count_is_the_layouts_and_overflow_is_none() {
        let zoo = [
            ModelSpec::LogisticRegression { inputs: 13, outputs: 1 },
            ModelSpec::Mlp { inputs: 13, hidden: vec![16, 8], outputs: 1 },
            ModelSpec::Mlp { inputs: 13, hidden: vec![11200, 11200], outputs: 1 },
            ModelSpec::Cnn { channels: 1, height: 13, width: 1, filters: vec![4, 2], kernel_size: 3, outputs: 1 },
            ModelSpec::Cnn { channels: 3, height: 8, width: 8, filters: vec![5], kernel_size: 5, outputs: 1 },
        ];
        for spec in zoo {
            assert_eq!(spec.checked_num_params(), Some(spec.num_params() as u64), "{spec:?}");
        }
        let huge = usize::MAX / 2;
        for spec in [
            ModelSpec::LogisticRegression { inputs: usize::MAX, outputs: 1 },
            ModelSpec::Mlp { inputs: 13, hidden: vec![huge, huge], outputs: 1 },
            ModelSpec::Cnn { channels: huge, height: 2, width: 2, filters: vec![1], kernel_size: 3, outputs: 1 },
            ModelSpec::Cnn { channels: 1, height: huge, width: huge, filters: vec![1], kernel_size: 1, outputs: 1 },
        ] {
            assert_eq!(spec.checked_num_params(), None, "{spec:?}");
        }
    }

    #[test]
    fn safetensors_roundtrip_and_wrong_layout() -> Result<(), ModelError> {
        let spec = ModelSpec::LogisticRegression { inputs: 13, outputs: 1 };
        let w = spec.init(1);
        let bytes = w.to_safetensors()?;
        assert_eq!(Weights::from_safetensors(&bytes, &spec.layout())?, w);
        let other = ModelSpec::LogisticRegression { inputs: 12, outputs: 1 };
        assert!(matches!(Weights::from_safetensors(&bytes, &other.layout()), Err(ModelError::Shape { .. })));
        assert!(Weights::from_safetensors(b"garbage", &spec.layout()).is_err());
        Ok(())
    }
}
