//! The `audit` subcommands both binaries mount (offline; no network).

use std::path::PathBuf;

use super::verify::{IssuerError, VerifyFileError, issued_by, verify_file};

/// `audit` subcommands shared by both binaries (offline; no network).
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Verify an audit log offline: key binding, every record's signature, the hash chain, the
    /// sequence and the signed head (LOG.head beside it). Names the first bad record; exits 1.
    Verify {
        /// The log (`audit.jsonl`).
        log: PathBuf,
        /// The consortium CA certificate: also check that the writer's certificate was issued by it.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

/// Why `audit verify` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{path}: cannot read the CA certificate: {source}")]
    Ca { path: PathBuf, source: std::io::Error },
    #[error("{log}: FAILED: {source}")]
    Failed { log: PathBuf, source: VerifyFileError },
}

/// Runs `audit verify`: the report on success, the reason on failure.
pub fn run(cmd: &AuditCommand) -> Result<String, RunError> {
    match cmd {
        AuditCommand::Verify { log, ca } => {
            let ca_pem = match ca {
                Some(p) => Some(std::fs::read_to_string(p).map_err(|source| RunError::Ca { path: p.clone(), source })?),
                None => None,
            };
            let check = |der: &[u8]| -> Result<(), IssuerError> {
                match &ca_pem {
                    Some(pem) => issued_by(pem, der),
                    None => Ok(()),
                }
            };
            let v = verify_file(log, Some(&check)).map_err(|source| RunError::Failed { log: log.clone(), source })?;
            let mut out = format!(
                "{}: OK, {} records written by {} ({}), certificate {}",
                log.display(),
                v.records,
                v.writer,
                v.role,
                &v.fingerprint[..16.min(v.fingerprint.len())]
            );
            out.push_str(if ca.is_some() { ", issued by the given CA" } else { "" });
            if v.head_behind {
                out.push_str("; the signed head is one record behind (the writer stopped between the two writes)");
            }
            Ok(out)
        }
    }
}
