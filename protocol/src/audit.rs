//! The tamper-evident audit log every party keeps: append-only JSON Lines, each record with a
//! sequence number, UTC time, the actor's certificate fingerprint, the event and its parameters
//! (hashes and numbers, never data), the SHA-256 of the previous record's line, and an Ed25519
//! signature (ring) by the writer.
//!
//! - **Binding.** The writer's Ed25519 audit key is bound to its certificate by the first record
//!   (`log_opened`): it holds the certificate and an ECDSA signature, made with the certificate's
//!   key, over the audit key and the log's id. A verifier needs nothing else: it checks the binding,
//!   then every record's signature and chain.
//! - **Canonical lines.** A line must be exactly the canonical JSON of the record it parses to,
//!   so a byte changed anywhere (even whitespace) is caught at that record.
//! - **Signed head.** After each append the writer replaces `LOG.head` (atomically) with a signed
//!   (seq, hash) of the last record, so a cut tail is caught offline. A crash between the append
//!   and the head update leaves the head one record behind, which verification accepts and says.
//!   A head rolled back to an older signed one cannot be told from a shorter log by this file
//!   alone; node receipts countersigning the coordinator's round records anchor it from outside.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hash::ContentHash;

/// The `prev` of the first record.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit record, in the field order of its canonical JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    /// UTC, RFC 3339 with milliseconds.
    pub time: String,
    /// SHA-256 (hex) of the certificate of whoever caused the event.
    pub actor: String,
    pub event: String,
    /// Hashes, names and numbers; sorted keys.
    pub params: BTreeMap<String, Value>,
    /// SHA-256 (hex) of the previous record's line.
    pub prev: String,
    /// Ed25519 signature (hex) over the canonical JSON of the record without this field.
    #[serde(default)]
    pub sig: String,
}

#[derive(Serialize)]
struct Unsigned<'a> {
    seq: u64,
    time: &'a str,
    actor: &'a str,
    event: &'a str,
    params: &'a BTreeMap<String, Value>,
    prev: &'a str,
}

impl Record {
    /// The bytes the writer signs.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let u = Unsigned {
            seq: self.seq,
            time: &self.time,
            actor: &self.actor,
            event: &self.event,
            params: &self.params,
            prev: &self.prev,
        };
        serde_json::to_vec(&u).unwrap_or_default()
    }

    /// The record's one canonical line (without the newline).
    pub fn line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The signed head: the last record's sequence number and line hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
    pub sig: String,
}

impl Head {
    fn signed_bytes(seq: u64, hash: &str) -> Vec<u8> {
        let mut m = b"sanctum audit head v1\0".to_vec();
        m.extend_from_slice(&seq.to_le_bytes());
        m.extend_from_slice(hash.as_bytes());
        m
    }
}

/// Why an audit log cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("audit log {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The message the certificate key signs to bind an audit key to it.
fn binding_message(audit_key: &[u8], log_id: &str) -> Vec<u8> {
    let mut m = b"sanctum audit key v1\0".to_vec();
    m.extend_from_slice(audit_key);
    m.extend_from_slice(log_id.as_bytes());
    m
}

/// UTC now, RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let millis = now.millisecond();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// Signs with a certificate's private key (for the audit key's binding).
pub type CertSigner<'a> = &'a dyn Fn(&[u8]) -> Result<Vec<u8>, String>;

/// Accepts or refuses a writer's certificate (DER), e.g. against the consortium CA.
pub type CertCheck<'a> = &'a dyn Fn(&[u8]) -> Result<(), String>;

/// Who writes a log: its certificate, and a signer for the binding (the certificate's key).
pub struct Writer<'a> {
    pub name: &'a str,
    pub role: &'a str,
    pub cert_der: &'a [u8],
    pub sign_with_cert_key: CertSigner<'a>,
}

/// An open, append-only audit log.
pub struct AuditLog {
    path: PathBuf,
    head_path: PathBuf,
    file: File,
    key: Ed25519KeyPair,
    next_seq: u64,
    prev: String,
    /// The writer's certificate fingerprint, the actor of its own events.
    own: String,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("path", &self.path).field("next_seq", &self.next_seq).finish_non_exhaustive()
    }
}

/// `LOG.head` beside `LOG`.
pub fn head_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".head");
    PathBuf::from(p)
}

