-- event-piper schema. Applied at start-up (unless --skip-schema), in one transaction, under an
-- advisory lock so that instances starting together do not race each other.
--
-- It is idempotent and cheap to re-apply: statements that would lock `events` or its sequence (and
-- so queue behind open producer transactions and make new inserts queue behind them) run only when
-- the catalog shows they are needed.
--
-- Why ids are assigned the way they are ("Order and the gap problem" in the README): `id` is an
-- identity column, GENERATED ALWAYS, so an insert that names an id is refused by PostgreSQL itself.
-- Its sequence hands out one id at a time (CACHE 1). Every transaction that holds an id it has
-- not committed yet holds a ROW EXCLUSIVE lock on `events`, which PostgreSQL takes before it runs
-- the insert, so the service can tell an id still in flight from one that will never commit by
-- looking at pg_locks. Nothing runs per row for that: no trigger, no CHECK constraint (both are
-- prepared anew for every statement and cost a single-row insert more than its own execution).
--
-- Why a producer rings only sometimes ("The doorbell" in the README): a transaction that runs
-- NOTIFY takes, at commit, a lock that serializes every notifying commit of the cluster through its
-- WAL flush. So a producer rings only while a hub sleeps. The default of the column
-- `event_piper_bell` (always NULL) tries to take a shared advisory lock with the key
-- 7311142570156910960 ("eventpip" read as a big-endian integer); a sleeping hub holds that lock
-- exclusively, or waits for it, so the try fails exactly then, and the producer rings.

SELECT pg_advisory_xact_lock(7311142570156910963);

CREATE TABLE IF NOT EXISTS events (
    id         bigint      GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    type       text        NOT NULL,
    timestamp  timestamptz NOT NULL DEFAULT now(),
    subscriber text,
    payload    jsonb       NOT NULL DEFAULT '{}'
);

-- Functions are created with the schema's name written into them, so a producer's search_path
-- cannot point them elsewhere.
DO $schema$
DECLARE
    here text := quote_ident(current_schema());
    identity "char" := (SELECT attidentity FROM pg_attribute
                        WHERE attrelid = 'events'::regclass AND attname = 'id');
    next_id bigint;
BEGIN
    -- A table from an older setup: ids came from a trigger (event-piper before the identity
    -- column) or from a bigserial default (EventPiper). The identity column takes over where their
    -- sequence stopped.
    IF identity = '' THEN
        next_id := (SELECT coalesce(max(id), 0) + 1 FROM events);
        IF to_regclass('events_id_seq') IS NOT NULL THEN
            EXECUTE 'SELECT greatest($1, CASE WHEN is_called THEN last_value + 1 ELSE last_value END) '
                    'FROM events_id_seq' INTO next_id USING next_id;
        END IF;
        DROP TRIGGER IF EXISTS events_assign_id ON events;
        EXECUTE format('DROP FUNCTION IF EXISTS %s.event_piper_assign_id()', here);
        ALTER TABLE events ALTER COLUMN id DROP DEFAULT;
        DROP SEQUENCE IF EXISTS events_id_seq;
        EXECUTE format('ALTER TABLE events ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY '
                       '(SEQUENCE NAME %s.events_id_seq START WITH %s CACHE 1)', here, next_id);
    ELSIF identity = 'd' THEN
        ALTER TABLE events ALTER COLUMN id SET GENERATED ALWAYS;
    END IF;
    -- A cached block of ids would be handed out long after the lock that covers them was taken.
    IF (SELECT seqcache FROM pg_sequence
        WHERE seqrelid = pg_get_serial_sequence('events', 'id')::regclass) <> 1 THEN
        ALTER TABLE events ALTER COLUMN id SET CACHE 1;
    END IF;

    -- Earlier versions checked the type in the database, with a CHECK constraint and then in their
    -- id trigger; both cost every insert more than the insert itself. The service renders a type
    -- with a line break safely (README, "The events table").
    IF EXISTS (SELECT 1 FROM pg_constraint
               WHERE conrelid = 'events'::regclass AND conname = 'events_type_check') THEN
        ALTER TABLE events DROP CONSTRAINT events_type_check;
    END IF;
    -- Earlier versions rang on every statement, from a trigger of its own.
    IF EXISTS (SELECT 1 FROM pg_trigger
               WHERE tgrelid = 'events'::regclass AND tgname = 'events_notify') THEN
        DROP TRIGGER events_notify ON events;
        EXECUTE format('DROP FUNCTION IF EXISTS %s.event_piper_notify()', here);
    END IF;

    -- The doorbell. PostgreSQL folds repeated NOTIFYs of a transaction into one, and the payload
    -- is empty: the service reads the rows from the table.
    EXECUTE format($fn$
        CREATE OR REPLACE FUNCTION %s.event_piper_ring() RETURNS boolean
        LANGUAGE plpgsql AS $body$
        BEGIN
            PERFORM pg_catalog.pg_notify('new_events', '');
            RETURN NULL;
        END
        $body$ $fn$, here);
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'events'::regclass AND attname = 'event_piper_bell'
                     AND NOT attisdropped) THEN
        ALTER TABLE events ADD COLUMN event_piper_bell boolean;
        COMMENT ON COLUMN events.event_piper_bell IS
            'Always NULL. Its default rings event-piper''s doorbell while the service sleeps '
            '(README, "The doorbell"). Leave it out of inserts.';
    END IF;
    -- Shared locks never wait for each other, so producers do not contend. The lock is released
    -- when the transaction ends, after its commit became visible. A hub that goes to sleep asks for
    -- the lock exclusively, and shared requests fail from then on: the producer rings. The hub's
    -- request is granted once every producer that took the lock has ended, so it then reads
    -- whatever they committed without a ring.
    IF NOT EXISTS (SELECT 1 FROM pg_attrdef d JOIN pg_attribute a
                     ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                   WHERE d.adrelid = 'events'::regclass AND a.attname = 'event_piper_bell') THEN
        EXECUTE format('ALTER TABLE events ALTER COLUMN event_piper_bell SET DEFAULT '
                       '(CASE WHEN pg_catalog.pg_try_advisory_xact_lock_shared(7311142570156910960) '
                       'THEN NULL ELSE %s.event_piper_ring() END)', here);
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

