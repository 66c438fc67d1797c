-- event-piper schema. Applied at start-up (unless --skip-schema); every statement is idempotent, and
-- the whole file runs in one transaction under an advisory lock so that instances starting together
-- do not race each other.
--
-- Why ids are assigned the way they are: see "Order and the gap problem" in the README. In short,
-- every transaction that holds an id not yet committed also holds a shared advisory lock
-- (key 7311142570156910960, "eventpip" read as a big-endian integer), so the service can tell an id that is still
-- in flight from one that will never commit by looking at pg_locks.

SELECT pg_advisory_xact_lock(7311142570156910963);

-- CACHE 1 is essential: a cached block of ids would be handed out without taking the lock below.
CREATE SEQUENCE IF NOT EXISTS events_id_seq CACHE 1;
ALTER SEQUENCE events_id_seq CACHE 1;

CREATE TABLE IF NOT EXISTS events (
    id         bigint      PRIMARY KEY,
    type       text        NOT NULL,
    timestamp  timestamptz NOT NULL DEFAULT now(),
    subscriber text,
    payload    jsonb       NOT NULL DEFAULT '{}'
);

ALTER SEQUENCE events_id_seq OWNED BY events.id;

-- An SSE "event:" line cannot carry a line break, and an empty type is meaningless.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'events_type_check') THEN
        ALTER TABLE events ADD CONSTRAINT events_type_check
            CHECK (type <> '' AND type !~ '[\r\n]');
    END IF;
END
$$;

-- Replay reads one consumer's events in id order.
CREATE INDEX IF NOT EXISTS events_subscriber_id_idx ON events (subscriber, id);

-- Takes the shared "id in flight" lock, then the next id. Shared locks never wait for each other,
-- so producers do not contend; the lock is released when the transaction ends, after its commit
-- became visible.
CREATE OR REPLACE FUNCTION event_piper_next_id() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7311142570156910960);
    RETURN nextval('events_id_seq');
END
$$;

-- Ids come only from event_piper_next_id(): an id chosen by the producer would bypass the lock and
-- could be older than what the service already published, so it is refused.
CREATE OR REPLACE FUNCTION event_piper_assign_id() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.id IS NOT NULL THEN
            RAISE EXCEPTION 'events.id is assigned by the database; leave it out of the insert'
                USING ERRCODE = 'check_violation';
        END IF;
        NEW.id := event_piper_next_id();
    ELSIF NEW.id IS DISTINCT FROM OLD.id THEN
        RAISE EXCEPTION 'events.id cannot be changed' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER events_assign_id
    BEFORE INSERT OR UPDATE OF id ON events
    FOR EACH ROW EXECUTE FUNCTION event_piper_assign_id();

-- One doorbell per statement (and PostgreSQL folds repeats within a transaction). The payload is
-- empty on purpose: the service reads the rows from the table, so NOTIFY's 8000-byte payload limit
-- never limits an event.
CREATE OR REPLACE FUNCTION event_piper_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('new_events', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION event_piper_notify();
