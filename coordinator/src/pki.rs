//! The consortium CA's files: `pki init` creates the CA, the coordinator's server certificate and
//! the lead's certificate; `pki sign` turns a hospital's CSR into its certificate.

use std::io;
use std::path::{Path, PathBuf};

use sanctum_protocol::audit::{self, AuditError, AuditEvent, AuditLog};
use sanctum_protocol::pki::{self, PkiError, Role, SignSpec};
use sanctum_protocol::secagg::keys::KeySignatureError;
use sanctum_protocol::tls::RevokedCert;

/// Why a command on the CA's files failed. A wrapped cause is the variant's `source()`, not part
/// of its message: the CLI prints the chain (`{:#}`), so the text reads "MESSAGE: CAUSE".
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot create private key file {}", path.display())]
    WritePrivateKey { path: PathBuf, source: io::Error },
    #[error("cannot write {}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read {}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot create {}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot move {} aside", path.display())]
    MoveAside { path: PathBuf, source: io::Error },
    #[error("cannot sync {}", path.display())]
    Sync { path: PathBuf, source: io::Error },
    #[error("cannot replace {}", path.display())]
    Replace { path: PathBuf, source: io::Error },
    #[error(
        "{} already exists: a second CA would orphan every certificate the first one signed; use another --dir",
        path.display()
    )]
    CaExists { path: PathBuf },
    /// `pki sign` without a CA: the lead has not run `pki init` in this directory.
    #[error("cannot read the CA certificate in {}: run `sanctum-coordinator pki init` first", dir.display())]
    NoCa { dir: PathBuf, source: io::Error },
    #[error("cannot read the CA certificate in {}", dir.display())]
    ReadCaCertificate { dir: PathBuf, source: io::Error },
    #[error("cannot read the CA key in {}", dir.display())]
    ReadCaKey { dir: PathBuf, source: io::Error },
    #[error("cannot read CSR {}", path.display())]
    ReadCsr { path: PathBuf, source: io::Error },
    #[error("the coordinator's certificate is made by `pki init`; sign members as node, lead or auditor")]
    CoordinatorRole,
    /// A name is a member's identity: a second key under it would let one hospital act as another.
    #[error(
        "'{name}' is already issued to a different key (certificate {}, {status}, fingerprint {fingerprint}): revoke it first with `sanctum-coordinator pki revoke {name}` if this request replaces it, or sign this request under another name",
        file.display()
    )]
    NameHeldByAnotherKey {
        name: String,
        file: PathBuf,
        /// The held certificate's status in `pki list` ("valid" or "expired").
        status: String,
        /// The held certificate's fingerprint prefix, as `pki list` shows it.
        fingerprint: String,
    },
    #[error("{} is not a valid revocation list: fix it, or restore it from a backup", path.display())]
    BadRevocationList { path: PathBuf, source: PkiError },
    #[error("no unrevoked certificate for '{name}' in {} (see `pki list`)", dir.display())]
    NothingToRevoke { name: String, dir: PathBuf },
    #[error("no certificate for '{name}' at {} (see `pki list`)", path.display())]
    NoCertificate { name: String, path: PathBuf, source: io::Error },
    #[error(
        "the certificate of '{name}' is revoked: a revoked member is not renewed; sign a new request if it is re-admitted"
    )]
    RenewRevoked { name: String },
    #[error("no stored request for '{name}' ({}); ask {name} for a new CSR and use `pki sign`", path.display())]
    NoStoredRequest { name: String, path: PathBuf },
    /// A certificate, request or key the protocol's PKI refused (its message says which).
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A PEM file that holds no readable certificate.
    #[error(transparent)]
    Certificate(#[from] KeySignatureError),
    /// The CA's audit log cannot be opened or appended to.
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Writes a file readable only by its owner (private keys).
pub fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    pki::write_private_key(path, contents).map_err(|source| CaError::WritePrivateKey { path: path.into(), source })
}

/// Writes a public file (certificates).
pub fn write_public(path: &Path, contents: &str) -> Result<(), CaError> {
    std::fs::write(path, contents).map_err(|source| CaError::Write { path: path.into(), source })
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read { path: path.into(), source })
}

fn create_dir(path: &Path) -> Result<(), CaError> {
    std::fs::create_dir_all(path).map_err(|source| CaError::CreateDir { path: path.into(), source })
}

