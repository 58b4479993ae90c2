//! The hospital's approved TorchScript models: a TOML file (`policy.model_approvals`, default
//! `approved_models.toml` beside node.toml) that `sanctum-node model approve` and `model revoke`
//! write and the node reads before it trains a TorchScript model.
//!
//! ```toml
//! [[model]]
//! sha256 = "3b0c…"                      # the .pt file's SHA-256: what is approved
//! name = "logreg"
//! approved_by = "Dr. A. Steward"
//! approved_at = "2026-05-01T09:30:00.000Z"
//! parameters = 14                       # scalars, as the file holds them
//! file = "models/logreg.pt"             # as given to `model approve`; informational
//! # revoked_by = "…"                    # set by `model revoke`; the entry stays as history
//! # revoked_at = "…"
//! ```
//!
//! Fail closed: a missing file approves nothing; a malformed file is an error naming it, and a
//! node that cannot read its approvals approves nothing and says so. Writes go through a temp
//! file, fsync and rename under an exclusive lock on `FILE.lock`, so a reader never sees half a
//! file and two approvals at once do not lose one.
//!
//! Every approval and revocation reaches the node's signed audit log exactly once. The CLI writes
//! it there itself when it can take the state directory's lock; while the node runs, the node
//! does it ([`audit_pending`], at start and on each offer) from the difference between this file
//! and `STATE_DIR/model_approvals_audited.json`, the keys of the events already in the log.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use sanctum_protocol::audit::{AuditEvent, AuditLog};
use sanctum_protocol::model::ModelSpec;
use serde::{Deserialize, Serialize};

/// The file in the state directory that lists the approval events already audited.
pub const AUDITED_FILE: &str = "model_approvals_audited.json";

/// One approval of a model file, by its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub sha256: String,
    pub name: String,
    pub approved_by: String,
    /// RFC 3339, UTC (`…Z`).
    pub approved_at: String,
    /// Scalars over all the module's parameters.
    pub parameters: u64,
    /// The file as given to `model approve` (informational: the hash is what is approved).
    #[serde(default)]
    pub file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

impl Approval {
    /// Whether the approval still stands.
    pub fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }

    /// The key of its approval event in the audited file.
    fn approved_key(&self) -> String {
        format!("approved {} {}", self.sha256, self.approved_at)
    }

    fn revoked_key(&self) -> Option<String> {
        self.revoked_at.as_ref().map(|at| format!("revoked {} {at}", self.sha256))
    }
}

/// The approvals file's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approvals {
    #[serde(default, rename = "model")]
    entries: Vec<Approval>,
}

/// Why approvals cannot be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("model approvals {path}: {source}; check the file's permissions")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "model approvals {path} is malformed ({reason}): no TorchScript model is approved until it is fixed; repair or remove the file and approve again with `sanctum-node model approve FILE --config node.toml`"
    )]
    Malformed { path: PathBuf, reason: String },
    #[error("model {sha256} is already approved (by {by} at {at}); revoke it first to approve it again")]
    AlreadyApproved { sha256: String, by: String, at: String },
    #[error("model {0} is not approved here; `sanctum-node model list --config node.toml` shows what is")]
    NotApproved(String),
    #[error(transparent)]
    Invalid(#[from] InvalidApproval),
    #[error("cannot encode {what}: {reason}; this is a bug, please report it")]
    Encode { what: &'static str, reason: String },
    #[error("audit log: {0}")]
    Audit(#[from] sanctum_protocol::audit::AuditError),
}

/// What makes an approvals file, or one of its entries, invalid (the reason inside
/// [`ApprovalError::Malformed`], or a refused [`Approvals::approve`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidApproval {
    /// The TOML parser's message, on one line.
    #[error("{0}")]
    Toml(String),
    /// The first 80 characters of the value.
    #[error("sha256 '{0}' is not 64 lowercase hex digits")]
    Sha256(String),
    #[error("{field} must be 1 to 200 characters without control characters")]
    Text { field: String },
    #[error("{field} is not an RFC 3339 UTC time (2026-05-01T09:30:00Z)")]
    Time { field: String },
    #[error("model {sha256}: revoked_by and revoked_at go together")]
    HalfRevoked { sha256: String },
    #[error("model {sha256} is approved twice; revoke one entry or remove it")]
    ApprovedTwice { sha256: String },
    #[error("model {sha256} has two approvals at {at}; remove one of them")]
    SameTime { sha256: String, at: String },
}

/// Why a plan's model may not be trained here ([`check_model`]); the text is the refusal's
/// reason the coordinator gets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelRefused {
    #[error(
        "model {sha256} is not approved at this hospital: review the file and run `sanctum-node model approve FILE --config node.toml`"
    )]
    NotApproved { sha256: String },
    /// `declared` is `None` when the plan's count overflows a u64.
    #[error(
        "model {sha256} was approved with {approved} parameters, the plan declares {}: the plan does not describe the approved file",
        declared.map_or("more than 2^64".to_string(), |d| d.to_string())
    )]
    Parameters { sha256: String, approved: u64, declared: Option<u64> },
}