impl AuditLog {
    /// Opens `dir/audit.jsonl` (creating it, its Ed25519 key `dir/audit.key` and the binding record
    /// on first use). A torn last line from a crash is cut off and the cut recorded.
    pub fn open(dir: &Path, writer: &Writer<'_>) -> Result<Self, AuditError> {
        let path = dir.join("audit.jsonl");
        let io = |source| AuditError::Io { path: path.clone(), source };
        let invalid = |reason: String| AuditError::Invalid { path: path.clone(), reason };
        std::fs::create_dir_all(dir).map_err(io)?;
        let key_path = dir.join("audit.key");
        let fresh = !path.exists() || std::fs::metadata(&path).map(|m| m.len() == 0).unwrap_or(true);
        let pkcs8 = if key_path.exists() {
            std::fs::read(&key_path).map_err(io)?
        } else {
            if !fresh {
                return Err(invalid(format!(
                    "the log exists but its key {} is missing; restore the key (records cannot be signed by another)",
                    key_path.display()
                )));
            }
            let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| invalid("cannot generate an Ed25519 key".into()))?;
            write_private(&key_path, doc.as_ref()).map_err(io)?;
            doc.as_ref().to_vec()
        };
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| invalid(format!("audit key: {e}")))?;
        let own = ContentHash::of(writer.cert_der).to_hex();
        // Only the tail is read: the last complete line gives the next seq and prev, and anything
        // after it is a torn write to cut off.
        let Tail { last, torn } = if fresh { Tail { last: None, torn: None } } else { read_tail(&path).map_err(io)? };
        if let Some((cut, _)) = torn {
            let f = OpenOptions::new().write(true).open(&path).map_err(io)?;
            f.set_len(cut).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        let torn = torn.map(|(_, bytes)| bytes);
        let (next_seq, prev) = match last {
            Some(last) => {
                let r: Record = serde_json::from_str(&last).map_err(|e| invalid(format!("last record: {e}")))?;
                (r.seq + 1, ContentHash::of(last.as_bytes()).to_hex())
            }
            None => (0, GENESIS_PREV.to_string()),
        };
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
        let mut log = Self { head_path: head_path(&path), path: path.clone(), file, key, next_seq, prev, own };
        if next_seq == 0 {
            let audit_key = log.key.public_key().as_ref().to_vec();
            let log_id = ContentHash::of(&[audit_key.as_slice(), writer.cert_der].concat()).to_hex();
            let binding = (writer.sign_with_cert_key)(&binding_message(&audit_key, &log_id))
                .map_err(|reason| AuditError::Invalid { path: log.path.clone(), reason })?;
            let mut params = BTreeMap::new();
            params.insert("writer".into(), Value::from(writer.name));
            params.insert("role".into(), Value::from(writer.role));
            params.insert("certificate".into(), Value::from(hex::encode(writer.cert_der)));
            params.insert("audit_key".into(), Value::from(hex::encode(&audit_key)));
            params.insert("log_id".into(), Value::from(log_id));
            params.insert("binding".into(), Value::from(hex::encode(binding)));
            let own = log.own.clone();
            log.append(&own, "log_opened", params)?;
        } else if let Some(bytes) = torn {
            let own = log.own.clone();
            log.append(&own, "log_recovered", BTreeMap::from([("torn_bytes_cut".to_string(), Value::from(bytes))]))?;
        }
        Ok(log)
    }

    /// Opens `dir`'s log as the holder of `material` (its certificate, and its key for the binding).
    pub fn open_for(dir: &Path, material: &crate::tls::TlsMaterial) -> Result<Self, AuditError> {
        let sign = |m: &[u8]| material.sign(m).map_err(|e| e.to_string());
        let identity = material.identity();
        let writer = Writer {
            name: &identity.name,
            role: identity.role.as_str(),
            cert_der: material.cert_der(),
            sign_with_cert_key: &sign,
        };
        Self::open(dir, &writer)
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer's own certificate fingerprint.
    pub fn own_fingerprint(&self) -> &str {
        &self.own
    }

    /// Appends one record (fsync'd), then the signed head. Returns its sequence number.
    pub fn append(&mut self, actor: &str, event: &str, params: BTreeMap<String, Value>) -> Result<u64, AuditError> {
        self.append_line(actor, event, params).map(|(seq, _)| seq)
    }

    /// Like [`AuditLog::append`], also returning the record's exact line.
    pub fn append_line(
        &mut self,
        actor: &str,
        event: &str,
        params: BTreeMap<String, Value>,
    ) -> Result<(u64, String), AuditError> {
        let io = |source| AuditError::Io { path: self.path.clone(), source };
        let mut record = Record {
            seq: self.next_seq,
            time: now_rfc3339(),
            actor: actor.to_string(),
            event: event.to_string(),
            params,
            prev: self.prev.clone(),
            sig: String::new(),
        };
        record.sig = hex::encode(self.key.sign(&record.signed_bytes()));
        let line = record.line();
        self.file.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        let hash = ContentHash::of(line.as_bytes()).to_hex();
        let head = Head {
            seq: record.seq,
            hash: hash.clone(),
            sig: hex::encode(self.key.sign(&Head::signed_bytes(record.seq, &hash))),
        };
        let tmp = self.head_path.with_extension("head.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&head).unwrap_or_default()).map_err(io)?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, &self.head_path).map_err(io)?;
        self.prev = hash;
        self.next_seq += 1;
        Ok((record.seq, line))
    }
}

/// What the end of a log holds: its last complete line, and where a torn tail after it starts and
/// how long it is.
struct Tail {
    last: Option<String>,
    torn: Option<(u64, usize)>,
}

/// Reads only as much of a log's end as it takes to find its last complete line.
fn read_tail(path: &Path) -> std::io::Result<Tail> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let end = buf.iter().rposition(|&b| b == b'\n');
        let torn = match end {
            Some(i) if i + 1 < buf.len() => Some((start + i as u64 + 1, buf.len() - i - 1)),
            None if start == 0 && !buf.is_empty() => Some((0, buf.len())),
            _ => None,
        };
        let Some(end) = end else {
            if start == 0 {
                return Ok(Tail { last: None, torn });
            }
            window *= 4;
            continue;
        };
        match buf[..end].iter().rposition(|&b| b == b'\n') {
            Some(i) => return Ok(Tail { last: Some(String::from_utf8_lossy(&buf[i + 1..end]).into_owned()), torn }),
            None if start == 0 => {
                return Ok(Tail { last: Some(String::from_utf8_lossy(&buf[..end]).into_owned()), torn });
            }
            None => window *= 4,
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

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
            let (writer, role) = writer_of(&cert).map_err(|e| bad(0, &e))?;
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
pub fn writer_of(cert_der: &[u8]) -> Result<(String, String), String> {
    use x509_parser::prelude::*;
    match crate::pki::identity_from_der(cert_der) {
        Ok(id) => Ok((id.name, id.role.as_str().to_string())),
        Err(crate::pki::PkiError::NoIdentity) => {
            let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| format!("certificate: {e}"))?;
            if cert.is_ca() {
                Ok(("ca".to_string(), "ca".to_string()))
            } else {
                Err("the writer's certificate names no Sanctum member (no urn:sanctum: identity)".to_string())
            }
        }
        Err(e) => Err(format!("the writer's certificate: {e}")),
    }
}

/// Verifies `path` and `path.head` from disk.
pub fn verify_file(path: &Path, cert_check: Option<CertCheck<'_>>) -> Result<Verified, String> {
    let log = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let head = std::fs::read(head_path(path)).ok();
    verify(&log, head.as_deref(), cert_check).map_err(|e| e.to_string())
}

/// Reads every record of a log (for reports); stops at the first unreadable line.
pub fn read_records(path: &Path) -> Result<Vec<Record>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines().map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}", path.display()))).collect()
}

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

