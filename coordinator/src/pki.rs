//! The consortium CA's files: `pki init` creates the CA, the coordinator's server certificate and
//! the lead's certificate; `pki sign` turns a hospital's CSR into its certificate.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sanctum_protocol::pki::{self, Role, SignSpec};

/// Writes a file readable only by its owner (private keys).
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    pki::write_private_key(path, contents).with_context(|| format!("cannot create private key file {}", path.display()))
}

/// Writes a public file (certificates).
pub fn write_public(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

/// What `pki init` made.
pub struct InitOutput {
    pub ca_cert: PathBuf,
    pub coordinator_cert: PathBuf,
    pub lead_cert: PathBuf,
}

/// Creates the CA and the coordinator's and lead's certificates in `dir`.
pub fn init(dir: &Path, consortium: &str, hosts: &[String], lead: &str, days: i64) -> anyhow::Result<InitOutput> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca_key = dir.join("ca.key");
    if ca_key.exists() {
        bail!(
            "{} already exists: a second CA would orphan every certificate the first one signed; use another --dir",
            ca_key.display()
        );
    }
    let ca = pki::init_ca(consortium, days.max(3650))?;
    write_private(&ca_key, &ca.key_pem)?;
    write_public(&dir.join("ca.pem"), &ca.cert_pem)?;
    let coord =
        pki::issue(&ca.cert_pem, &ca.key_pem, &SignSpec { name: "coordinator", role: Role::Coordinator, days, hosts })?;
    write_private(&dir.join("coordinator.key"), &coord.key_pem)?;
    write_public(&dir.join("coordinator.pem"), &coord.cert_pem)?;
    let lead_cert =
        pki::issue(&ca.cert_pem, &ca.key_pem, &SignSpec { name: lead, role: Role::Lead, days, hosts: &[] })?;
    write_private(&dir.join("lead.key"), &lead_cert.key_pem)?;
    write_public(&dir.join("lead.pem"), &lead_cert.cert_pem)?;
    Ok(InitOutput {
        ca_cert: dir.join("ca.pem"),
        coordinator_cert: dir.join("coordinator.pem"),
        lead_cert: dir.join("lead.pem"),
    })
}

/// Signs a member's CSR with the CA in `dir`; returns the certificate's PEM.
pub fn sign(dir: &Path, csr: &Path, name: &str, role: Role, days: i64) -> anyhow::Result<String> {
    if role == Role::Coordinator {
        bail!("the coordinator's certificate is made by `pki init`; sign members as node, lead or auditor");
    }
    let ca_cert = std::fs::read_to_string(dir.join("ca.pem")).with_context(|| {
        format!("cannot read the CA certificate in {}: run `sanctum-coordinator pki init` first", dir.display())
    })?;
    let ca_key = std::fs::read_to_string(dir.join("ca.key"))
        .with_context(|| format!("cannot read the CA key in {}", dir.display()))?;
    let csr_pem = std::fs::read_to_string(csr).with_context(|| format!("cannot read CSR {}", csr.display()))?;
    Ok(pki::sign(&ca_cert, &ca_key, &csr_pem, &SignSpec { name, role, days, hosts: &[] })?)
}
