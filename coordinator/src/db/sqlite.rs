//! The SQLite backend of [`super::StateStore`]: `STATE_DIR/coordinator.sqlite3`, embedded.
//!
//! Durability: write-ahead log with `synchronous = FULL`, so each commit is fsync'd before it
//! returns and survives kill -9 and power loss, not only a crash of the process (NORMAL would
//! lose the last commits on power loss). Foreign keys are on (SQLite's default is off). Writes
//! take the lock at `BEGIN` (IMMEDIATE), so a reader elsewhere (a backup, an operator's sqlite3)
//! makes a writer wait up to the busy timeout instead of failing half-way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use sanctum_protocol::ids::{PlanId, RunId};

use super::{
    Checkpoint, DECISION_COLUMNS, DbError, DecisionRow, Legacy, Migration, NODE_COLUMNS, NodeRow, RECEIPT_COLUMNS,
    ROUND_COLUMNS, RUN_COLUMNS, RawRound, RawRun, ReceiptRow, RoundRow, RunRow, RunStatus, SQLITE_FILE, StateStore,
    decision_row, int, names_json, u32_of, u64_of,
};

/// The schema, in order. A new version is a new file, never an edit of an applied one.
pub(crate) const MIGRATIONS: &[Migration] =
    &[Migration { version: 1, name: "initial", sql: include_str!("migrations/sqlite/0001_initial.sql") }];

/// How long a write waits for another connection's lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct SqliteStore {
    conn: Connection,
    /// The database file, for error messages.
    path: PathBuf,
}

fn err(path: &Path, op: &'static str) -> impl FnOnce(rusqlite::Error) -> DbError {
    let path = path.to_path_buf();
    move |source| DbError::Sqlite { path, op, source }
}

impl SqliteStore {
    /// Opens or creates `state_dir/coordinator.sqlite3`, migrates it and imports `runs.json`.
    pub(crate) fn open(state_dir: &Path) -> Result<SqliteStore, DbError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|source| DbError::StateDir { path: state_dir.to_path_buf(), source })?;
        let path = state_dir.join(SQLITE_FILE);
        let conn = Connection::open(&path).map_err(err(&path, "open"))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err(&path, "set the busy timeout"))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(err(&path, "set the journal mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DbError::Durability { path, reason: format!("the journal mode stays '{mode}', not 'wal'") });
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(err(&path, "set synchronous = FULL"))?;
        conn.pragma_update(None, "foreign_keys", true).map_err(err(&path, "turn foreign keys on"))?;
        let (sync, fk): (i64, i64) = conn
            .query_row("SELECT synchronous, foreign_keys FROM pragma_synchronous, pragma_foreign_keys", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(err(&path, "read the pragmas back"))?;
        if sync != 2 || fk != 1 {
            return Err(DbError::Durability {
                path,
                reason: format!("synchronous = {sync} (want 2), foreign_keys = {fk}"),
            });
        }
        let mut store = SqliteStore { conn, path };
        let legacy = store.migrate(state_dir)?;
        // The database file itself may be new: make its directory entry durable too (SQLite
        // syncs the directory for its journal files, not for the main file).
        super::sync_dir(state_dir).map_err(|source| DbError::StateDir { path: state_dir.to_path_buf(), source })?;
        if let Some(legacy) = legacy {
            super::retire_legacy(&legacy.path)?;
        }
        Ok(store)
    }

    /// Applies pending migrations and imports `runs.json` in one transaction; returns the legacy
    /// registry to rename once that transaction is committed.
    fn migrate(&mut self, state_dir: &Path) -> Result<Option<Legacy>, DbError> {
        let path = &self.path;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err(path, "begin"))?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ms INTEGER NOT NULL) STRICT",
        )
        .map_err(err(path, "create schema_migrations"))?;
        let found: Option<i64> = tx
            .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| r.get(0))
            .map_err(err(path, "read the schema version"))?;
        let found = found.map(|v| u32_of("schema_migrations.version", v)).transpose()?;
        for m in super::pending("sqlite", found, MIGRATIONS)? {
            tx.execute_batch(m.sql).map_err(err(path, "apply a migration"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_ms) VALUES (?1, ?2, ?3)",
                params![m.version, m.name, int("applied_ms", super::now_ms())?],
            )
            .map_err(err(path, "record a migration"))?;
        }
        let legacy = super::legacy_runs(state_dir)?;
        if let Some(legacy) = &legacy {
            let count: i64 =
                tx.query_row("SELECT COUNT(*) FROM runs", [], |r| r.get(0)).map_err(err(path, "count runs"))?;
            if count == 0 {
                for row in &legacy.rows {
                    insert_run(&tx, path, row)?;
                }
            } else {
                // Imported before, and the rename did not happen (a crash in between): rename now,
                // unless the file has runs the database lacks.
                let mut missing = Vec::new();
                for row in &legacy.rows {
                    if find_run(&tx, path, &row.run_id)?.is_none() {
                        missing.push(row.run_id.to_string());
                    }
                }
                if let Some(example) = missing.first() {
                    return Err(DbError::LegacyDiverged {
                        path: legacy.path.clone(),
                        missing: missing.len(),
                        example: example.clone(),
                    });
                }
            }
        }
        tx.commit().map_err(err(path, "commit the migration"))?;
        Ok(legacy)
    }

    /// The pragmas in force on this connection: (journal_mode, synchronous, foreign_keys).
    #[cfg(test)]
    pub(crate) fn pragmas(&self) -> (String, i64, i64) {
        let q = |sql: &str| self.conn.query_row(sql, [], |r| r.get::<_, rusqlite::types::Value>(0));
        let text = |v: Result<rusqlite::types::Value, rusqlite::Error>| match v {
            Ok(rusqlite::types::Value::Text(s)) => s,
            other => format!("{other:?}"),
        };
        let num = |v: Result<rusqlite::types::Value, rusqlite::Error>| match v {
            Ok(rusqlite::types::Value::Integer(i)) => i,
            _ => -1,
        };
        (text(q("PRAGMA journal_mode")), num(q("PRAGMA synchronous")), num(q("PRAGMA foreign_keys")))
    }

    fn write(&mut self) -> Result<(Transaction<'_>, &Path), DbError> {
        let tx =
            self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err(&self.path, "begin"))?;
        Ok((tx, &self.path))
    }
}

