//! Config files of the coordinator (`serve`) and of the lead's CLI (`plan submit`). Config is
//! data: read, validated, and any error names the file, the line and the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use sanctum_protocol::tls::TlsFiles;
use serde::Deserialize;

/// `coordinator.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address to listen on, e.g. `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// Models, spool and exports.
    pub state_dir: PathBuf,
    pub tls: TlsFiles,
    /// Seconds nodes get to evaluate the final model.
    #[serde(default = "default_eval")]
    pub evaluation_deadline_secs: u64,
    /// The consortium's revocation list (`pki/revoked.json` from `pki revoke`); re-read every
    /// 200 ms, so a revocation takes effect without a restart.
    #[serde(default)]
    pub revocation_list: Option<PathBuf>,
    /// What one peer may cost the coordinator: connections, handshakes, streams, uploads.
    #[serde(default)]
    pub limits: Limits,
    /// Where runs, rounds, checkpoints and events are kept durably: SQLite in the state
    /// directory (the default) or a PostgreSQL server.
    #[serde(default)]
    pub store: StoreConfig,
    /// The read-only status page and Prometheus metrics (`[status]`); absent, nothing is served.
    #[serde(default)]
    pub status: Option<StatusConfig>,
}

/// `[status]` in `coordinator.toml`: the read-only status page (`GET /`) and the Prometheus
/// metrics (`GET /metrics`) on a listener of their own.
///
/// By default plain HTTP and **unauthenticated**: it shows plan names, hospital names, their
/// states, refusal reasons and ε, so it listens on loopback unless the operator says otherwise.
/// With `tls = true` it is served behind the coordinator's own mutual TLS instead: only a
/// consortium certificate with role `lead` or `auditor` that is neither revoked nor expired is
/// served (checked on every request), and any address may be used. `allow_remote = true` allows
/// a non-loopback address for plain HTTP (then put it behind a reverse proxy with
/// authentication, or a firewall that admits only the monitoring host). Requests whose `Host` is
/// not an IP address, `localhost` or one of `allowed_hosts` are refused, so a web page in the
/// operator's browser cannot read it through DNS rebinding.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Where to listen, e.g. `127.0.0.1:9464` (port 0: any free port, logged at start).
    pub listen: SocketAddr,
    /// Whether a non-loopback `listen` is allowed for plain HTTP (the page has no authentication).
    #[serde(default)]
    pub allow_remote: bool,
    /// Serve over the coordinator's mutual TLS (its `[tls]` certificate and CA, HTTP/1.1):
    /// lead and auditor certificates only.
    #[serde(default)]
    pub tls: bool,
    /// Host names (without port) a request may name besides IP addresses and `localhost`, e.g.
    /// the monitoring host's name for this machine.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Seconds between the page's reloads (`<meta http-equiv="refresh">`); 0: no reload.
    #[serde(default = "default_status_refresh")]
    pub refresh_secs: u64,
}

fn default_status_refresh() -> u64 {
    5
}

impl StatusConfig {
    /// Refuses a non-loopback address for plain HTTP without `allow_remote`, and a reload
    /// slower than an hour.
    pub fn validate(&self) -> Result<(), SettingError> {
        if !self.listen.ip().is_loopback() && !self.allow_remote && !self.tls {
            return Err(SettingError::StatusNotLoopback(self.listen));
        }
        if self.refresh_secs > 3600 {
            return Err(SettingError::StatusRefreshTooLong(self.refresh_secs));
        }
        if let Some(h) = self.allowed_hosts.iter().find(|h| h.is_empty() || h.len() > 253 || h.contains(':')) {
            return Err(SettingError::StatusBadHost(h.clone()));
        }
        Ok(())
    }
}

/// `[store]` in `coordinator.toml`: the database behind [`crate::db`].
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// PostgreSQL connection string, key=value (`host=/run/postgresql user=sanctum dbname=sanctum`)
    /// or URL form. Never holds a password: this file is read by anyone who can read the
    /// configuration, so the password lives in `password_file`.
    pub url: Option<String>,
    /// A file holding the PostgreSQL password alone (one trailing newline is ignored), readable
    /// only by the coordinator's user. Relative to this config file's directory.
    pub password_file: Option<PathBuf>,
}