/// Checks that `cert_der` was signed by the CA in `ca_pem` (validity dates are not checked: an old
/// log stays verifiable after its writer's certificate expired).
pub fn issued_by(ca_pem: &str, cert_der: &[u8]) -> Result<(), String> {
    use x509_parser::prelude::*;
    let ca_der = crate::secagg::keys::cert_der_from_pem(ca_pem).map_err(|e| e.to_string())?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| format!("CA certificate: {e}"))?;
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| format!("certificate: {e}"))?;
    if cert.issuer() != ca.subject() {
        return Err(format!("issued by '{}', not by the CA '{}'", cert.issuer(), ca.subject()));
    }
    cert.verify_signature(Some(ca.public_key())).map_err(|_| "its signature does not verify against the CA".to_string())
}

/// Runs `audit verify`: the report on success, the reason on failure.
pub fn run(cmd: &AuditCommand) -> Result<String, String> {
    match cmd {
        AuditCommand::Verify { log, ca } => {
            let ca_pem = match ca {
                Some(p) => Some(std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?),
                None => None,
            };
            let check = |der: &[u8]| match &ca_pem {
                Some(pem) => issued_by(pem, der),
                None => Ok(()),
            };
            let v = verify_file(log, Some(&check)).map_err(|e| format!("{}: FAILED: {e}", log.display()))?;
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::pki::{self, Role, SignSpec};

    struct Fixture {
        dir: tempfile::TempDir,
        log: Vec<u8>,
        head: Vec<u8>,
    }

    /// A node certificate (DER) and its key (PEM) from a fresh CA.
    fn member(name: &str) -> (Vec<u8>, String) {
        member_as(name, Role::Node)
    }

    fn member_as(name: &str, role: Role) -> (Vec<u8>, String) {
        let ca = pki::init_ca("t", 1).unwrap();
        let me = pki::issue(&ca.cert_pem, &ca.key_pem, &SignSpec { name, role, days: 1, hosts: &[] }).unwrap();
        (crate::secagg::keys::cert_der_from_pem(&me.cert_pem).unwrap(), me.key_pem)
    }

    fn build(records: usize) -> Fixture {
        let (der, key_pem) = member_as("coordinator", Role::Coordinator);
        let sign = |m: &[u8]| crate::secagg::keys::sign_message(m, &key_pem).map_err(|e| e.to_string());
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer { name: "coordinator", role: "coordinator", cert_der: &der, sign_with_cert_key: &sign };
        let mut log = AuditLog::open(dir.path(), &writer).unwrap();
        for i in 1..records {
            let params = BTreeMap::from([
                ("round".to_string(), Value::from(i as u64)),
                ("model".to_string(), Value::from(ContentHash::of(&i.to_le_bytes()).to_hex())),
            ]);
            log.append("ab".repeat(32).as_str(), "round_closed", params).unwrap();
        }
        let log_bytes = std::fs::read(dir.path().join("audit.jsonl")).unwrap();
        let head = std::fs::read(head_path(&dir.path().join("audit.jsonl"))).unwrap();
        Fixture { dir, log: log_bytes, head }
    }

    fn lines(log: &[u8]) -> Vec<Vec<u8>> {
        log.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
    }

    fn join(lines: &[Vec<u8>]) -> Vec<u8> {
        lines.iter().flat_map(|l| l.iter().copied().chain(std::iter::once(b'\n'))).collect()
    }

    /// The record that holds byte `pos`.
    fn record_at(log: &[u8], pos: usize) -> u64 {
        log[..pos].iter().filter(|&&b| b == b'\n').count() as u64
    }

    fn first_bad(log: &[u8], head: &[u8]) -> Option<u64> {
        match verify(log, Some(head), None) {
            Ok(_) => None,
            Err(VerifyError::Record { seq, .. }) => Some(seq),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn a_log_verifies_and_reopening_continues_the_chain() {
        let f = build(20);
        let v = verify(&f.log, Some(&f.head), None).unwrap();
        assert_eq!((v.records, v.writer.as_str(), v.head_behind), (20, "coordinator", false));
        assert!(verify(&f.log, None, None).is_err(), "a missing head is an error");
        let _ = f.dir;
    }

    proptest! {
        /// Any finite f64 in a record's parameters survives the write → read → canonical-form
        /// round trip exactly (serde_json's float_roundtrip), so a verifier never mistakes a
        /// number for an altered line.
        #[test]
        fn numbers_keep_their_canonical_form(x in proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO) {
            let r = Record {
                seq: 1,
                time: now_rfc3339(),
                actor: "a".into(),
                event: "e".into(),
                params: BTreeMap::from([("x".to_string(), Value::from(x))]),
                prev: GENESIS_PREV.into(),
                sig: "00".into(),
            };
            let line = r.line();
            let back: Record = serde_json::from_str(&line).unwrap();
            prop_assert_eq!(back.line(), line);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// In a log of 300 records, any single changed byte is caught at the record holding it.
        #[test]
        fn any_changed_byte_is_caught_at_its_record(pos_frac in 0.0f64..1.0, delta in 1u8..=255) {
            let f = fixture();
            let mut log = f.log.clone();
            let pos = ((log.len() - 1) as f64 * pos_frac) as usize;
            log[pos] = log[pos].wrapping_add(delta);
            let at = record_at(&f.log, pos);
            if first_bad(&log, &f.head) != Some(at) {
                eprintln!("DEBUG orig {:?} new {:?} ctx {:?} err {:?}", f.log[pos], log[pos], String::from_utf8_lossy(&f.log[pos.saturating_sub(60)..pos+20]), verify(&log, Some(&f.head), None).err().map(|e| e.to_string()));
            }
            prop_assert_eq!(first_bad(&log, &f.head), Some(at), "byte {} of the log", pos);
        }

        /// Deleting any record, swapping any two, or cutting the tail anywhere is caught, and the
        /// first bad record is named.
        #[test]
        fn removed_swapped_and_cut_records_are_caught(i in 0usize..300, j in 0usize..300, cut in 1usize..300) {
            let f = fixture();
            let original = lines(&f.log);
            let mut deleted = original.clone();
            deleted.remove(i);
            prop_assert_eq!(first_bad(&join(&deleted), &f.head), Some(i as u64));
            if i != j {
                let mut swapped = original.clone();
                swapped.swap(i, j);
                prop_assert_eq!(first_bad(&join(&swapped), &f.head), Some(i.min(j) as u64));
            }
            let kept = original.len() - cut;
            prop_assert_eq!(first_bad(&join(&original[..kept]), &f.head), Some(kept as u64));
            // A cut inside a line: that record is incomplete.
            let mut torn = join(&original[..kept]);
            torn.extend_from_slice(&original[kept][..original[kept].len() / 2]);
            prop_assert_eq!(first_bad(&torn, &f.head), Some(kept as u64));
        }
    }

    fn fixture() -> &'static Fixture {
        static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
        F.get_or_init(|| build(300))
    }

    /// A log that names another writer or role than its certificate is refused at its first
    /// record; an honest one reports the certificate's identity, and the CA's own log is `ca`.
    #[test]
    fn a_logs_writer_and_role_come_from_its_certificate() {
        let verify_as = |der: &[u8], key_pem: &str, name: &str, role: &str| {
            let sign = |m: &[u8]| crate::secagg::keys::sign_message(m, key_pem).map_err(|e| e.to_string());
            let dir = tempfile::tempdir().unwrap();
            let writer = Writer { name, role, cert_der: der, sign_with_cert_key: &sign };
            let mut log = AuditLog::open(dir.path(), &writer).unwrap();
            log.append("x", "e", BTreeMap::new()).unwrap();
            verify_file(&dir.path().join("audit.jsonl"), None)
        };
        let (der, key) = member("cleveland");
        let v = verify_as(&der, &key, "cleveland", "node").unwrap();
        assert_eq!((v.writer.as_str(), v.role.as_str()), ("cleveland", "node"));
        for (name, role) in [("coordinator", "node"), ("cleveland", "coordinator"), ("hungarian", "lead")] {
            let err = verify_as(&der, &key, name, role).unwrap_err();
            assert!(
                err.starts_with("record 0:") && err.contains("but its certificate is 'cleveland' (node)"),
                "{name} ({role}): {err}"
            );
        }
        let ca = pki::init_ca("t", 1).unwrap();
        let ca_der = crate::secagg::keys::cert_der_from_pem(&ca.cert_pem).unwrap();
        let v = verify_as(&ca_der, &ca.key_pem, "ca", "ca").unwrap();
        assert_eq!((v.writer.as_str(), v.role.as_str()), ("ca", "ca"));
        assert!(verify_as(&ca_der, &ca.key_pem, "coordinator", "coordinator").is_err());
    }

    #[test]
    fn reopening_reads_only_the_tail_and_continues_the_chain_even_after_a_long_record() {
        let (der, key_pem) = member("n");
        let sign = |m: &[u8]| crate::secagg::keys::sign_message(m, &key_pem).map_err(|e| e.to_string());
        let writer = Writer { name: "n", role: "node", cert_der: &der, sign_with_cert_key: &sign };
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path(), &writer).unwrap();
        for i in 0..200u64 {
            log.append("x", "e", BTreeMap::from([("i".to_string(), Value::from(i))])).unwrap();
        }
        // A record longer than the first tail window read on reopen.
        log.append("x", "long", BTreeMap::from([("reason".to_string(), Value::from("r".repeat(200_000)))])).unwrap();
        drop(log);
        let mut log = AuditLog::open(dir.path(), &writer).unwrap();
        log.append("x", "after", BTreeMap::new()).unwrap();
        let v = verify_file(&dir.path().join("audit.jsonl"), None).unwrap();
        assert_eq!(v.records, 203);
    }

    #[test]
    fn a_torn_tail_is_cut_on_reopen_and_the_recovery_recorded() {
        let (der, key_pem) = member("n");
        let sign = |m: &[u8]| crate::secagg::keys::sign_message(m, &key_pem).map_err(|e| e.to_string());
        let writer = Writer { name: "n", role: "node", cert_der: &der, sign_with_cert_key: &sign };
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path(), &writer).unwrap();
        log.append("x", "e", BTreeMap::new()).unwrap();
        drop(log);
        let path = dir.path().join("audit.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"ti").unwrap();
        drop(f);
        let mut log = AuditLog::open(dir.path(), &writer).unwrap();
        log.append("x", "after", BTreeMap::new()).unwrap();
        let v = verify_file(&path, None).unwrap();
        assert_eq!(v.records, 4);
        let events: Vec<String> = read_records(&path).unwrap().into_iter().map(|r| r.event).collect();
        assert_eq!(events, ["log_opened", "e", "log_recovered", "after"]);
    }
}
