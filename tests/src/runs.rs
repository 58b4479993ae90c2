//! Whole runs seen from outside, for the end-to-end tests of resume and of several plans at once
//! (tests/tests/resume.rs, tests/tests/concurrent_plans.rs): the store a coordinator runs on
//! (SQLite in its state directory, or a PostgreSQL schema of the test's own), read back after
//! the fact; the lead's CLI; and the final accuracy `plan status --json` reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use sanctum_protocol::proto::{PlanEvent, plan_event};
use serde_json::Value;

use crate::{Consortium, CoordinatorProcess, bin, run_ok};

/// The variable naming the test PostgreSQL server (`scripts/postgres.sh` sets it).
pub const PG_ENV: &str = "SANCTUM_TEST_POSTGRES";

/// Which database the coordinator keeps its state in.
pub enum Backend {
    /// `STATE_DIR/coordinator.sqlite3`, the default.
    Sqlite,
    /// A schema of its own on the test server.
    Postgres(Box<PgSchema>),
}

impl Backend {
    /// PostgreSQL in a fresh schema, or `None` (said on the process's stderr) when no server is
    /// named: a skip is never silent.
    pub fn postgres() -> Option<Backend> {
        PgSchema::create().map(|pg| Backend::Postgres(Box::new(pg)))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The `[store]` table for coordinator.toml (nothing for SQLite, the default).
    pub fn store_toml(&self) -> String {
        match self {
            Backend::Sqlite => String::new(),
            Backend::Postgres(pg) => format!("[store]\nbackend = \"postgres\"\nurl = {:?}\n", pg.url),
        }
    }

    /// Starts a coordinator for `c` on this store.
    pub fn start(&self, c: &Consortium) -> CoordinatorProcess {
        CoordinatorProcess::start_configured(c, &self.store_toml(), &[])
    }

    /// The rounds the store holds as closed for `run_id`, in order, each with its model hash.
    pub fn rounds(&self, coord: &CoordinatorProcess, run_id: &str) -> Vec<(u32, String)> {
        let sql = "SELECT round, model_sha256 FROM rounds WHERE run_id = $1 ORDER BY round";
        match self {
            Backend::Sqlite => {
                let db = sqlite(coord);
                let mut stmt = db.prepare(&sql.replace("$1", "?1")).expect("prepare");
                stmt.query_map([run_id], |r| Ok((r.get::<_, i64>(0)? as u32, r.get::<_, String>(1)?)))
                    .expect("rounds")
                    .map(|r| r.expect("row"))
                    .collect()
            }
            Backend::Postgres(pg) => pg
                .client()
                .query(sql, &[&run_id])
                .expect("rounds")
                .iter()
                .map(|r| (r.get::<_, i64>(0) as u32, r.get::<_, String>(1)))
                .collect(),
        }
    }

    /// The round of each `RoundClosed` among the run's stored events (what a late watcher is
    /// replayed), in order.
    pub fn round_closed_events(&self, coord: &CoordinatorProcess, run_id: &str) -> Vec<u32> {
        let sql = "SELECT event FROM events WHERE run_id = $1 ORDER BY seq";
        let blobs: Vec<Vec<u8>> = match self {
            Backend::Sqlite => {
                let db = sqlite(coord);
                let mut stmt = db.prepare(&sql.replace("$1", "?1")).expect("prepare");
                stmt.query_map([run_id], |r| r.get::<_, Vec<u8>>(0)).expect("events").map(|r| r.expect("row")).collect()
            }
            Backend::Postgres(pg) => {
                pg.client().query(sql, &[&run_id]).expect("events").iter().map(|r| r.get::<_, Vec<u8>>(0)).collect()
            }
        };
        blobs
            .iter()
            .filter_map(|b| match PlanEvent::decode(b.as_slice()).expect("a stored event decodes").kind {
                Some(plan_event::Kind::RoundClosed(r)) => Some(r.round),
                _ => None,
            })
            .collect()
    }
}

fn sqlite(coord: &CoordinatorProcess) -> rusqlite::Connection {
    let path = coord.state_dir().join("coordinator.sqlite3");
    rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A schema of the test's own on the server [`PG_ENV`] names, dropped at the end: the store
/// imports and resumes every running run it finds at open, so tests must not share one.
pub struct PgSchema {
    config: postgres::Config,
    schema: String,
    /// The connection string the coordinator is given (the schema first on its search path).
    pub url: String,
}

impl PgSchema {
    pub fn create() -> Option<PgSchema> {
        let Ok(base) = std::env::var(PG_ENV) else {
            // Straight to the process's stderr: libtest shows a passing test's eprintln! only
            // on failure.
            use std::io::Write;
            let line = format!("skipped: {PG_ENV} is not set (scripts/test starts a PostgreSQL server and sets it)\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
            return None;
        };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let schema = format!("sanctum_e2e_{}_{nanos}", std::process::id());
        let config: postgres::Config = base.parse().unwrap_or_else(|e| panic!("{PG_ENV}={base:?}: {e}"));
        let mut admin = config.connect(postgres::NoTls).unwrap_or_else(|e| panic!("{PG_ENV}={base:?}: {e}"));
        admin.batch_execute(&format!("CREATE SCHEMA {schema}")).expect("create schema");
        let url = format!("{base} options='-c search_path={schema}'");
        let mut config = config;
        config.options(&format!("-c search_path={schema}"));
        Some(PgSchema { config, schema, url })
    }

    fn client(&self) -> postgres::Client {
        self.config.connect(postgres::NoTls).expect("connect to the test server")
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Ok(mut c) = self.config.connect(postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
    }
}

/// Writes `lead.toml` for the coordinator at `addr` with the lead's files; returns its path.
pub fn lead_config(c: &Consortium, addr: &str) -> PathBuf {
    let path = c.dir.path().join("lead.toml");
    let files = c.lead();
    std::fs::write(
        &path,
        format!("coordinator = {addr:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n", files.ca, files.cert, files.key),
    )
    .expect("lead.toml");
    path
}

/// Runs `sanctum-coordinator ARGS --config LEAD --json` and parses what it printed.
pub fn lead_json(lead: &Path, args: &[&str]) -> Value {
    let out = run_ok(Command::new(bin("sanctum-coordinator")).args(args).arg("--config").arg(lead).arg("--json"));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A run's final evaluation from `plan status ID --json`: each node's metric, and their mean
/// weighted by the test examples (the consortium's accuracy).
#[derive(Clone, Debug, PartialEq)]
pub struct FinalAccuracy {
    pub per_node: BTreeMap<String, f64>,
    pub weighted: f64,
}

impl FinalAccuracy {
    pub fn of_run(lead: &Path, run: &str) -> FinalAccuracy {
        let status = lead_json(lead, &["plan", "status", run]);
        let metrics = status["final_metrics"].as_array().cloned().unwrap_or_default();
        assert!(!metrics.is_empty(), "run {run} reported no final metrics: {status}");
        let mut per_node = BTreeMap::new();
        let (mut sum, mut samples) = (0.0, 0.0);
        for m in &metrics {
            let value = m["value"].as_f64().expect("metric value");
            let n = m["samples"].as_f64().unwrap_or(0.0);
            per_node.insert(m["node"].as_str().unwrap_or_default().to_string(), value);
            sum += value * n;
            samples += n;
        }
        assert!(samples > 0.0, "no test examples in {status}");
        FinalAccuracy { per_node, weighted: sum / samples }
    }

    /// The largest difference from `other`, over the weighted mean and each node's metric.
    pub fn max_difference(&self, other: &FinalAccuracy) -> f64 {
        assert_eq!(
            self.per_node.keys().collect::<Vec<_>>(),
            other.per_node.keys().collect::<Vec<_>>(),
            "the same nodes evaluated"
        );
        self.per_node
            .iter()
            .map(|(n, v)| (v - other.per_node[n]).abs())
            .fold((self.weighted - other.weighted).abs(), f64::max)
    }
}
