//! The files a lead's plan names beside it: the dataset schema (`data.schema_file`) and a
//! TorchScript model (`model.file`). The lead's tools (`plan submit`, `simulate`) read them once,
//! here: the schema fills `data.schema_sha256` and checks the plan against it before any hospital
//! hears of the plan; the model file travels with the submission so the coordinator can serve it
//! by hash. [`check_model_file`] is the coordinator's own check of what it was sent (pure).

use std::path::Path;

use sanctum_protocol::dataset::Schema;
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::model::ModelSpec;
use sanctum_protocol::plan::Plan;

/// Largest TorchScript file a plan may carry (64 MiB). The lead's gRPC service decodes messages
/// up to a little more than this.
pub const MAX_MODEL_FILE_BYTES: usize = sanctum_protocol::plan::limits::MAX_MODEL_FILE_BYTES;

/// What [`resolve`] read.
#[derive(Debug, Default)]
pub struct Resolved {
    /// The schema the plan was checked against, when it gave `data.schema_file`.
    pub schema: Option<Schema>,
    /// The TorchScript file's bytes, when the plan's model is one.
    pub model_file: Vec<u8>,
}

/// Why a plan's files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PlanFileError {
    #[error("data.schema_file {path}: {reason}")]
    Schema { path: String, reason: String },
    #[error("model.file {path}: cannot read it ({source}); the path is relative to the plan file")]
    ModelRead { path: String, source: std::io::Error },
    #[error(
        "the plan's model is TorchScript but gives no model.file: name the .pt file (relative to the plan) so the coordinator can serve it by hash"
    )]
    NoModelFile,
    #[error("{0}")]
    Plan(#[from] sanctum_protocol::plan::PlanError),
    #[error(transparent)]
    ModelFile(#[from] ModelFileError),
}

/// Why a submission's model file does not go with its plan ([`check_model_file`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelFileError {
    #[error(
        "the plan's model is TorchScript {sha256} but the submission carries no model file; submit it with `sanctum-coordinator plan submit` (which reads model.file)"
    )]
    Missing { sha256: String },
    #[error("the model file has {bytes} bytes; a plan's TorchScript file may have at most {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error(
        "the model file's SHA-256 is {got} but the plan's model.sha256 is {want}: the plan was written for another file"
    )]
    HashMismatch { got: String, want: String },
    #[error("the submission carries a model file but the plan's model is not TorchScript; send none")]
    NotTorchScript,
}

/// Reads the files `plan` names relative to `base` (the plan file's directory): fills
/// `data.schema_sha256` from `data.schema_file` and checks the plan against the schema, and
/// reads a TorchScript model's file, checking its hash.
pub fn resolve(plan: &mut Plan, base: &Path) -> Result<Resolved, PlanFileError> {
    let mut resolved = Resolved::default();
    if let Some(file) = plan.data.schema_file.clone() {
        let path = if file.is_absolute() { file } else { base.join(file) };
        let schema = Schema::load(&path)
            .map_err(|e| PlanFileError::Schema { path: path.display().to_string(), reason: e.to_string() })?;
        let hash = schema.sha256().to_hex();
        if plan.data.schema_sha256.is_none() {
            plan.data.schema_sha256 = Some(hash);
        }
        plan.check_schema(&schema)?;
        resolved.schema = Some(schema);
    }
    if let ModelSpec::Torchscript(spec) = &plan.model {
        let file = spec.file.clone().ok_or(PlanFileError::NoModelFile)?;
        let path = if file.is_absolute() { file } else { base.join(file) };
        let bytes = std::fs::read(&path)
            .map_err(|source| PlanFileError::ModelRead { path: path.display().to_string(), source })?;
        check_model_file(plan, &bytes)?;
        resolved.model_file = bytes;
    }
    Ok(resolved)
}

/// The coordinator's check of a submission's model file: a TorchScript plan needs the file whose
/// SHA-256 its `model.sha256` names, within [`MAX_MODEL_FILE_BYTES`]; a zoo plan takes none.
pub fn check_model_file(plan: &Plan, bytes: &[u8]) -> Result<(), ModelFileError> {
    match &plan.model {
        ModelSpec::Torchscript(spec) => {
            if bytes.is_empty() {
                return Err(ModelFileError::Missing { sha256: spec.sha256.clone() });
            }
            if bytes.len() > MAX_MODEL_FILE_BYTES {
                return Err(ModelFileError::TooLarge { bytes: bytes.len(), max: MAX_MODEL_FILE_BYTES });
            }
            let got = ContentHash::of(bytes).to_hex();
            if got != spec.sha256 {
                return Err(ModelFileError::HashMismatch { got, want: spec.sha256.clone() });
            }
            Ok(())
        }
        _ if !bytes.is_empty() => Err(ModelFileError::NotTorchScript),
        _ => Ok(()),
    }
}