/// `YYYY-MM-DDTHH:MM:SS[.fff…]Z`, with plausible fields.
pub fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r.clone()).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|t| t.parse::<u32>().ok()).unwrap_or(99);
    let base = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b.last() == Some(&b'Z');
    if !base {
        return false;
    }
    let frac = match b.get(19..b.len() - 1) {
        Some([]) => true,
        Some([b'.', rest @ ..]) => !rest.is_empty() && rest.len() <= 9 && rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    frac && (1..=12).contains(&num(5..7))
        && (1..=31).contains(&num(8..10))
        && num(11..13) <= 23
        && num(14..16) <= 59
        && num(17..19) <= 60
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// A person's or a model's name: 1 to 200 characters, no control characters.
fn check_text(field: &str, s: &str) -> Result<(), InvalidApproval> {
    if s.trim().is_empty() || s.chars().count() > 200 || s.chars().any(char::is_control) {
        return Err(InvalidApproval::Text { field: field.to_string() });
    }
    Ok(())
}

impl Approval {
    fn validate(&self) -> Result<(), InvalidApproval> {
        if !is_sha256_hex(&self.sha256) {
            return Err(InvalidApproval::Sha256(self.sha256.chars().take(80).collect()));
        }
        let what = |f: &str| format!("{f} of model {}", self.sha256);
        check_text(&what("name"), &self.name)?;
        check_text(&what("approved_by"), &self.approved_by)?;
        if !is_rfc3339_utc(&self.approved_at) {
            return Err(InvalidApproval::Time { field: what("approved_at") });
        }
        match (&self.revoked_by, &self.revoked_at) {
            (None, None) => Ok(()),
            (Some(by), Some(at)) => {
                check_text(&what("revoked_by"), by)?;
                if !is_rfc3339_utc(at) {
                    return Err(InvalidApproval::Time { field: what("revoked_at") });
                }
                Ok(())
            }
            _ => Err(InvalidApproval::HalfRevoked { sha256: self.sha256.clone() }),
        }
    }
}

impl Approvals {
    /// Reads `path`; a missing file is no approval at all.
    pub fn load(path: &Path) -> Result<Self, ApprovalError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(ApprovalError::Io { path: path.to_path_buf(), source }),
        };
        Self::parse(&text).map_err(|e| ApprovalError::Malformed { path: path.to_path_buf(), reason: e.to_string() })
    }

    /// [`Approvals::load`] for the node: on any error, nothing is approved, and the error says why.
    pub fn load_fail_closed(path: &Path) -> (Self, Option<ApprovalError>) {
        match Self::load(path) {
            Ok(a) => (a, None),
            Err(e) => (Self::default(), Some(e)),
        }
    }

    /// Parses and validates the TOML text.
    pub fn parse(text: &str) -> Result<Self, InvalidApproval> {
        let a: Approvals =
            toml::from_str(text).map_err(|e| InvalidApproval::Toml(e.to_string().trim().replace('\n', " ")))?;
        let mut active = BTreeSet::new();
        let mut keys = BTreeSet::new();
        for e in &a.entries {
            e.validate()?;
            if e.is_active() && !active.insert(e.sha256.as_str()) {
                return Err(InvalidApproval::ApprovedTwice { sha256: e.sha256.clone() });
            }
            if !keys.insert(e.approved_key()) {
                return Err(InvalidApproval::SameTime { sha256: e.sha256.clone(), at: e.approved_at.clone() });
            }
        }
        Ok(a)
    }

    /// Every entry, revoked ones included, in the order they were approved.
    pub fn entries(&self) -> &[Approval] {
        &self.entries
    }

    /// The standing approval of a hash, if any.
    pub fn is_approved(&self, sha256: &str) -> Option<&Approval> {
        self.entries.iter().find(|e| e.is_active() && e.sha256 == sha256)
    }

    /// Adds an approval; refused if the hash is approved already or the entry is malformed.
    pub fn approve(&mut self, approval: Approval) -> Result<(), ApprovalError> {
        approval.validate()?;
        if let Some(e) = self.is_approved(&approval.sha256) {
            return Err(ApprovalError::AlreadyApproved {
                sha256: e.sha256.clone(),
                by: e.approved_by.clone(),
                at: e.approved_at.clone(),
            });
        }
        self.entries.push(approval);
        Ok(())
    }

    /// Revokes the standing approval of `sha256`; the entry stays, marked, as history.
    pub fn revoke(&mut self, sha256: &str, by: &str, at: &str) -> Result<Approval, ApprovalError> {
        check_text("revoked_by", by)?;
        let e = self
            .entries
            .iter_mut()
            .find(|e| e.is_active() && e.sha256 == sha256)
            .ok_or_else(|| ApprovalError::NotApproved(sha256.to_string()))?;
        e.revoked_by = Some(by.to_string());
        e.revoked_at = Some(at.to_string());
        Ok(e.clone())
    }

    /// The file's text.
    pub fn to_toml(&self) -> Result<String, ApprovalError> {
        let body = toml::to_string(self)
            .map_err(|e| ApprovalError::Encode { what: "the approvals file", reason: e.to_string() })?;
        Ok(format!(
            "# Approved TorchScript models, written by `sanctum-node model approve` / `model revoke`.\n# A plan's model is trained here only if its sha256 is listed without revoked_at.\n\n{body}"
        ))
    }

    /// Writes atomically: `PATH.tmp`, fsync, rename over `path`, fsync of the directory.
    pub fn save(&self, path: &Path) -> Result<(), ApprovalError> {
        write_atomic(path, self.to_toml()?.as_bytes())
    }

    /// Read, change and write back under an exclusive lock on `PATH.lock`, so that two commands at
    /// once do not lose one's change. Nothing is written if `change` fails.
    pub fn update<T>(
        path: &Path,
        change: impl FnOnce(&mut Self) -> Result<T, ApprovalError>,
    ) -> Result<T, ApprovalError> {
        let io = |source| ApprovalError::Io { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(with_suffix(path, ".lock"))
            .map_err(io)?;
        lock.lock().map_err(io)?;
        let mut approvals = Self::load(path)?;
        let out = change(&mut approvals)?;
        approvals.save(path)?;
        Ok(out)
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// Temp file beside `path`, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ApprovalError> {
    let io = |source| ApprovalError::Io { path: path.to_path_buf(), source };
    let tmp = with_suffix(path, ".tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    crate::state_lock::sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(io)?;
    Ok(())
}

/// The policy decision for a plan's model: a TorchScript model must be approved here (and the
/// plan's parameter count must be the approved file's); zoo models need no approval.
pub fn check_model(plan_model: &ModelSpec, approvals: &Approvals) -> Result<(), ModelRefused> {
    let ModelSpec::Torchscript(t) = plan_model else {
        return Ok(());
    };
    let Some(a) = approvals.is_approved(&t.sha256) else {
        return Err(ModelRefused::NotApproved { sha256: t.sha256.clone() });
    };
    let declared = plan_model.checked_num_params();
    if declared != Some(a.parameters) {
        return Err(ModelRefused::Parameters { sha256: t.sha256.clone(), approved: a.parameters, declared });
    }
    Ok(())
}

/// An approval event the audit log does not hold yet.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingAudit {
    /// `model_approved` or `model_revoked` (its `key` is in it too, so a record can be matched).
    pub event: AuditEvent,
    /// Its key in the audited file.
    pub key: String,
}

/// The keys of the approval events already in the audit log
/// (`STATE_DIR/model_approvals_audited.json`, a JSON list of strings).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audited(BTreeSet<String>);

impl Audited {
    /// Reads the state directory's audited file; missing means none yet.
    pub fn load(state_dir: &Path) -> Result<Self, ApprovalError> {
        let path = state_dir.join(AUDITED_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ApprovalError::Malformed { path: path.clone(), reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ApprovalError::Io { path, source }),
        }
    }

    fn save(&self, state_dir: &Path) -> Result<(), ApprovalError> {
        let path = state_dir.join(AUDITED_FILE);
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| ApprovalError::Encode { what: "the audited approvals", reason: e.to_string() })?;
        write_atomic(&path, &bytes)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.0.contains(key)
    }
}

