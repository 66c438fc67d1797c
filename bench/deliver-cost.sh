#!/bin/bash
# What delivering costs producers on a saturated primary (issue 19), with pgbench as the producers:
# single-row INSERTs from CLIENTS connections, pgbench and PostgreSQL on CPU 0, by turns into
#   plain     a plain table (bigserial id, the columns and indexes of `events`),
#   stopped   `events` with no service running,
#   streamed  `events` with the release service on CPU 1 streaming every event to 8 consumers
#             (curl, on CPU 1 too).
# pgbench's own rate is steadier than the bench's `producers` scenario at 8 clients, so the three
# can be told apart there (BENCHMARKS.md, "The hub's reads on a saturated primary"). A streamed run
# also reports the CPU time the service's own database backends used during it, as a share of the
# run: what its reads took from the producers' core, whatever the noise in their rate.
#
# Usage: PGHOST=... PGPORT=... PGUSER=... bench/deliver-cost.sh [scratch database, default deliver_cost]
# The PostgreSQL server must already be pinned to CPU 0 (taskset -pc 0 on the postmaster and its
# children). Environment: CLIENTS (default "8 64"), ROUNDS (default 3), SECS per run (default 10),
# PHASES (default "plain stopped streamed"), SERVICE (the binary, default the release build),
# SERVICE_ARGS (extra flags for it), PORT the service listens on (default 4011), SCHEMA (the
# schema file, default postgresql/schema.sql; an older build needs its own), TOPICS=1 to address
# the events of `events` to one of 8 topics instead of 8 consumers, read by 8 topic streams.
set -euo pipefail

db=${1:-deliver_cost}
here=$(dirname "$0")
service=${SERVICE:-$here/../target/release/event-piper}
port=${PORT:-4011}
[ -x "$service" ] || { echo "build it first: cargo build --release" >&2; exit 1; }
psql -qAtX -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
psql -qAtX -v ON_ERROR_STOP=1 -d "$db" -f "${SCHEMA:-$here/../postgresql/schema.sql}" >/dev/null 2>&1
psql -qAtX -v ON_ERROR_STOP=1 -d "$db" -f "$here/plain-table.sql" >/dev/null
# libpq's environment, as a URL the service takes (a socket directory goes in as the host).
url="postgres://${PGUSER:-postgres}@$(printf %s "${PGHOST:-localhost}" | sed 's|/|%2F|g'):${PGPORT:-5432}/$db"

scripts=$(mktemp -d)
trap 'rm -rf "$scripts"; kill $(jobs -p) 2>/dev/null || true' EXIT
# CPU ticks (user + system, from /proc) of each of the service's backends: "pid ticks" lines.
service_ticks() {
    local pid
    for pid in $(psql -qAtX -d "$db" -c \
        "SELECT pid FROM pg_stat_activity WHERE datname = '$db' AND application_name LIKE 'event-piper%'"); do
        [ -r "/proc/$pid/stat" ] && echo "$pid $(awk '{print $14 + $15}' "/proc/$pid/stat")"
    done
}
echo "INSERT INTO plain_events (type, subscriber, payload)
      VALUES ('order.created', 'c' || (random() * 7)::int, '{\"n\": 1}');" >"$scripts/plain_events.sql"
if [ -n "${TOPICS:-}" ]; then
    echo "INSERT INTO events (type, topics, payload)
          VALUES ('order.created', ARRAY['/t/' || (random() * 7)::int], '{\"n\": 1}');"
else
    echo "INSERT INTO events (type, subscriber, payload)
          VALUES ('order.created', 'c' || (random() * 7)::int, '{\"n\": 1}');"
fi >"$scripts/events.sql"

for clients in ${CLIENTS:-8 64}; do
    for round in $(seq 1 "${ROUNDS:-3}"); do
        for phase in ${PHASES:-plain stopped streamed}; do
            table=events
            [ "$phase" = plain ] && table=plain_events
            psql -qAtX -d "$db" -c "VACUUM plain_events" -c "VACUUM events" -c "CHECKPOINT" >/dev/null
            if [ "$phase" = streamed ]; then
                # shellcheck disable=SC2086 # SERVICE_ARGS is a list of flags
                taskset -c 1 "$service" --database-url "$url" --listen "127.0.0.1:$port" \
                    ${SERVICE_ARGS:-} >"$scripts/service.log" 2>&1 &
                svc=$!
                for _ in $(seq 1 120); do curl -sf "127.0.0.1:$port/ready" >/dev/null && break; sleep 0.5; done
                consumers=()
                for consumer in 0 1 2 3 4 5 6 7; do
                    if [ -n "${TOPICS:-}" ]; then
                        taskset -c 1 curl -sN "127.0.0.1:$port/events?topic=/t/$consumer" >/dev/null &
                    else
                        taskset -c 1 curl -sN "127.0.0.1:$port/events" -H "X-Consumer-Id: c$consumer" >/dev/null &
                    fi
                    consumers+=($!)
                done
                sleep 1
            fi
            [ "$phase" = streamed ] && service_ticks >"$scripts/ticks.before"
            tps=$(taskset -c 0 pgbench -n -M prepared -c "$clients" -j 1 -T "${SECS:-10}" \
                  -f "$scripts/$table.sql" "$db" 2>/dev/null | sed -n 's/^tps = \([0-9]*\).*/\1/p')
            share=
            if [ "$phase" = streamed ]; then
                # A backend the service opened during the run counts from zero.
                share=$(service_ticks | awk -v secs="${SECS:-10}" -v hz="$(getconf CLK_TCK)" '
                    NR == FNR { before[$1] = $2; next }
                    { used += $2 - before[$1] }
                    END { printf "  service %.1f %% of the core", 100 * used / (secs * hz) }
                ' "$scripts/ticks.before" -)
                kill "${consumers[@]}" 2>/dev/null || true
                kill -INT "$svc"
                wait "$svc" || true
            fi
            echo "clients $clients  round $round  $phase  tps $tps$share"
        done
    done
done
