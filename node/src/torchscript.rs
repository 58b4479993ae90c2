//! TorchScript models a consortium wrote itself (`torch.jit.script` + `torch.jit.save`), named in
//! a plan by the SHA-256 of the `.pt` file, loaded through libtorch's TorchScript runtime.
//!
//! A file is trusted only as far as the hospital approved its hash ([`crate::approvals`]), so
//! loading checks, in this order and before anything runs: the bytes hash to the plan's SHA-256
//! (the same bytes are then handed to libtorch, so nothing can change between the check and the
//! load); the zip archive declares no buffers (see [`ScriptError::Buffers`]); libtorch loads it;
//! its `named_parameters()` equal the plan's declared parameters (names, shapes, order, float32,
//! trainable); the global weights are copied in; one forward pass on zeros returns
//! `[n, outputs]`. Every libtorch call is a fallible `f_*` call, so a file that does not load is
//! an error and never a crash of the node.
//!
//! DP-SGD needs each example's gradient, which ghost clipping ([`crate::dpsgd`]) gets from the
//! zoo's known layer structure. A TorchScript module is opaque, so
//! [`ScriptNet::clipped_sum_by_microbatches`] runs one forward and one backward pass per example
//! (micro-batches of one), clips each gradient to C and sums: exact per-example clipping, at the
//! cost of n backward passes per batch.

use std::io::Read;
use std::path::{Path, PathBuf};

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::model::{ParameterSpec, TensorSpec, TorchScriptSpec, Weights};
use tch::{CModule, Device, Kind, TchError, Tensor, nn};

/// Largest `.pt` file a node reads (1 GiB: 2²⁸ float32 parameters, the plan bound, plus code).
pub const MAX_TORCHSCRIPT_BYTES: u64 = 1 << 30;

/// Most bytes of TorchScript source read from the archive to look for buffers: the code of a
/// real model is kilobytes; this bounds a zip bomb.
const MAX_CODE_BYTES: u64 = 64 << 20;

/// Why a TorchScript file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot read TorchScript file {path}: {source}; check the path and its permissions")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("TorchScript file {path} is {size} bytes, more than the {max} a node reads; a model this large is refused")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error(
        "TorchScript file {path} has SHA-256 {file}, the plan names {plan}: it is not the plan's model; fetch the model by its hash again or ask the lead which file the plan means"
    )]
    HashMismatch { path: PathBuf, file: String, plan: String },
    #[error(
        "{path} is not a TorchScript module libtorch can load ({reason}); save the model with torch.jit.save(torch.jit.script(model), PATH)"
    )]
    NotTorchScript { path: PathBuf, reason: String },
    #[error(
        "{path} has buffers ({}) that training would change (BatchNorm's running statistics, for example): they are neither averaged across hospitals nor covered by per-example clipping, so such modules are refused; replace BatchNorm by LayerNorm or GroupNorm (parameters only) and save the module again",
        .names.join(", ")
    )]
    Buffers { path: PathBuf, names: Vec<String> },
    #[error(
        "{path}: {entry}: {why}; Sanctum trains only modules whose forward is a function of their parameters and input (ask the model's author to remove it)"
    )]
    Forbidden { path: PathBuf, entry: String, why: &'static str },
    #[error(
        "{path}: {difference}; the plan's [model] parameters must list the module's named_parameters() in order (`sanctum-node model inspect FILE --inputs N` prints them)"
    )]
    Parameters { path: PathBuf, difference: String },
    #[error("{path}: parameter '{name}' is {kind}, not float32; save the module after model.float()")]
    Kind { path: PathBuf, name: String, kind: String },
    #[error(
        "{path}: parameter '{name}' is frozen (requires_grad = False); every parameter of a federated model is trained, so unfreeze it or make it a constant"
    )]
    Frozen { path: PathBuf, name: String },
    #[error("{path}: the global weights do not fit the module: {0}", .reason)]
    Weights { path: PathBuf, reason: String },
    #[error(
        "{path}: forward on a [{rows}, {inputs}] batch of zeros fails: {reason}; check the plan's inputs (the schema's number of model inputs) against what the module's forward takes"
    )]
    Forward { path: PathBuf, rows: i64, inputs: usize, reason: String },
    #[error("{path}: forward returns shape {got:?}, the plan says [n, {want}]; fix the plan's outputs or the module")]
    Outputs { path: PathBuf, got: Vec<i64>, want: usize },
    #[error("{path}: libtorch: {source}")]
    Torch { path: PathBuf, source: TchError },
}

impl ScriptError {
    /// The refusal reason for the lead: what is wrong, never the node's path (its state
    /// directory), and no libtorch message (which can quote the path). Parameter names and
    /// shapes come from the plan or the approved file, so they may be named.
    pub fn public_reason(&self) -> String {
        let what = match self {
            ScriptError::Read { .. } => "the stored file cannot be read".to_string(),
            ScriptError::TooLarge { size, max, .. } => {
                format!("the file is {size} bytes, more than the {max} a node reads")
            }
            ScriptError::HashMismatch { file, plan, .. } => {
                format!("the stored file has SHA-256 {file}, the plan names {plan}")
            }
            ScriptError::NotTorchScript { .. } => "libtorch cannot load it as a TorchScript module".to_string(),
            ScriptError::Buffers { names, .. } => {
                format!("it has buffers training would change ({})", names.join(", "))
            }
            ScriptError::Forbidden { why, .. } => (*why).to_string(),
            ScriptError::Parameters { difference, .. } => {
                format!("its parameters are not the plan's ({difference})")
            }
            ScriptError::Kind { name, kind, .. } => format!("parameter '{name}' is {kind}, not float32"),
            ScriptError::Frozen { name, .. } => format!("parameter '{name}' is frozen"),
            ScriptError::Weights { reason, .. } => format!("the global weights do not fit it ({reason})"),
            ScriptError::Forward { rows, inputs, .. } => {
                format!("forward on a [{rows}, {inputs}] batch fails or changes the module's own parameters")
            }
            ScriptError::Outputs { got, want, .. } => {
                format!("forward returns shape {got:?}, the plan says [n, {want}]")
            }
            ScriptError::Torch { .. } => "libtorch failed on it".to_string(),
        };
        format!("{what}; the hospital's node log has the detail")
    }
}

