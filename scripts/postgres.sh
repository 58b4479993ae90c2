# Sourced by scripts/test: a throw-away PostgreSQL server for the coordinator store's PostgreSQL
# tests (coordinator/src/db). Installs Debian's postgresql when its binaries are missing, makes a
# fresh cluster in a temporary directory, serves it on a unix socket there only (no TCP port, so
# nothing else on the machine can reach it or clash with it), and exports
#
#   SANCTUM_TEST_POSTGRES   the connection string the tests read ("host=DIR port=PORT user=sanctum dbname=sanctum")
#
# sanctum_postgres_stop stops it and removes the directory (scripts/test calls it on exit).
# When the server cannot be had, it says why, loudly, and leaves SANCTUM_TEST_POSTGRES unset:
# each PostgreSQL test then prints "skipped: ..." instead of passing silently.

SANCTUM_PG_DIR=""
SANCTUM_PG_BIN=""
SANCTUM_PG_AS=()

sanctum_postgres_warn() {
    echo "warning: no PostgreSQL server for the store tests: $*; they will print 'skipped: SANCTUM_TEST_POSTGRES is not set'" >&2
}

# The newest Debian PostgreSQL bin directory (initdb and pg_ctl are not on PATH there), or a
# PATH that has them.
sanctum_postgres_find() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return 0
        fi
    done
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
        return 0
    fi
    return 1
}

sanctum_postgres_start() {
    if ! SANCTUM_PG_BIN=$(sanctum_postgres_find); then
        echo "==> installing postgresql (Debian) for the coordinator store's PostgreSQL tests"
        local sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
        if ! { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }; then
            sanctum_postgres_warn "apt-get install postgresql failed"
            return 0
        fi
        if ! SANCTUM_PG_BIN=$(sanctum_postgres_find); then
            sanctum_postgres_warn "postgresql is installed but no initdb/pg_ctl was found under /usr/lib/postgresql/*/bin"
            return 0
        fi
    fi
    # initdb refuses to run as root: as root, the cluster belongs to the postgres user that
    # Debian's package creates.
    SANCTUM_PG_AS=()
    if [ "$(id -u)" -eq 0 ]; then
        if ! id postgres >/dev/null 2>&1; then
            sanctum_postgres_warn "running as root and there is no 'postgres' user to own the cluster"
            return 0
        fi
        SANCTUM_PG_AS=(runuser -u postgres --)
    fi
    SANCTUM_PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/sanctum-pg.XXXXXX")
    [ "$(id -u)" -eq 0 ] && chown postgres: "$SANCTUM_PG_DIR"
    chmod 755 "$SANCTUM_PG_DIR"
    local port=54329 log="$SANCTUM_PG_DIR/server.log"
    if ! "${SANCTUM_PG_AS[@]}" "$SANCTUM_PG_BIN/initdb" -D "$SANCTUM_PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-sync >"$SANCTUM_PG_DIR/initdb.log" 2>&1; then
        sanctum_postgres_warn "initdb failed: $(tail -n 5 "$SANCTUM_PG_DIR/initdb.log")"
        sanctum_postgres_stop
        return 0
    fi
    # Unix socket in our directory only (listen_addresses empty); trust is safe there because only
    # this machine's users can reach the socket. fsync off: these tests check the store's
    # behaviour, not the server's durability, and the machine is shared.
    if ! "${SANCTUM_PG_AS[@]}" "$SANCTUM_PG_BIN/pg_ctl" -D "$SANCTUM_PG_DIR/data" -l "$log" -w -t 60 \
        -o "-c listen_addresses='' -k $SANCTUM_PG_DIR -p $port -c fsync=off" start >/dev/null; then
        sanctum_postgres_warn "the server did not start: $(tail -n 5 "$log" 2>/dev/null)"
        sanctum_postgres_stop
        return 0
    fi
    if ! "${SANCTUM_PG_AS[@]}" "$SANCTUM_PG_BIN/psql" -q -h "$SANCTUM_PG_DIR" -p "$port" -U postgres -d postgres \
        -c "CREATE ROLE sanctum LOGIN" -c "CREATE DATABASE sanctum OWNER sanctum" >/dev/null; then
        sanctum_postgres_warn "could not create the role and database 'sanctum'"
        sanctum_postgres_stop
        return 0
    fi
    export SANCTUM_TEST_POSTGRES="host=$SANCTUM_PG_DIR port=$port user=sanctum dbname=sanctum"
    echo "==> postgresql: $("$SANCTUM_PG_BIN/postgres" --version) at $SANCTUM_TEST_POSTGRES"
}

sanctum_postgres_stop() {
    if [ -n "$SANCTUM_PG_DIR" ] && [ -d "$SANCTUM_PG_DIR" ]; then
        if [ -f "$SANCTUM_PG_DIR/data/postmaster.pid" ]; then
            "${SANCTUM_PG_AS[@]}" "$SANCTUM_PG_BIN/pg_ctl" -D "$SANCTUM_PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
        fi
        rm -rf "$SANCTUM_PG_DIR"
    fi
    SANCTUM_PG_DIR=""
    unset SANCTUM_TEST_POSTGRES
}
