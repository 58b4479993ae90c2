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
//! Read-only: only GET (and HEAD) are routed, nothing here changes the coordinator's state; a
//! page is rendered from a snapshot taken under the locks and rendered without them; at most
//! [`RENDERS_AT_ONCE`] requests are answered at once (others get 503), and every list on the
//! page is bounded (`page`), so a response's size does not depend on what a member sends.

pub mod chart;
pub mod page;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::Semaphore;

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

/// Binds `[status] listen` and serves the page and the metrics on it in a task of their own;
/// returns the address bound (port 0 picks one). The task ends with the process.
pub async fn start(cfg: &StatusConfig, source: Arc<dyn Source>) -> Result<SocketAddr, WebError> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| WebError::Bind { addr: cfg.listen, source })?;
    let addr = listener.local_addr().map_err(|source| WebError::Bind { addr: cfg.listen, source })?;
    let app = router(cfg, source);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("status page: the listener stopped: {e}");
        }
    });
    tracing::info!("status page on http://{addr}/ (metrics at /metrics)");
    Ok(addr)
}

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
            allowed_hosts: vec![],
            refresh_secs: 5,
        };
        let addr = start(&cfg, Arc::new(Fixture)).await.unwrap();
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
}