/// The approval and revocation events of `approvals` that `audited` lacks, in file order (an
/// approval before its revocation). Pure.
pub fn pending_audit(approvals: &Approvals, audited: &Audited) -> Vec<PendingAudit> {
    let mut out = Vec::new();
    for a in &approvals.entries {
        let key = a.approved_key();
        if !audited.contains(&key) {
            let event = AuditEvent::ModelApproved {
                sha256: a.sha256.clone(),
                name: a.name.clone(),
                approved_by: a.approved_by.clone(),
                approved_at: a.approved_at.clone(),
                key: key.clone(),
                parameters: a.parameters,
                file: a.file.clone(),
            };
            out.push(PendingAudit { event, key });
        }
        if let (Some(key), Some(by), Some(at)) = (a.revoked_key(), &a.revoked_by, &a.revoked_at)
            && !audited.contains(&key)
        {
            let event = AuditEvent::ModelRevoked {
                sha256: a.sha256.clone(),
                name: a.name.clone(),
                approved_by: a.approved_by.clone(),
                approved_at: a.approved_at.clone(),
                key: key.clone(),
                revoked_by: by.clone(),
                revoked_at: at.clone(),
            };
            out.push(PendingAudit { event, key });
        }
    }
    out
}

/// Appends every pending approval event to `log` (as the log's own writer) and records each in
/// the audited file right after its record is fsync'd; returns how many were written. The caller
/// holds the state directory (the daemon, or the CLI when the node is stopped). A crash between
/// the record and the audited file writes that one event twice on the next call (both records
/// carry the same `key`), never zero times.
pub fn audit_pending(approvals: &Approvals, state_dir: &Path, log: &mut AuditLog) -> Result<usize, ApprovalError> {
    let mut audited = Audited::load(state_dir)?;
    let pending = pending_audit(approvals, &audited);
    let own = log.own_fingerprint().to_string();
    for p in &pending {
        log.append_event(&own, &p.event)?;
        audited.0.insert(p.key.clone());
        audited.save(state_dir)?;
    }
    Ok(pending.len())
}

