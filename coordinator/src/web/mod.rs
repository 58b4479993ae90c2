//! The coordinator's read-only status page (`GET /`) and Prometheus metrics (`GET /metrics`) on
//! a listener of their own (`[status]` in `coordinator.toml`, [`crate::config::StatusConfig`]).
//!
//! # Layout
//! - this file: the listener, the router and the request checks;
//! - `page`: the HTML, a pure function of a [`page::Snapshot`] (unit-tested without tokio);
//! - `chart`: inline SVG line charts (plotters).
//!
//! Plain HTTP/1.1 on loopback by default, not the coordinator's mutual TLS: an operator opens it
//! in a browser on the coordinator's machine (or through an SSH tunnel) and Prometheus scrapes
//! it, neither of which holds a consortium certificate. Because it has no authentication a
//! non-loopback address needs `allow_remote = true` (refused at start otherwise), and a request
//! naming a `Host` that is not an IP address, `localhost` or one of `allowed_hosts` is refused
//! (a page in the operator's browser cannot read it by DNS rebinding).
//!
//! With `tls = true` the same routes are served behind the coordinator's mutual TLS
//! ([`StatusTls`]): the accept loop is the gRPC listener's ([`tls::mtls_incoming`], with its caps
//! on handshakes and connections), ALPN offers `http/1.1`, and every request is checked with the
//! gRPC role guard's own decision ([`tls::caller_refusal`]): a `lead` or `auditor` certificate,
//! neither revoked nor expired at that request. A hospital's `node` certificate is refused (403),
//! as is one revoked while its connection was open. Refusals are counted in [`StatusTls::refusals`],
//! which the coordinator writes to its audit log like the gRPC listener's.
//!
//! Read-only: only GET (and HEAD) are routed, nothing here changes the coordinator's state; a
//! page is rendered from a snapshot taken under the locks and rendered without them; at most
//! [`RENDERS_AT_ONCE`] requests are answered at once (others get 503), and every list on the
//! page is bounded (`page`), so a response's size does not depend on what a member sends.

pub mod chart;
pub mod page;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sanctum_protocol::pki::Role;
use sanctum_protocol::tls::{self, RefusalClass, Refusals};
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;

use crate::config::StatusConfig;

/// Requests in their handler at once; more are answered 503 at once.
pub const RENDERS_AT_ONCE: usize = 4;

/// Where the page and the metrics come from (the running coordinator; a fixture in tests).
pub trait Source: Send + Sync + 'static {
    /// What the page shows, taken now (its `refresh_secs` is filled in here).
    fn snapshot(&self) -> page::Snapshot;
    /// The metrics as OpenMetrics text, gauges read now.
    fn metrics_text(&self) -> String;
}

/// Why the status listener did not start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("cannot listen on {addr} for the status page (status.listen): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct AppState {
    source: Arc<dyn Source>,
    refresh_secs: u64,
    allowed_hosts: Arc<Vec<String>>,
    busy: Arc<Semaphore>,
}

/// The roles a certificate must hold to read the page behind mutual TLS.
pub const READERS: &[Role] = &[Role::Lead, Role::Auditor];

/// Connections the status listener holds at once behind mutual TLS (a browser opens a few).
const MAX_STATUS_CONNECTIONS: usize = 64;

/// A request's headers must arrive within this of the connection's last response.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The coordinator's mutual TLS for the status listener (`[status] tls = true`).
pub struct StatusTls {
    /// From [`tls::TlsMaterial::https_server_config`]: the coordinator's certificate, client
    /// certificates from the consortium CA required, ALPN `http/1.1`.
    pub config: Arc<rustls::ServerConfig>,
    /// The coordinator's revocation list, consulted at the handshake and at every request.
    pub revoked: Arc<tls::Revocations>,
    /// Where refused handshakes and requests are counted.
    pub refusals: Arc<Refusals>,
    /// Told of each refused request the period's allowance itemises (remote, reason), as the
    /// gRPC role guard's hook is; the rest are counted in `refusals`.
    pub on_itemised: Option<tls::RefusalHook>,
}

/// Binds `[status] listen` and serves the page and the metrics on it in a task of their own,
/// behind `tls` when given (`[status] tls = true`) and plain HTTP otherwise; returns the address
/// bound (port 0 picks one). The task ends with the process.
pub async fn start(
    cfg: &StatusConfig,
    source: Arc<dyn Source>,
    tls: Option<StatusTls>,
) -> Result<SocketAddr, WebError> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| WebError::Bind { addr: cfg.listen, source })?;
    let addr = listener.local_addr().map_err(|source| WebError::Bind { addr: cfg.listen, source })?;
    let app = router(cfg, source);
    match tls {
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!("status page: the listener stopped: {e}");
                }
            });
            tracing::info!("status page on http://{addr}/ (metrics at /metrics)");
        }
        Some(tls) => {
            tokio::spawn(serve_mutual_tls(listener, app, tls));
            tracing::info!(
                "status page on https://{addr}/ (mutual TLS: lead and auditor certificates only; metrics at /metrics)"
            );
        }
    }
    Ok(addr)
}