fn raw_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRun> {
    Ok(RawRun {
        run_id: r.get(0)?,
        plan_id: r.get(1)?,
        number: r.get(2)?,
        name: r.get(3)?,
        wire_toml: r.get(4)?,
        submitted_by: r.get(5)?,
        submitted_ms: r.get(6)?,
        rounds_planned: r.get(7)?,
        status: r.get(8)?,
        reason: r.get(9)?,
        final_model: r.get(10)?,
        finished_ms: r.get(11)?,
    })
}

fn find_run(conn: &Connection, path: &Path, run_id: &str) -> Result<Option<RunRow>, DbError> {
    conn.query_row(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?1"), [run_id], raw_run)
        .optional()
        .map_err(err(path, "read a run"))?
        .map(RawRun::into_row)
        .transpose()
}

fn query_runs(
    conn: &Connection,
    path: &Path,
    sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<RunRow>, DbError> {
    let mut stmt = conn.prepare(sql).map_err(err(path, "read runs"))?;
    let raws = stmt.query_map(args, raw_run).map_err(err(path, "read runs"))?;
    raws.map(|r| r.map_err(err(path, "read runs")).and_then(RawRun::into_row)).collect()
}

fn insert_run(conn: &Connection, path: &Path, run: &RunRow) -> Result<(), DbError> {
    if find_run(conn, path, &run.run_id)?.is_some() {
        return Err(DbError::DuplicateRun { run_id: run.run_id.to_string() });
    }
    let existing: Option<String> = conn
        .query_row(
            "SELECT run_id FROM runs WHERE plan_id = ?1 AND number = ?2",
            params![run.plan_id.as_str(), run.number],
            |r| r.get(0),
        )
        .optional()
        .map_err(err(path, "read a run"))?;
    if let Some(existing) = existing {
        return Err(DbError::DuplicateRunNumber { plan_id: run.plan_id.to_string(), number: run.number, existing });
    }
    conn.execute(
        &format!("INSERT INTO runs ({RUN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
        params![
            run.run_id.as_str(),
            run.plan_id.as_str(),
            run.number,
            run.name,
            run.wire_toml,
            run.submitted_by,
            int("submitted_ms", run.submitted_ms)?,
            run.rounds_planned,
            run.status.as_str(),
            run.reason,
            run.final_model,
            run.finished_ms.map(|v| int("finished_ms", v)).transpose()?,
        ],
    )
    .map_err(err(path, "insert a run"))?;
    Ok(())
}

/// The run's status, or [`DbError::UnknownRun`].
fn status_of(conn: &Connection, path: &Path, run_id: &str) -> Result<RunStatus, DbError> {
    let status: Option<String> = conn
        .query_row("SELECT status FROM runs WHERE run_id = ?1", [run_id], |r| r.get(0))
        .optional()
        .map_err(err(path, "read a run"))?;
    let status = status.ok_or_else(|| DbError::UnknownRun { run_id: run_id.to_string() })?;
    RunStatus::parse(&status)
        .ok_or_else(|| DbError::Corrupt { what: "runs.status", reason: format!("unknown status '{status}'") })
}

fn put_checkpoint(conn: &Connection, path: &Path, c: &Checkpoint) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO checkpoints (run_id, rounds_completed, state, saved_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (run_id) DO UPDATE SET rounds_completed = excluded.rounds_completed,
             state = excluded.state, saved_ms = excluded.saved_ms",
        params![c.run_id.as_str(), c.rounds_completed, c.state, int("saved_ms", c.saved_ms)?],
    )
    .map_err(err(path, "save a checkpoint"))?;
    Ok(())
}

fn query_decisions(conn: &Connection, path: &Path, sql: &str, run_id: &str) -> Result<Vec<DecisionRow>, DbError> {
    let mut stmt = conn.prepare(sql).map_err(err(path, "read decisions"))?;
    let rows = stmt
        .query_map([run_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))
        .map_err(err(path, "read decisions"))?;
    rows.map(|r| {
        let (run_id, node, accept, reason, epsilon, delta, at_ms) = r.map_err(err(path, "read decisions"))?;
        decision_row(run_id, node, accept, reason, epsilon, delta, at_ms)
    })
    .collect()
}

impl StateStore for SqliteStore {
    fn insert_run(&mut self, run: &RunRow) -> Result<(), DbError> {
        let (tx, path) = self.write()?;
        insert_run(&tx, path, run)?;
        tx.commit().map_err(err(path, "commit a run"))
    }

    fn runs(&mut self) -> Result<Vec<RunRow>, DbError> {
        query_runs(&self.conn, &self.path, &format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY seq"), &[])
    }

    fn run(&mut self, run_id: &RunId) -> Result<Option<RunRow>, DbError> {
        find_run(&self.conn, &self.path, run_id)
    }

    fn runs_of_plan(&mut self, plan_id: &PlanId) -> Result<Vec<RunRow>, DbError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE plan_id = ?1 ORDER BY number");
        query_runs(&self.conn, &self.path, &sql, &[&plan_id.as_str()])
    }

    fn finish_run(
        &mut self,
        run_id: &RunId,
        status: RunStatus,
        reason: &str,
        final_model: Option<&str>,
        finished_ms: u64,
    ) -> Result<(), DbError> {
        super::check_final(run_id, status)?;
        let (tx, path) = self.write()?;
        let now = status_of(&tx, path, run_id)?;
        if now != RunStatus::Running {
            return Err(DbError::AlreadyFinished { run_id: run_id.to_string(), status: now });
        }
        tx.execute(
            "UPDATE runs SET status = ?2, reason = ?3, final_model = ?4, finished_ms = ?5 WHERE run_id = ?1",
            params![run_id.as_str(), status.as_str(), reason, final_model, int("finished_ms", finished_ms)?],
        )
        .map_err(err(path, "finish a run"))?;
        tx.commit().map_err(err(path, "commit a finished run"))
    }

    fn commit_round(&mut self, round: &RoundRow, checkpoint: &Checkpoint) -> Result<(), DbError> {
        super::check_pair(round, checkpoint)?;
        let (tx, path) = self.write()?;
        let status = status_of(&tx, path, &round.run_id)?;
        if status != RunStatus::Running {
            return Err(DbError::AlreadyFinished { run_id: round.run_id.to_string(), status });
        }
        let exists = tx
            .query_row(
                "SELECT 1 FROM rounds WHERE run_id = ?1 AND round = ?2",
                params![round.run_id.as_str(), round.round],
                |_| Ok(()),
            )
            .optional()
            .map_err(err(path, "read a round"))?;
        if exists.is_some() {
            return Err(DbError::RoundExists { run_id: round.run_id.to_string(), round: round.round });
        }
        tx.execute(
            &format!("INSERT INTO rounds ({ROUND_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
            params![
                round.run_id.as_str(),
                round.round,
                round.model_sha256,
                names_json(&round.reported)?,
                names_json(&round.dropped)?,
                round.record_line,
                int("closed_ms", round.closed_ms)?,
            ],
        )
        .map_err(err(path, "insert a round"))?;
        put_checkpoint(&tx, path, checkpoint)?;
        tx.commit().map_err(err(path, "commit a round"))
    }

    fn save_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), DbError> {
        let (tx, path) = self.write()?;
        status_of(&tx, path, &checkpoint.run_id)?;
        put_checkpoint(&tx, path, checkpoint)?;
        tx.commit().map_err(err(path, "commit a checkpoint"))
    }

    fn checkpoint(&mut self, run_id: &RunId) -> Result<Option<Checkpoint>, DbError> {
        let path = &self.path;
        let raw: Option<(String, i64, Vec<u8>, i64)> = self
            .conn
            .query_row(
                "SELECT run_id, rounds_completed, state, saved_ms FROM checkpoints WHERE run_id = ?1",
                [run_id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(err(path, "read a checkpoint"))?;
        raw.map(|(run_id, rounds, state, saved)| {
            Ok(Checkpoint {
                run_id: super::id_of("checkpoints.run_id", run_id)?,
                rounds_completed: u32_of("checkpoints.rounds_completed", rounds)?,
                state,
                saved_ms: u64_of("checkpoints.saved_ms", saved)?,
            })
        })
        .transpose()
    }

    fn rounds(&mut self, run_id: &RunId) -> Result<Vec<RoundRow>, DbError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {ROUND_COLUMNS} FROM rounds WHERE run_id = ?1 ORDER BY round"))
            .map_err(err(path, "read rounds"))?;
        let raws = stmt
            .query_map([run_id.as_str()], |r| {
                Ok(RawRound {
                    run_id: r.get(0)?,
                    round: r.get(1)?,
                    model_sha256: r.get(2)?,
                    reported: r.get(3)?,
                    dropped: r.get(4)?,
                    record_line: r.get(5)?,
                    closed_ms: r.get(6)?,
                })
            })
            .map_err(err(path, "read rounds"))?;
        raws.map(|r| r.map_err(err(path, "read rounds")).and_then(RawRound::into_row)).collect()
    }

    fn record_decision(&mut self, d: &DecisionRow) -> Result<(), DbError> {
        super::check_decision(d)?;
        let (tx, path) = self.write()?;
        status_of(&tx, path, &d.run_id)?;
        tx.execute(
            &format!("INSERT INTO decisions ({DECISION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
            params![d.run_id.as_str(), d.node.as_str(), d.accept, d.reason, d.epsilon, d.delta, int("at_ms", d.at_ms)?],
        )
        .map_err(err(path, "insert a decision"))?;
        tx.commit().map_err(err(path, "commit a decision"))
    }

    fn decisions(&mut self, run_id: &RunId) -> Result<Vec<DecisionRow>, DbError> {
        // "Latest" is the last recorded (seq), not the largest at_ms: a clock step back on the
        // node or here must not resurrect an older answer.
        let sql = format!(
            "SELECT {DECISION_COLUMNS} FROM decisions d WHERE run_id = ?1
             AND seq = (SELECT MAX(seq) FROM decisions e WHERE e.run_id = d.run_id AND e.node = d.node)
             ORDER BY node"
        );
        query_decisions(&self.conn, &self.path, &sql, run_id)
    }

    fn decision_history(&mut self, run_id: &RunId) -> Result<Vec<DecisionRow>, DbError> {
        let sql = format!("SELECT {DECISION_COLUMNS} FROM decisions WHERE run_id = ?1 ORDER BY seq");
        query_decisions(&self.conn, &self.path, &sql, run_id)
    }

    fn record_receipt(&mut self, r: &ReceiptRow) -> Result<(), DbError> {
        let (tx, path) = self.write()?;
        status_of(&tx, path, &r.run_id)?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM receipts WHERE run_id = ?1 AND round = ?2 AND node = ?3",
                params![r.run_id.as_str(), r.round, r.node.as_str()],
                |_| Ok(()),
            )
            .optional()
            .map_err(err(path, "read a receipt"))?;
        if exists.is_some() {
            return Err(DbError::ReceiptExists {
                run_id: r.run_id.to_string(),
                round: r.round,
                node: r.node.to_string(),
            });
        }
        tx.execute(
            &format!("INSERT INTO receipts ({RECEIPT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
            params![
                r.run_id.as_str(),
                r.round,
                r.node.as_str(),
                r.agrees,
                r.reason,
                r.signature,
                int("at_ms", r.at_ms)?
            ],
        )
        .map_err(err(path, "insert a receipt"))?;
        tx.commit().map_err(err(path, "commit a receipt"))
    }

    fn receipts(&mut self, run_id: &RunId) -> Result<Vec<ReceiptRow>, DbError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {RECEIPT_COLUMNS} FROM receipts WHERE run_id = ?1 ORDER BY round, node"))
            .map_err(err(path, "read receipts"))?;
        let rows = stmt
            .query_map([run_id.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })
            .map_err(err(path, "read receipts"))?;
        rows.map(|r| {
            let (run_id, round, node, agrees, reason, signature, at_ms) = r.map_err(err(path, "read receipts"))?;
            Ok(ReceiptRow {
                run_id: super::id_of("receipts.run_id", run_id)?,
                round: u32_of("receipts.round", round)?,
                node: super::id_of("receipts.node", node)?,
                agrees,
                reason,
                signature,
                at_ms: u64_of("receipts.at_ms", at_ms)?,
            })
        })
        .collect()
    }

    fn append_event(&mut self, run_id: &RunId, event: &[u8]) -> Result<u64, DbError> {
        let (tx, path) = self.write()?;
        let seq: Option<i64> = tx
            .query_row(
                "UPDATE runs SET last_event_seq = last_event_seq + 1 WHERE run_id = ?1 RETURNING last_event_seq",
                [run_id.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(err(path, "number an event"))?;
        let seq = seq.ok_or_else(|| DbError::UnknownRun { run_id: run_id.to_string() })?;
        tx.execute("INSERT INTO events (run_id, seq, event) VALUES (?1, ?2, ?3)", params![run_id.as_str(), seq, event])
            .map_err(err(path, "insert an event"))?;
        tx.commit().map_err(err(path, "commit an event"))?;
        u64_of("events.seq", seq)
    }

    fn events(&mut self, run_id: &RunId, after_seq: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, DbError> {
        let path = &self.path;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare("SELECT seq, event FROM events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")
            .map_err(err(path, "read events"))?;
        let rows = stmt
            .query_map(params![run_id.as_str(), int("after_seq", after_seq)?, limit], |r| {
                Ok((r.get::<_, i64>(0)?, r.get(1)?))
            })
            .map_err(err(path, "read events"))?;
        rows.map(|r| {
            let (seq, event) = r.map_err(err(path, "read events"))?;
            Ok((u64_of("events.seq", seq)?, event))
        })
        .collect()
    }

    fn upsert_node(&mut self, n: &NodeRow) -> Result<(), DbError> {
        let (tx, path) = self.write()?;
        tx.execute(
            &format!(
                "INSERT INTO nodes ({NODE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (name) DO UPDATE SET fingerprint = excluded.fingerprint,
                     version = excluded.version, device = excluded.device,
                     first_seen_ms = min(nodes.first_seen_ms, excluded.first_seen_ms),
                     last_seen_ms = max(nodes.last_seen_ms, excluded.last_seen_ms)"
            ),
            params![
                n.name.as_str(),
                n.fingerprint,
                n.version,
                n.device,
                int("first_seen_ms", n.first_seen_ms)?,
                int("last_seen_ms", n.last_seen_ms)?
            ],
        )
        .map_err(err(path, "record a node"))?;
        tx.commit().map_err(err(path, "commit a node"))
    }

    fn nodes(&mut self) -> Result<Vec<NodeRow>, DbError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY name"))
            .map_err(err(path, "read nodes"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get::<_, i64>(4)?, r.get::<_, i64>(5)?))
            })
            .map_err(err(path, "read nodes"))?;
        rows.map(|r| {
            let (name, fingerprint, version, device, first, last) = r.map_err(err(path, "read nodes"))?;
            Ok(NodeRow {
                name: super::id_of("nodes.name", name)?,
                fingerprint,
                version,
                device,
                first_seen_ms: u64_of("nodes.first_seen_ms", first)?,
                last_seen_ms: u64_of("nodes.last_seen_ms", last)?,
            })
        })
        .collect()
    }
}
