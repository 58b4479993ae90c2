//! The PostgreSQL backend of [`super::StateStore`], for deployments that outgrow one machine.
//!
//! The synchronous `postgres` client runs its own small tokio runtime inside each call, so it
//! must be used from a plain thread (the store's executor thread), never from an async worker.
//! A commit returns once the server reports it committed (its `synchronous_commit`, `on` by
//! default, makes that durable). A dropped connection is opened again at the next call; the
//! call that saw it drop fails and wrote nothing. Run-row locks (`FOR UPDATE`) keep two writers
//! of one run in order; the migration takes an advisory lock so two coordinators starting at once
//! migrate one after the other.
//!
//! The connection is made without TLS: reach the server over a unix socket or a private network.

use std::path::Path;

use ::postgres::{Client, Config, GenericClient, NoTls, Row, Transaction};
use sanctum_protocol::ids::{PlanId, RunId};

use super::{
    Checkpoint, DECISION_COLUMNS, DbError, DecisionRow, Legacy, Migration, NODE_COLUMNS, NodeRow, RECEIPT_COLUMNS,
    ROUND_COLUMNS, RUN_COLUMNS, RawRound, RawRun, ReceiptRow, RoundRow, RunRow, RunStatus, StateStore, StoreConfig,
    decision_row, int, names_json, u32_of, u64_of,
};

/// The schema, in order; the same versions as SQLite's, in PostgreSQL's dialect.
pub(crate) const MIGRATIONS: &[Migration] =
    &[Migration { version: 1, name: "initial", sql: include_str!("migrations/postgres/0001_initial.sql") }];

/// Taken for the migration's transaction: "sanctum" in ASCII.
const MIGRATION_LOCK: i64 = 0x0073_616e_6374_756d;

pub(crate) struct PgStore {
    client: Client,
    /// To connect again after the connection dropped.
    config: Config,
}

fn err(op: &'static str) -> impl FnOnce(::postgres::Error) -> DbError {
    move |source| DbError::Postgres { op, source }
}