-- Topics (README, "Topics"): an event may be addressed to topics besides, or instead of, a
-- subscriber; the first is canonical, the others alternates. `private` events reach a topic's
-- streams only with a token that grants one of their topics. `update_id` and `retry` are what a
-- Mercure publisher asked for as the SSE id and retry. All four are NULL for an event addressed
-- as before, and no index holds it but the two it always had. Topics and publishers' ids are
-- indexed by the service, in tables of its own (below), not on `events`: PostgreSQL opens every
-- index of a table and evaluates each partial index's predicate for every row it inserts, about
-- 1 µs each (BENCHMARKS.md, "What topics cost a producer that does not use them"), and the
-- producers that do not use topics are most of them.
DO $topics$
BEGIN
    -- Each statement here locks `events`, so it runs only when the catalog says it is needed.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'events'::regclass
                     AND attname = 'topics' AND NOT attisdropped) THEN
        ALTER TABLE events ADD COLUMN topics text[], ADD COLUMN private boolean,
            ADD COLUMN update_id text, ADD COLUMN retry integer;
    END IF;
    -- Replay reads one consumer's events in id order (events_subscriber_id_idx, below), and the
    -- broadcasts in id order. Before topics a broadcast was any event without a subscriber; an
    -- event addressed to topics only is not one, and a broadcast replay must not walk them.
    IF to_regclass('events_broadcasts_idx') IS NULL THEN
        CREATE INDEX events_broadcasts_idx ON events (id)
            WHERE subscriber IS NULL AND topics IS NULL;
    END IF;
    IF to_regclass('events_broadcast_id_idx') IS NOT NULL THEN
        DROP INDEX events_broadcast_id_idx;
    END IF;
END
$topics$;

-- The keys a replay looks up that `events` does not index: the topics of the events
-- (`event_piper_topics`), and a Mercure publisher's id (`event_piper_update_ids`). The service
-- writes them, not the producer: the hub writes the keys of the events it reads before it
-- publishes them, so every event up to a published id has its keys here, and a replay, which
-- never reads past what its instance published, finds all of them. Producers that write topics or
-- ids with SQL need do nothing else, and `events` keeps the indexes an application's own table
-- would have: an index on `events`, even a partial one that a row does not enter, costs every
-- insert the opening of the index and the test of its predicate. `event_piper_keyed.upto` is how
-- far every event's keys are in; an instance starting after producers wrote while none ran adds
-- the keys of the events after it first, with bounded scans.
DO $keys$
BEGIN
    IF to_regclass('event_piper_keyed') IS NOT NULL THEN
        RETURN;
    END IF;
    CREATE TABLE event_piper_update_ids (
        update_id text   NOT NULL,
        event_id  bigint NOT NULL,
        PRIMARY KEY (update_id, event_id)
    );
    -- Retention deletes keys by event, as it deletes events.
    CREATE INDEX event_piper_update_ids_event_id_idx ON event_piper_update_ids (event_id);
    CREATE TABLE event_piper_keyed (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        upto     bigint  NOT NULL
    );
    -- The keys of the events already there, once. SHARE mode waits for the producers in flight
    -- and holds new ones back until this transaction ends, so every id up to the maximum is
    -- final, and the keys of all of them are in when the mark is set there. On a table of an
    -- earlier version the partial indexes that held these keys are dropped.
    LOCK TABLE events IN SHARE MODE;
    INSERT INTO event_piper_update_ids (update_id, event_id)
        SELECT update_id, id FROM events WHERE update_id IS NOT NULL;
    INSERT INTO event_piper_keyed (upto) SELECT coalesce(max(id), 0) FROM events;
    DROP INDEX IF EXISTS events_alternate_topics_idx, events_update_id_idx;
