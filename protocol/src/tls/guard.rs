//! The per-call guard: every call's certificate is checked again for its role, revocation and
//! expiry (a connection may outlive both), and refusals are counted and the first of each
//! period audited.

use std::sync::Arc;

use tonic::{Request, Status};

use super::listener::PeerInfo;
use super::refusals::{RefusalClass, Refusals};
use crate::pki::{Identity, Role};

/// Revoked certificates by fingerprint (hex SHA-256 of the DER), shared between the accept loop
/// and the per-call guard and replaced whole when the revocation list changes.
#[derive(Debug, Default)]
pub struct Revocations {
    revoked: std::sync::RwLock<std::collections::BTreeMap<String, RevokedCert>>,
}

/// One entry of the consortium's revocation list (`pki/revoked.json`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevokedCert {
    pub name: String,
    pub fingerprint: String,
    /// UTC, RFC 3339.
    pub revoked_at: String,
    #[serde(default)]
    pub reason: String,
}

impl Revocations {
    /// The entry for a certificate fingerprint, if it is revoked.
    pub fn get(&self, fingerprint: &str) -> Option<RevokedCert> {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).get(fingerprint).cloned()
    }

    /// Replaces the whole list; returns the entries that were not in it before.
    pub fn replace(&self, entries: Vec<RevokedCert>) -> Vec<RevokedCert> {
        let mut map = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        let fresh = entries.iter().filter(|e| !map.contains_key(&e.fingerprint)).cloned().collect();
        *map = entries.into_iter().map(|e| (e.fingerprint.clone(), e)).collect();
        fresh
    }

    /// How many certificates are revoked.
    pub fn len(&self) -> usize {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Why `identity` is refused, if its certificate is revoked (the accept loop and every call).
    pub(super) fn refusal(&self, identity: &Identity) -> Option<String> {
        self.get(&identity.fingerprint.to_hex()).map(|r| {
            format!(
                "the certificate of '{}' was revoked at {}{}; ask the consortium lead for a new one",
                identity.name,
                r.revoked_at,
                if r.reason.is_empty() { String::new() } else { format!(" ({})", r.reason) }
            )
        })
    }
}

/// Told of a refused call that is audited on its own (remote address, reason).
pub type RefusalHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// The verified caller of a request; a request without one never came through [`mtls_incoming`].
pub fn peer<T>(request: &Request<T>) -> Result<&PeerInfo, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate on this connection"))
}

/// What every role guard shares: the revocation list, the refusal counter and who audits the
/// refused calls that are itemised.
#[derive(Clone, Default)]
pub struct CallGuard {
    pub revoked: Arc<Revocations>,
    pub refusals: Arc<Refusals>,
    /// Told of a refused call within the period's allowance
    /// ([`super::refusals::CALLS_ITEMISED_PER_PERIOD`]); the rest are only counted.
    pub on_itemised: Option<RefusalHook>,
}

/// Why a certificate that was valid at the handshake is refused now, if it has expired since.
fn expiry_refusal(identity: &Identity, now: time::OffsetDateTime) -> Option<String> {
    (identity.not_after <= now).then(|| {
        let at = identity
            .not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| identity.not_after.to_string());
        format!(
            "the certificate of '{}' expired at {at}; ask the consortium lead to renew it (`sanctum-coordinator pki renew {}`; the private key stays where it is), install the new certificate and reconnect",
            identity.name, identity.name
        )
    })
}

/// Why a verified caller is refused now, if it is: the decision [`role_guard`] and the status
/// page's mutual-TLS listener share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallerRefusal {
    /// Its certificate was revoked or has expired since the handshake.
    Unauthenticated(String),
    /// Its certificate is valid but its role is not one the call allows.
    Forbidden(String),
}

impl CallerRefusal {
    /// The reason, naming the certificate and what to do.
    pub fn message(&self) -> &str {
        match self {
            Self::Unauthenticated(m) | Self::Forbidden(m) => m,
        }
    }
}

/// Whether `identity` may make a call that needs one of `allowed` roles at `now`: neither
/// revoked nor expired (a connection may outlive both), and holding one of the roles.
pub fn caller_refusal(
    identity: &Identity,
    allowed: &[Role],
    revoked: &Revocations,
    now: time::OffsetDateTime,
) -> Option<CallerRefusal> {
    // A certificate revoked while its connection is open is refused on its next call.
    if let Some(why) = revoked.refusal(identity) {
        return Some(CallerRefusal::Unauthenticated(why));
    }
    // So is one that expired: TLS checked its validity only at the handshake.
    if let Some(why) = expiry_refusal(identity, now) {
        return Some(CallerRefusal::Unauthenticated(why));
    }
    (!allowed.contains(&identity.role)).then(|| {
        let need: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        CallerRefusal::Forbidden(format!(
            "'{}' holds a {} certificate; this call needs role {}",
            identity.name,
            identity.role,
            need.join(" or ")
        ))
    })
}

