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
# default none), VARIANTS (default all of bench/table-variants.sh, which says what each is).
set -euo pipefail

db=${1:-table_cost}
pin=()
[ -n "${CPU:-}" ] && pin=(taskset -c "$CPU")
psql_db() { psql -qAtX -v ON_ERROR_STOP=1 -d "$db" "$@"; }
# shellcheck source=bench/table-variants.sh
. "$(dirname "$0")/table-variants.sh"
variants=${VARIANTS:-$all_variants}

psql -qAtX -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
psql_db -c "CREATE EXTENSION pg_stat_statements" >/dev/null

create_variants

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