/// Serves `app` on every verified stream of `listener`, one HTTP/1.1 connection each, every
/// request checked against [`READERS`] and the revocation list first.
async fn serve_mutual_tls(listener: tokio::net::TcpListener, app: Router, tls: StatusTls) {
    use tonic::transport::server::Connected;
    let options = tls::IncomingOptions {
        max_connections: MAX_STATUS_CONNECTIONS,
        revoked: Arc::clone(&tls.revoked),
        refusals: Arc::clone(&tls.refusals),
        ..tls::IncomingOptions::default()
    };
    let mut incoming = tls::mtls_incoming(listener, tls.config, options);
    while let Some(stream) = incoming.next().await {
        let Ok(stream) = stream else { continue };
        let peer = Arc::new(stream.connect_info());
        let (app, revoked, refusals) = (app.clone(), Arc::clone(&tls.revoked), Arc::clone(&tls.refusals));
        let on_itemised = tls.on_itemised.clone();
        let service = hyper::service::service_fn(move |request: axum::http::Request<hyper::body::Incoming>| {
            let refused = tls::caller_refusal(&peer.identity, READERS, &revoked, time::OffsetDateTime::now_utc());
            let (app, peer, refusals, on_itemised) =
                (app.clone(), Arc::clone(&peer), Arc::clone(&refusals), on_itemised.clone());
            async move {
                if let Some(refusal) = refused {
                    let reason = format!("{}: {} (the status page)", peer.identity, refusal.message());
                    if refusals.refuse(RefusalClass::CallRefused, peer.remote, &reason)
                        && let Some(hook) = &on_itemised
                    {
                        hook(&peer.remote.to_string(), &reason);
                    }
                    let body = format!("{}\n", refusal.message());
                    return Ok::<_, Infallible>(with_headers((StatusCode::FORBIDDEN, body).into_response(), TEXT));
                }
                tower::ServiceExt::oneshot(app, request).await
            }
        });
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("status page: a connection ended: {e}");
            }
        });
    }
}

/// The content type of refusals and plain answers.
const TEXT: &str = "text/plain; charset=utf-8";

/// The routes: `/` and `/metrics`, GET and HEAD only; everything else 404 or 405.
pub fn router(cfg: &StatusConfig, source: Arc<dyn Source>) -> Router {
    let state = AppState {
        source,
        refresh_secs: cfg.refresh_secs,
        allowed_hosts: Arc::new(cfg.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()).collect()),
        busy: Arc::new(Semaphore::new(RENDERS_AT_ONCE)),
    };
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: this listener serves / and /metrics\n") })
        .with_state(state)
}

/// Whether the request's `Host` may reach the page: none (not a browser), an IP address,
/// `localhost`, or a configured name; a port is ignored.
pub fn host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(host) = host else {
        return true;
    };
    let name = if let Some(v6) = host.strip_prefix('[') {
        // "[::1]:9464"
        return v6.split(']').next().is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        host.rsplit_once(':')
            .map_or(host, |(name, port)| if port.bytes().all(|b| b.is_ascii_digit()) { name } else { host })
    };
    let name = name.to_ascii_lowercase();
    name.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || allowed.contains(&name)
}

/// Checks the host and takes a render slot; or the response that refuses the request.
fn admit(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<tokio::sync::OwnedSemaphorePermit, (StatusCode, &'static str)> {
    let host = headers.get(header::HOST).map(|h| h.to_str().unwrap_or("\u{0}"));
    if !host_allowed(host, &state.allowed_hosts) {
        return Err((
            StatusCode::MISDIRECTED_REQUEST,
            "this status page answers requests for an IP address, localhost or status.allowed_hosts only\n",
        ));
    }
    Arc::clone(&state.busy)
        .try_acquire_owned()
        .map_err(|_| (StatusCode::SERVICE_UNAVAILABLE, "busy: try again in a moment\n"))
}

/// Headers every answer carries: nothing cached, nothing loaded from elsewhere, never framed.
fn with_headers(mut r: Response, content_type: &'static str) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'",
        ),
    );
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

