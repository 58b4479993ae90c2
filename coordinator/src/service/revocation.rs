//! Following the consortium's revocation list: refused at the handshake and on every call.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sanctum_protocol::tls;

use serde_json::json;

use super::*;

impl Inner {
    /// Takes a new revocation list: audits each new entry and cuts the directive stream of any
    /// connected node it names, so the node's next call (its reconnect) is refused.
    pub(super) fn apply_revocations(&self, list: Vec<tls::RevokedCert>) {
        let fresh = self.revoked.replace(list);
        for r in fresh {
            tracing::warn!(node = r.name, fingerprint = r.fingerprint, "certificate revoked; refusing it from now on");
            let own = lock(&self.audit).own_fingerprint().to_string();
            self.audit(
                &own,
                "certificate_revocation_applied",
                [("name", json!(r.name)), ("fingerprint", json!(r.fingerprint)), ("revoked_at", json!(r.revoked_at))],
            );
            let mut nodes = lock(&self.nodes);
            if nodes.get(&r.name).is_some_and(|c| c.fingerprint == r.fingerprint) {
                nodes.remove(&r.name);
            }
        }
    }
}

/// (and says so once), never an empty one.
pub(super) async fn follow_revocations(inner: Arc<Inner>, path: PathBuf, mut last: String) {
    let mut warned = false;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        if text == last {
            continue;
        }
        match serde_json::from_str::<Vec<tls::RevokedCert>>(&text) {
            Ok(list) => {
                inner.apply_revocations(list);
                last = text;
                warned = false;
            }
            Err(e) if !warned => {
                tracing::error!("revocation list {} is not valid ({e}); keeping the previous one", path.display());
                warned = true;
            }
            Err(_) => {}
        }
    }
}
