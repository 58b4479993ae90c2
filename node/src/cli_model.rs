//! `sanctum-node model …`: a hospital approves, lists, revokes and inspects TorchScript models.
//!
//! `approve` loads the file as TorchScript first (hash, no buffers, parameters, one forward pass
//! on zeros at `--inputs`): a file that does not load is not approved. The approval goes into
//! `policy.model_approvals` and then into the node's signed audit log: by this command when the
//! node is stopped (it takes the state directory's lock), otherwise by the running node at its
//! next start or plan offer ([`crate::approvals::audit_pending`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use sanctum_protocol::audit::AuditLog;
use sanctum_protocol::tls::TlsMaterial;

use crate::approvals::{Approval, Approvals, audit_pending};
use crate::config::NodeConfig;
use crate::state_lock::{StateLock, StateLockError};
use crate::torchscript::{self, Inspection};

/// The `model` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Approve a TorchScript file (by its SHA-256) for training at this hospital; prints the
    /// plan's [model] block.
    Approve {
        /// The `.pt` file (`torch.jit.save(torch.jit.script(model), FILE)`).
        file: PathBuf,
        #[arg(long)]
        config: PathBuf,
        /// Who approves (recorded in the approvals file and the audit log).
        #[arg(long)]
        by: String,
        /// A name for the model (default: the file's stem).
        #[arg(long)]
        name: Option<String>,
        /// Input features (the schema's number of model inputs); one forward pass on zeros of
        /// this width checks the module and learns its outputs.
        #[arg(long)]
        inputs: usize,
    },
    /// List the approved models (and revoked ones, as history).
    List {
        #[arg(long)]
        config: PathBuf,
    },
    /// Revoke a model's approval: plans naming its hash are refused from then on.
    Revoke {
        sha256: String,
        #[arg(long)]
        config: PathBuf,
        /// Who revokes.
        #[arg(long)]
        by: String,
    },
    /// Print a TorchScript file's hash, parameters and the plan's [model] block, approving nothing.
    Inspect {
        file: PathBuf,
        /// Input features, as for `approve`.
        #[arg(long)]
        inputs: usize,
    },
}

/// Runs a `model` subcommand; the text to print.
pub fn run(cmd: &ModelCommand) -> anyhow::Result<String> {
    match cmd {
        ModelCommand::Approve { file, config, by, name, inputs } => approve(file, config, by, name.as_deref(), *inputs),
        ModelCommand::List { config } => list(config),
        ModelCommand::Revoke { sha256, config, by } => revoke(sha256, config, by),
        ModelCommand::Inspect { file, inputs } => {
            let i = torchscript::inspect(file, *inputs)?;
            Ok(describe(&i, file))
        }
    }
}

/// The hash, the parameters and the [model] block.
fn describe(i: &Inspection, file: &Path) -> String {
    let mut out = format!(
        "file:       {}\nsha256:     {}\ninputs:     {}\noutputs:    {}\nparameters: {} in {} tensors\n",
        file.display(),
        i.sha256,
        i.inputs,
        i.outputs,
        i.num_params(),
        i.parameters.len()
    );
    for p in &i.parameters {
        out.push_str(&format!("  {} {:?}\n", p.name, p.shape));
    }
    out.push_str("\nthe plan's model (put it in plan.toml; `file` is read by the lead's CLI only):\n\n");
    out.push_str(&i.model_toml(Some(&file.display().to_string())));
    out
}

fn approve(file: &Path, config: &Path, by: &str, name: Option<&str>, inputs: usize) -> anyhow::Result<String> {
    let cfg = NodeConfig::load(config)?;
    let i = torchscript::inspect(file, inputs).with_context(|| format!("{} is not approved", file.display()))?;
    let name = match name {
        Some(n) => n.to_string(),
        None => file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
    };
    let approval = Approval {
        sha256: i.sha256.clone(),
        name,
        approved_by: by.to_string(),
        approved_at: sanctum_protocol::audit::now_rfc3339(),
        parameters: i.num_params(),
        file: file.display().to_string(),
        revoked_by: None,
        revoked_at: None,
    };
    let path = &cfg.policy.model_approvals;
    Approvals::update(path, |a| a.approve(approval.clone()))?;
    let mut out = format!(
        "approved model {} ({}) by {} at {}\nrecorded in {}\n",
        approval.sha256,
        approval.name,
        approval.approved_by,
        approval.approved_at,
        path.display()
    );
    out.push_str(&audit_now(&cfg)?);
    out.push('\n');
    out.push_str(&describe(&i, file));
    Ok(out)
}

fn revoke(sha256: &str, config: &Path, by: &str) -> anyhow::Result<String> {
    let cfg = NodeConfig::load(config)?;
    let sha256 = sha256.trim().to_ascii_lowercase();
    let path = &cfg.policy.model_approvals;
    let at = sanctum_protocol::audit::now_rfc3339();
    let revoked = Approvals::update(path, |a| a.revoke(&sha256, by, &at))?;
    let mut out = format!(
        "revoked model {} ({}) by {by} at {at}: plans naming it are refused from now on\nrecorded in {}\n",
        revoked.sha256,
        revoked.name,
        path.display()
    );
    out.push_str(&audit_now(&cfg)?);
    Ok(out)
}

/// Writes pending approval events into the audit log if the node is stopped; says what happened.
fn audit_now(cfg: &NodeConfig) -> anyhow::Result<String> {
    let approvals = Approvals::load(&cfg.policy.model_approvals)?;
    let _lock = match StateLock::acquire(&cfg.state_dir) {
        Ok(lock) => lock,
        Err(StateLockError::InUse { .. }) => {
            return Ok(
                "audit log: the node is running; it writes this into its audit log at its next start or plan offer\n"
                    .into(),
            );
        }
        Err(e) => return Err(e.into()),
    };
    let pending = || {
        format!(
            "the change is recorded in {} and the node writes it into its audit log when it starts",
            cfg.policy.model_approvals.display()
        )
    };
    let material = TlsMaterial::load(&cfg.tls).with_context(pending)?;
    let dir = cfg.state_dir.join("audit");
    let mut log = AuditLog::open_for(&dir, &material).with_context(pending)?;
    let n = audit_pending(&approvals, &cfg.state_dir, &mut log).with_context(pending)?;
    Ok(format!("audit log: {n} event(s) written to {}\n", log.path().display()))
}

fn list(config: &Path) -> anyhow::Result<String> {
    let cfg = NodeConfig::load(config)?;
    let path = &cfg.policy.model_approvals;
    let approvals = Approvals::load(path)?;
    let mut out = format!("model approvals: {}\n", path.display());
    if approvals.entries().is_empty() {
        out.push_str("no model is approved (approve one with `sanctum-node model approve FILE --config node.toml --by NAME --inputs N`)\n");
    }
    for a in approvals.entries() {
        let status = match (&a.revoked_by, &a.revoked_at) {
            (Some(by), Some(at)) => format!("REVOKED by {by} at {at}"),
            _ => "approved".to_string(),
        };
        out.push_str(&format!(
            "{} {} ({} parameters, {}): approved by {} at {}; {status}\n",
            a.sha256, a.name, a.parameters, a.file, a.approved_by, a.approved_at
        ));
    }
    Ok(out)
}
