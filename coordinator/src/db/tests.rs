//! The store's conformance suite, written once over [`Harness`] and run against SQLite (in a
//! temporary directory) and PostgreSQL (a real server named by `SANCTUM_TEST_POSTGRES`, which
//! `scripts/test` starts; without it each PostgreSQL test says so on stderr and returns), plus
//! SQLite's crash test: a child process committing rounds is killed with SIGKILL at random points.

use std::path::Path;

use super::*;
use crate::test_ids as ids;

/// A backend under test: opens stores on one database and state directory, and changes the
/// database behind the store's back where a test needs it.
trait Harness {
    fn open(&self) -> Result<Box<dyn StateStore>, DbError>;
    fn state_dir(&self) -> &Path;
    /// Runs raw SQL on the database (both dialects accept what the tests send).
    fn exec(&self, sql: &str);
    /// The single integer a raw query returns.
    fn query_i64(&self, sql: &str) -> i64;
    fn backend(&self) -> &'static str;
}

struct Sqlite {
    dir: tempfile::TempDir,
}

impl Harness for Sqlite {
    fn open(&self) -> Result<Box<dyn StateStore>, DbError> {
        open(&StoreConfig::default(), self.dir.path())
    }
    fn state_dir(&self) -> &Path {
        self.dir.path()
    }
    fn exec(&self, sql: &str) {
        rusqlite::Connection::open(self.dir.path().join(SQLITE_FILE)).unwrap().execute_batch(sql).unwrap();
    }
    fn query_i64(&self, sql: &str) -> i64 {
        let c = rusqlite::Connection::open(self.dir.path().join(SQLITE_FILE)).unwrap();
        c.query_row(sql, [], |r| r.get(0)).unwrap()
    }
    fn backend(&self) -> &'static str {
        "sqlite"
    }
}

fn sqlite() -> Sqlite {
    Sqlite { dir: tempfile::tempdir().unwrap() }
}

/// A PostgreSQL schema of its own per test (tests run in parallel on one server), dropped after.
struct Postgres {
    config: ::postgres::Config,
    schema: String,
    dir: tempfile::TempDir,
}

impl Harness for Postgres {
    fn open(&self) -> Result<Box<dyn StateStore>, DbError> {
        Ok(Box::new(postgres::PgStore::open(self.config.clone(), self.dir.path())?))
    }
    fn state_dir(&self) -> &Path {
        self.dir.path()
    }
    fn exec(&self, sql: &str) {
        self.config.connect(::postgres::NoTls).unwrap().batch_execute(sql).unwrap();
    }
    fn query_i64(&self, sql: &str) -> i64 {
        self.config.connect(::postgres::NoTls).unwrap().query_one(sql, &[]).unwrap().get(0)
    }
    fn backend(&self) -> &'static str {
        "postgresql"
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Ok(mut c) = self.config.connect(::postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
    }
}

const PG_ENV: &str = "SANCTUM_TEST_POSTGRES";