/// An interceptor that lets through only callers whose certificate has one of `allowed` roles
/// and is, at the time of the call, neither revoked nor expired ([`caller_refusal`]).
pub fn role_guard(
    allowed: &'static [Role],
    guard: CallGuard,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |request: Request<()>| {
        let peer = peer(&request)?;
        let Some(refusal) = caller_refusal(&peer.identity, allowed, &guard.revoked, time::OffsetDateTime::now_utc())
        else {
            return Ok(request);
        };
        let status = match &refusal {
            CallerRefusal::Unauthenticated(why) => Status::unauthenticated(why.clone()),
            CallerRefusal::Forbidden(why) => Status::permission_denied(why.clone()),
        };
        let reason = format!("{}: {}", peer.identity, status.message());
        if guard.refusals.refuse(RefusalClass::CallRefused, peer.remote, &reason)
            && let Some(hook) = &guard.on_itemised
        {
            hook(&peer.remote.to_string(), &reason);
        }
        Err(status)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::hash::ContentHash;
    use crate::tls::refusals;

    fn identity(role: Role, not_after: time::OffsetDateTime) -> Identity {
        Identity { name: "cleveland".into(), role, fingerprint: ContentHash::of(b"cert"), not_after }
    }

    fn call_from(identity: Identity) -> Request<()> {
        let mut request = Request::new(());
        let remote = SocketAddr::from(([127, 0, 0, 1], 4000));
        request.extensions_mut().insert(PeerInfo { identity, remote, cert_der: Arc::new(Vec::new()) });
        request
    }

    #[test]
    fn a_certificate_that_expired_on_an_open_connection_is_refused_on_its_next_call_with_how_to_renew() {
        let audited = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = Arc::clone(&audited);
        let hook: RefusalHook = Arc::new(move |_remote: &str, reason: &str| {
            seen.lock().unwrap_or_else(|p| p.into_inner()).push(reason.to_string());
        });
        let guard = CallGuard { on_itemised: Some(hook), ..CallGuard::default() };
        let mut check = role_guard(&[Role::Node], guard);
        let now = time::OffsetDateTime::now_utc();
        // Valid until tomorrow: served.
        assert!(check(call_from(identity(Role::Node, now + time::Duration::days(1)))).is_ok());
        // It expired a second ago, after its handshake: refused, saying how to renew.
        let Err(status) = check(call_from(identity(Role::Node, now - time::Duration::seconds(1)))) else {
            panic!("an expired certificate was let through");
        };
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("expired at"), "{}", status.message());
        assert!(status.message().contains("sanctum-coordinator pki renew cleveland"), "{}", status.message());
        // The refusal is audited (the first of its period is itemised).
        let audited = audited.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(audited.len(), 1);
        assert!(audited[0].starts_with("cleveland (node): the certificate of 'cleveland' expired"), "{audited:?}");
    }

    #[test]
    fn expiry_is_checked_to_the_second() {
        let now = time::OffsetDateTime::now_utc();
        assert!(expiry_refusal(&identity(Role::Node, now), now).is_some(), "not_after is the last valid instant");
        assert!(expiry_refusal(&identity(Role::Node, now + time::Duration::seconds(1)), now).is_none());
    }

    #[test]
    fn a_member_with_the_wrong_role_is_refused_and_counted() {
        let guard = CallGuard::default();
        let refusals = Arc::clone(&guard.refusals);
        let mut check = role_guard(&[Role::Lead], guard);
        let later = time::OffsetDateTime::now_utc() + time::Duration::days(1);
        for _ in 0..(refusals::CALLS_ITEMISED_PER_PERIOD + 5) {
            let status = check(call_from(identity(Role::Node, later))).err().map(|s| s.code());
            assert_eq!(status, Some(tonic::Code::PermissionDenied));
        }
        // The first of the period are itemised; the 5 beyond the allowance are counted.
        let report = refusals.take().map(|r| r.by_reason);
        assert_eq!(report, Some(vec![(RefusalClass::CallRefused, 5)]));
    }
}