/// The connection settings `cfg` names, with the password read from `password_file`.
pub(crate) fn connect_config(cfg: &StoreConfig) -> Result<Config, DbError> {
    let url = cfg.url.as_deref().ok_or_else(|| DbError::Config("store.url is required for postgres".into()))?;
    let mut config: Config =
        url.parse().map_err(|e| DbError::Config(format!("store.url is not a PostgreSQL connection string: {e}")))?;
    if let Some(path) = &cfg.password_file {
        config.password(read_password(path)?);
    }
    if config.get_application_name().is_none() {
        config.application_name("sanctum-coordinator");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    Ok(config)
}

/// The password alone, one trailing newline removed; a file others may read is refused.
fn read_password(path: &Path) -> Result<String, DbError> {
    let fail = |reason: String| DbError::PasswordFile { path: path.to_path_buf(), reason };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?.permissions().mode();
        if mode & 0o004 != 0 {
            return Err(fail(format!(
                "is readable by every user (mode {:o}); run `chmod o-r {}`",
                mode & 0o777,
                path.display()
            )));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let password = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if password.is_empty() {
        return Err(fail("is empty; write the password of store.url's user into it".into()));
    }
    Ok(password.to_string())
}

impl PgStore {
    /// Connects, migrates and imports `state_dir/runs.json`.
    pub(crate) fn open(config: Config, state_dir: &Path) -> Result<PgStore, DbError> {
        let client = config.connect(NoTls).map_err(err("connect"))?;
        let mut store = PgStore { client, config };
        if let Some(legacy) = store.migrate(state_dir)? {
            super::retire_legacy(&legacy.path)?;
        }
        Ok(store)
    }

    fn client(&mut self) -> Result<&mut Client, DbError> {
        if self.client.is_closed() {
            self.client = self.config.connect(NoTls).map_err(err("reconnect"))?;
        }
        Ok(&mut self.client)
    }

    fn migrate(&mut self, state_dir: &Path) -> Result<Option<Legacy>, DbError> {
        let mut tx = self.client()?.transaction().map_err(err("begin"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).map_err(err("take the migration lock"))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_ms BIGINT NOT NULL)",
        )
        .map_err(err("create schema_migrations"))?;
        let found: Option<i64> = first(
            &tx.query_one("SELECT MAX(version) FROM schema_migrations", &[]).map_err(err("read the schema version"))?,
            "read the schema version",
        )?;
        let found = found.map(|v| u32_of("schema_migrations.version", v)).transpose()?;
        for m in super::pending("postgresql", found, MIGRATIONS)? {
            tx.batch_execute(m.sql).map_err(err("apply a migration"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_ms) VALUES ($1, $2, $3)",
                &[&i64::from(m.version), &m.name, &int("applied_ms", super::now_ms())?],
            )
            .map_err(err("record a migration"))?;
        }
        let legacy = super::legacy_runs(state_dir)?;
        if let Some(legacy) = &legacy {
            let count: i64 =
                first(&tx.query_one("SELECT COUNT(*) FROM runs", &[]).map_err(err("count runs"))?, "count runs")?;
            if count == 0 {
                for row in &legacy.rows {
                    insert_run(&mut tx, row)?;
                }
            } else {
                let mut missing = Vec::new();
                for row in &legacy.rows {
                    if find_run(&mut tx, &row.run_id)?.is_none() {
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
        tx.commit().map_err(err("commit the migration"))?;
        Ok(legacy)
    }

    fn write(&mut self) -> Result<Transaction<'_>, DbError> {
        self.client()?.transaction().map_err(err("begin"))
    }
}

/// A row's first column (`Row::get` would panic on a type mismatch).
fn first<'a, T: ::postgres::types::FromSql<'a>>(row: &'a Row, op: &'static str) -> Result<T, DbError> {
    row.try_get(0).map_err(err(op))
}

fn raw_run(r: &Row) -> Result<RawRun, DbError> {
    let get = |e| DbError::Postgres { op: "read a run", source: e };
    Ok(RawRun {
        run_id: r.try_get(0).map_err(get)?,
        plan_id: r.try_get(1).map_err(get)?,
        number: r.try_get(2).map_err(get)?,
        name: r.try_get(3).map_err(get)?,
        wire_toml: r.try_get(4).map_err(get)?,
        submitted_by: r.try_get(5).map_err(get)?,
        submitted_ms: r.try_get(6).map_err(get)?,
        rounds_planned: r.try_get(7).map_err(get)?,
        status: r.try_get(8).map_err(get)?,
        reason: r.try_get(9).map_err(get)?,
        final_model: r.try_get(10).map_err(get)?,
        finished_ms: r.try_get(11).map_err(get)?,
    })
}

fn find_run(c: &mut impl GenericClient, run_id: &str) -> Result<Option<RunRow>, DbError> {
    c.query_opt(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = $1"), &[&run_id])
        .map_err(err("read a run"))?
        .map(|r| raw_run(&r)?.into_row())
        .transpose()
}

fn insert_run(c: &mut impl GenericClient, run: &RunRow) -> Result<(), DbError> {
    if find_run(c, &run.run_id)?.is_some() {
        return Err(DbError::DuplicateRun { run_id: run.run_id.to_string() });
    }
    let number = i64::from(run.number);
    let existing = c
        .query_opt("SELECT run_id FROM runs WHERE plan_id = $1 AND number = $2", &[&run.plan_id.as_str(), &number])
        .map_err(err("read a run"))?;
    if let Some(existing) = existing {
        return Err(DbError::DuplicateRunNumber {
            plan_id: run.plan_id.to_string(),
            number: run.number,
            existing: first(&existing, "read a run")?,
        });
    }
    c.execute(
        &format!("INSERT INTO runs ({RUN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"),
        &[
            &run.run_id.as_str(),
            &run.plan_id.as_str(),
            &number,
            &run.name,
            &run.wire_toml,
            &run.submitted_by,
            &int("submitted_ms", run.submitted_ms)?,
            &i64::from(run.rounds_planned),
            &run.status.as_str(),
            &run.reason,
            &run.final_model,
            &run.finished_ms.map(|v| int("finished_ms", v)).transpose()?,
        ],
    )
    .map_err(err("insert a run"))?;
    Ok(())
}

/// The run's status with its row locked for this transaction, or [`DbError::UnknownRun`].
fn lock_run(tx: &mut Transaction<'_>, run_id: &str) -> Result<RunStatus, DbError> {
    let row =
        tx.query_opt("SELECT status FROM runs WHERE run_id = $1 FOR UPDATE", &[&run_id]).map_err(err("read a run"))?;
    let row = row.ok_or_else(|| DbError::UnknownRun { run_id: run_id.to_string() })?;
    let status: String = first(&row, "read a run")?;
    RunStatus::parse(&status)
        .ok_or_else(|| DbError::Corrupt { what: "runs.status", reason: format!("unknown status '{status}'") })
}

fn put_checkpoint(tx: &mut Transaction<'_>, c: &Checkpoint) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO checkpoints (run_id, rounds_completed, state, saved_ms) VALUES ($1, $2, $3, $4)
         ON CONFLICT (run_id) DO UPDATE SET rounds_completed = excluded.rounds_completed,
             state = excluded.state, saved_ms = excluded.saved_ms",
        &[&c.run_id.as_str(), &i64::from(c.rounds_completed), &c.state, &int("saved_ms", c.saved_ms)?],
    )
    .map_err(err("save a checkpoint"))?;
    Ok(())
}

fn query_decisions(client: &mut Client, sql: &str, run_id: &str) -> Result<Vec<DecisionRow>, DbError> {
    let rows = client.query(sql, &[&run_id]).map_err(err("read decisions"))?;
    rows.iter()
        .map(|r| {
            let get = err("read decisions");
            let (run_id, node, accept, reason, epsilon, delta, at_ms) = (|| {
                Ok::<_, ::postgres::Error>((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get(3)?,
                    r.try_get(4)?,
                    r.try_get(5)?,
                    r.try_get(6)?,
                ))
            })()
            .map_err(get)?;
            decision_row(run_id, node, accept, reason, epsilon, delta, at_ms)
        })
        .collect()
}

impl StateStore for PgStore {
    fn insert_run(&mut self, run: &RunRow) -> Result<(), DbError> {
        let mut tx = self.write()?;
        insert_run(&mut tx, run)?;
        tx.commit().map_err(err("commit a run"))
    }

    fn runs(&mut self) -> Result<Vec<RunRow>, DbError> {
        let rows = self
            .client()?
            .query(&format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY seq"), &[])
            .map_err(err("read runs"))?;
        rows.iter().map(|r| raw_run(r)?.into_row()).collect()
    }

    fn run(&mut self, run_id: &RunId) -> Result<Option<RunRow>, DbError> {
        find_run(self.client()?, run_id)
    }

    fn runs_of_plan(&mut self, plan_id: &PlanId) -> Result<Vec<RunRow>, DbError> {
        let plan_id = plan_id.as_str();
        let rows = self
            .client()?
            .query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE plan_id = $1 ORDER BY number"), &[&plan_id])
            .map_err(err("read runs"))?;
        rows.iter().map(|r| raw_run(r)?.into_row()).collect()
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
        let run_id = run_id.as_str();
        let mut tx = self.write()?;
        let now = lock_run(&mut tx, run_id)?;
        if now != RunStatus::Running {
            return Err(DbError::AlreadyFinished { run_id: run_id.to_string(), status: now });
        }
        tx.execute(
            "UPDATE runs SET status = $2, reason = $3, final_model = $4, finished_ms = $5 WHERE run_id = $1",
            &[&run_id, &status.as_str(), &reason, &final_model, &int("finished_ms", finished_ms)?],
        )
        .map_err(err("finish a run"))?;
        tx.commit().map_err(err("commit a finished run"))
    }

    fn commit_round(&mut self, round: &RoundRow, checkpoint: &Checkpoint) -> Result<(), DbError> {
        super::check_pair(round, checkpoint)?;
        let mut tx = self.write()?;
        let status = lock_run(&mut tx, &round.run_id)?;
        if status != RunStatus::Running {
            return Err(DbError::AlreadyFinished { run_id: round.run_id.to_string(), status });
        }
        let number = i64::from(round.round);
        let exists = tx
            .query_opt("SELECT 1 FROM rounds WHERE run_id = $1 AND round = $2", &[&round.run_id.as_str(), &number])
            .map_err(err("read a round"))?;
        if exists.is_some() {
            return Err(DbError::RoundExists { run_id: round.run_id.to_string(), round: round.round });
        }
        tx.execute(
            &format!("INSERT INTO rounds ({ROUND_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
            &[
                &round.run_id.as_str(),
                &number,
                &round.model_sha256,
                &names_json(&round.reported)?,
                &names_json(&round.dropped)?,
                &round.record_line,
                &int("closed_ms", round.closed_ms)?,
            ],
        )
        .map_err(err("insert a round"))?;
        put_checkpoint(&mut tx, checkpoint)?;
        tx.commit().map_err(err("commit a round"))
    }

    fn save_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), DbError> {
        let mut tx = self.write()?;
        lock_run(&mut tx, &checkpoint.run_id)?;
        put_checkpoint(&mut tx, checkpoint)?;
        tx.commit().map_err(err("commit a checkpoint"))
    }

    fn checkpoint(&mut self, run_id: &RunId) -> Result<Option<Checkpoint>, DbError> {
        let run_id = run_id.as_str();
        let row = self
            .client()?
            .query_opt(
                "SELECT run_id, rounds_completed, state, saved_ms FROM checkpoints WHERE run_id = $1",
                &[&run_id],
            )
            .map_err(err("read a checkpoint"))?;
        row.map(|r| {
            let get = |e| DbError::Postgres { op: "read a checkpoint", source: e };
            Ok(Checkpoint {
                run_id: super::id_of("checkpoints.run_id", r.try_get(0).map_err(get)?)?,
                rounds_completed: u32_of("checkpoints.rounds_completed", r.try_get(1).map_err(get)?)?,
                state: r.try_get(2).map_err(get)?,
                saved_ms: u64_of("checkpoints.saved_ms", r.try_get(3).map_err(get)?)?,
            })
        })
        .transpose()
    }

    fn rounds(&mut self, run_id: &RunId) -> Result<Vec<RoundRow>, DbError> {
        let run_id = run_id.as_str();
        let rows = self
            .client()?
            .query(&format!("SELECT {ROUND_COLUMNS} FROM rounds WHERE run_id = $1 ORDER BY round"), &[&run_id])
            .map_err(err("read rounds"))?;
        rows.iter()
            .map(|r| {
                let get = |e| DbError::Postgres { op: "read rounds", source: e };
                RawRound {
                    run_id: r.try_get(0).map_err(get)?,
                    round: r.try_get(1).map_err(get)?,
                    model_sha256: r.try_get(2).map_err(get)?,
                    reported: r.try_get(3).map_err(get)?,
                    dropped: r.try_get(4).map_err(get)?,
                    record_line: r.try_get(5).map_err(get)?,
                    closed_ms: r.try_get(6).map_err(get)?,
                }
                .into_row()
            })
            .collect()
    }

    fn record_decision(&mut self, d: &DecisionRow) -> Result<(), DbError> {
        super::check_decision(d)?;
        let mut tx = self.write()?;
        lock_run(&mut tx, &d.run_id)?;
        tx.execute(
            &format!("INSERT INTO decisions ({DECISION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
            &[
                &d.run_id.as_str(),
                &d.node.as_str(),
                &d.accept,
                &d.reason,
                &d.epsilon,
                &d.delta,
                &int("at_ms", d.at_ms)?,
            ],
        )
        .map_err(err("insert a decision"))?;
        tx.commit().map_err(err("commit a decision"))
    }

    fn decisions(&mut self, run_id: &RunId) -> Result<Vec<DecisionRow>, DbError> {
        // "Latest" is the last recorded (seq), not the largest at_ms: a clock step back must not
        // resurrect an older answer.
        let sql = format!(
            "SELECT {DECISION_COLUMNS} FROM decisions d WHERE run_id = $1
             AND seq = (SELECT MAX(seq) FROM decisions e WHERE e.run_id = d.run_id AND e.node = d.node)
             ORDER BY node"
        );
        query_decisions(self.client()?, &sql, run_id)
    }

    fn decision_history(&mut self, run_id: &RunId) -> Result<Vec<DecisionRow>, DbError> {
        let sql = format!("SELECT {DECISION_COLUMNS} FROM decisions WHERE run_id = $1 ORDER BY seq");
        query_decisions(self.client()?, &sql, run_id)
    }

    fn record_receipt(&mut self, r: &ReceiptRow) -> Result<(), DbError> {
        let mut tx = self.write()?;
        lock_run(&mut tx, &r.run_id)?;
        let round = i64::from(r.round);
        let exists = tx
            .query_opt(
                "SELECT 1 FROM receipts WHERE run_id = $1 AND round = $2 AND node = $3",
                &[&r.run_id.as_str(), &round, &r.node.as_str()],
            )
            .map_err(err("read a receipt"))?;
        if exists.is_some() {
            return Err(DbError::ReceiptExists {
                run_id: r.run_id.to_string(),
                round: r.round,
                node: r.node.to_string(),
            });
        }
        tx.execute(
            &format!("INSERT INTO receipts ({RECEIPT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"),
            &[
                &r.run_id.as_str(),
                &round,
                &r.node.as_str(),
                &r.agrees,
                &r.reason,
                &r.signature,
                &int("at_ms", r.at_ms)?,
            ],
        )
        .map_err(err("insert a receipt"))?;
        tx.commit().map_err(err("commit a receipt"))
    }

    fn receipts(&mut self, run_id: &RunId) -> Result<Vec<ReceiptRow>, DbError> {
        let run_id = run_id.as_str();
        let rows = self
            .client()?
            .query(
                &format!("SELECT {RECEIPT_COLUMNS} FROM receipts WHERE run_id = $1 ORDER BY round, node"),
                &[&run_id],
            )
            .map_err(err("read receipts"))?;
        rows.iter()
            .map(|r| {
                let get = |e| DbError::Postgres { op: "read receipts", source: e };
                Ok(ReceiptRow {
                    run_id: super::id_of("receipts.run_id", r.try_get(0).map_err(get)?)?,
                    round: u32_of("receipts.round", r.try_get(1).map_err(get)?)?,
                    node: super::id_of("receipts.node", r.try_get(2).map_err(get)?)?,
                    agrees: r.try_get(3).map_err(get)?,
                    reason: r.try_get(4).map_err(get)?,
                    signature: r.try_get(5).map_err(get)?,
                    at_ms: u64_of("receipts.at_ms", r.try_get(6).map_err(get)?)?,
                })
            })
            .collect()
    }

    fn append_event(&mut self, run_id: &RunId, event: &[u8]) -> Result<u64, DbError> {
        let run_id = run_id.as_str();
        let mut tx = self.write()?;
        // The UPDATE locks the run's row, so two writers of one run number their events in turn.
        let row = tx
            .query_opt(
                "UPDATE runs SET last_event_seq = last_event_seq + 1 WHERE run_id = $1 RETURNING last_event_seq",
                &[&run_id],
            )
            .map_err(err("number an event"))?;
        let row = row.ok_or_else(|| DbError::UnknownRun { run_id: run_id.to_string() })?;
        let seq: i64 = first(&row, "number an event")?;
        tx.execute("INSERT INTO events (run_id, seq, event) VALUES ($1, $2, $3)", &[&run_id, &seq, &event])
            .map_err(err("insert an event"))?;
        tx.commit().map_err(err("commit an event"))?;
        u64_of("events.seq", seq)
    }

    fn events(&mut self, run_id: &RunId, after_seq: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, DbError> {
        let run_id = run_id.as_str();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = int("after_seq", after_seq)?;
        let rows = self
            .client()?
            .query(
                "SELECT seq, event FROM events WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&run_id, &after, &limit],
            )
            .map_err(err("read events"))?;
        rows.iter()
            .map(|r| {
                let get = |e| DbError::Postgres { op: "read events", source: e };
                Ok((u64_of("events.seq", r.try_get(0).map_err(get)?)?, r.try_get(1).map_err(get)?))
            })
            .collect()
    }

    fn upsert_node(&mut self, n: &NodeRow) -> Result<(), DbError> {
        let (first, last) = (int("first_seen_ms", n.first_seen_ms)?, int("last_seen_ms", n.last_seen_ms)?);
        self.client()?
            .execute(
                &format!(
                    "INSERT INTO nodes ({NODE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (name) DO UPDATE SET fingerprint = excluded.fingerprint,
                         version = excluded.version, device = excluded.device,
                         first_seen_ms = LEAST(nodes.first_seen_ms, excluded.first_seen_ms),
                         last_seen_ms = GREATEST(nodes.last_seen_ms, excluded.last_seen_ms)"
                ),
                &[&n.name.as_str(), &n.fingerprint, &n.version, &n.device, &first, &last],
            )
            .map_err(err("record a node"))?;
        Ok(())
    }

    fn nodes(&mut self) -> Result<Vec<NodeRow>, DbError> {
        let rows = self
            .client()?
            .query(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY name"), &[])
            .map_err(err("read nodes"))?;
        rows.iter()
            .map(|r| {
                let get = |e| DbError::Postgres { op: "read nodes", source: e };
                Ok(NodeRow {
                    name: super::id_of("nodes.name", r.try_get(0).map_err(get)?)?,
                    fingerprint: r.try_get(1).map_err(get)?,
                    version: r.try_get(2).map_err(get)?,
                    device: r.try_get(3).map_err(get)?,
                    first_seen_ms: u64_of("nodes.first_seen_ms", r.try_get(4).map_err(get)?)?,
                    last_seen_ms: u64_of("nodes.last_seen_ms", r.try_get(5).map_err(get)?)?,
                })
            })
            .collect()
    }
}