/// Which database keeps the coordinator's durable state.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// `STATE_DIR/coordinator.sqlite3`, embedded: nothing to install or run.
    #[default]
    Sqlite,
    /// A PostgreSQL server, for deployments that outgrow one machine.
    Postgres,
}

impl StoreConfig {
    /// Refuses what cannot work or would leak: a PostgreSQL backend without `url`, a `url` that
    /// does not parse or holds a password, PostgreSQL fields under the SQLite backend. Each error
    /// names the field.
    pub fn validate(&self) -> Result<(), SettingError> {
        match self.backend {
            StoreBackend::Sqlite => {
                if self.url.is_some() || self.password_file.is_some() {
                    return Err(SettingError::PostgresFieldsUnderSqlite);
                }
            }
            StoreBackend::Postgres => {
                let Some(url) = &self.url else {
                    return Err(SettingError::NoPostgresUrl);
                };
                let parsed = url
                    .parse::<postgres::Config>()
                    .map_err(|e| SettingError::BadPostgresUrl { reason: e.to_string() })?;
                if parsed.get_password().is_some() {
                    return Err(SettingError::PasswordInUrl);
                }
            }
        }
        Ok(())
    }

    /// Resolves `password_file` against the config file's directory, as the other paths are.
    pub fn resolve_paths(&self, base: &Path) -> StoreConfig {
        StoreConfig { password_file: self.password_file.as_ref().map(|p| resolve(base, p)), ..self.clone() }
    }
}

/// `[limits]` in `coordinator.toml`: bounds on what anyone who reaches the port, or any one
/// node, can make the coordinator hold. Every field has a default sized for a consortium of up
/// to a few hundred hospitals on one machine.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// TLS handshakes in progress at once; a connection whose ClientHello has begun waits for
    /// one (within `handshake_timeout_secs`). A connection that has sent nothing holds none.
    pub max_handshakes_in_flight: usize,
    /// Connections open at once (authenticated or not); a connection beyond it is closed at once
    /// and counted as refused.
    pub max_connections: usize,
    /// Connections from one IP address in handshake at once (silent ones included); one beyond
    /// it is closed at once and counted as refused (`address_limit`). Served connections do not
    /// count, so several nodes behind one NAT are not limited by it, only their reconnects at
    /// the same instant.
    pub handshakes_per_ip: usize,
    /// Seconds a client gets to send the first byte of its ClientHello; a silent socket is
    /// closed after it (`handshake_timed_out`), long before the handshake timeout.
    pub first_byte_timeout_secs: u64,
    /// Seconds a client gets to complete the TLS handshake, from accept.
    pub handshake_timeout_secs: u64,
    /// Authenticated connections open at once with the same certificate; one beyond it is closed
    /// after the handshake and counted as refused (`identity_limit`). A node needs one; the
    /// lead's CLI one per command running.
    pub connections_per_identity: usize,
    /// Refused connections are counted, and the counts written to the audit log at most once per
    /// this many seconds (one record per period, never one per refusal).
    pub refusal_report_secs: u64,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Requests one connection may have in its handler at once.
    pub concurrency_per_connection: usize,
    /// Seconds a call may take in its handler (a whole upload, for `SubmitUpdate`).
    pub request_timeout_secs: u64,
    /// Seconds between the server's HTTP/2 keep-alive pings, and how long it waits for the answer.
    /// The interval is also the idle time before TCP keep-alive probes on an accepted socket.
    /// Clients' pings are always answered, however often (no "too many pings").
    pub keepalive_interval_secs: u64,
    pub keepalive_timeout_secs: u64,
    /// Seconds an upload may go without a chunk before it is dropped and its spool freed.
    pub upload_idle_timeout_secs: u64,
    /// `FetchModel` streams one node may have open at once.
    pub fetch_streams_per_node: usize,
    /// Events kept per run for late watchers, and runs whose events are kept in memory.
    pub events_per_run: usize,
    pub runs_in_memory: usize,
    /// Seconds a participant that sends heartbeats while it trains may go without one before it
    /// is dropped from the round (so the round need not wait for its deadline). Nodes are asked
    /// for one every third of this; 1 to 3600.
    pub heartbeat_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_handshakes_in_flight: 64,
            max_connections: 1024,
            handshakes_per_ip: 4,
            first_byte_timeout_secs: 2,
            handshake_timeout_secs: 10,
            connections_per_identity: 8,
            refusal_report_secs: 60,
            max_concurrent_streams: 64,
            concurrency_per_connection: 32,
            request_timeout_secs: 3600,
            keepalive_interval_secs: 20,
            keepalive_timeout_secs: 20,
            upload_idle_timeout_secs: 60,
            fetch_streams_per_node: 4,
            events_per_run: 10_000,
            runs_in_memory: 64,
            heartbeat_timeout_secs: 30,
        }
    }
}