/// What a TorchScript file is, as `model inspect` and `model approve` print it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspection {
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    pub inputs: usize,
    /// Learned from one forward pass on zeros.
    pub outputs: usize,
    /// `named_parameters()`, in order.
    pub parameters: Vec<ParameterSpec>,
}

impl Inspection {
    /// Scalars over all parameters.
    pub fn num_params(&self) -> u64 {
        self.parameters.iter().map(|p| p.shape.iter().product::<usize>() as u64).sum()
    }

    /// The plan's model for this file (`file` as given, lead side only).
    pub fn spec(&self, file: Option<PathBuf>) -> TorchScriptSpec {
        TorchScriptSpec {
            sha256: self.sha256.clone(),
            inputs: self.inputs,
            outputs: self.outputs,
            parameters: self.parameters.clone(),
            file,
        }
    }

    /// The `[model]` block a lead puts in a plan (TOML; `file` relative to the plan).
    pub fn model_toml(&self, file: Option<&str>) -> String {
        let mut out = format!(
            "[model]\nkind = \"torchscript\"\nsha256 = \"{}\"\ninputs = {}\noutputs = {}\nparameters = [\n",
            self.sha256, self.inputs, self.outputs
        );
        for p in &self.parameters {
            let shape: Vec<String> = p.shape.iter().map(usize::to_string).collect();
            out.push_str(&format!("    {{ name = \"{}\", shape = [{}] }},\n", p.name, shape.join(", ")));
        }
        out.push_str("]\n");
        if let Some(f) = file {
            out.push_str(&format!("file = {}\n", toml_string(f)));
        }
        out
    }
}

/// A TOML basic string (quotes and backslashes escaped; control characters as \u escapes).
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A loaded TorchScript module whose parameters are the plan's, in a var store an optimizer can
/// train.
pub struct ScriptNet {
    module: CModule,
    vs: nn::VarStore,
    /// The module's parameters (shared with it: an optimizer step on these moves the module), in
    /// layout order.
    params: Vec<Tensor>,
    layout: Vec<TensorSpec>,
    outputs: usize,
    path: PathBuf,
}

/// Reads a file of at most [`MAX_TORCHSCRIPT_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, ScriptError> {
    let read = |source| ScriptError::Read { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read)?;
    let size = file.metadata().map_err(read)?.len();
    if size > MAX_TORCHSCRIPT_BYTES {
        return Err(ScriptError::TooLarge { path: path.to_path_buf(), size, max: MAX_TORCHSCRIPT_BYTES });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_TORCHSCRIPT_BYTES + 1).read_to_end(&mut bytes).map_err(read)?;
    if bytes.len() as u64 > MAX_TORCHSCRIPT_BYTES {
        return Err(ScriptError::TooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            max: MAX_TORCHSCRIPT_BYTES,
        });
    }
    Ok(bytes)
}

/// The buffers the archive's TorchScript code declares, as `Class.buffer`. Every scripted module
/// class is serialised with its `__buffers__ = [...]` list (`code/**.py` in the archive), which
/// is the only place a saved module lists them: tch has no `named_buffers`.
pub fn declared_buffers(path: &Path, bytes: &[u8]) -> Result<Vec<String>, ScriptError> {
    let not_ts = |reason: String| ScriptError::NotTorchScript { path: path.to_path_buf(), reason };
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| not_ts(format!("not a zip archive: {e}")))?;
    let mut names = Vec::new();
    let mut code_files = 0usize;
    let mut budget = MAX_CODE_BYTES;
    for i in 0..archive.len() {
        let entry = archive.by_index(i).map_err(|e| not_ts(format!("archive entry {i}: {e}")))?;
        let name = entry.name().to_string();
        let is_code = name.split('/').nth(1) == Some("code") && name.ends_with(".py");
        if !is_code {
            continue;
        }
        code_files += 1;
        let mut text = String::new();
        let read = entry.take(budget + 1).read_to_string(&mut text);
        read.map_err(|e| not_ts(format!("archive entry {name}: {e}")))?;
        if text.len() as u64 > budget {
            return Err(not_ts(format!("its code is larger than {MAX_CODE_BYTES} bytes")));
        }
        budget -= text.len() as u64;
        if let Some(why) = forbidden_code(&text) {
            return Err(ScriptError::Forbidden { path: path.to_path_buf(), entry: name, why });
        }
        let mut class = String::from("?");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("class ") {
                class = rest.split(['(', ':']).next().unwrap_or("?").trim().to_string();
            } else if let Some(list) = line.trim().strip_prefix("__buffers__ = [") {
                for b in list.trim_end_matches(']').split(',') {
                    let b = b.trim().trim_matches('"');
                    if !b.is_empty() {
                        names.push(format!("{class}.{b}"));
                    }
                }
            }
        }
    }
    if code_files == 0 {
        return Err(not_ts("the archive holds no TorchScript code (code/*.py)".into()));
    }
    Ok(names)
}