async fn status_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let permit = match admit(&state, &headers) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    let (source, refresh) = (Arc::clone(&state.source), state.refresh_secs);
    // The snapshot takes the coordinator's locks and rendering draws SVG: off the async workers.
    let html = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut snapshot = source.snapshot();
        snapshot.refresh_secs = refresh;
        page::render(&snapshot)
    })
    .await;
    match html {
        Ok(html) => with_headers(html.into_response(), "text/html; charset=utf-8"),
        Err(e) => {
            tracing::error!("status page: rendering failed: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered; see the coordinator's log\n")
                .into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let permit = match admit(&state, &headers) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    let source = Arc::clone(&state.source);
    let text = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        source.metrics_text()
    })
    .await;
    match text {
        Ok(text) => with_headers(text.into_response(), "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        Err(e) => {
            tracing::error!("metrics: encoding failed: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable; see the coordinator's log\n").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ip_addresses_localhost_and_named_hosts_reach_the_page() {
        let named = vec!["coordinator.hospital.example".to_string()];
        for ok in [
            None,
            Some("127.0.0.1:9464"),
            Some("localhost:9464"),
            Some("LOCALHOST"),
            Some("[::1]:9464"),
            Some("10.0.0.5"),
        ] {
            assert!(host_allowed(ok, &named), "{ok:?}");
        }
        assert!(host_allowed(Some("coordinator.hospital.example:9464"), &named));
        for bad in [
            Some("evil.example:9464"),
            Some("evil.example"),
            Some("127.0.0.1.evil.example"),
            Some("[evil]:1"),
            Some("\u{0}"),
        ] {
            assert!(!host_allowed(bad, &named), "{bad:?}");
        }
    }

    struct Fixture;
    impl Source for Fixture {
        fn snapshot(&self) -> page::Snapshot {
            page::Snapshot::default()
        }
        fn metrics_text(&self) -> String {
            crate::metrics::Metrics::new().encode()
        }
    }

    async fn get_raw(addr: SocketAddr, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn get_serves_the_page_and_metrics_and_nothing_else_is_routed() {
        let cfg = StatusConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            allow_remote: false,
            tls: false,
            allowed_hosts: vec![],
            refresh_secs: 5,
        };
        let addr = start(&cfg, Arc::new(Fixture), None).await.unwrap();
        let page = get_raw(addr, "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
        assert!(
            page.starts_with("HTTP/1.1 200") && page.contains("content-security-policy: default-src 'none'"),
            "{page}"
        );
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        let m = get_raw(addr, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await;
        assert!(
            m.starts_with("HTTP/1.1 200")
                && m.contains("# TYPE sanctum_updates_accepted counter")
                && m.ends_with("# EOF\n"),
            "{m}"
        );
        let post =
            get_raw(addr, "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let other = get_raw(addr, "GET /admin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let rebound = get_raw(addr, "GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n").await;
        assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
    }

    /// One consortium: its CA, the coordinator's material and a member's PEMs by role.
    struct Consortium {
        ca: sanctum_protocol::pki::Issued,
        coordinator: tls::TlsMaterial,
    }

    impl Consortium {
        fn new() -> Self {
            use sanctum_protocol::pki::{self, SignSpec};
            let ca = pki::init_ca("status", 1).unwrap();
            let hosts = ["localhost".to_string()];
            let spec = SignSpec { name: "coordinator", role: Role::Coordinator, days: 1, hosts: &hosts };
            let cert = pki::issue(&ca.cert_pem, &ca.key_pem, &spec).unwrap();
            let coordinator = tls::TlsMaterial::from_pem(&ca.cert_pem, &cert.cert_pem, &cert.key_pem).unwrap();
            Self { ca, coordinator }
        }

        fn member(&self, name: &str, role: Role) -> tls::TlsMaterial {
            let spec = sanctum_protocol::pki::SignSpec { name, role, days: 1, hosts: &[] };
            let cert = sanctum_protocol::pki::issue(&self.ca.cert_pem, &self.ca.key_pem, &spec).unwrap();
            tls::TlsMaterial::from_pem(&self.ca.cert_pem, &cert.cert_pem, &cert.key_pem).unwrap()
        }
    }

    /// A client configuration offering HTTP/1.1: with `member`'s certificate, or none.
    fn https_client(consortium: &Consortium, member: Option<&tls::TlsMaterial>) -> Arc<rustls::ClientConfig> {
        let mut cfg = match member {
            Some(m) => (*m.client_config().unwrap()).clone(),
            None => {
                let mut roots = rustls::RootCertStore::empty();
                use rustls_pki_types::pem::PemObject;
                for der in rustls_pki_types::CertificateDer::pem_slice_iter(consortium.ca.cert_pem.as_bytes()) {
                    roots.add(der.unwrap()).unwrap();
                }
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth()
            }
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }

    type Https = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    async fn connect_https(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<Https> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await
    }

    /// One keep-alive GET on `stream`: (status code, body); `None` if the server closed instead.
    async fn get_on(stream: &mut Https, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let text = String::from_utf8_lossy(&raw).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    let code = head.split(' ').nth(1)?.parse().ok()?;
                    return Some((code, body.to_string()));
                }
            }
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            raw.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn behind_mutual_tls_only_lead_and_auditor_certificates_are_served_and_a_revocation_ends_an_open_connection()
    {
        let consortium = Consortium::new();
        let (lead, auditor, node) = (
            consortium.member("lead", Role::Lead),
            consortium.member("inspector", Role::Auditor),
            consortium.member("cleveland", Role::Node),
        );
        let cfg = StatusConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            allow_remote: false,
            tls: true,
            allowed_hosts: vec![],
            refresh_secs: 0,
        };
        let revoked = Arc::new(tls::Revocations::default());
        let refusals = Arc::new(Refusals::new(Duration::from_secs(3600)));
        let itemised = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = Arc::clone(&itemised);
        let status_tls = StatusTls {
            config: consortium.coordinator.https_server_config().unwrap(),
            revoked: Arc::clone(&revoked),
            refusals: Arc::clone(&refusals),
            on_itemised: Some(Arc::new(move |_remote: &str, reason: &str| {
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(reason.to_string());
            })),
        };
        let addr = start(&cfg, Arc::new(Fixture), Some(status_tls)).await.unwrap();

        // The lead: the page and the metrics, on one kept-alive connection.
        let mut as_lead = connect_https(addr, https_client(&consortium, Some(&lead))).await.unwrap();
        let (code, page) = get_on(&mut as_lead, "/").await.unwrap();
        assert!(code == 200 && page.contains("<html"), "{code} {page}");
        let (code, metrics) = get_on(&mut as_lead, "/metrics").await.unwrap();
        assert!(code == 200 && metrics.ends_with("# EOF\n"), "{code} {metrics}");
        // An auditor reads it too.
        let mut as_auditor = connect_https(addr, https_client(&consortium, Some(&auditor))).await.unwrap();
        assert_eq!(get_on(&mut as_auditor, "/metrics").await.map(|(c, _)| c), Some(200));

        // A hospital's certificate is a member's, but not one that reads the page.
        let mut as_node = connect_https(addr, https_client(&consortium, Some(&node))).await.unwrap();
        let (code, why) = get_on(&mut as_node, "/").await.unwrap();
        assert_eq!(code, 403, "{why}");
        assert!(why.contains("'cleveland' holds a node certificate; this call needs role lead or auditor"), "{why}");
        assert!(!why.contains("<html"));

        // No client certificate, or plain HTTP: no page, whatever the server says.
        let anonymous = connect_https(addr, https_client(&consortium, None)).await;
        if let Ok(mut s) = anonymous {
            assert_eq!(get_on(&mut s, "/").await, None, "a client without a certificate got an answer");
        }
        let plain = get_raw(addr, "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
        assert!(!plain.contains("HTTP/1.1 200"), "{plain}");

        // The lead's certificate is revoked while its connection is open: its next request is
        // refused on that connection, and a new connection is refused at the handshake.
        let fingerprint = lead.identity().fingerprint.to_hex();
        revoked.replace(vec![tls::RevokedCert {
            name: "lead".into(),
            fingerprint,
            revoked_at: "2026-12-04T12:00:00Z".into(),
            reason: "key lost".into(),
        }]);
        let (code, why) = get_on(&mut as_lead, "/").await.unwrap();
        assert_eq!(code, 403, "{why}");
        assert!(why.contains("the certificate of 'lead' was revoked at 2026-12-04T12:00:00Z (key lost)"), "{why}");
        let again = connect_https(addr, https_client(&consortium, Some(&lead))).await;
        if let Ok(mut s) = again {
            assert_eq!(get_on(&mut s, "/").await, None, "a revoked certificate got an answer on a new connection");
        }
        // The auditor is unaffected.
        assert_eq!(get_on(&mut as_auditor, "/").await.map(|(c, _)| c), Some(200));
        // Every refusal was counted: the node's and the revoked request itemised (for the audit
        // log), the anonymous, plain and revoked handshakes in the counts.
        let itemised = itemised.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(itemised.len(), 2, "{itemised:?}");
        assert!(itemised[0].starts_with("cleveland (node): 'cleveland' holds a node certificate"), "{itemised:?}");
        assert!(itemised[1].contains("the certificate of 'lead' was revoked"), "{itemised:?}");
        assert!(itemised.iter().all(|r| r.ends_with("(the status page)")), "{itemised:?}");
        let report = refusals.take().expect("refusals were counted");
        assert!(report.refused >= 3, "{}", report.summary());
    }
}
