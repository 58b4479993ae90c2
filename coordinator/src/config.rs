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

/// Resolves `p` against `base` unless it is absolute.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

/// Resolves the three TLS paths against the config file's directory.
pub fn resolve_tls(config_path: &Path, tls: &TlsFiles) -> TlsFiles {
    let base = config_path.parent().unwrap_or(Path::new("."));
    TlsFiles { ca: resolve(base, &tls.ca), cert: resolve(base, &tls.cert), key: resolve(base, &tls.key) }
}