/// The PostgreSQL harness, or `None` (said on stderr) when no server is named.
fn postgres() -> Option<Postgres> {
    let Ok(url) = std::env::var(PG_ENV) else {
        // Straight to the process's stderr: libtest captures eprintln! and shows it only on
        // failure, and a skip must never be silent.
        use std::io::Write;
        let line = format!("skipped: {PG_ENV} is not set (scripts/test starts a PostgreSQL server and sets it)\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
        return None;
    };
    let mut config: ::postgres::Config = url.parse().unwrap_or_else(|e| panic!("{PG_ENV}={url:?}: {e}"));
    let schema = format!("sanctum_test_{:016x}", rand::random::<u64>());
    config.connect(::postgres::NoTls).unwrap().batch_execute(&format!("CREATE SCHEMA {schema}")).unwrap();
    config.options(&format!("-c search_path={schema}"));
    Some(Postgres { config, schema, dir: tempfile::tempdir().unwrap() })
}

fn run_row(run_id: &str, plan_id: &str, number: u32) -> RunRow {
    RunRow {
        run_id: ids::run(run_id),
        plan_id: ids::plan(plan_id),
        number,
        name: "heart-fedavg".into(),
        wire_toml: "name = \"heart-fedavg\"\nrounds = 15\n".into(),
        submitted_by: "ab".repeat(32),
        submitted_ms: 1_780_000_000_000 + u64::from(number),
        rounds_planned: 15,
        status: RunStatus::Running,
        reason: String::new(),
        final_model: None,
        finished_ms: None,
    }
}

fn round_row(run_id: &str, round: u32) -> RoundRow {
    RoundRow {
        run_id: ids::run(run_id),
        round,
        model_sha256: format!("{round:064x}"),
        reported: ids::nodes(&["cleveland", "hungary"]),
        dropped: if round.is_multiple_of(2) { ids::nodes(&["va"]) } else { Vec::new() },
        record_line: format!("{{\"event\":\"round_closed\",\"round\":{round},\"sig\":\"…\"}}"),
        closed_ms: 1_780_000_100_000 + u64::from(round),
    }
}

fn checkpoint_of(run_id: &str, rounds: u32, size: usize) -> Checkpoint {
    let state = (0..size).map(|i| (i as u64).wrapping_mul(31).wrapping_add(u64::from(rounds) * 7) as u8).collect();
    Checkpoint {
        run_id: ids::run(run_id),
        rounds_completed: rounds,
        state,
        saved_ms: 1_780_000_200_000 + u64::from(rounds),
    }
}

fn every_row_type_round_trips(h: &dyn Harness) {
    let mut s = h.open().unwrap();
    let mut a = run_row("r-a", "plan-1", 1);
    let b = RunRow { final_model: Some("cd".repeat(32)), ..run_row("r-b", "plan-2", 1) };
    let c = run_row("r-c", "plan-1", 2);
    for r in [&a, &b, &c] {
        s.insert_run(r).unwrap();
    }
    assert_eq!(s.runs().unwrap(), vec![a.clone(), b.clone(), c.clone()], "oldest first");
    assert_eq!(s.run(&ids::run("r-b")).unwrap(), Some(b.clone()));
    assert_eq!(s.run(&ids::run("nope")).unwrap(), None);
    assert_eq!(s.runs_of_plan(&ids::plan("plan-1")).unwrap(), vec![a.clone(), c.clone()]);
    let dup = s.insert_run(&run_row("r-a", "plan-9", 1)).unwrap_err();
    assert!(matches!(dup, DbError::DuplicateRun { .. }) && dup.to_string().contains("never given out twice"), "{dup}");
    assert!(matches!(s.insert_run(&run_row("r-d", "plan-1", 2)), Err(DbError::DuplicateRunNumber { .. })));

    s.finish_run(&ids::run("r-a"), RunStatus::Succeeded, "15 rounds", Some(&"ef".repeat(32)), 1_780_000_900_000)
        .unwrap();
    (a.status, a.reason, a.final_model, a.finished_ms) =
        (RunStatus::Succeeded, "15 rounds".into(), Some("ef".repeat(32)), Some(1_780_000_900_000));
    assert_eq!(s.run(&ids::run("r-a")).unwrap(), Some(a.clone()));
    assert!(matches!(
        s.finish_run(&ids::run("r-a"), RunStatus::Cancelled, "", None, 1),
        Err(DbError::AlreadyFinished { .. })
    ));
    assert!(matches!(s.finish_run(&ids::run("r-c"), RunStatus::Running, "", None, 1), Err(DbError::NotFinal { .. })));
    assert!(matches!(s.finish_run(&ids::run("zz"), RunStatus::Failed, "", None, 1), Err(DbError::UnknownRun { .. })));

    for round in 1..=3 {
        s.commit_round(&round_row("r-c", round), &checkpoint_of("r-c", round, 100)).unwrap();
    }
    assert_eq!(s.rounds(&ids::run("r-c")).unwrap(), (1..=3).map(|r| round_row("r-c", r)).collect::<Vec<_>>());
    assert_eq!(s.checkpoint(&ids::run("r-c")).unwrap(), Some(checkpoint_of("r-c", 3, 100)));
    assert_eq!(s.checkpoint(&ids::run("r-b")).unwrap(), None);
    s.save_checkpoint(&checkpoint_of("r-b", 0, 7)).unwrap();
    assert_eq!(s.checkpoint(&ids::run("r-b")).unwrap(), Some(checkpoint_of("r-b", 0, 7)));
    assert!(matches!(
        s.commit_round(&round_row("r-a", 1), &checkpoint_of("r-a", 1, 1)),
        Err(DbError::AlreadyFinished { .. })
    ));
    assert!(matches!(s.commit_round(&round_row("zz", 1), &checkpoint_of("zz", 1, 1)), Err(DbError::UnknownRun { .. })));
    assert!(matches!(s.commit_round(&round_row("r-c", 4), &checkpoint_of("r-b", 4, 1)), Err(DbError::Mismatch { .. })));
    assert!(matches!(s.save_checkpoint(&checkpoint_of("zz", 0, 1)), Err(DbError::UnknownRun { .. })));

    let receipt = |round, node: &str| ReceiptRow {
        run_id: ids::run("r-c"),
        round,
        node: ids::node(node),
        agrees: node != "va",
        reason: if node == "va" { "model hash differs".into() } else { String::new() },
        signature: vec![round as u8, 0, 255, 7],
        at_ms: 1_780_000_300_000,
    };
    for (round, node) in [(2, "hungary"), (1, "va"), (1, "cleveland")] {
        s.record_receipt(&receipt(round, node)).unwrap();
    }
    assert_eq!(
        s.receipts(&ids::run("r-c")).unwrap(),
        vec![receipt(1, "cleveland"), receipt(1, "va"), receipt(2, "hungary")]
    );
    let again = ReceiptRow { agrees: false, ..receipt(1, "cleveland") };
    assert!(matches!(s.record_receipt(&again), Err(DbError::ReceiptExists { .. })));
    assert_eq!(s.receipts(&ids::run("r-c")).unwrap()[0], receipt(1, "cleveland"), "the first receipt is kept");
    assert!(matches!(
        s.record_receipt(&ReceiptRow { run_id: ids::run("zz"), ..receipt(1, "va") }),
        Err(DbError::UnknownRun { .. })
    ));

    let node = |name: &str, first, last, version: &str| NodeRow {
        name: ids::node(name),
        fingerprint: format!("fp-{version}"),
        version: version.into(),
        device: "cuda:0".into(),
        first_seen_ms: first,
        last_seen_ms: last,
    };
    s.upsert_node(&node("va", 10, 20, "0.1.0")).unwrap();
    s.upsert_node(&node("cleveland", 5, 6, "0.1.0")).unwrap();
    s.upsert_node(&node("va", 30, 40, "0.2.0")).unwrap();
    assert_eq!(s.nodes().unwrap(), vec![node("cleveland", 5, 6, "0.1.0"), node("va", 10, 40, "0.2.0")]);
    // A clock that stepped back moves neither end of what was seen.
    s.upsert_node(&node("va", 1, 2, "0.2.1")).unwrap();
    assert_eq!(s.nodes().unwrap()[1], node("va", 1, 40, "0.2.1"));
    drop(s);
    let mut s = h.open().unwrap();
    assert_eq!(s.runs().unwrap().len(), 3, "{}: everything is there after a reopen", h.backend());
    assert_eq!(s.rounds(&ids::run("r-c")).unwrap().len(), 3);
}

fn a_repeated_round_is_refused_and_changes_nothing(h: &dyn Harness) {
    let mut s = h.open().unwrap();
    s.insert_run(&run_row("r", "p", 1)).unwrap();
    s.commit_round(&round_row("r", 1), &checkpoint_of("r", 1, 64)).unwrap();
    s.commit_round(&round_row("r", 2), &checkpoint_of("r", 2, 64)).unwrap();
    let other = RoundRow { model_sha256: "ff".repeat(32), ..round_row("r", 2) };
    let e = s.commit_round(&other, &checkpoint_of("r", 3, 9)).unwrap_err();
    assert!(matches!(e, DbError::RoundExists { round: 2, .. }), "{e}");
    let want = format!("round 2 of run {} is already committed; nothing was changed", ids::run("r"));
    assert!(e.to_string().contains(&want), "{e}");
    assert_eq!(s.rounds(&ids::run("r")).unwrap(), vec![round_row("r", 1), round_row("r", 2)]);
    assert_eq!(
        s.checkpoint(&ids::run("r")).unwrap(),
        Some(checkpoint_of("r", 2, 64)),
        "the checkpoint is not replaced either"
    );
}

fn events_are_numbered_per_run_and_paged(h: &dyn Harness) {
    let mut s = h.open().unwrap();
    s.insert_run(&run_row("a", "p", 1)).unwrap();
    s.insert_run(&run_row("b", "p", 2)).unwrap();
    for i in 1..=25u64 {
        assert_eq!(s.append_event(&ids::run("a"), &[i as u8; 3]).unwrap(), i);
        if i.is_multiple_of(5) {
            assert_eq!(s.append_event(&ids::run("b"), &[0xb0, i as u8]).unwrap(), i / 5, "each run counts its own");
        }
    }
    let want = |from: u64, to: u64| (from..=to).map(|i| (i, vec![i as u8; 3])).collect::<Vec<_>>();
    assert_eq!(s.events(&ids::run("a"), 0, 10).unwrap(), want(1, 10));
    assert_eq!(s.events(&ids::run("a"), 10, 10).unwrap(), want(11, 20));
    assert_eq!(s.events(&ids::run("a"), 20, 10).unwrap(), want(21, 25));
    assert_eq!(s.events(&ids::run("a"), 25, 10).unwrap(), vec![]);
    assert_eq!(s.events(&ids::run("a"), 0, 0).unwrap(), vec![]);
    assert_eq!(s.events(&ids::run("b"), 0, 100).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(s.events(&ids::run("nope"), 0, 100).unwrap(), vec![]);
    assert!(matches!(s.append_event(&ids::run("nope"), b"x"), Err(DbError::UnknownRun { .. })));
    drop(s);
    let mut s = h.open().unwrap();
    assert_eq!(s.append_event(&ids::run("a"), b"after a restart").unwrap(), 26, "numbering goes on across a reopen");
}

fn the_latest_decision_wins_and_history_is_kept(h: &dyn Harness) {
    let mut s = h.open().unwrap();
    s.insert_run(&run_row("r", "p", 1)).unwrap();
    s.insert_run(&run_row("other", "p", 2)).unwrap();
    let d = |node: &str, accept, at_ms, epsilon| DecisionRow {
        run_id: ids::run("r"),
        node: ids::node(node),
        accept,
        reason: if accept { String::new() } else { "budget exhausted".into() },
        epsilon,
        delta: epsilon.map(|_| 1e-6),
        at_ms,
    };
    let history = [
        d("va", true, 100, Some(1.5)),
        d("cleveland", false, 110, None),
        // A later answer with an earlier clock: recorded order decides, not at_ms.
        d("va", false, 90, None),
        d("cleveland", true, 120, Some(0.25)),
    ];
    for x in &history {
        s.record_decision(x).unwrap();
    }
    s.record_decision(&DecisionRow { run_id: ids::run("other"), ..d("va", true, 1, Some(3.0)) }).unwrap();
    assert_eq!(s.decisions(&ids::run("r")).unwrap(), vec![history[3].clone(), history[2].clone()]);
    assert_eq!(s.decision_history(&ids::run("r")).unwrap(), history.to_vec());
    for bad in [f64::NAN, f64::INFINITY, -1.0] {
        let e = s.record_decision(&d("va", true, 1, Some(bad))).unwrap_err();
        assert!(matches!(e, DbError::Invalid { field: "decision epsilon", .. }), "{e}");
    }
    assert!(matches!(
        s.record_decision(&DecisionRow { run_id: ids::run("zz"), ..d("va", true, 1, None) }),
        Err(DbError::UnknownRun { .. })
    ));
    assert_eq!(s.decision_history(&ids::run("r")).unwrap().len(), 4, "refused decisions leave no row");
}

fn a_fresh_database_is_migrated_and_reopening_changes_nothing(h: &dyn Harness) {
    let mut s = h.open().unwrap();
    s.insert_run(&run_row("r", "p", 1)).unwrap();
    drop(s);
    for _ in 0..3 {
        let mut s = h.open().unwrap();
        assert_eq!(s.runs().unwrap(), vec![run_row("r", "p", 1)]);
    }
    // Version 1 recorded once: a reopen applied nothing again (a reapplied migration would also
    // fail, CREATE TABLE runs exists).
    let q = "SELECT COUNT(*) * 1000 + MAX(version) FROM schema_migrations";
    assert_eq!(h.query_i64(q), 1001, "{}: schema_migrations holds version 1 once", h.backend());
}

fn a_database_newer_than_the_binary_is_refused_naming_both_versions(h: &dyn Harness) {
    drop(h.open().unwrap());
    h.exec("INSERT INTO schema_migrations (version, name, applied_ms) VALUES (7, 'from the future', 0)");
    let e = h.open().err().expect("a newer database must be refused").to_string();
    assert!(
        e.contains("schema version 7") && e.contains("knows versions up to 1") && e.contains("run that release"),
        "{e}"
    );
    assert!(e.contains(h.backend()), "{e}");
}

fn runs_json_is_imported_once_as_interrupted_runs(h: &dyn Harness) {
    let mut registry = crate::runs::RunRegistry::default();
    registry.admit(&ids::plan("plan-b"), "b", false, ids::run("run-b1")).unwrap();
    registry.admit(&ids::plan("plan-a"), "a", false, ids::run("run-a1")).unwrap();
    registry.admit(&ids::plan("plan-a"), "a", true, ids::run("run-a2")).unwrap();
    crate::runs::RunFile::new(h.state_dir()).save(&registry).unwrap();
    let mut s = h.open().unwrap();
    let runs = s.runs().unwrap();
    let got: std::collections::BTreeSet<_> =
        runs.iter().map(|r| (r.plan_id.clone(), r.run_id.clone(), r.number)).collect();
    let want = [("plan-a", "run-a1", 1), ("plan-a", "run-a2", 2), ("plan-b", "run-b1", 1)]
        .map(|(p, r, n)| (ids::plan(p), ids::run(r), n))
        .into_iter()
        .collect();
    assert_eq!(got, want);
    assert!(runs.iter().all(|r| r.status == RunStatus::Interrupted && r.reason == "imported from runs.json"));
    assert!(!h.state_dir().join("runs.json").exists());
    assert!(h.state_dir().join("runs.json.imported").exists());
    assert_eq!(
        crate::runs::RunRegistry::from_rows(&runs),
        registry,
        "the registry rebuilt from the store is the old one"
    );
    // Ids given out before the upgrade stay taken.
    assert!(matches!(s.insert_run(&run_row("run-a1", "plan-c", 1)), Err(DbError::DuplicateRun { .. })));
    s.insert_run(&run_row("run-a3", "plan-a", 3)).unwrap();
    drop(s);

    // A crash between the import's commit and the rename: the next open only renames.
    std::fs::rename(h.state_dir().join("runs.json.imported"), h.state_dir().join("runs.json")).unwrap();
    let mut s = h.open().unwrap();
    assert_eq!(s.runs().unwrap().len(), 4);
    assert!(!h.state_dir().join("runs.json").exists());
    drop(s);

    // A runs.json with runs the database lacks (an old binary ran after the upgrade) is refused.
    registry.admit(&ids::plan("plan-z"), "z", false, ids::run("run-z1")).unwrap();
    crate::runs::RunFile::new(h.state_dir()).save(&registry).unwrap();
    let e = h.open().err().expect("a diverged runs.json must be refused").to_string();
    let want = format!("holds 1 run(s) that the database does not (e.g. {})", ids::run("run-z1"));
    assert!(e.contains(&want) && e.contains("move it away"), "{e}");
    assert!(h.state_dir().join("runs.json").exists(), "a refused file is left where it is");

    // A corrupt runs.json stops the open and names the next step.
    std::fs::write(h.state_dir().join("runs.json"), "{not json").unwrap();
    let e = h.open().err().expect("a corrupt runs.json must be refused").to_string();
    assert!(e.contains("cannot import the old run registry") && e.contains("restore it from backup"), "{e}");

    // So does one whose ids are not of their form (reading it back checks them).
    std::fs::write(h.state_dir().join("runs.json"), r#"{"plans":{"../../etc":["00000000000000000000000000000001"]}}"#)
        .unwrap();
    let e = h.open().err().expect("a runs.json with a malformed plan id must be refused").to_string();
    assert!(e.contains("cannot import the old run registry") && e.contains("plan id has a path character"), "{e}");
}

/// Each conformance function becomes one test per backend: `db::tests::sqlite::NAME` and
/// `db::tests::postgresql::NAME`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(#[test] fn $name() { super::$name(&super::sqlite()) })*
        }
        mod postgresql_backend {
            $(#[test] fn $name() { if let Some(h) = super::postgres() { super::$name(&h) } })*
        }
    };
}

conformance!(
    every_row_type_round_trips,
    a_repeated_round_is_refused_and_changes_nothing,
    events_are_numbered_per_run_and_paged,
    the_latest_decision_wins_and_history_is_kept,
    a_fresh_database_is_migrated_and_reopening_changes_nothing,
    a_database_newer_than_the_binary_is_refused_naming_both_versions,
    runs_json_is_imported_once_as_interrupted_runs,
);

#[test]
fn both_backends_know_the_same_schema_versions() {
    let versions = |m: &[Migration]| m.iter().map(|m| (m.version, m.name)).collect::<Vec<_>>();
    assert_eq!(versions(sqlite::MIGRATIONS), versions(postgres::MIGRATIONS));
    let v = versions(sqlite::MIGRATIONS);
    assert!(v.iter().enumerate().all(|(i, (version, _))| *version as usize == i + 1), "numbered 1, 2, 3, …: {v:?}");
}

#[test]
fn sqlite_runs_in_wal_with_full_sync_and_foreign_keys() {
    let dir = tempfile::tempdir().unwrap();
    let s = sqlite::SqliteStore::open(dir.path()).unwrap();
    assert_eq!(s.pragmas(), ("wal".to_string(), 2, 1));
}

#[test]
fn a_postgres_password_comes_from_its_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pg.pass");
    std::fs::write(&file, "s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = StoreConfig {
        backend: StoreBackend::Postgres,
        url: Some("host=/run/postgresql user=sanctum dbname=sanctum".into()),
        password_file: Some(file.clone()),
    };
    let config = postgres::connect_config(&cfg).unwrap();
    assert_eq!(config.get_password(), Some(&b"s3cret"[..]));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = postgres::connect_config(&cfg).unwrap_err().to_string();
    assert!(e.contains("readable by every user") && e.contains("chmod o-r"), "{e}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&file, "\n").unwrap();
    assert!(postgres::connect_config(&cfg).unwrap_err().to_string().contains("is empty"));
    let inline = StoreConfig { url: Some("host=/tmp user=sanctum password=x".into()), ..cfg };
    let e = open(&inline, dir.path()).err().expect("an inline password must be refused").to_string();
    assert!(e.contains("store.url must not hold a password"), "{e}");
}

/// The child of the crash test: commits rounds (and an event after each) as fast as it can
/// until it is killed. Runs only when the parent names the state directory.
#[test]
#[ignore = "the child process of sqlite_survives_sigkill_with_whole_rounds_only"]
fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else { return };
    let mut s = open(&StoreConfig::default(), Path::new(&dir)).unwrap();
    if s.run(&ids::run(CRASH_RUN)).unwrap().is_none() {
        s.insert_run(&run_row(CRASH_RUN, "p", 1)).unwrap();
    }
    let mut k = s.checkpoint(&ids::run(CRASH_RUN)).unwrap().map_or(0, |c| c.rounds_completed);
    // Bounded, so a parent that fails to kill it does not leave it running for ever.
    for _ in 0..20_000 {
        k += 1;
        s.commit_round(&round_row(CRASH_RUN, k), &checkpoint_of(CRASH_RUN, k, CRASH_STATE_BYTES)).unwrap();
        s.append_event(&ids::run(CRASH_RUN), &k.to_le_bytes()).unwrap();
    }
}

