//! Following the consortium's revocation list: a revoked certificate is refused at the handshake
//! and on every call, its node's directive stream ends and counts as a disconnect in the open
//! round, and its uploads and model downloads in progress end at their next chunk.
//!
//! The list fails closed. A configured list that cannot be read or parsed stops the coordinator
//! from starting; one that breaks while it runs never turns into an empty list: the last good one
//! stays in force, and the coordinator says so until the file is fixed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sanctum_protocol::pki::{self, Identity, PkiError};
use sanctum_protocol::tls;
use tonic::Status;

use sanctum_protocol::audit::RevocationListState;

use super::*;

/// How often the follower re-reads the list.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// How often a list that stays broken is logged again (the first failure is logged at once):
/// every few seconds is loud enough to be seen and quiet enough not to drown the log.
const REPEAT_BROKEN_EVERY: Duration = Duration::from_secs(2);

/// Why the revocation list cannot be used.
///
/// The cause is part of the message (not a `source`), so a report of the whole chain names it once.
#[derive(Debug, thiserror::Error)]
pub enum RevocationListError {
    #[error(
        "cannot read the revocation list {}: {cause}; `sanctum-coordinator pki init` creates pki/revoked.json, or fix revocation_list in coordinator.toml",
        .path.display()
    )]
    Unreadable { path: PathBuf, cause: std::io::Error },
    #[error(
        "revocation list {} is not valid: {detail}; fix the file (`sanctum-coordinator pki revoke` writes it) or revocation_list in coordinator.toml",
        .path.display()
    )]
    Invalid { path: PathBuf, detail: String },
}

/// Reads and checks the revocation list at `path`; returns its text (to notice changes) and its
/// entries.
pub(super) fn load(path: &Path) -> Result<(String, Vec<tls::RevokedCert>), RevocationListError> {
    let text = std::fs::read_to_string(path)
        .map_err(|cause| RevocationListError::Unreadable { path: path.to_path_buf(), cause })?;
    let list = parse(path, &text)?;
    Ok((text, list))
}

fn parse(path: &Path, text: &str) -> Result<Vec<tls::RevokedCert>, RevocationListError> {
    pki::parse_revocation_list(text).map_err(|e| RevocationListError::Invalid {
        path: path.to_path_buf(),
        detail: match e {
            PkiError::BadRevocationList(detail) => detail,
            other => other.to_string(),
        },
    })
}

impl Inner {
    /// Takes a new revocation list: audits each new entry and ends the directive stream of any
    /// connected node it names, so the node's next call (its reconnect) is refused.
    pub(super) fn apply_revocations(&self, list: Vec<tls::RevokedCert>) {
        let fresh = self.revoked.replace(list);
        for r in fresh {
            tracing::warn!(node = r.name, fingerprint = r.fingerprint, "certificate revoked; refusing it from now on");
            let own = lock(&self.audit).own_fingerprint().to_string();
            self.audit(
                &own,
                AuditEvent::CertificateRevocationApplied {
                    name: r.name.clone(),
                    fingerprint: r.fingerprint.clone(),
                    revoked_at: r.revoked_at.clone(),
                },
            );
            // A name not of a certificate name's form has no connection to close.
            let name = NodeName::parse(&r.name).ok();
            let open = name.as_ref().and_then(|name| {
                lock(&self.nodes).get(name).filter(|c| c.fingerprint == r.fingerprint).map(|c| (c.id, c.tx.clone()))
            });
            if let (Some((conn, tx)), Some(name)) = (open, name) {
                // The node learns why its stream ends (if its queue has room; it ends anyway).
                let _ = tx.try_send(Err(revoked_status(&r.name, &r)));
                drop(tx);
                // The driver is the one place a connection leaves the map: it drops the stream's
                // sender (ending the stream) and counts the disconnect in the open round. Whichever
                // of this notice and the stream's own drop notice comes first acts; the other
                // finds the connection gone, so the round hears of it exactly once.
                // `send_event` awaits the bounded queue; this path cannot (see `notify_disconnected`).
                Inner::notify_disconnected(&self.events, name, conn);
            }
        }
    }

    /// Refuses the rest of a call already under way (an upload's or a model download's next
    /// chunk) once the caller's certificate is revoked: the per-call guard only sees a call start.
    pub(super) fn still_trusted(&self, caller: &Identity) -> Result<(), Status> {
        match self.revoked.get(&caller.fingerprint.to_hex()) {
            Some(r) => Err(revoked_status(&caller.name, &r)),
            None => Ok(()),
        }
    }
}

fn revoked_status(name: &str, r: &tls::RevokedCert) -> Status {
    Status::unauthenticated(format!(
        "the certificate of '{name}' was revoked at {}{}; ask the consortium lead for a new one",
        r.revoked_at,
        if r.reason.is_empty() { String::new() } else { format!(" ({})", r.reason) }
    ))
}

/// Re-reads the revocation list every 200 ms and applies changes. A list that becomes unreadable
/// or invalid keeps the last good one in force, never an empty one: an error is logged at once
/// and again every few seconds while it stays broken, and the audit log records when it broke and
/// when it was fixed.
pub(super) async fn follow_revocations(inner: Arc<Inner>, path: PathBuf, mut last: String) {
    // Since when the list has been broken, and when that was last logged.
    let mut broken: Option<(Instant, Instant)> = None;
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let checked = match tokio::fs::read_to_string(&path).await {
            Ok(text) if text == last => Ok(None),
            Ok(text) => parse(&path, &text).map(|list| Some((text, list))),
            Err(cause) => Err(RevocationListError::Unreadable { path: path.clone(), cause }),
        };
        let now = Instant::now();
        match checked {
            Ok(change) => {
                if let Some((since, _)) = broken.take() {
                    let secs = now.duration_since(since).as_secs();
                    tracing::warn!("revocation list {} is usable again after {secs} s", path.display());
                    inner.revocation_list_event(AuditEvent::RevocationListRestored, &path, None, secs);
                }
                if let Some((text, list)) = change {
                    inner.apply_revocations(list);
                    last = text;
                }
            }
            Err(e) => {
                let kept = inner.revoked.len();
                match broken {
                    None => {
                        tracing::error!("{e}; keeping the last good list ({kept} revoked certificates)");
                        inner.revocation_list_event(AuditEvent::RevocationListUnusable, &path, Some(&e.to_string()), 0);
                        broken = Some((now, now));
                    }
                    Some((since, logged)) if now.duration_since(logged) >= REPEAT_BROKEN_EVERY => {
                        let secs = now.duration_since(since).as_secs();
                        tracing::error!(
                            "{e}; still keeping the last good list ({kept} revoked certificates), broken for {secs} s"
                        );
                        broken = Some((since, now));
                    }
                    Some(_) => {}
                }
            }
        }
    }
}

impl Inner {
    /// Audits the list breaking or being fixed (once each, not at every check).
    fn revocation_list_event(
        &self,
        event: fn(RevocationListState) -> AuditEvent,
        path: &Path,
        error: Option<&str>,
        broken_secs: u64,
    ) {
        let own = lock(&self.audit).own_fingerprint().to_string();
        let state = RevocationListState {
            path: path.display().to_string(),
            error: error.unwrap_or_default().to_string(),
            kept_revocations: self.revoked.len() as u64,
            broken_secs,
        };
        self.audit(&own, event(state));
    }
}
