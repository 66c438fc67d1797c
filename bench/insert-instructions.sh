#!/bin/bash
# What a single-row INSERT costs PostgreSQL in CPU instructions, into a plain table and into each
# variant of `events` (bench/table-variants.sh): counted by valgrind's callgrind in a backend of
# PostgreSQL's single-user mode, so the count repeats whatever else the machine is doing, where
# transactions/s on a shared machine move by a quarter from one run to the next (BENCHMARKS.md,
# "The hub's reads on a saturated primary"). One backend, no client and no network: the parser's,
# executor's and storage's own work for the statement, without contention.
#
# Usage: bench/insert-instructions.sh
# Needs valgrind and PostgreSQL's server binaries (PG_BIN, default the newest
# /usr/lib/postgresql/*/bin). Makes a throwaway cluster in a temporary directory; run as root, it
# runs PostgreSQL as the user postgres. Environment: INSERTS per variant (default 3000), each in
# a transaction of its own; VARIANTS (default all of bench/table-variants.sh).
set -euo pipefail

here=$(dirname "$0")
pg_bin=${PG_BIN:-$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin | sort -V | tail -n 1)}
inserts=${INSERTS:-3000}
command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 1; }

dir=$(mktemp -d)
as_postgres=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$dir"
    as_postgres=(runuser -u postgres --)
fi
trap '"${as_postgres[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
"${as_postgres[@]}" "$pg_bin/initdb" -D "$dir/data" -U postgres -A trust >/dev/null
"${as_postgres[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p 5499 -k $dir -c listen_addresses=''" start >/dev/null
db=postgres
psql_db() { PGOPTIONS='-c client_min_messages=warning' psql -qAtX -v ON_ERROR_STOP=1 -h "$dir" -p 5499 -U postgres -d "$db" "$@"; }
# shellcheck source=bench/table-variants.sh
. "$here/table-variants.sh"
variants=${VARIANTS:-$all_variants}
create_variants
"${as_postgres[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -w stop >/dev/null

# Instructions of a single-user backend that prepares the INSERT into $1 and runs it $2 times.
count() {
    local script=$dir/statements.sql
    {
        echo "PREPARE p AS INSERT INTO $1.events (type, subscriber, payload) VALUES ('order.created', 'c3', '{\"n\": 1}');"
        for _ in $(seq 1 "$2"); do echo "EXECUTE p;"; done
    } >"$script"
    chmod 644 "$script"
    "${as_postgres[@]}" valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
        "$pg_bin/postgres" --single -D "$dir/data" "$db" <"$script" >/dev/null 2>&1
    sed -n 's/^summary: //p' "$dir/callgrind.out"
}

# Start-up, the PREPARE and shutdown, taken off every variant's count.
base=$(count plain 0)
plain=
for variant in $variants; do
    per=$((($(count "$variant" "$inserts") - base) / inserts))
    [ "$variant" = plain ] && plain=$per
    printf '%-24s %7d instructions per insert' "$variant" "$per"
    [ -n "$plain" ] && printf '   %+6d over plain' $((per - plain))
    echo
done