/// What `pki init` made.
#[derive(Debug)]
pub struct InitOutput {
    pub ca_cert: PathBuf,
    pub coordinator_cert: PathBuf,
    pub lead_cert: PathBuf,
}

/// Creates the CA and the coordinator's and lead's certificates in `dir`.
pub fn init(dir: &Path, consortium: &str, hosts: &[String], lead: &str, days: i64) -> Result<InitOutput, CaError> {
    create_dir(dir)?;
    let ca_key = dir.join("ca.key");
    if ca_key.exists() {
        return Err(CaError::CaExists { path: ca_key });
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
pub fn sign(dir: &Path, csr: &Path, name: &str, role: Role, days: i64) -> Result<String, CaError> {
    if role == Role::Coordinator {
        return Err(CaError::CoordinatorRole);
    }
    let ca_cert =
        std::fs::read_to_string(dir.join("ca.pem")).map_err(|source| CaError::NoCa { dir: dir.into(), source })?;
    let ca_key =
        std::fs::read_to_string(dir.join("ca.key")).map_err(|source| CaError::ReadCaKey { dir: dir.into(), source })?;
    let csr_pem = std::fs::read_to_string(csr).map_err(|source| CaError::ReadCsr { path: csr.into(), source })?;
    pki::validate_name(name)?;
    refuse_name_held_by_another_key(dir, name, role, &csr_pem)?;
    let pem = pki::sign(&ca_cert, &ca_key, &csr_pem, &SignSpec { name, role, days, hosts: &[] })?;
    // The request is kept so the member can be renewed without a new one (its key is unchanged).
    let requests = dir.join("requests");
    create_dir(&requests)?;
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
fn refuse_name_held_by_another_key(dir: &Path, name: &str, role: Role, csr_pem: &str) -> Result<(), CaError> {
    let key = pki::request_public_key(csr_pem)?;
    for held in list(dir)?.into_iter().filter(|c| c.name == name && c.status != "revoked") {
        let pem = read(&held.file)?;
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
        return Err(CaError::NameHeldByAnotherKey {
            name: name.to_string(),
            fingerprint: held.fingerprint.get(..16).unwrap_or(&held.fingerprint).to_string(),
            file: held.file,
            status: held.status,
        });
    }
    Ok(())
}

/// Stores an issued certificate as `DIR/issued/NAME.pem`; a previous one for the same name is kept
/// beside it as `NAME.<fingerprint prefix>.pem`.
pub fn keep_issued(dir: &Path, name: &str, pem: &str) -> Result<PathBuf, CaError> {
    let issued = dir.join("issued");
    create_dir(&issued)?;
    let current = issued.join(format!("{name}.pem"));
    if let Ok(old) = std::fs::read_to_string(&current) {
        if old == pem {
            return Ok(current);
        }
        let der = sanctum_protocol::secagg::keys::cert_der_from_pem(&old)?;
        let fp = sanctum_protocol::hash::ContentHash::of(&der).to_hex();
        std::fs::rename(&current, issued.join(format!("{name}.{}.pem", &fp[..12])))
            .map_err(|source| CaError::MoveAside { path: current.clone(), source })?;
    }
    write_public(&current, pem)?;
    Ok(current)
}

/// The CA's own audit log (`DIR/audit/audit.jsonl`): every certificate issued, renewed or
/// revoked, signed with a key bound to the CA certificate.
fn ca_audit(dir: &Path) -> Result<AuditLog, CaError> {
    let ca_cert = std::fs::read_to_string(dir.join("ca.pem"))
        .map_err(|source| CaError::ReadCaCertificate { dir: dir.into(), source })?;
    let ca_key =
        std::fs::read_to_string(dir.join("ca.key")).map_err(|source| CaError::ReadCaKey { dir: dir.into(), source })?;
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
pub fn record(dir: &Path, cert_pem: &str, event: impl FnOnce(Subject) -> AuditEvent) -> Result<(), CaError> {
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
pub fn revoked(dir: &Path) -> Result<Vec<RevokedCert>, CaError> {
    let path = dir.join("revoked.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => pki::parse_revocation_list(&text).map_err(|source| CaError::BadRevocationList { path, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(vec![]),
        Err(source) => Err(CaError::Read { path, source }),
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
pub fn list(dir: &Path) -> Result<Vec<Listed>, CaError> {
    let revoked = revoked(dir)?;
    let now = time::OffsetDateTime::now_utc();
    let mut out = Vec::new();
    for file in cert_files(dir) {
        let pem = read(&file)?;
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
pub fn revoke(dir: &Path, name: &str, reason: &str) -> Result<Vec<RevokedCert>, CaError> {
    let mut list = revoked(dir)?;
    let targets: Vec<Listed> =
        self::list(dir)?.into_iter().filter(|c| c.name == name && c.status != "revoked").collect();
    if targets.is_empty() {
        return Err(CaError::NothingToRevoke { name: name.to_string(), dir: dir.into() });
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
    write_public(&tmp, &serde_json::to_string_pretty(&list)?)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|source| CaError::Sync { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, &path).map_err(|source| CaError::Replace { path, source })?;
    for t in &targets {
        let pem = read(&t.file)?;
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
pub fn renew(dir: &Path, name: &str, days: i64) -> Result<(String, PathBuf), CaError> {
    let current = dir.join("issued").join(format!("{name}.pem"));
    let old = std::fs::read_to_string(&current).map_err(|source| CaError::NoCertificate {
        name: name.to_string(),
        path: current.clone(),
        source,
    })?;
    let der = sanctum_protocol::secagg::keys::cert_der_from_pem(&old)?;
    let id = pki::identity_from_der(&der)?;
    if revoked(dir)?.iter().any(|r| r.fingerprint == id.fingerprint.to_hex()) {
        return Err(CaError::RenewRevoked { name: name.to_string() });
    }
    let csr = dir.join("requests").join(format!("{name}.csr"));
    if !csr.exists() {
        return Err(CaError::NoStoredRequest { name: name.to_string(), path: csr });
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// What the CLI prints for an error (`{:#}`): the message, then each cause after ": ".
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        sanctum_protocol::errors::Chain(e).to_string()
    }

    #[test]
    fn each_refusal_names_its_cause_once_with_the_next_step() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let csr = dir.path().join("va.csr");
        // The operating system's words for a missing file ("No such file or directory (os error 2)").
        let os_gone = std::fs::read(dir.path().join("nothing")).unwrap_err().to_string();

        let err = sign(dir.path(), &csr, "va", Role::Node, 1).unwrap_err();
        assert_eq!(
            chain(&err),
            format!("cannot read the CA certificate in {d}: run `sanctum-coordinator pki init` first: {os_gone}")
        );
        let err = sign(dir.path(), &csr, "va", Role::Coordinator, 1).unwrap_err();
        assert_eq!(
            chain(&err),
            "the coordinator's certificate is made by `pki init`; sign members as node, lead or auditor"
        );

        init(dir.path(), "t", &["localhost".to_string()], "lead", 1).unwrap();
        let err = init(dir.path(), "t", &[], "lead", 1).unwrap_err();
        assert_eq!(
            chain(&err),
            format!(
                "{d}/ca.key already exists: a second CA would orphan every certificate the first one signed; use another --dir"
            )
        );
        let err = sign(dir.path(), &csr, "va", Role::Node, 1).unwrap_err();
        assert_eq!(chain(&err), format!("cannot read CSR {d}/va.csr: {os_gone}"));
        std::fs::write(&csr, "not a request").unwrap();
        let err = sign(dir.path(), &csr, "va", Role::Node, 1).unwrap_err();
        assert!(matches!(err, CaError::Pki(PkiError::BadRequest(_))), "{err:?}");
        assert!(chain(&err).starts_with("certificate request is not valid: "), "{err}");

        let err = revoke(dir.path(), "va", "").unwrap_err();
        assert_eq!(chain(&err), format!("no unrevoked certificate for 'va' in {d} (see `pki list`)"));
        let err = renew(dir.path(), "va", 1).unwrap_err();
        assert_eq!(chain(&err), format!("no certificate for 'va' at {d}/issued/va.pem (see `pki list`): {os_gone}"));

        std::fs::write(dir.path().join("revoked.json"), "{").unwrap();
        let err = list(dir.path()).unwrap_err();
        assert!(
            chain(&err).starts_with(&format!(
                "{d}/revoked.json is not a valid revocation list: fix it, or restore it from a backup: revocation list is not valid: "
            )),
            "{}",
            chain(&err)
        );
    }
}