impl Limits {
    /// Refuses a zero where zero would stop the service, naming the field.
    pub fn validate(&self) -> Result<(), SettingError> {
        let nonzero = [
            ("max_handshakes_in_flight", self.max_handshakes_in_flight as u64),
            ("max_connections", self.max_connections as u64),
            ("handshakes_per_ip", self.handshakes_per_ip as u64),
            ("first_byte_timeout_secs", self.first_byte_timeout_secs),
            ("handshake_timeout_secs", self.handshake_timeout_secs),
            ("connections_per_identity", self.connections_per_identity as u64),
            ("refusal_report_secs", self.refusal_report_secs),
            ("max_concurrent_streams", u64::from(self.max_concurrent_streams)),
            ("concurrency_per_connection", self.concurrency_per_connection as u64),
            ("request_timeout_secs", self.request_timeout_secs),
            ("keepalive_interval_secs", self.keepalive_interval_secs),
            ("keepalive_timeout_secs", self.keepalive_timeout_secs),
            ("upload_idle_timeout_secs", self.upload_idle_timeout_secs),
            ("fetch_streams_per_node", self.fetch_streams_per_node as u64),
            ("events_per_run", self.events_per_run as u64),
            ("runs_in_memory", self.runs_in_memory as u64),
            ("heartbeat_timeout_secs", self.heartbeat_timeout_secs),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(SettingError::Zero(name));
        }
        if self.heartbeat_timeout_secs > 3600 {
            return Err(SettingError::HeartbeatTimeoutTooLong(self.heartbeat_timeout_secs));
        }
        // The first byte is part of the handshake: a longer wait for it would never apply.
        if self.first_byte_timeout_secs > self.handshake_timeout_secs {
            return Err(SettingError::FirstByteAfterHandshake {
                first_byte: self.first_byte_timeout_secs,
                handshake: self.handshake_timeout_secs,
            });
        }
        Ok(())
    }
}

fn default_eval() -> u64 {
    300
}

/// `lead.toml`: how the lead's CLI reaches the coordinator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeadConfig {
    /// `host:port` of the coordinator; `host` must be in its certificate.
    pub coordinator: String,
    pub tls: TlsFiles,
}