/// What a module's TorchScript code may not do, and why: read or write files (`torch.from_file`,
/// `torch.save`, `torch.load`, `open`), call operators from outside libtorch's own (`ops.` other
/// than `ops.aten` and `ops.prim`), or assign its own attributes in a method, which would carry
/// state (one example's data) from one call to the next, past per-example clipping. A textual
/// check on the code the archive holds: it refuses more than it must, never less than these.
fn forbidden_code(code: &str) -> Option<&'static str> {
    const FILE_OPS: [&str; 5] = ["from_file", "torch.save", "torch.load", "open(", "__torch__.torch.classes"];
    if FILE_OPS.iter().any(|op| code.contains(op)) {
        return Some("it reads or writes files or uses custom classes");
    }
    for (i, _) in code.match_indices("ops.") {
        let rest = &code[i + 4..];
        let prev = code[..i].chars().next_back();
        if prev.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        if !(rest.starts_with("aten.") || rest.starts_with("prim.")) {
            return Some("it calls an operator from outside libtorch");
        }
    }
    let mut in_method = false;
    for line in code.lines() {
        let t = line.trim_start();
        if t.starts_with("def ") {
            in_method = !t.starts_with("def __init__");
        } else if t.starts_with("class ") {
            in_method = false;
        } else if in_method && let Some(rest) = t.strip_prefix("self.") {
            // `self.x = …` or `self.x += …` inside a method; `==` is a comparison.
            let after = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            let after = after.trim_start();
            if (after.starts_with('=') && !after.starts_with("=="))
                || after.starts_with("+=")
                || after.starts_with("-=")
            {
                return Some(
                    "a method assigns the module's own attributes, which carries state from one call to the next",
                );
            }
        }
    }
    None
}

/// Loads bytes with libtorch on `device` and returns the module with its named parameters.
fn load_module(path: &Path, bytes: &[u8], device: Device) -> Result<(CModule, Vec<(String, Tensor)>), ScriptError> {
    let buffers = declared_buffers(path, bytes)?;
    if !buffers.is_empty() {
        return Err(ScriptError::Buffers { path: path.to_path_buf(), names: buffers });
    }
    let not_ts = |e: TchError| ScriptError::NotTorchScript { path: path.to_path_buf(), reason: first_line(&e) };
    let mut module = CModule::load_data_on_device(&mut &bytes[..], device).map_err(not_ts)?;
    module.f_set_train().map_err(not_ts)?;
    let named = module.named_parameters().map_err(not_ts)?;
    for (name, t) in &named {
        let kind = t.f_kind().map_err(|source| ScriptError::Torch { path: path.to_path_buf(), source })?;
        if kind != Kind::Float {
            return Err(ScriptError::Kind { path: path.to_path_buf(), name: name.clone(), kind: format!("{kind:?}") });
        }
        if !t.requires_grad() {
            return Err(ScriptError::Frozen { path: path.to_path_buf(), name: name.clone() });
        }
    }
    Ok((module, named))
}

/// libtorch's messages carry a C++ backtrace after the first line; the first says what failed.
fn first_line(e: &TchError) -> String {
    let text = e.to_string();
    text.lines().find(|l| !l.trim().is_empty()).unwrap_or("unknown error").chars().take(300).collect()
}

fn shape_of(t: &Tensor) -> Vec<usize> {
    t.size().iter().map(|&d| d.max(0) as usize).collect()
}

/// Runs `forward` on `[rows, inputs]` zeros without gradients; the output's shape.
fn probe(module: &CModule, path: &Path, rows: i64, inputs: usize, device: Device) -> Result<Vec<i64>, ScriptError> {
    let fail = |e: TchError| ScriptError::Forward { path: path.to_path_buf(), rows, inputs, reason: first_line(&e) };
    tch::no_grad(|| -> Result<Vec<i64>, TchError> {
        let x = Tensor::f_zeros([rows, inputs as i64], (Kind::Float, device))?;
        Ok(module.forward_ts(&[x])?.size())
    })
    .map_err(fail)
}

/// Reads and loads a TorchScript file without a plan: its hash, parameters and (from one forward
/// pass on `[2, inputs]` zeros, on the CPU) its outputs. A file this refuses is not approvable.
pub fn inspect(path: &Path, inputs: usize) -> Result<Inspection, ScriptError> {
    let bytes = read_bounded(path)?;
    let sha256 = ContentHash::of(&bytes).to_hex();
    let (module, named) = load_module(path, &bytes, Device::Cpu)?;
    let parameters = named.iter().map(|(name, t)| ParameterSpec { name: name.clone(), shape: shape_of(t) }).collect();
    let shape = probe(&module, path, 2, inputs, Device::Cpu)?;
    let outputs = match shape.as_slice() {
        [2] => 1,
        [2, k] if *k >= 1 => *k as usize,
        _ => return Err(ScriptError::Outputs { path: path.to_path_buf(), got: shape, want: 0 }),
    };
    Ok(Inspection { sha256, inputs, outputs, parameters })
}

