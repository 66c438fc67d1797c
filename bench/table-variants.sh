# The tables bench/table-cost.sh and bench/insert-instructions.sh compare, each as `events` in a
# schema of its own, so that one INSERT text fits all of them. Sourced; the caller defines
# psql_db, which runs psql on its scratch database.
#
#   plain                    the columns and indexes an application's own table would have
#                            (bench/plain-table.sql, the bench's peer everywhere)
#   plain_column             plain plus one nullable column, no default: what a column costs
#   plain_topic_columns      plain plus the four columns topics added to `events`
#   plain_lock               plain plus the doorbell's per-row shared advisory lock in a column
#                            default, on another key
#   plain_sequence_flag      plain plus a column default that reads a sequence's value: a
#                            doorbell that reads a flag instead of taking a lock
#   events                   event-piper's schema as it is (postgresql/schema.sql)
#   events_topic_index       the version before, with one partial index by first topic (the
#                            test fixture, verbatim)
#   events_before            two versions before, with three topic indexes (the test fixture,
#                            verbatim)
#   events_no_bell           `events` without the doorbell's column default: what its columns
#                            alone cost
here_variants=$(dirname "${BASH_SOURCE[0]}")
all_variants="plain plain_column plain_topic_columns plain_lock plain_sequence_flag events events_topic_index events_before events_no_bell"

# A copy of plain as schema $1's `events`, with a sequence of its own, altered by $2.
plain_with() {
    psql_db >/dev/null <<SQL
CREATE SCHEMA $1;
CREATE TABLE $1.events (LIKE plain.events INCLUDING ALL);
CREATE SEQUENCE $1.events_id_seq OWNED BY $1.events.id;
ALTER TABLE $1.events ALTER COLUMN id SET DEFAULT nextval('$1.events_id_seq');
ALTER TABLE $1.events $2;
SQL
}

create_variants() {
    psql_db -c "CREATE SCHEMA plain" >/dev/null
    psql_db -c "SET search_path = plain" -f "$here_variants/plain-table.sql" \
            -c "ALTER TABLE plain.plain_events RENAME TO events" >/dev/null
    plain_with plain_column "ADD COLUMN bell boolean"
    plain_with plain_topic_columns \
        "ADD COLUMN topics text[], ADD COLUMN private boolean, ADD COLUMN update_id text, \
         ADD COLUMN retry integer"
    plain_with plain_lock "ADD COLUMN bell boolean DEFAULT (CASE WHEN \
        pg_try_advisory_xact_lock_shared(42) THEN NULL::boolean ELSE NULL::boolean END)"
    psql_db -c "CREATE SEQUENCE plain_flag" >/dev/null
    plain_with plain_sequence_flag "ADD COLUMN bell boolean DEFAULT (CASE WHEN \
        pg_sequence_last_value('plain_flag'::regclass) IS NULL THEN NULL::boolean \
        ELSE NULL::boolean END)"
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
