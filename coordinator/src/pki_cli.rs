//! `sanctum-coordinator pki …`: the consortium CA's commands (`init`, `sign`, `list`, `revoke`,
//! `renew`) over [`crate::pki`], each returning what it prints, with the next step for the lead.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Subcommand;
use sanctum_protocol::pki::Role;

use crate::pki;
use crate::status::head;

/// `pki` subcommands.
#[derive(Subcommand)]
pub enum PkiCommand {
    /// Create the consortium CA, the coordinator's certificate and the lead's certificate.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "sanctum")]
        consortium: String,
        /// Host names or IPs the coordinator is reached at (repeatable).
        #[arg(long = "host", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
        #[arg(long, default_value = "lead")]
        lead_name: String,
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
    /// Sign a member's CSR; the identity and role are decided here, not by the request.
    Sign {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        csr: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "node")]
        role: String,
        #[arg(long, default_value_t = 90)]
        days: i64,
        /// Where to write the certificate (default: DIR/issued/NAME.pem).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Every certificate the CA issued: name, role, expiry and status (valid, expired, revoked).
    List {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke every certificate of a member; a coordinator following DIR/revoked.json refuses it
    /// within a second, without a restart.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        name: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Issue a member a fresh certificate for the same key (its private key never moves).
    Renew {
        #[arg(long)]
        dir: PathBuf,
        name: String,
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
}

/// Runs one `pki` command; the text is what the lead reads (the files it wrote and what to do
/// with them).
pub fn run(cmd: PkiCommand) -> anyhow::Result<String> {
    let mut out = String::new();
    match cmd {
        PkiCommand::Init { dir, consortium, hosts, lead_name, days } => {
            let written = pki::init(&dir, &consortium, &hosts, &lead_name, days)?;
            writeln!(out, "consortium CA:           {}", written.ca_cert.display())?;
            writeln!(
                out,
                "coordinator certificate: {} (hosts: {})",
                written.coordinator_cert.display(),
                hosts.join(", ")
            )?;
            writeln!(out, "lead certificate:        {}", written.lead_cert.display())?;
            writeln!(
                out,
                "next: give {} to each hospital; sign their CSRs with `sanctum-coordinator pki sign`",
                written.ca_cert.display()
            )?;
        }
        PkiCommand::Sign { dir, csr, name, role, days, out: to } => {
            let role: Role = role.parse()?;
            let pem = pki::sign(&dir, &csr, &name, role, days)?;
            // The CA keeps what it issued (for `pki list`, `renew` and `revoke`), wherever the copy
            // for the member goes.
            pki::keep_issued(&dir, &name, &pem)?;
            let to = to.unwrap_or_else(|| dir.join("issued").join(format!("{name}.pem")));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            pki::write_public(&to, &pem)?;
            writeln!(out, "signed {name} as {role} for {days} days: {}", to.display())?;
            writeln!(out, "next: send {} and ca.pem back to {name}", to.display())?;
        }
        PkiCommand::List { dir, json } => {
            let certs = pki::list(&dir)?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&certs)?)?;
            } else {
                writeln!(out, "{:<16} {:<12} {:<10} {:<28} fingerprint", "name", "role", "status", "expires")?;
                for c in &certs {
                    writeln!(
                        out,
                        "{:<16} {:<12} {:<10} {:<28} {}",
                        c.name,
                        c.role,
                        c.status,
                        c.not_after,
                        head(&c.fingerprint, 16)
                    )?;
                }
            }
        }
        PkiCommand::Revoke { dir, name, reason } => {
            for r in pki::revoke(&dir, &name, &reason)? {
                writeln!(out, "revoked {} (certificate {}) at {}", r.name, head(&r.fingerprint, 16), r.revoked_at)?;
            }
            writeln!(
                out,
                "a coordinator with revocation_list = \"{}\" refuses it within a second",
                dir.join("revoked.json").display()
            )?;
        }
        PkiCommand::Renew { dir, name, days } => {
            let (_, path) = pki::renew(&dir, &name, days)?;
            writeln!(out, "renewed {name} for {days} days: {}", path.display())?;
            writeln!(
                out,
                "next: send {} to {name}; it replaces its certificate file and restarts its node (same key)",
                path.display()
            )?;
        }
    }
    Ok(out)
}
