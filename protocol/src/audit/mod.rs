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
//!
//! # Layout
//! - this file: [`Record`], [`AuditLog`] (open, append, the signed head), [`read_records`].
//! - [`event`]: [`AuditEvent`], the typed events every writer appends and every reader matches.
//! - [`verify`]: offline verification ([`verify()`], [`verify_file`], [`issued_by`]).
//! - [`cli`]: the `audit verify` subcommand both binaries mount.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hash::ContentHash;

pub mod cli;
pub mod event;
#[cfg(test)]
mod tests;
pub mod verify;

pub use cli::{AuditCommand, RunError, run};
pub use event::{AuditEvent, EventError, KNOWN_EVENTS, Params, PlanDecision, RevocationListState, RoundUpdate};
pub use verify::{
    IssuerError, Verified, VerifyError, VerifyFileError, WriterError, issued_by, verify, verify_file, writer_of,
};

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
    pub(crate) fn signed_bytes(seq: u64, hash: &str) -> Vec<u8> {
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
    #[error("audit log {path}: {source}")]
    Event { path: PathBuf, source: EventError },
}

/// The message the certificate key signs to bind an audit key to it.
pub(crate) fn binding_message(audit_key: &[u8], log_id: &str) -> Vec<u8> {
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

/// Why a certificate's key did not sign (whatever the signer's own error is).
pub type SignError = Box<dyn std::error::Error + Send + Sync>;

/// Signs with a certificate's private key (for the audit key's binding).
pub type CertSigner<'a> = &'a dyn Fn(&[u8]) -> Result<Vec<u8>, SignError>;

/// Accepts or refuses a writer's certificate (DER), e.g. against the consortium CA.
pub type CertCheck<'a> = &'a dyn Fn(&[u8]) -> Result<(), IssuerError>;

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
                .map_err(|e| AuditError::Invalid { path: log.path.clone(), reason: e.to_string() })?;
            let opened = AuditEvent::LogOpened {
                writer: writer.name.to_string(),
                role: writer.role.to_string(),
                certificate: hex::encode(writer.cert_der),
                audit_key: hex::encode(&audit_key),
                log_id,
                binding: hex::encode(binding),
            };
            let own = log.own.clone();
            log.append_event(&own, &opened)?;
        } else if let Some(bytes) = torn {
            let own = log.own.clone();
            log.append_event(&own, &AuditEvent::LogRecovered { torn_bytes_cut: bytes as u64 })?;
        }
        Ok(log)
    }

    /// Opens `dir`'s log as the holder of `material` (its certificate, and its key for the binding).
    pub fn open_for(dir: &Path, material: &crate::tls::TlsMaterial) -> Result<Self, AuditError> {
        let sign = |m: &[u8]| material.sign(m).map_err(SignError::from);
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

    /// Appends one event (fsync'd), then the signed head. Returns its sequence number.
    pub fn append_event(&mut self, actor: &str, event: &AuditEvent) -> Result<u64, AuditError> {
        self.append_event_line(actor, event).map(|(seq, _)| seq)
    }

    /// Like [`AuditLog::append_event`], also returning the record's exact line (a round record's,
    /// which its nodes countersign).
    pub fn append_event_line(&mut self, actor: &str, event: &AuditEvent) -> Result<(u64, String), AuditError> {
        let (name, params) =
            event.to_parts().map_err(|source| AuditError::Event { path: self.path.clone(), source })?;
        self.append_line(actor, &name, params)
    }

    /// Appends one record with untyped parameters (fsync'd), then the signed head. Returns its
    /// sequence number. Writers use [`AuditLog::append_event`]; this stays for tools and tests
    /// that write records of any shape.
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

/// Why a log's records cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: cannot read the log: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: line {line} is not an audit record ({source}): verify the log with `audit verify`")]
    Line { path: PathBuf, line: usize, source: serde_json::Error },
}

/// Reads every record of a log (for reports); stops at the first unreadable line.
pub fn read_records(path: &Path) -> Result<Vec<Record>, ReadError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReadError::Io { path: path.to_path_buf(), source })?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| ReadError::Line { path: path.to_path_buf(), line: i + 1, source })
        })
        .collect()
}