/// The first difference between the module's parameters and the plan's, in words.
fn first_difference(got: &[(String, Tensor)], want: &[ParameterSpec]) -> Option<String> {
    for (i, w) in want.iter().enumerate() {
        let Some((name, t)) = got.get(i) else {
            return Some(format!(
                "the module has {} parameters, the plan declares {}: the plan's parameter {} '{}' {:?} is not in the module",
                got.len(),
                want.len(),
                i,
                w.name,
                w.shape
            ));
        };
        let shape = shape_of(t);
        if *name != w.name || shape != w.shape {
            return Some(format!(
                "parameter {i} is '{name}' {shape:?} in the module, the plan declares '{}' {:?}",
                w.name, w.shape
            ));
        }
    }
    got.get(want.len()).map(|(name, t)| {
        format!(
            "the module has {} parameters, the plan declares {}: the module's parameter {} '{name}' {:?} is not declared",
            got.len(),
            want.len(),
            want.len(),
            shape_of(t)
        )
    })
}

impl ScriptNet {
    /// Loads `path` as the plan's model `spec` and copies `global` into its parameters.
    pub fn load(path: &Path, spec: &TorchScriptSpec, global: &Weights, device: Device) -> Result<Self, ScriptError> {
        let bytes = read_bounded(path)?;
        let file = ContentHash::of(&bytes).to_hex();
        if file != spec.sha256 {
            return Err(ScriptError::HashMismatch { path: path.to_path_buf(), file, plan: spec.sha256.clone() });
        }
        Self::from_bytes(path, &bytes, spec, global, device)
    }

    /// Like [`ScriptNet::load`] on bytes already read and hash-checked (e.g. fetched by hash).
    fn from_bytes(
        path: &Path,
        bytes: &[u8],
        spec: &TorchScriptSpec,
        global: &Weights,
        device: Device,
    ) -> Result<Self, ScriptError> {
        let torch = |source| ScriptError::Torch { path: path.to_path_buf(), source };
        let (module, named) = load_module(path, bytes, device)?;
        if let Some(difference) = first_difference(&named, &spec.parameters) {
            return Err(ScriptError::Parameters { path: path.to_path_buf(), difference });
        }
        let layout: Vec<TensorSpec> =
            spec.parameters.iter().map(|p| TensorSpec { name: p.name.clone(), shape: p.shape.clone() }).collect();
        if global.layout() != layout.as_slice() {
            return Err(ScriptError::Weights {
                path: path.to_path_buf(),
                reason: "the global model's layout is not the plan's declared parameters".into(),
            });
        }
        let vs = nn::VarStore::new(device);
        let mut params = Vec::with_capacity(named.len());
        for ((name, t), (_, values)) in named.into_iter().zip(global.tensors()) {
            let mut var = t;
            let shape: Vec<i64> = var.size();
            let src = Tensor::f_from_slice(values)
                .and_then(|s| s.f_view(shape.as_slice()))
                .and_then(|s| s.f_to_device(device))
                .map_err(torch)?;
            tch::no_grad(|| var.f_copy_(&src)).map_err(torch)?;
            // Nested paths, so the var store names the variable exactly as the plan does
            // (`hidden.0.weight`); tch refuses a '.' inside one path component.
            let mut parts: Vec<&str> = name.split('.').collect();
            let leaf = parts.pop().unwrap_or_default();
            if leaf.is_empty() || parts.iter().any(|p| p.is_empty()) {
                return Err(ScriptError::Parameters {
                    path: path.to_path_buf(),
                    difference: format!("parameter name '{name}' has an empty component"),
                });
            }
            let vpath = parts.iter().fold(vs.root(), |p, s| p / *s);
            params.push(vpath.add(leaf, var, true));
        }
        let net = Self { module, vs, params, layout, outputs: spec.outputs, path: path.to_path_buf() };
        // The first call after the global weights are in place goes through the checked forward:
        // a module that writes into its own parameters is refused before any round (a raw call
        // first could overwrite them with what a second call writes again, unseen).
        let zeros = Tensor::f_zeros([2, spec.inputs as i64], (Kind::Float, device)).map_err(torch)?;
        let got = tch::no_grad(|| -> Result<Vec<i64>, TchError> {
            let before: Vec<Tensor> = net.params.iter().map(Tensor::f_detach_copy).collect::<Result<_, _>>()?;
            let size = net.module.forward_ts(&[&zeros])?.size();
            net.unchanged(&before)?;
            Ok(size)
        })
        .map_err(|e| ScriptError::Forward {
            path: path.to_path_buf(),
            rows: 2,
            inputs: spec.inputs,
            reason: first_line(&e),
        })?;
        net.check_output(&got, 2).map_err(|_| ScriptError::Outputs {
            path: path.to_path_buf(),
            got,
            want: spec.outputs,
        })?;
        Ok(net)
    }

    /// Whether `shape` is `[n, outputs]`, or `[n]` with outputs = 1.
    fn check_output(&self, shape: &[i64], n: i64) -> Result<(), TchError> {
        let k = self.outputs as i64;
        match shape {
            [m, j] if *m == n && *j == k => Ok(()),
            [m] if *m == n && k == 1 => Ok(()),
            _ => Err(TchError::Shape(format!(
                "{}: forward returned shape {shape:?} for {n} examples, the plan says [{n}, {k}]",
                self.path.display()
            ))),
        }
    }

