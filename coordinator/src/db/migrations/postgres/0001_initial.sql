-- Sanctum coordinator, schema version 1 (PostgreSQL). Times are milliseconds since the Unix
-- epoch. Keep in step with ../sqlite/0001_initial.sql: the two backends hold the same rows.

-- One row per submission of a plan. `seq` gives "oldest first"; `last_event_seq` hands out the
-- run's event numbers (1, 2, 3, ...) in the same statement that reserves one.
CREATE TABLE runs (
    seq            BIGSERIAL PRIMARY KEY,
    run_id         TEXT      NOT NULL UNIQUE,
    plan_id        TEXT      NOT NULL,
    number         BIGINT    NOT NULL CHECK (number >= 1),
    name           TEXT      NOT NULL,
    wire_toml      TEXT      NOT NULL,
    submitted_by   TEXT      NOT NULL,
    submitted_ms   BIGINT    NOT NULL,
    rounds_planned BIGINT    NOT NULL,
    status         TEXT      NOT NULL
        CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled', 'interrupted')),
    reason         TEXT      NOT NULL,
    final_model    TEXT,
    finished_ms    BIGINT,
    last_event_seq BIGINT    NOT NULL DEFAULT 0,
    UNIQUE (plan_id, number)
);

-- Closed rounds; a round is written once, with its checkpoint, in one transaction.
CREATE TABLE rounds (
    run_id       TEXT   NOT NULL REFERENCES runs (run_id),
    round        BIGINT NOT NULL,
    model_sha256 TEXT   NOT NULL,
    reported     TEXT   NOT NULL, -- JSON array of node names
    dropped      TEXT   NOT NULL, -- JSON array of node names
    record_line  TEXT   NOT NULL, -- the signed audit line
    closed_ms    BIGINT NOT NULL,
    PRIMARY KEY (run_id, round)
);

-- The engine's latest serialised state per run.
CREATE TABLE checkpoints (
    run_id           TEXT   PRIMARY KEY REFERENCES runs (run_id),
    rounds_completed BIGINT NOT NULL,
    state            BYTEA  NOT NULL,
    saved_ms         BIGINT NOT NULL
);

-- Every decision a node sent, in order; the latest per (run, node) is the one in force.
CREATE TABLE decisions (
    seq     BIGSERIAL PRIMARY KEY,
    run_id  TEXT      NOT NULL REFERENCES runs (run_id),
    node    TEXT      NOT NULL,
    accept  BOOLEAN   NOT NULL,
    reason  TEXT      NOT NULL,
    epsilon DOUBLE PRECISION,
    delta   DOUBLE PRECISION,
    at_ms   BIGINT    NOT NULL
);
CREATE INDEX decisions_by_run_node ON decisions (run_id, node, seq);

-- Countersigned round records: one per node and round.
CREATE TABLE receipts (
    run_id    TEXT    NOT NULL REFERENCES runs (run_id),
    round     BIGINT  NOT NULL,
    node      TEXT    NOT NULL,
    agrees    BOOLEAN NOT NULL,
    reason    TEXT    NOT NULL,
    signature BYTEA   NOT NULL,
    at_ms     BIGINT  NOT NULL,
    PRIMARY KEY (run_id, round, node)
);

-- A run's events for watchers (prost-encoded PlanEvent), numbered per run.
CREATE TABLE events (
    run_id TEXT   NOT NULL REFERENCES runs (run_id),
    seq    BIGINT NOT NULL CHECK (seq >= 1),
    event  BYTEA  NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- Nodes that ever connected.
CREATE TABLE nodes (
    name          TEXT   PRIMARY KEY,
    fingerprint   TEXT   NOT NULL,
    version       TEXT   NOT NULL,
    device        TEXT   NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL
);
