-- event-piper schema. Applied at start-up (unless --skip-schema), in one transaction, under an
-- advisory lock so that instances starting together do not race each other.
--
-- It is idempotent and cheap to re-apply: statements that would lock `events` or its sequence (and
-- so queue behind open producer transactions and make new inserts queue behind them) run only when
-- the catalog shows they are needed.
--
-- Why ids are assigned the way they are ("Order and the gap problem" in the README): every
-- transaction that holds an id it has not committed yet also holds a shared advisory lock with the
-- key 7311142570156910960 ("eventpip" read as a big-endian integer), so the service can tell an id
-- still in flight from one that will never commit by looking at pg_locks.
--
-- Why a producer rings only sometimes ("The doorbell" in the README): a transaction that runs
-- NOTIFY takes, at commit, a lock that serializes every notifying commit of the cluster through its
-- WAL flush. So the id trigger rings only while a hub sleeps, which it tells by failing to take
-- that same shared lock: a sleeping hub holds it exclusively (or waits for it). Such a producer
-- takes a second shared lock (key 7311142570156910961) instead, so it is still seen in flight.

SELECT pg_advisory_xact_lock(7311142570156910963);

CREATE SEQUENCE IF NOT EXISTS events_id_seq CACHE 1;

CREATE TABLE IF NOT EXISTS events (
    id         bigint      PRIMARY KEY,
    type       text        NOT NULL,
    timestamp  timestamptz NOT NULL DEFAULT now(),
    subscriber text,
    payload    jsonb       NOT NULL DEFAULT '{}'
);

-- Ids come from the trigger below. Functions are created with the schema's name written into
-- them, so a producer's search_path cannot point them at another sequence.
DO $schema$
DECLARE
    here text := quote_ident(current_schema());
BEGIN
    -- A cached block of ids would be handed out without taking the lock.
    IF (SELECT seqcache FROM pg_sequence WHERE seqrelid = 'events_id_seq'::regclass) <> 1 THEN
        ALTER SEQUENCE events_id_seq CACHE 1;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_depend
                   WHERE objid = 'events_id_seq'::regclass AND refobjid = 'events'::regclass
                     AND deptype = 'a') THEN
        ALTER SEQUENCE events_id_seq OWNED BY events.id;
    END IF;
    -- A table from an older setup (EventPiper's bigserial id) keeps its own default otherwise.
    IF EXISTS (SELECT 1 FROM pg_attrdef
               WHERE adrelid = 'events'::regclass
                 AND adnum = (SELECT attnum FROM pg_attribute
                              WHERE attrelid = 'events'::regclass AND attname = 'id')) THEN
        ALTER TABLE events ALTER COLUMN id DROP DEFAULT;
    END IF;
    -- The type is checked by the id trigger below: a CHECK constraint is prepared anew for every
    -- statement, which costs a single-row insert about a third more than the check itself
    -- (BENCHMARKS.md, "producers"). Earlier versions had one.
    IF EXISTS (SELECT 1 FROM pg_constraint
               WHERE conrelid = 'events'::regclass AND conname = 'events_type_check') THEN
        ALTER TABLE events DROP CONSTRAINT events_type_check;
    END IF;

    -- Refuses an empty type or one with a line break: an SSE "event:" line cannot carry one.
    -- Takes the shared "id in flight" lock, then the next id. Shared locks never wait for each
    -- other, so producers do not contend; the lock is released when the transaction ends, after
    -- its commit became visible. An id chosen by the producer would bypass the lock and could be
    -- older than what the service already published, so it is refused.
    --
    -- A hub that goes to sleep asks for the lock exclusively, and shared requests fail from then
    -- on: the producer rings, and shows it is in flight with the second lock. The hub's request
    -- is granted once every producer that took the first lock has ended, so it then reads
    -- whatever they committed without a ring. PostgreSQL folds repeated NOTIFYs of a transaction
    -- into one, and the payload is empty: the service reads the rows from the table.
    EXECUTE format($fn$
        CREATE OR REPLACE FUNCTION %1$s.event_piper_assign_id() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                IF NEW.id IS NOT NULL THEN
                    RAISE EXCEPTION 'events.id is assigned by the database; leave it out of the insert'
                        USING ERRCODE = 'check_violation';
                END IF;
                IF NEW.type = '' OR NEW.type ~ '[\r\n]' THEN
                    RAISE EXCEPTION 'events.type must not be empty or contain a line break'
                        USING ERRCODE = 'check_violation';
                END IF;
                IF NOT pg_catalog.pg_try_advisory_xact_lock_shared(7311142570156910960) THEN
                    PERFORM pg_catalog.pg_advisory_xact_lock_shared(7311142570156910961);
                    PERFORM pg_catalog.pg_notify('new_events', '');
                END IF;
                NEW.id := pg_catalog.nextval('%1$s.events_id_seq');
            ELSIF NEW.id IS DISTINCT FROM OLD.id THEN
                RAISE EXCEPTION 'events.id cannot be changed' USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END
        $body$ $fn$, here);

    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'events'::regclass AND tgname = 'events_assign_id') THEN
        EXECUTE format('CREATE TRIGGER events_assign_id BEFORE INSERT OR UPDATE OF id ON events '
                       'FOR EACH ROW EXECUTE FUNCTION %s.event_piper_assign_id()', here);
    END IF;
    -- Earlier versions rang on every statement, from a trigger of its own.
    IF EXISTS (SELECT 1 FROM pg_trigger
               WHERE tgrelid = 'events'::regclass AND tgname = 'events_notify') THEN
        DROP TRIGGER events_notify ON events;
        EXECUTE format('DROP FUNCTION IF EXISTS %s.event_piper_notify()', here);
    END IF;
END
$schema$;

-- Retention (--retention) deletes the oldest events; it records the highest id it deleted, so a
-- stream resuming from an older point can be told that part of what it asked for is gone.
CREATE TABLE IF NOT EXISTS event_piper_retention (
    only_row     boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    deleted_upto bigint  NOT NULL DEFAULT 0
);
INSERT INTO event_piper_retention DEFAULT VALUES ON CONFLICT DO NOTHING;

-- Replay reads one consumer's events in id order, and the broadcasts (NULL subscriber) in id order.
CREATE INDEX IF NOT EXISTS events_subscriber_id_idx ON events (subscriber, id);
CREATE INDEX IF NOT EXISTS events_broadcast_id_idx ON events (id) WHERE subscriber IS NULL;
