//! Offline verification of an audit log: the key binding, each record's canonical form,
//! sequence, chain and signature, and the signed head. Needs nothing but the log, its head and,
//! optionally, a check of the writer's certificate (e.g. against the consortium CA).

use std::path::{Path, PathBuf};

use ring::signature::{self, UnparsedPublicKey};
use serde_json::Value;

use super::{CertCheck, GENESIS_PREV, Head, Record, binding_message, head_path};
use crate::hash::ContentHash;

/// What verification found.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// The writer's name and role, read from its certificate (never from the log's own fields).
    pub writer: String,
    pub role: String,
    /// The writer's certificate fingerprint.
    pub fingerprint: String,
    /// The head was one record behind (a crash between append and head update).
    pub head_behind: bool,
}

/// The first problem found, naming the record.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("record {seq}: {reason}")]
    Record { seq: u64, reason: String },
    #[error("the log is empty")]
    Empty,
    #[error("head: {0}")]
    Head(String),
}

/// Checks a log offline: binding, canonical form, sequence, chain, signatures, signed head.
/// `head` is the content of `LOG.head` (`None` if it is missing, which is itself an error).
/// `cert_check`, when given, is asked to accept the writer's certificate (e.g. against a CA).
pub fn verify(log: &[u8], head: Option<&[u8]>, cert_check: Option<CertCheck<'_>>) -> Result<Verified, VerifyError> {
    let text = std::str::from_utf8(log).map_err(|e| {
        // Name the record holding the first invalid byte.
        let seq = log[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() as u64;
        VerifyError::Record { seq, reason: "not UTF-8 text (altered)".into() }
    })?;
    if text.is_empty() {
        return Err(VerifyError::Empty);
    }
    let mut lines: Vec<&str> = text.split('\n').collect();
    let complete = text.ends_with('\n');
    if complete {
        lines.pop();
    }
    let bad = |seq: u64, reason: &str| VerifyError::Record { seq, reason: reason.to_string() };
    let mut key: Option<Vec<u8>> = None;
    let mut prev = GENESIS_PREV.to_string();
    let mut found = Verified {
        records: 0,
        writer: String::new(),
        role: String::new(),
        fingerprint: String::new(),
        head_behind: false,
    };
    for (i, line) in lines.iter().enumerate() {
        let seq = i as u64;
        if i == lines.len() - 1 && !complete {
            return Err(bad(seq, "the last record is incomplete (no end of line): cut or torn"));
        }
        let record: Record = serde_json::from_str(line).map_err(|e| bad(seq, &format!("not a valid record ({e})")))?;
        if record.line() != *line {
            return Err(bad(seq, "not in canonical form: the line was altered"));
        }
        // Hex decodes either case, so only lowercase is canonical: an upper-cased digit of the
        // signature would otherwise verify here and be caught only by the next record's chain.
        let lower_hex = |h: &str| h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !lower_hex(&record.sig) || !lower_hex(&record.prev) {
            return Err(bad(seq, "not in canonical form: a hash or signature is not lowercase hex (altered)"));
        }
        if record.seq != seq {
            return Err(bad(
                seq,
                &format!(
                    "carries sequence number {} at position {seq}: records were removed, inserted or reordered",
                    record.seq
                ),
            ));
        }
        if record.prev != prev {
            return Err(bad(
                seq,
                "does not chain to the record before it: records were removed, inserted, reordered or altered",
            ));
        }
        if seq == 0 {
            let get = |k: &str| record.params.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            if record.event != "log_opened" {
                return Err(bad(0, "the first record must be log_opened (the key binding)"));
            }
            let cert = hex::decode(get("certificate")).map_err(|_| bad(0, "certificate is not hex"))?;
            let audit_key = hex::decode(get("audit_key")).map_err(|_| bad(0, "audit_key is not hex"))?;
            let binding = hex::decode(get("binding")).map_err(|_| bad(0, "binding is not hex"))?;
            let log_id = ContentHash::of(&[audit_key.as_slice(), cert.as_slice()].concat()).to_hex();
            if get("log_id") != log_id {
                return Err(bad(0, "log_id does not match the key and certificate"));
            }
            crate::secagg::keys::verify_message(&binding_message(&audit_key, &log_id), &binding, &cert)
                .map_err(|e| bad(0, &format!("the audit key is not bound to the certificate: {e}")))?;
            if let Some(check) = cert_check {
                check(&cert).map_err(|e| bad(0, &format!("the writer's certificate is not accepted: {e}")))?;
            }
            // Who wrote the log is what its certificate says; the log's own fields only have to
            // agree with it (a log naming another writer is refused, not believed).
            let (writer, role) = writer_of(&cert).map_err(|e| bad(0, &e.to_string()))?;
            if get("writer") != writer || get("role") != role {
                return Err(bad(
                    0,
                    &format!(
                        "the log says it was written by '{}' ({}), but its certificate is '{writer}' ({role})",
                        get("writer"),
                        get("role")
                    ),
                ));
            }
            found.writer = writer;
            found.role = role;
            found.fingerprint = ContentHash::of(&cert).to_hex();
            key = Some(audit_key);
        }
        let sig = hex::decode(&record.sig).map_err(|_| bad(seq, "signature is not hex"))?;
        let pk = UnparsedPublicKey::new(&signature::ED25519, key.clone().unwrap_or_default());
        pk.verify(&record.signed_bytes(), &sig)
            .map_err(|_| bad(seq, "signature does not verify: the record was altered"))?;
        prev = ContentHash::of(line.as_bytes()).to_hex();
        found.records = seq + 1;
    }
    let head = head.ok_or_else(|| VerifyError::Head("the signed head (LOG.head) is missing".into()))?;
    let head: Head = serde_json::from_slice(head).map_err(|e| VerifyError::Head(format!("unreadable: {e}")))?;
    let sig = hex::decode(&head.sig).map_err(|_| VerifyError::Head("signature is not hex".into()))?;
    UnparsedPublicKey::new(&signature::ED25519, key.unwrap_or_default())
        .verify(&Head::signed_bytes(head.seq, &head.hash), &sig)
        .map_err(|_| VerifyError::Head("signature does not verify".into()))?;
    let last = found.records - 1;
    if head.seq > last {
        return Err(bad(
            last + 1,
            &format!("missing: the log ends at record {last} but its signed head says {}: the tail was cut", head.seq),
        ));
    }
    let hash_at = |seq: u64| ContentHash::of(lines[seq as usize].as_bytes()).to_hex();
    if head.seq == last && head.hash == hash_at(last) {
        return Ok(found);
    }
    if head.seq + 1 == last && head.hash == hash_at(head.seq) {
        found.head_behind = true;
        return Ok(found);
    }
    Err(bad(head.seq, "does not match the signed head"))
}

/// The writer's name and role, from its certificate: a member's Sanctum identity, or `ca` for the
/// consortium CA's own log (its certificate is a CA certificate and names no member).
pub fn writer_of(cert_der: &[u8]) -> Result<(String, String), WriterError> {
    use x509_parser::prelude::*;
    match crate::pki::identity_from_der(cert_der) {
        Ok(id) => Ok((id.name, id.role.as_str().to_string())),
        Err(crate::pki::PkiError::NoIdentity) => {
            let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| WriterError::Unreadable(e.to_string()))?;
            if cert.is_ca() { Ok(("ca".to_string(), "ca".to_string())) } else { Err(WriterError::NoMember) }
        }
        Err(e) => Err(WriterError::Identity(e)),
    }
}