/// A setting of `coordinator.toml` that parses but cannot work; each names its field and what to
/// write instead. [`load_coordinator`] adds the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("limits.{0} must be at least 1")]
    Zero(&'static str),
    #[error("limits.heartbeat_timeout_secs ({0}) must be at most 3600: a round's deadline bounds a slower node")]
    HeartbeatTimeoutTooLong(u64),
    #[error(
        "limits.first_byte_timeout_secs ({first_byte}) must not exceed limits.handshake_timeout_secs ({handshake})"
    )]
    FirstByteAfterHandshake { first_byte: u64, handshake: u64 },
    #[error(
        "store.url and store.password_file are for backend = \"postgres\"; remove them or set store.backend = \"postgres\""
    )]
    PostgresFieldsUnderSqlite,
    #[error(
        "store.url is required with store.backend = \"postgres\", e.g. url = \"host=/run/postgresql user=sanctum dbname=sanctum\""
    )]
    NoPostgresUrl,
    /// The connection string does not parse (the driver's reason, which names no password).
    #[error(
        "store.url is not a PostgreSQL connection string ({reason}); write it as key=value pairs, e.g. \"host=/run/postgresql user=sanctum dbname=sanctum\""
    )]
    BadPostgresUrl { reason: String },
    #[error(
        "status.listen = \"{0}\" is not a loopback address, and the status page over plain HTTP has no authentication: listen on 127.0.0.1, set status.tls = true (the coordinator's mutual TLS: lead and auditor certificates only), or set status.allow_remote = true and protect it another way (a reverse proxy with authentication, a firewall)"
    )]
    StatusNotLoopback(SocketAddr),
    #[error("status.refresh_secs ({0}) must be at most 3600 (0: the page does not reload)")]
    StatusRefreshTooLong(u64),
    #[error("status.allowed_hosts: {0:?} is not a host name (write the name alone, without a port)")]
    StatusBadHost(String),
    #[error(
        "store.url must not hold a password (it would sit in the config in clear): put the password alone in a file readable only by the coordinator and name it in store.password_file"
    )]
    PasswordInUrl,
}

/// A config file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {reason}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub reason: String,
}

/// Reads a TOML config; relative paths inside it are resolved against the file's directory.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let err = |reason: String| ConfigError { path: path.to_path_buf(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    toml::from_str(&text).map_err(|e| err(e.to_string()))
}

/// Reads `coordinator.toml` and checks what serde cannot (limits of zero, a store that cannot
/// work).
pub fn load_coordinator(path: &Path) -> Result<CoordinatorConfig, ConfigError> {
    let cfg: CoordinatorConfig = load(path)?;
    let err = |e: SettingError| ConfigError { path: path.to_path_buf(), reason: e.to_string() };
    cfg.limits.validate().map_err(err)?;
    cfg.store.validate().map_err(err)?;
    if let Some(status) = &cfg.status {
        status.validate().map_err(err)?;
    }
    Ok(cfg)
}