END
$keys$;

-- Topics are keyed by stretches of ids, not one row per event: the hub writes one row per topic
-- for the events of a batch, `ids` the topic's events in (the previous mark, `upto`], ascending.
-- A write moves the mark, and waits for the one before it to commit (the mark's row lock), so
-- stretches never overlap, whichever instance writes them, and every topic's stretches end at
-- marks: the ids of any topic up to a mark are in the stretches that end at or below it
-- (src/keys.rs). `prev` is the mark a write found, which tells it where its stretch begins.
-- A table of an earlier version (topics indexed on `events`, or the first topic there and the
-- others in `event_piper_alternates`) has the topics of its events moved here once, in
-- stretches of 1,000 ids, with the same SHARE lock, and the old index and table go away.
DO $topics_keyed$
BEGIN
    IF to_regclass('event_piper_topics') IS NOT NULL THEN
        RETURN;
    END IF;
    CREATE TABLE event_piper_topics (
        topic text     NOT NULL,
        upto  bigint   NOT NULL,
        ids   bigint[] NOT NULL,
        PRIMARY KEY (topic, upto)
    );
    -- Retention deletes the stretches that end at or below what it deleted.
    CREATE INDEX event_piper_topics_upto_idx ON event_piper_topics (upto);
    ALTER TABLE event_piper_keyed ADD COLUMN IF NOT EXISTS prev bigint NOT NULL DEFAULT 0;
    LOCK TABLE events IN SHARE MODE;
    WITH last AS (SELECT coalesce(max(id), 0) AS id FROM events)
    INSERT INTO event_piper_topics (topic, upto, ids)
        SELECT topic, least((id - 1) / 1000 * 1000 + 1000, (SELECT id FROM last)),
               array_agg(DISTINCT id ORDER BY id)
        FROM events, unnest(topics) AS topic WHERE topics IS NOT NULL
        GROUP BY 1, 2;
    UPDATE event_piper_keyed SET upto = greatest(upto, (SELECT coalesce(max(id), 0) FROM events));
    DROP TABLE IF EXISTS event_piper_alternates;
    DROP INDEX IF EXISTS events_topic_id_idx;
END
$topics_keyed$;
CREATE INDEX IF NOT EXISTS events_subscriber_id_idx ON events (subscriber, id);

-- Webhook subscriptions (README, "Webhooks"): the server remembers each one's position, so a
-- receiver that is away gets what it missed when it is back. `position` is the last event id the
-- receiver acknowledged with a 2xx; `pending_upto` is the end of the batch being delivered, and
-- `pending_generation` the epoch it was formed in (they make its webhook-id), so that an
-- instance taking over sends that same batch again, under the same webhook-id.
--
-- Two counters, because not every change invalidates what is in flight (README, "What a change
-- does to delivery"). `generation` grows with every change made through the API: the instance
-- delivering a subscription begins a batch, records a failure or disables only while the
-- generation it read is current, so a change always reaches it. `epoch` is the generation of the
-- last change that restarted delivery (a new position, or new types); an acknowledgement is
-- stored while the epoch it was sent in is current, so a pause, a resume, a new URL or batch size
-- keeps it, and a replay asked for refuses it. Being a generation, an epoch is never reused, and
-- neither is a webhook-id.
CREATE TABLE IF NOT EXISTS event_piper_subscriptions (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer        text        NOT NULL,
    url             text        NOT NULL,
    secret          text        NOT NULL,
    types           text[],
    batch_size      integer     NOT NULL CHECK (batch_size BETWEEN 1 AND 1000),
    position        bigint      NOT NULL,
    pending_upto    bigint,
    pending_generation integer,
    state           text        NOT NULL DEFAULT 'active'
                                CHECK (state IN ('active', 'paused', 'disabled')),
    generation      integer     NOT NULL DEFAULT 0,
    epoch           integer     NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered       bigint      NOT NULL DEFAULT 0,
    failed_attempts bigint      NOT NULL DEFAULT 0,
    last_attempt_at timestamptz,
    last_outcome    text,
    last_error      text,
    last_success_at timestamptz,
    failing_since   timestamptz,
    next_retry_at   timestamptz
);
CREATE INDEX IF NOT EXISTS event_piper_subscriptions_consumer_idx
    ON event_piper_subscriptions (consumer);

-- A table from before the epoch, when every change restarted delivery. Each epoch starts at its
-- subscription's generation: the batches of that generation go on under their webhook-ids, and
-- the next epoch is a later generation, which no earlier webhook-id was made of.
DO $epoch$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'event_piper_subscriptions'::regclass AND attname = 'epoch'
                     AND NOT attisdropped) THEN
        ALTER TABLE event_piper_subscriptions ADD COLUMN epoch integer NOT NULL DEFAULT 0;
        UPDATE event_piper_subscriptions SET epoch = generation;
    END IF;
END
$epoch$;