#[cfg(test)]
mod tests {
    use sanctum_protocol::model::{ParameterSpec, TorchScriptSpec};
    use serde_json::Value;

    use super::*;

    fn approval(sha: &str) -> Approval {
        Approval {
            sha256: sha.to_string(),
            name: "logreg".into(),
            approved_by: "Dr. Steward".into(),
            approved_at: "2026-05-01T09:30:00.000Z".into(),
            parameters: 14,
            file: "models/logreg.pt".into(),
            revoked_by: None,
            revoked_at: None,
        }
    }

    fn plan_model(sha: &str) -> ModelSpec {
        ModelSpec::Torchscript(TorchScriptSpec {
            sha256: sha.to_string(),
            inputs: 13,
            outputs: 1,
            parameters: vec![
                ParameterSpec { name: "fc.weight".into(), shape: vec![1, 13] },
                ParameterSpec { name: "fc.bias".into(), shape: vec![1] },
            ],
            file: None,
        })
    }

    #[test]
    fn an_unapproved_hash_is_refused_with_the_full_hash_and_the_command() {
        let sha = "0123456789abcdef".repeat(4);
        let none = Approvals::default();
        let e = check_model(&plan_model(&sha), &none).unwrap_err();
        assert_eq!(e, ModelRefused::NotApproved { sha256: sha.clone() });
        assert_eq!(
            e.to_string(),
            format!(
                "model {sha} is not approved at this hospital: review the file and run `sanctum-node model approve FILE --config node.toml`"
            )
        );
        let mut a = Approvals::default();
        a.approve(approval(&sha)).unwrap();
        check_model(&plan_model(&sha), &a).unwrap();
        // Zoo models need no approval.
        check_model(&ModelSpec::LogisticRegression { inputs: 13, outputs: 1 }, &none).unwrap();
        // A plan that misdescribes the approved file.
        let mut wrong = plan_model(&sha);
        if let ModelSpec::Torchscript(t) = &mut wrong {
            t.parameters[0].shape = vec![2, 13];
        }
        assert!(
            check_model(&wrong, &a)
                .unwrap_err()
                .to_string()
                .contains("approved with 14 parameters, the plan declares 27")
        );
        // Revoked: refused again.
        a.revoke(&sha, "Dr. Other", "2026-05-02T10:00:00Z").unwrap();
        assert!(matches!(check_model(&plan_model(&sha), &a), Err(ModelRefused::NotApproved { .. })));
    }