    /// `forward(x)` for `x` of shape `[n, inputs]`: `[n, outputs]` (a `[n]` output of a one-output
    /// model is reshaped to `[n, 1]`); any other shape is an error.
    ///
    /// The module is code the hospital approved, not code it trusts with its parameters: a
    /// `forward` that writes into them (`self.fc.weight.copy_(x[0])` would put a patient's row
    /// into the update, past DP-SGD's clipping and noise) is caught here. The parameters are
    /// copied before the call and compared bit for bit after it; any change is an error and the
    /// round is not sent. The cost is one copy and one comparison of the parameters per call.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let n = x.size().first().copied().unwrap_or(0);
        let before: Vec<Tensor> =
            tch::no_grad(|| self.params.iter().map(Tensor::f_detach_copy).collect::<Result<_, _>>())?;
        let out = self.module.forward_ts(&[x])?;
        self.unchanged(&before)?;
        let shape = out.size();
        self.check_output(&shape, n)?;
        if shape.len() == 1 { out.f_view([n, 1]) } else { Ok(out) }
    }

    /// An error unless every parameter is bit for bit what `before` holds.
    fn unchanged(&self, before: &[Tensor]) -> Result<(), TchError> {
        for ((p, b), spec) in self.params.iter().zip(before).zip(&self.layout) {
            if !tch::no_grad(|| p.f_detach()?.f_equal(b))? {
                return Err(TchError::Kind(format!(
                    "the TorchScript module changed its own parameter '{}' during forward; a module that writes into its parameters could carry patient data out past DP-SGD, so this node refuses to train it (revoke its approval)",
                    spec.name
                )));
            }
        }
        Ok(())
    }

    /// Training mode (dropout active; the default after loading) or evaluation mode.
    pub fn set_training(&mut self, train: bool) -> Result<(), TchError> {
        if train { self.module.f_set_train() } else { self.module.f_set_eval() }
    }

    /// Every trainable tensor, in layout order (shared with the module).
    pub fn params(&self) -> Vec<Tensor> {
        self.params.iter().map(Tensor::shallow_clone).collect()
    }

    /// The var store holding the parameters, to build an optimizer on.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The current parameters as flat weights in layout order.
    pub fn weights(&self) -> Result<Weights, ScriptError> {
        let torch = |source| ScriptError::Torch { path: self.path.clone(), source };
        let mut values = Vec::with_capacity(self.layout.iter().map(TensorSpec::numel).sum());
        for t in &self.params {
            let flat = t
                .f_detach()
                .and_then(|t| t.f_to_device(Device::Cpu))
                .and_then(|t| t.f_flatten(0, -1))
                .map_err(torch)?;
            values.extend(Vec::<f32>::try_from(&flat).map_err(torch)?);
        }
        Weights::new(self.layout.clone(), values)
            .map_err(|e| ScriptError::Weights { path: self.path.clone(), reason: e.to_string() })
    }

    /// DP-SGD's clipped sum by micro-batches of one: for each row i of `x` (`[n, inputs]`), one
    /// forward pass on `x[i..i+1]`, `per_example_loss(outputs [1, k], i)` (summed to a scalar), one
    /// backward pass to the parameters, the gradient scaled by cᵢ = min(1, C/(‖∇ℓᵢ‖ + 1e-6)) — the
    /// factor [`crate::dpsgd`] uses — and added up. Returns Σᵢ cᵢ·∇ℓᵢ per parameter in layout
    /// order and each ‖∇ℓᵢ‖ before clipping. Each example's contribution has norm at most C
    /// whatever the module does, because the clipping sees the whole gradient of that example.
    /// A parameter the loss does not reach gets a zero gradient.
    pub fn clipped_sum_by_microbatches(
        &self,
        x: &Tensor,
        per_example_loss: &dyn Fn(&Tensor, i64) -> Result<Tensor, TchError>,
        clip_norm: f64,
    ) -> Result<(Vec<Tensor>, Vec<f64>), TchError> {
        let n = x.size().first().copied().unwrap_or(0);
        let mut sums: Vec<Tensor> = self.params.iter().map(|p| p.f_zeros_like()).collect::<Result<_, _>>()?;
        let mut norms = Vec::with_capacity(n.max(0) as usize);
        for i in 0..n {
            let out = self.forward(&x.f_narrow(0, i, 1)?)?;
            let loss = per_example_loss(&out, i)?.f_sum(Kind::Float)?;
            let grads = Tensor::f_run_backward(&[&loss], &self.params, false, false)?;
            let grads: Vec<Tensor> = grads
                .into_iter()
                .zip(&self.params)
                .map(|(g, p)| if g.defined() { Ok(g) } else { p.f_zeros_like() })
                .collect::<Result<_, TchError>>()?;
            let mut sq = 0.0;
            for g in &grads {
                sq += g.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
            }
            let norm = sq.sqrt();
            let c = (clip_norm / (norm + 1e-6)).min(1.0);
            for (s, g) in sums.iter_mut().zip(&grads) {
                *s = s.f_add(&g.f_mul_scalar(c)?)?;
            }
            norms.push(norm);
        }
        Ok((sums, norms))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use sanctum_protocol::model::ModelSpec;
    use tch::Reduction;
    use tch::nn::OptimizerConfig;

    use super::*;
    use crate::train::Net;

    pub(crate) fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/torchscript").join(name)
    }

    /// The plan's model for a fixture, as `model inspect` prints it.
    fn spec_of(name: &str) -> TorchScriptSpec {
        inspect(&fixture(name), 13).unwrap().spec(None)
    }

    fn batch(n: i64, seed: i64) -> (Tensor, Tensor) {
        tch::manual_seed(seed);
        let x = Tensor::randn([n, 13], (Kind::Float, Device::Cpu)) * 2.0;
        let y = Tensor::randint(2, [n], (Kind::Float, Device::Cpu));
        (x, y)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// A zoo net's values (its own `weights` is private to train.rs).
    fn weights_of(net: &Net, like: &Weights) -> Weights {
        let values =
            net.params().iter().flat_map(|t| Vec::<f32>::try_from(&t.detach().flatten(0, -1)).unwrap()).collect();
        Weights::new(like.layout().to_vec(), values).unwrap()
    }

    fn zoo_pairs() -> [(&'static str, ModelSpec); 2] {
        [
            ("logreg.pt", ModelSpec::LogisticRegression { inputs: 13, outputs: 1 }),
            ("mlp.pt", ModelSpec::Mlp { inputs: 13, hidden: vec![16], outputs: 1 }),
        ]
    }

    #[test]
    fn inspect_reads_hash_parameters_and_outputs() {
        let path = fixture("logreg.pt");
        let i = inspect(&path, 13).unwrap();
        assert_eq!(i.sha256, ContentHash::of(&std::fs::read(&path).unwrap()).to_hex());
        assert_eq!(i.outputs, 1);
        assert_eq!(
            i.parameters,
            vec![
                ParameterSpec { name: "fc.weight".into(), shape: vec![1, 13] },
                ParameterSpec { name: "fc.bias".into(), shape: vec![1] },
            ]
        );
        assert_eq!(i.num_params(), 14);
        // The printed block is a plan's [model] that parses back to the same spec.
        #[derive(serde::Deserialize)]
        struct P {
            model: ModelSpec,
        }
        let p: P = toml::from_str(&i.model_toml(Some("models/lr \"v1\".pt"))).unwrap();
        let mut want = i.spec(Some(PathBuf::from("models/lr \"v1\".pt")));
        assert_eq!(p.model, ModelSpec::Torchscript(want.clone()));
        want.file = None;
        p.model.validate().unwrap();
    }

    #[test]
    fn torchscript_and_zoo_start_equal_compute_equal_and_train_equal() {
        for (file, zoo) in zoo_pairs() {
            let spec = spec_of(file);
            let ts_model = ModelSpec::Torchscript(spec.clone());
            // The same initialisation rule over the declared parameters: equal by construction.
            let w = zoo.init(7);
            assert_eq!(ts_model.init(7), w, "{file}");
            let script = ScriptNet::load(&fixture(file), &spec, &w, Device::Cpu).unwrap();
            let net = Net::new(&zoo, &w, Device::Cpu).unwrap();
            assert_eq!(script.weights().unwrap(), w, "{file}: the global weights were copied in");
            let (x, y) = batch(32, 1);
            let (a, b) = (script.forward(&x).unwrap(), net.forward(&x).unwrap());
            assert_eq!(a.size(), vec![32, 1]);
            assert!(max_diff(&a, &b) <= 1e-6, "{file}: forward differs by {}", max_diff(&a, &b));
            // Ten SGD steps on the same batch: the TorchScript module through a tch optimizer on
            // its var store, the zoo net by hand (θ ← θ − lr·∇, what nn::Sgd does).
            let mut opt = nn::Sgd::default().build(script.var_store(), 0.3).unwrap();
            let bce =
                |z: &Tensor| z.view([-1]).binary_cross_entropy_with_logits::<Tensor>(&y, None, None, Reduction::Mean);
            let params = net.params();
            for _ in 0..10 {
                let loss = bce(&script.forward(&x).unwrap());
                opt.zero_grad();
                loss.backward();
                opt.step();
                let loss = bce(&net.forward(&x).unwrap());
                let grads = Tensor::run_backward(&[&loss], &params, false, false);
                tch::no_grad(|| {
                    for (p, g) in params.iter().zip(&grads) {
                        let mut p = p.shallow_clone();
                        let _ = p.f_sub_(&(g * 0.3)).unwrap();
                    }
                });
            }
            let (ws, wz) = (script.weights().unwrap(), weights_of(&net, &w));
            assert_ne!(ws, w, "{file}: training moved the weights");
            for (a, b) in ws.values().iter().zip(wz.values()) {
                assert!((a - b).abs() <= 1e-6, "{file}: weights after SGD differ: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_flat_output_of_a_one_output_model_is_reshaped() {
        let spec = spec_of("logreg_flat.pt");
        let w = ModelSpec::Torchscript(spec.clone()).init(1);
        let script = ScriptNet::load(&fixture("logreg_flat.pt"), &spec, &w, Device::Cpu).unwrap();
        let (x, _) = batch(5, 2);
        assert_eq!(script.forward(&x).unwrap().size(), vec![5, 1]);
    }

    fn bce_of(y: &Tensor) -> impl Fn(&Tensor, i64) -> Result<Tensor, TchError> + '_ {
        move |out, i| {
            out.f_view([-1])?.f_binary_cross_entropy_with_logits::<Tensor>(
                &y.f_narrow(0, i, 1)?,
                None,
                None,
                Reduction::None,
            )
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]
        #[test]
        fn microbatch_clipping_equals_ghost_clipping_and_bounds_each_example(
            seed in 0u64..1000, clip in 0.01f64..5.0, n in 1i64..24,
        ) {
            let (file, zoo) = &zoo_pairs()[(seed % 2) as usize];
            let spec = spec_of(file);
            let w = zoo.init(seed);
            let script = ScriptNet::load(&fixture(file), &spec, &w, Device::Cpu).unwrap();
            let net = Net::new(zoo, &w, Device::Cpu).unwrap();
            let (x, y) = batch(n, seed as i64);
            let loss = bce_of(&y);
            let (sums, norms) = script.clipped_sum_by_microbatches(&x, &loss, clip).unwrap();
            let ghost = crate::dpsgd::clipped_sum(&net, &x, &y, clip, sanctum_protocol::dataset::Task::Binary, None).unwrap();
            for (a, b) in sums.iter().zip(&ghost.grads) {
                prop_assert!(max_diff(a, b) <= 1e-5, "{file}: clipped sums differ by {}", max_diff(a, b));
            }
            let ghost_norms = Vec::<f32>::try_from(&ghost.norms).unwrap();
            for (a, b) in norms.iter().zip(&ghost_norms) {
                prop_assert!((a - f64::from(*b)).abs() <= 1e-4 * a.max(1.0), "norm {a} vs {b}");
            }
            for i in 0..n {
                let xi = x.narrow(0, i, 1);
                let yi = y.narrow(0, i, 1);
                let one = script.clipped_sum_by_microbatches(&xi, &bce_of(&yi), clip).unwrap().0;
                let norm = one.iter().map(|g| g.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
                prop_assert!(norm <= clip * (1.0 + 1e-6), "example {i}: contribution {norm} > clip {clip}");
            }
        }
    }

    #[test]
    fn a_wrong_hash_is_refused_before_loading_with_both_hashes() {
        let path = fixture("logreg.pt");
        let mut spec = spec_of("logreg.pt");
        let real = spec.sha256.clone();
        spec.sha256 = "ab".repeat(32);
        let w = ModelSpec::Torchscript(spec.clone()).init(0);
        let e = ScriptNet::load(&path, &spec, &w, Device::Cpu).err().unwrap();
        let text = e.to_string();
        assert!(matches!(e, ScriptError::HashMismatch { .. }), "{text}");
        assert!(text.contains(&real) && text.contains(&spec.sha256), "{text}");
        assert!(text.contains("fetch the model by its hash again"), "{text}");
    }

    #[test]
    fn a_parameter_list_that_differs_is_refused_naming_the_first_difference() {
        let path = fixture("mlp.pt");
        let base = spec_of("mlp.pt");
        let load = |spec: &TorchScriptSpec| {
            let w = ModelSpec::Torchscript(spec.clone()).init(0);
            ScriptNet::load(&path, spec, &w, Device::Cpu).err().unwrap().to_string()
        };
        let mut shape = base.clone();
        shape.parameters[2].shape = vec![1, 8];
        let text = load(&shape);
        assert!(
            text.contains("parameter 2 is 'out.weight' [1, 16] in the module, the plan declares 'out.weight' [1, 8]"),
            "{text}"
        );
        let mut order = base.clone();
        order.parameters.swap(0, 1);
        let text = load(&order);
        assert!(
            text.contains(
                "parameter 0 is 'hidden.0.weight' [16, 13] in the module, the plan declares 'hidden.0.bias' [16]"
            ),
            "{text}"
        );
        let mut fewer = base.clone();
        fewer.parameters.pop();
        let text = load(&fewer);
        assert!(text.contains("the module has 4 parameters, the plan declares 3: the module's parameter 3 'out.bias' [1] is not declared"), "{text}");
        let mut more = base.clone();
        more.parameters.push(ParameterSpec { name: "extra.weight".into(), shape: vec![2, 2] });
        let text = load(&more);
        assert!(text.contains("the plan's parameter 4 'extra.weight' [2, 2] is not in the module"), "{text}");
        assert!(text.contains("sanctum-node model inspect FILE --inputs N"), "{text}");
    }

    #[test]
    fn garbage_and_foreign_archives_are_errors_not_crashes() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "random.pt",
                (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(),
                "not a zip archive",
            ),
            ("empty.pt", vec![], "not a zip archive"),
            ("notes.pt", zip_of(&[("notes/readme.txt", b"hello")]), "holds no TorchScript code"),
            // Looks like TorchScript to the buffer scan; libtorch refuses it.
            (
                "fake.pt",
                zip_of(&[
                    ("fake/code/__torch__.py", b"class X(Module):\n  __buffers__ = []\n"),
                    ("fake/data.pkl", b"junk"),
                ]),
                "is not a TorchScript module libtorch can load",
            ),
        ];
        for (name, bytes, want) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            let e = inspect(&path, 13).err().unwrap();
            assert!(matches!(e, ScriptError::NotTorchScript { .. }), "{name}: {e}");
            let text = e.to_string();
            assert!(text.contains(want) && text.contains("torch.jit.save"), "{name}: {text}");
            // Through the plan path too (hash right, content wrong).
            let spec = TorchScriptSpec {
                sha256: ContentHash::of(&bytes).to_hex(),
                inputs: 13,
                outputs: 1,
                parameters: vec![ParameterSpec { name: "fc.weight".into(), shape: vec![1, 13] }],
                file: None,
            };
            let w = ModelSpec::Torchscript(spec.clone()).init(0);
            assert!(matches!(ScriptNet::load(&path, &spec, &w, Device::Cpu), Err(ScriptError::NotTorchScript { .. })));
        }
        let missing = inspect(&dir.path().join("absent.pt"), 13).err().unwrap();
        assert!(matches!(missing, ScriptError::Read { .. }), "{missing}");
    }

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, bytes) in entries {
            w.start_file(*name, zip::write::FileOptions::default()).unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn a_module_with_buffers_is_refused_naming_them() {
        let path = fixture("batchnorm.pt");
        let e = inspect(&path, 13).err().unwrap();
        let text = e.to_string();
        assert!(matches!(e, ScriptError::Buffers { .. }), "{text}");
        assert!(
            text.contains("BatchNorm1d.running_mean, BatchNorm1d.running_var, BatchNorm1d.num_batches_tracked"),
            "{text}"
        );
        assert!(text.contains("LayerNorm"), "{text}");
    }

    /// A module that writes into its own parameters (here the first input row into its weight,
    /// which would put a patient's record into the update past DP-SGD) is refused at load; one
    /// whose code reads a file is refused before libtorch runs it, at inspection (so at approval)
    /// as at load. Both files are made by node/testdata/make_torchscript.py.
    #[test]
    fn hostile_modules_are_refused() {
        // inspect runs forward on zeros without the parameter check: it finds the parameters.
        let spec = inspect(&fixture("evil_copy.pt"), 13).unwrap().spec(None);
        let zoo = ModelSpec::LogisticRegression { inputs: 13, outputs: 1 };
        let e = ScriptNet::load(&fixture("evil_copy.pt"), &spec, &zoo.init(0), Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("changed its own parameter 'fc.weight' during forward"), "{e}");
        let e = inspect(&fixture("evil_file.pt"), 13).err().unwrap();
        assert!(matches!(e, ScriptError::Forbidden { .. }) && e.to_string().contains("reads or writes files"), "{e}");
        // The honest twin passes both.
        let honest = spec_of("logreg.pt");
        assert!(ScriptNet::load(&fixture("logreg.pt"), &honest, &zoo.init(0), Device::Cpu).is_ok());
    }

    #[test]
    fn forbidden_code_is_found_and_honest_code_is_not() {
        let honest = "class M(Module):\n  def forward(self, x: Tensor) -> Tensor:\n    y = torch.relu_(self.fc(x))\n    return torch.ops.aten.add(y, 1)\n";
        assert_eq!(forbidden_code(honest), None);
        let init_ok = "class M(Module):\n  def __init__(self) -> None:\n    self.n = 0\n";
        assert_eq!(forbidden_code(init_ok), None);
        for bad in [
            "  def forward(self, x):\n    self.memory = x\n",
            "  def forward(self, x):\n    self.calls += 1\n",
            "  def forward(self, x):\n    y = torch.from_file(\"/etc/passwd\")\n",
            "  def forward(self, x):\n    torch.save(x, \"/tmp/x\")\n",
            "  def forward(self, x):\n    return ops.mylib.leak(x)\n",
        ] {
            assert!(forbidden_code(bad).is_some(), "{bad}");
        }
        assert_eq!(forbidden_code("  def forward(self, x):\n    if self.n == 1:\n      return x\n"), None);
    }

    #[test]
    fn a_wrong_input_width_or_output_count_is_refused() {
        let e = inspect(&fixture("logreg.pt"), 12).err().unwrap();
        assert!(matches!(e, ScriptError::Forward { .. }), "{e}");
        let mut spec = spec_of("logreg.pt");
        spec.outputs = 3;
        let w = ModelSpec::Torchscript(spec.clone()).init(0);
        let e = ScriptNet::load(&fixture("logreg.pt"), &spec, &w, Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("forward returns shape [2, 1], the plan says [n, 3]"), "{e}");
    }

    /// Seconds per call of `f`: the median of `reps` timed calls after two warm-up calls.
    fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
        f();
        f();
        let mut t: Vec<f64> = (0..reps)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[reps / 2]
    }

    /// One DP-SGD step's clipping and update (the noise, the same for both, left out): micro-batches
    /// on the TorchScript module against ghost clipping on the zoo's same architecture, one libtorch
    /// thread. `cargo test -p sanctum-node --release --lib torchscript::tests::dp_step_time -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn dp_step_time_microbatches_against_ghost_clipping() {
        tch::set_num_threads(1);
        println!("model               batch   ghost (ms)   micro-batches (ms)   ratio");
        for (file, zoo) in zoo_pairs() {
            let spec = spec_of(file);
            let w = zoo.init(0);
            let script = ScriptNet::load(&fixture(file), &spec, &w, Device::Cpu).unwrap();
            let net = Net::new(&zoo, &w, Device::Cpu).unwrap();
            for n in [64i64, 256] {
                let (x, y) = batch(n, 3);
                let update = |params: &[Tensor], grads: &[Tensor]| {
                    tch::no_grad(|| {
                        for (p, g) in params.iter().zip(grads) {
                            let _ = p.shallow_clone().f_sub_(&(g * (0.01 / n as f64))).unwrap();
                        }
                    })
                };
                let zoo_params = net.params();
                let ghost = median_secs(41, || {
                    let sums =
                        crate::dpsgd::clipped_sum(&net, &x, &y, 1.0, sanctum_protocol::dataset::Task::Binary, None)
                            .unwrap()
                            .grads;
                    update(&zoo_params, &sums);
                });
                let loss = bce_of(&y);
                let script_params = script.params();
                let micro = median_secs(11, || {
                    let (sums, _) = script.clipped_sum_by_microbatches(&x, &loss, 1.0).unwrap();
                    update(&script_params, &sums);
                });
                println!(
                    "{:<19} {n:>5}   {:>10.3}   {:>18.3}   {:>5.1}×",
                    zoo.name(),
                    ghost * 1e3,
                    micro * 1e3,
                    micro / ghost
                );
            }
        }
    }
}
