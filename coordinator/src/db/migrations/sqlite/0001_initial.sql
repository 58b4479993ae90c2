-- Sanctum coordinator, schema version 1 (SQLite). STRICT tables: a value of the wrong type is an
-- error, not silently stored. Times are milliseconds since the Unix epoch. Keep in step with
-- ../postgres/0001_initial.sql: the two backends hold the same rows.

-- One row per submission of a plan. `seq` gives "oldest first"; `last_event_seq` hands out the
-- run's event numbers (1, 2, 3, ...) in the same statement that reserves one.
CREATE TABLE runs (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id         TEXT    NOT NULL UNIQUE,
    plan_id        TEXT    NOT NULL,
    number         INTEGER NOT NULL CHECK (number >= 1),
    name           TEXT    NOT NULL,
    wire_toml      TEXT    NOT NULL,
    submitted_by   TEXT    NOT NULL,
    submitted_ms   INTEGER NOT NULL,
    rounds_planned INTEGER NOT NULL,
    status         TEXT    NOT NULL
        CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled', 'interrupted')),
    reason         TEXT    NOT NULL,
    final_model    TEXT,
    finished_ms    INTEGER,
    last_event_seq INTEGER NOT NULL DEFAULT 0,
    UNIQUE (plan_id, number)
) STRICT;

-- Closed rounds; a round is written once, with its checkpoint, in one transaction.
CREATE TABLE rounds (
    run_id       TEXT    NOT NULL REFERENCES runs (run_id),
    round        INTEGER NOT NULL,
    model_sha256 TEXT    NOT NULL,
    reported     TEXT    NOT NULL, -- JSON array of node names
    dropped      TEXT    NOT NULL, -- JSON array of node names
    record_line  TEXT    NOT NULL, -- the signed audit line
    closed_ms    INTEGER NOT NULL,
    PRIMARY KEY (run_id, round)
) STRICT;

-- The engine's latest serialised state per run.
CREATE TABLE checkpoints (
    run_id           TEXT    PRIMARY KEY REFERENCES runs (run_id),
    rounds_completed INTEGER NOT NULL,
    state            BLOB    NOT NULL,
    saved_ms         INTEGER NOT NULL
) STRICT;

-- Every decision a node sent, in order; the latest per (run, node) is the one in force.
CREATE TABLE decisions (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  TEXT    NOT NULL REFERENCES runs (run_id),
    node    TEXT    NOT NULL,
    accept  INTEGER NOT NULL CHECK (accept IN (0, 1)),
    reason  TEXT    NOT NULL,
    epsilon REAL,
    delta   REAL,
    at_ms   INTEGER NOT NULL
) STRICT;
CREATE INDEX decisions_by_run_node ON decisions (run_id, node, seq);

-- Countersigned round records: one per node and round.
CREATE TABLE receipts (
    run_id    TEXT    NOT NULL REFERENCES runs (run_id),
    round     INTEGER NOT NULL,
    node      TEXT    NOT NULL,
    agrees    INTEGER NOT NULL CHECK (agrees IN (0, 1)),
    reason    TEXT    NOT NULL,
    signature BLOB    NOT NULL,
    at_ms     INTEGER NOT NULL,
    PRIMARY KEY (run_id, round, node)
) STRICT;

-- A run's events for watchers (prost-encoded PlanEvent), numbered per run.
CREATE TABLE events (
    run_id TEXT    NOT NULL REFERENCES runs (run_id),
    seq    INTEGER NOT NULL CHECK (seq >= 1),
    event  BLOB    NOT NULL,
    PRIMARY KEY (run_id, seq)
) STRICT, WITHOUT ROWID;

-- Nodes that ever connected.
CREATE TABLE nodes (
    name          TEXT    PRIMARY KEY,
    fingerprint   TEXT    NOT NULL,
    version       TEXT    NOT NULL,
    device        TEXT    NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL
) STRICT;