    #[test]
    fn the_file_round_trips_atomically_and_missing_means_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approved_models.toml");
        assert_eq!(Approvals::load(&path).unwrap(), Approvals::default());
        let sha = "ab".repeat(32);
        Approvals::update(&path, |a| a.approve(approval(&sha))).unwrap();
        let e = Approvals::update(&path, |a| a.approve(approval(&sha))).unwrap_err();
        assert!(e.to_string().contains("is already approved (by Dr. Steward at 2026-05-01T09:30:00.000Z)"), "{e}");
        let loaded = Approvals::load(&path).unwrap();
        assert_eq!(loaded.is_approved(&sha), Some(&approval(&sha)));
        assert!(!with_suffix(&path, ".tmp").exists());
        Approvals::update(&path, |a| a.revoke(&sha, "Dr. Other", "2026-05-02T10:00:00Z")).unwrap();
        let loaded = Approvals::load(&path).unwrap();
        assert_eq!(loaded.is_approved(&sha), None);
        assert_eq!(loaded.entries().len(), 1, "a revocation keeps the entry as history");
        let e = Approvals::update(&path, |a| a.revoke(&sha, "x", "2026-05-02T10:00:00Z")).unwrap_err();
        assert!(matches!(e, ApprovalError::NotApproved(_)), "{e}");
        // Approved again after the revocation: a second entry.
        let mut again = approval(&sha);
        again.approved_at = "2026-05-03T00:00:00Z".into();
        Approvals::update(&path, |a| a.approve(again)).unwrap();
        assert_eq!(Approvals::load(&path).unwrap().entries().len(), 2);
    }

    #[test]
    fn a_malformed_file_is_an_error_naming_it_and_the_node_approves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approved_models.toml");
        let sha = "ab".repeat(32);
        let good = Approvals { entries: vec![approval(&sha)] }.to_toml().unwrap();
        let cases = [
            ("[[model]]\nsha256 = 3\n".to_string(), "invalid type"),
            (good.replace("approved_by", "approver"), "unknown field"),
            (good.replace(&sha, &sha.to_uppercase()), "is not 64 lowercase hex digits"),
            (good.replace("2026-05-01T09:30:00.000Z", "yesterday"), "is not an RFC 3339 UTC time"),
            (
                format!("{good}\n{}", good.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")),
                "approved twice",
            ),
            ("this is not toml".to_string(), "expected"),
        ];
        for (text, want) in cases {
            std::fs::write(&path, &text).unwrap();
            let e = Approvals::load(&path).unwrap_err().to_string();
            assert!(e.contains(&path.display().to_string()) && e.contains(want), "{want}: {e}");
            assert!(e.contains("no TorchScript model is approved until it is fixed"), "{e}");
            let (a, err) = Approvals::load_fail_closed(&path);
            assert!(a.is_approved(&sha).is_none() && err.is_some());
            // An update on a malformed file changes nothing.
            assert!(Approvals::update(&path, |a| a.approve(approval(&"cd".repeat(32)))).is_err());
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        }
    }

    #[test]
    fn pending_audit_lists_each_event_once_in_order() {
        let sha = "ab".repeat(32);
        let mut a = Approvals::default();
        a.approve(approval(&sha)).unwrap();
        let mut audited = Audited::default();
        let p = pending_audit(&a, &audited);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].event.name(), "model_approved");
        let params = p[0].event.to_parts().unwrap().1;
        assert_eq!(params["sha256"], Value::from(sha.clone()));
        assert_eq!(params["approved_by"], Value::from("Dr. Steward"));
        audited.0.insert(p[0].key.clone());
        assert!(pending_audit(&a, &audited).is_empty());
        a.revoke(&sha, "Dr. Other", "2026-05-02T10:00:00Z").unwrap();
        let p = pending_audit(&a, &audited);
        assert_eq!(p.iter().map(|p| p.event.name()).collect::<Vec<_>>(), ["model_revoked"]);
        assert_eq!(p[0].event.to_parts().unwrap().1["revoked_by"], Value::from("Dr. Other"));
        // Nothing audited yet: the approval comes before its revocation.
        let p = pending_audit(&a, &Audited::default());
        assert_eq!(p.iter().map(|p| p.event.name()).collect::<Vec<_>>(), ["model_approved", "model_revoked"]);
    }

    #[test]
    fn rfc3339_utc_times() {
        for ok in ["2026-05-01T09:30:00Z", "2026-05-01T09:30:00.123Z", "1999-12-31T23:59:60Z"] {
            assert!(is_rfc3339_utc(ok), "{ok}");
        }
        for bad in [
            "2026-05-01 09:30:00Z",
            "2026-05-01T09:30:00",
            "2026-13-01T09:30:00Z",
            "2026-05-01T09:30:00.Z",
            "2026-05-01T09:30:00+01:00",
            "",
        ] {
            assert!(!is_rfc3339_utc(bad), "{bad}");
        }
    }
}