/// Why a log's certificate names no writer.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("the writer's certificate cannot be parsed: {0}")]
    Unreadable(String),
    #[error(
        "the writer's certificate names no Sanctum member (no urn:sanctum: identity): the log was not written by a member's Sanctum"
    )]
    NoMember,
    #[error("the writer's certificate: {0}")]
    Identity(crate::pki::PkiError),
}

/// Verifies `path` and `path.head` from disk.
pub fn verify_file(path: &Path, cert_check: Option<CertCheck<'_>>) -> Result<Verified, VerifyFileError> {
    let log = std::fs::read(path).map_err(|source| VerifyFileError::Read { path: path.to_path_buf(), source })?;
    let head = std::fs::read(head_path(path)).ok();
    Ok(verify(&log, head.as_deref(), cert_check)?)
}

/// Why a log on disk does not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyFileError {
    #[error("{path}: cannot read the log: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// What [`verify`] found (its message names the record).
    #[error(transparent)]
    Invalid(#[from] VerifyError),
}

/// Checks that `cert_der` was signed by the CA in `ca_pem` (validity dates are not checked: an old
/// log stays verifiable after its writer's certificate expired).
pub fn issued_by(ca_pem: &str, cert_der: &[u8]) -> Result<(), IssuerError> {
    use x509_parser::prelude::*;
    let ca_der = crate::secagg::keys::cert_der_from_pem(ca_pem).map_err(|e| IssuerError::Ca(e.to_string()))?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| IssuerError::Ca(e.to_string()))?;
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| IssuerError::Certificate(e.to_string()))?;
    if cert.issuer() != ca.subject() {
        return Err(IssuerError::OtherIssuer { issuer: cert.issuer().to_string(), ca: ca.subject().to_string() });
    }
    cert.verify_signature(Some(ca.public_key())).map_err(|_| IssuerError::Signature)
}

/// Why a certificate is not accepted as the consortium CA's.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("CA certificate: {0}; pass the consortium's ca.pem")]
    Ca(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("issued by '{issuer}', not by the CA '{ca}'")]
    OtherIssuer { issuer: String, ca: String },
    #[error("its signature does not verify against the CA")]
    Signature,
}