const CRASH_DIR_ENV: &str = "SANCTUM_DB_CRASH_CHILD_DIR";
const CRASH_RUN: &str = "crash-run";
/// Large enough that a commit spans several pages and takes a while, so kills land inside one.
const CRASH_STATE_BYTES: usize = 256 * 1024;

/// What the store must show after any kill: rounds 1..=k whole, the checkpoint of round k, and
/// events numbered without gaps whose last names round k or k-1 (killed between the two commits).
fn check_prefix(dir: &Path) -> u32 {
    let mut s = open(&StoreConfig::default(), dir).unwrap();
    let Some(checkpoint) = s.checkpoint(&ids::run(CRASH_RUN)).unwrap() else {
        assert!(s.rounds(&ids::run(CRASH_RUN)).unwrap().is_empty());
        return 0;
    };
    let k = checkpoint.rounds_completed;
    assert_eq!(checkpoint, checkpoint_of(CRASH_RUN, k, CRASH_STATE_BYTES), "the checkpoint is whole");
    assert_eq!(s.rounds(&ids::run(CRASH_RUN)).unwrap(), (1..=k).map(|r| round_row(CRASH_RUN, r)).collect::<Vec<_>>());
    let events = s.events(&ids::run(CRASH_RUN), 0, usize::MAX).unwrap();
    assert!(events.iter().enumerate().all(|(i, (seq, _))| *seq == i as u64 + 1), "event numbers have no gap");
    if let Some((_, last)) = events.last() {
        let last = u32::from_le_bytes(last.as_slice().try_into().unwrap());
        assert!(last == k || last + 1 == k, "last event names round {last}, rounds committed {k}");
    }
    k
}

#[test]
fn sqlite_survives_sigkill_with_whole_rounds_only() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let (mut committed, kills) = (0u32, 12);
    for kill in 0..kills {
        let mut child = std::process::Command::new(&exe)
            .args(["db::tests::crash_child", "--exact", "--ignored", "--test-threads=1", "--nocapture"])
            .env(CRASH_DIR_ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait for this child to commit at least one round, then kill it at a random moment.
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the crash child exited on its own ({status}) after round {committed}");
            }
            let now = rusqlite::Connection::open_with_flags(
                dir.path().join(SQLITE_FILE),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .and_then(|c| c.query_row("SELECT COALESCE(MAX(round), 0) FROM rounds", [], |r| r.get::<_, u32>(0)))
            .unwrap_or(0);
            if now > committed {
                break;
            }
            assert!(start.elapsed().as_secs() < 120, "the crash child made no progress in 120 s");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(rand::random_range(0..40)));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let k = check_prefix(dir.path());
        assert!(k > committed, "kill {kill}: the rounds the child committed are kept ({k} after {committed})");
        committed = k;
    }
    println!("sqlite crash test: {kills} SIGKILLs, {committed} whole rounds, no torn round");
}
