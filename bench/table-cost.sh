#!/bin/bash
# What a single-row INSERT into `events` costs PostgreSQL, against a plain table and against
# variants of `events` with one part taken away (BENCHMARKS.md, "The hub's reads on a saturated
# primary"). No service runs: this is the table's own cost, as a producer pays it.
#
# Each variant lives in its own schema of one scratch database; the `events` ones are made by
# postgresql/schema.sql itself. Rounds interleave the variants, and every run starts from empty
# tables after a CHECKPOINT, so no variant inherits another's bloat or dirty pages. One client by
# default (no contention; CLIENTS sets more): a run reports pgbench's transactions/s and the
# INSERT's mean execution time from pg_stat_statements, which the server must load
# (shared_preload_libraries).
#
# Usage: PGHOST=... PGPORT=... PGUSER=... bench/table-cost.sh [scratch database, default table_cost]
# Environment: ROUNDS (default 6), INSERTS per client and run (default 40000), CLIENTS (concurrent
# pgbench connections, default 1: 64 shows what contention adds), CPU to pin pgbench to (taskset;
# default none), VARIANTS (default all, below).
set -euo pipefail

db=${1:-table_cost}
schema_sql=$(dirname "$0")/../postgresql/schema.sql
before_sql=$(dirname "$0")/../tests/fixtures/schema-with-topic-indexes.sql
variants=${VARIANTS:-plain plain_lock events events_before events_no_bell events_no_topic_indexes}
pin=()
[ -n "${CPU:-}" ] && pin=(taskset -c "$CPU")
psql_db() { psql -qAtX -v ON_ERROR_STOP=1 -d "$db" "$@"; }

psql -qAtX -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
psql_db -c "CREATE EXTENSION pg_stat_statements" >/dev/null

# plain: the columns and indexes an application's own table would have (bench/plain-table.sql,
# the bench's peer everywhere), as plain.events. plain_lock: the same, plus the doorbell's per-row
# shared advisory lock in a column default, on another key.
psql_db -c "CREATE SCHEMA plain" >/dev/null
psql_db -c "SET search_path = plain" -f "$(dirname "$0")/plain-table.sql" \
        -c "ALTER TABLE plain.plain_events RENAME TO events" >/dev/null
psql_db >/dev/null <<'SQL'
CREATE SCHEMA plain_lock;
CREATE TABLE plain_lock.events (LIKE plain.events INCLUDING ALL);
CREATE SEQUENCE plain_lock.events_id_seq OWNED BY plain_lock.events.id;
ALTER TABLE plain_lock.events ALTER COLUMN id SET DEFAULT nextval('plain_lock.events_id_seq');
ALTER TABLE plain_lock.events ADD COLUMN bell boolean DEFAULT
    (CASE WHEN pg_try_advisory_xact_lock_shared(42) THEN NULL::boolean ELSE NULL::boolean END);
SQL

# events: event-piper's schema as it is. events_before: the schema before alternates and publishers'
# ids moved out of `events` (three topic indexes; the test fixture, verbatim). events_no_bell:
# without the doorbell's column default. events_no_topic_indexes: without the topic index.
for schema in events events_no_bell events_no_topic_indexes; do
    psql_db -c "CREATE SCHEMA $schema" >/dev/null
    psql_db -c "SET search_path = $schema" -f "$schema_sql" >/dev/null
done
psql_db -c "CREATE SCHEMA events_before" >/dev/null
psql_db -c "SET search_path = events_before" -f "$before_sql" >/dev/null
psql_db -c "ALTER TABLE events_no_bell.events ALTER COLUMN event_piper_bell DROP DEFAULT" \
        -c "DROP INDEX events_no_topic_indexes.events_topic_id_idx" >/dev/null

script=$(mktemp)
trap 'rm -f "$script"' EXIT
for round in $(seq 1 "${ROUNDS:-6}"); do
    for variant in $variants; do
        echo "INSERT INTO $variant.events (type, subscriber, payload)
              VALUES ('order.created', 'c' || (random() * 7)::int, '{\"n\": 1}');" >"$script"
        psql_db -c "TRUNCATE $(printf '%s.events,' $variants | sed 's/,$//')" \
                -c "CHECKPOINT" -c "SELECT pg_stat_statements_reset()" >/dev/null
        tps=$("${pin[@]}" pgbench -n -M prepared -c "${CLIENTS:-1}" -t "${INSERTS:-40000}" -f "$script" "$db" \
              2>/dev/null | sed -n 's/^tps = \([0-9]*\).*/\1/p')
        exec_us=$(psql_db -c "SELECT round(mean_exec_time::numeric * 1000, 2)
                              FROM pg_stat_statements WHERE query LIKE 'INSERT INTO $variant.%'")
        echo "round $round  $variant  tps $tps  exec_us $exec_us"
    done
done