/// Resolves `p` against `base` unless it is absolute.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// Resolves the three TLS paths against the config file's directory.
pub fn resolve_tls(config_path: &Path, tls: &TlsFiles) -> TlsFiles {
    let base = config_path.parent().unwrap_or(Path::new("."));
    TlsFiles { ca: resolve(base, &tls.ca), cert: resolve(base, &tls.cert), key: resolve(base, &tls.key) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_limits_are_valid_and_a_zero_or_an_inverted_timeout_is_refused_by_name() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let zero = Limits { handshakes_per_ip: 0, ..Limits::default() };
        assert_eq!(
            zero.validate().map_err(|e| e.to_string()),
            Err("limits.handshakes_per_ip must be at least 1".into())
        );
        let zero = Limits { connections_per_identity: 0, ..Limits::default() };
        assert_eq!(zero.validate(), Err(SettingError::Zero("connections_per_identity")));
        let zero = Limits { first_byte_timeout_secs: 0, ..Limits::default() };
        assert_eq!(zero.validate(), Err(SettingError::Zero("first_byte_timeout_secs")));
        let inverted = Limits { first_byte_timeout_secs: 11, ..Limits::default() };
        assert!(
            inverted.validate().is_err_and(|e| e.to_string().contains("must not exceed limits.handshake_timeout_secs"))
        );
    }

    #[test]
    fn the_status_page_is_off_by_default_loopback_unless_remote_is_allowed_by_name() {
        let base = "listen = \"127.0.0.1:0\"\nstate_dir = \"s\"\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        let cfg: CoordinatorConfig = toml::from_str(base).unwrap();
        assert_eq!(cfg.status, None, "absent: off");
        let cfg: CoordinatorConfig = toml::from_str(&format!("{base}[status]\nlisten = \"127.0.0.1:9464\"\n")).unwrap();
        let status = cfg.status.unwrap();
        assert_eq!((status.allow_remote, status.tls, status.refresh_secs), (false, false, 5));
        assert_eq!(status.validate(), Ok(()));
        let v6: StatusConfig = toml::from_str("listen = \"[::1]:9464\"\n").unwrap();
        assert_eq!(v6.validate(), Ok(()));
        let remote: StatusConfig = toml::from_str("listen = \"0.0.0.0:9464\"\n").unwrap();
        let e = remote.validate().unwrap_err().to_string();
        assert!(
            e.contains("status.listen = \"0.0.0.0:9464\" is not a loopback address") && e.contains("allow_remote"),
            "{e}"
        );
        assert!(e.contains("status.tls = true"), "{e}");
        let behind_tls = StatusConfig { tls: true, ..remote.clone() };
        assert_eq!(behind_tls.validate(), Ok(()), "mutual TLS: any address");
        let remote = StatusConfig { allow_remote: true, ..remote };
        assert_eq!(remote.validate(), Ok(()), "the operator opted in");
        let slow = StatusConfig { refresh_secs: 7200, ..status.clone() };
        assert_eq!(slow.validate(), Err(SettingError::StatusRefreshTooLong(7200)));
        let port = StatusConfig { allowed_hosts: vec!["mon.example:80".into()], ..status };
        assert!(port.validate().is_err());
        assert!(toml::from_str::<StatusConfig>("listen = \"127.0.0.1:1\"\nallow_remot = true\n").is_err());
    }

    #[test]
    fn limits_parse_from_toml_with_defaults_for_what_is_left_out() {
        let parsed: Limits = toml::from_str("handshakes_per_ip = 128\nconnections_per_identity = 3\n").unwrap();
        assert_eq!(parsed, Limits { handshakes_per_ip: 128, connections_per_identity: 3, ..Limits::default() });
    }

    #[test]
    fn the_store_defaults_to_sqlite_and_postgres_needs_a_url_without_a_password() {
        let parsed: StoreConfig = toml::from_str("").unwrap();
        assert_eq!(parsed, StoreConfig::default());
        assert_eq!(parsed.backend, StoreBackend::Sqlite);
        assert_eq!(parsed.validate(), Ok(()));

        let pg: StoreConfig = toml::from_str(
            "backend = \"postgres\"\nurl = \"host=/run/postgresql user=sanctum dbname=sanctum\"\npassword_file = \"pg.pass\"\n",
        )
        .unwrap();
        assert_eq!(pg.validate(), Ok(()));
        assert_eq!(
            pg.resolve_paths(Path::new("/etc/sanctum")).password_file,
            Some(PathBuf::from("/etc/sanctum/pg.pass"))
        );

        let no_url = StoreConfig { backend: StoreBackend::Postgres, ..StoreConfig::default() };
        assert!(no_url.validate().is_err_and(|e| e.to_string().starts_with("store.url is required")));
        for url in [
            "host=/run/postgresql user=sanctum password=hunter2",
            "postgresql://sanctum:hunter2@db.example.org/sanctum",
        ] {
            let inline = StoreConfig { backend: StoreBackend::Postgres, url: Some(url.into()), password_file: None };
            let e = inline.validate().unwrap_err().to_string();
            assert!(e.starts_with("store.url must not hold a password") && e.contains("store.password_file"), "{e}");
            assert!(!e.contains("hunter2"), "the error must not repeat the password: {e}");
        }
        let bad = StoreConfig {
            backend: StoreBackend::Postgres,
            url: Some("host='unterminated".into()),
            password_file: None,
        };
        assert!(
            bad.validate().is_err_and(|e| e.to_string().starts_with("store.url is not a PostgreSQL connection string"))
        );
        let stray = StoreConfig { url: Some("host=x".into()), ..StoreConfig::default() };
        assert!(stray.validate().is_err_and(|e| e.to_string().contains("backend = \"postgres\"")));
        assert!(toml::from_str::<StoreConfig>("backend = \"mysql\"\n").is_err());
        assert!(toml::from_str::<StoreConfig>("passwd = \"x\"\n").is_err(), "unknown fields are refused");
    }
}
