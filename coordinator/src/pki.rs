//! The consortium CA's files: `pki init` creates the CA, the coordinator's server certificate and
//! the lead's certificate; `pki sign` turns a hospital's CSR into its certificate.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sanctum_protocol::audit::{self, AuditEvent, AuditLog};
use sanctum_protocol::pki::{self, Role, SignSpec};
use sanctum_protocol::tls::RevokedCert;

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
    write_public(&dir.join("revoked.json"), "[]")?;
    record(dir, &coord.cert_pem, |s| s.issued(days))?;
    record(dir, &lead_cert.cert_pem, |s| s.issued(days))?;
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
    pki::validate_name(name)?;
    refuse_name_held_by_another_key(dir, name, role, &csr_pem)?;
    let pem = pki::sign(&ca_cert, &ca_key, &csr_pem, &SignSpec { name, role, days, hosts: &[] })?;
    // The request is kept so the member can be renewed without a new one (its key is unchanged).
    let requests = dir.join("requests");
    std::fs::create_dir_all(&requests).with_context(|| format!("cannot create {}", requests.display()))?;
    let stored = requests.join(format!("{name}.csr"));
    if stored.as_path() != csr {
        write_public(&stored, &csr_pem)?;
    }
    record(dir, &pem, |s| s.issued(days))?;
    Ok(pem)
}

/// Refuses to sign `name` for a key other than the one its unrevoked certificates hold: a name
/// is a member's identity (the coordinator's node map, audit records, receipts and budgets are
/// keyed by it), so two keys under one name would let one hospital act as, or shadow, another.
/// The same key may be signed again (that is what `pki renew` does); a revoked certificate no
/// longer holds its name. The refusal is recorded in the CA's audit log.
fn refuse_name_held_by_another_key(dir: &Path, name: &str, role: Role, csr_pem: &str) -> anyhow::Result<()> {
    let key = pki::request_public_key(csr_pem)?;
    for held in list(dir)?.into_iter().filter(|c| c.name == name && c.status != "revoked") {
        let pem =
            std::fs::read_to_string(&held.file).with_context(|| format!("cannot read {}", held.file.display()))?;
        let der = sanctum_protocol::secagg::keys::cert_der_from_pem(&pem)?;
        if pki::certificate_public_key(&der)? == key {
            continue;
        }
        let reason = format!("'{name}' is already issued to a different key");
        let requested_key_sha256 = sanctum_protocol::hash::ContentHash::of(&key).to_hex();
        record(dir, &pem, |s| AuditEvent::CertificateRefused {
            name: s.name,
            role: s.role,
            fingerprint: s.fingerprint,
            not_after: s.not_after,
            reason: reason.clone(),
            requested_role: role.as_str().to_string(),
            requested_key_sha256,
        })?;
        bail!(
            "{reason} (certificate {}, {}, fingerprint {}): revoke it first with `sanctum-coordinator pki revoke {name}` if this request replaces it, or sign this request under another name",
            held.file.display(),
            held.status,
            held.fingerprint.get(..16).unwrap_or(&held.fingerprint),
        );
    }
    Ok(())
}

/// Stores an issued certificate as `DIR/issued/NAME.pem`; a previous one for the same name is kept
/// beside it as `NAME.<fingerprint prefix>.pem`.
pub fn keep_issued(dir: &Path, name: &str, pem: &str) -> anyhow::Result<PathBuf> {
    let issued = dir.join("issued");
    std::fs::create_dir_all(&issued).with_context(|| format!("cannot create {}", issued.display()))?;
    let current = issued.join(format!("{name}.pem"));
    if let Ok(old) = std::fs::read_to_string(&current) {
        if old == pem {
            return Ok(current);
        }
        let der = sanctum_protocol::secagg::keys::cert_der_from_pem(&old)?;
        let fp = sanctum_protocol::hash::ContentHash::of(&der).to_hex();
        std::fs::rename(&current, issued.join(format!("{name}.{}.pem", &fp[..12])))
            .with_context(|| format!("cannot move {} aside", current.display()))?;
    }
    write_public(&current, pem)?;
    Ok(current)
}

/// The CA's own audit log (`DIR/audit/audit.jsonl`): every certificate issued, renewed or
/// revoked, signed with a key bound to the CA certificate.
fn ca_audit(dir: &Path) -> anyhow::Result<AuditLog> {
    let ca_cert = std::fs::read_to_string(dir.join("ca.pem"))
        .with_context(|| format!("cannot read the CA certificate in {}", dir.display()))?;
    let ca_key = std::fs::read_to_string(dir.join("ca.key"))
        .with_context(|| format!("cannot read the CA key in {}", dir.display()))?;
    let der = sanctum_protocol::secagg::keys::cert_der_from_pem(&ca_cert)?;
    let sign = |m: &[u8]| sanctum_protocol::secagg::keys::sign_message(m, &ca_key).map_err(audit::SignError::from);
    let writer = audit::Writer { name: "ca", role: "ca", cert_der: &der, sign_with_cert_key: &sign };
    Ok(AuditLog::open(&dir.join("audit"), &writer)?)
}

/// Who a certificate event is about, read from the certificate itself.
pub struct Subject {
    pub name: String,
    pub role: String,
    pub fingerprint: String,
    pub not_after: String,
}

impl Subject {
    fn issued(self, days: i64) -> AuditEvent {
        AuditEvent::CertificateIssued {
            name: self.name,
            role: self.role,
            fingerprint: self.fingerprint,
            not_after: self.not_after,
            days,
        }
    }
}

