# The tables bench/table-cost.sh and bench/insert-instructions.sh compare, each as `events` in a
# schema of its own, so that one INSERT text fits all of them. Sourced; the caller defines
# psql_db, which runs psql on its scratch database.
#
#   plain                    the columns and indexes an application's own table would have
#                            (bench/plain-table.sql, the bench's peer everywhere)
#   plain_lock               the same, plus the doorbell's per-row shared advisory lock in a
#                            column default, on another key
#   events                   event-piper's schema as it is (postgresql/schema.sql)
#   events_topic_index       the version before, with one partial index by first topic (the
#                            test fixture, verbatim)
#   events_before            two versions before, with three topic indexes (the test fixture,
#                            verbatim)
#   events_no_bell           `events` without the doorbell's column default: what its columns
#                            alone cost
here_variants=$(dirname "${BASH_SOURCE[0]}")
all_variants="plain plain_lock events events_topic_index events_before events_no_bell"

create_variants() {
    psql_db -c "CREATE SCHEMA plain" >/dev/null
    psql_db -c "SET search_path = plain" -f "$here_variants/plain-table.sql" \
            -c "ALTER TABLE plain.plain_events RENAME TO events" >/dev/null
    psql_db >/dev/null <<'SQL'
CREATE SCHEMA plain_lock;
CREATE TABLE plain_lock.events (LIKE plain.events INCLUDING ALL);
CREATE SEQUENCE plain_lock.events_id_seq OWNED BY plain_lock.events.id;
ALTER TABLE plain_lock.events ALTER COLUMN id SET DEFAULT nextval('plain_lock.events_id_seq');
ALTER TABLE plain_lock.events ADD COLUMN bell boolean DEFAULT
    (CASE WHEN pg_try_advisory_xact_lock_shared(42) THEN NULL::boolean ELSE NULL::boolean END);
SQL
    local schema schema_file
    for schema in events events_no_bell events_topic_index events_before; do
        case $schema in
            events_topic_index) schema_file=tests/fixtures/schema-with-canonical-topic-index.sql ;;
            events_before) schema_file=tests/fixtures/schema-with-topic-indexes.sql ;;
            *) schema_file=postgresql/schema.sql ;;
        esac
        psql_db -c "CREATE SCHEMA $schema" >/dev/null
        psql_db -c "SET search_path = $schema" -f "$here_variants/../$schema_file" >/dev/null
    done
    psql_db -c "ALTER TABLE events_no_bell.events ALTER COLUMN event_piper_bell DROP DEFAULT" \
            >/dev/null
}