/// Records a certificate event in the CA's audit log: `event` builds it from the certificate's
/// subject.
pub fn record(dir: &Path, cert_pem: &str, event: impl FnOnce(Subject) -> AuditEvent) -> anyhow::Result<()> {
    let mut log = ca_audit(dir)?;
    let der = sanctum_protocol::secagg::keys::cert_der_from_pem(cert_pem)?;
    let id = pki::identity_from_der(&der)?;
    let subject = Subject {
        name: id.name,
        role: id.role.as_str().to_string(),
        fingerprint: id.fingerprint.to_hex(),
        not_after: pki::not_after(&der)?.to_string(),
    };
    let own = log.own_fingerprint().to_string();
    log.append_event(&own, &event(subject))?;
    Ok(())
}

/// One certificate the CA issued, as `pki list` shows it.
#[derive(Debug, serde::Serialize)]
pub struct Listed {
    pub name: String,
    pub role: String,
    pub fingerprint: String,
    pub not_after: String,
    /// "valid", "expired" or "revoked".
    pub status: String,
    pub file: PathBuf,
}

/// The revocation list in `dir` (empty when absent).
pub fn revoked(dir: &Path) -> anyhow::Result<Vec<RevokedCert>> {
    let path = dir.join("revoked.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => pki::parse_revocation_list(&text).with_context(|| {
            format!("{} is not a valid revocation list: fix it, or restore it from a backup", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn cert_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![dir.join("coordinator.pem")];
    files.extend(std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| {
        p.extension().is_some_and(|x| x == "pem") && !p.ends_with("ca.pem") && !p.ends_with("coordinator.pem")
    }));
    if let Ok(entries) = std::fs::read_dir(dir.join("issued")) {
        files.extend(entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "pem")));
    }
    files.sort();
    files.dedup();
    files.into_iter().filter(|p| p.exists()).collect()
}

/// Every certificate in the PKI directory with its status.
pub fn list(dir: &Path) -> anyhow::Result<Vec<Listed>> {
    let revoked = revoked(dir)?;
    let now = time::OffsetDateTime::now_utc();
    let mut out = Vec::new();
    for file in cert_files(dir) {
        let pem = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let der = sanctum_protocol::secagg::keys::cert_der_from_pem(&pem)?;
        let Ok(id) = pki::identity_from_der(&der) else { continue };
        let not_after = pki::not_after(&der)?;
        let fp = id.fingerprint.to_hex();
        let status = if revoked.iter().any(|r| r.fingerprint == fp) {
            "revoked"
        } else if not_after < now {
            "expired"
        } else {
            "valid"
        };
        out.push(Listed {
            name: id.name,
            role: id.role.as_str().into(),
            fingerprint: fp,
            not_after: not_after.to_string(),
            status: status.into(),
            file,
        });
    }
    Ok(out)
}

/// Revokes every certificate issued to `name`; the running coordinator applies the list within
/// a fraction of a second. Returns the revoked entries.
pub fn revoke(dir: &Path, name: &str, reason: &str) -> anyhow::Result<Vec<RevokedCert>> {
    let mut list = revoked(dir)?;
    let targets: Vec<Listed> =
        self::list(dir)?.into_iter().filter(|c| c.name == name && c.status != "revoked").collect();
    if targets.is_empty() {
        bail!("no unrevoked certificate for '{name}' in {} (see `pki list`)", dir.display());
    }
    let mut fresh = Vec::new();
    for t in &targets {
        let entry = RevokedCert {
            name: name.to_string(),
            fingerprint: t.fingerprint.clone(),
            revoked_at: audit::now_rfc3339(),
            reason: reason.to_string(),
        };
        list.push(entry.clone());
        fresh.push(entry);
    }
    let path = dir.join("revoked.json");
    let tmp = dir.join("revoked.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&list)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all())?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
    for t in &targets {
        let pem = std::fs::read_to_string(&t.file)?;
        record(dir, &pem, |s| AuditEvent::CertificateRevoked {
            name: s.name,
            role: s.role,
            fingerprint: s.fingerprint,
            not_after: s.not_after,
            reason: reason.to_string(),
        })?;
    }
    Ok(fresh)
}

/// Issues `name` a fresh certificate for the same key (from the request stored at signing),
/// with `days` of validity; the previous certificate is kept beside it. Returns the new PEM.
pub fn renew(dir: &Path, name: &str, days: i64) -> anyhow::Result<(String, PathBuf)> {
    let current = dir.join("issued").join(format!("{name}.pem"));
    let old = std::fs::read_to_string(&current)
        .with_context(|| format!("no certificate for '{name}' at {} (see `pki list`)", current.display()))?;
    let der = sanctum_protocol::secagg::keys::cert_der_from_pem(&old)?;
    let id = pki::identity_from_der(&der)?;
    if revoked(dir)?.iter().any(|r| r.fingerprint == id.fingerprint.to_hex()) {
        bail!(
            "the certificate of '{name}' is revoked: a revoked member is not renewed; sign a new request if it is re-admitted"
        );
    }
    let csr = dir.join("requests").join(format!("{name}.csr"));
    if !csr.exists() {
        bail!("no stored request for '{name}' ({}); ask {name} for a new CSR and use `pki sign`", csr.display());
    }
    let pem = sign(dir, &csr, name, id.role, days)?;
    keep_issued(dir, name, &pem)?;
    record(dir, &pem, |s| AuditEvent::CertificateRenewed {
        name: s.name,
        role: s.role,
        fingerprint: s.fingerprint,
        not_after: s.not_after,
        previous_fingerprint: id.fingerprint.to_hex(),
    })?;
    Ok((pem, current))
}
