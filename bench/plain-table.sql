-- What an application's table would be without event-piper: the columns and indexes of
-- postgresql/schema.sql's `events` before topics, an ordinary `bigserial` id, no trigger, no
-- doorbell. The peer every producers' measurement compares `events` with: the bench's
-- `producers` scenario, bench/table-cost.sh and bench/deliver-cost.sh.
CREATE TABLE plain_events (
    id         bigserial   PRIMARY KEY,
    type       text        NOT NULL,
    timestamp  timestamptz NOT NULL DEFAULT now(),
    subscriber text,
    payload    jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX plain_events_subscriber_id_idx ON plain_events (subscriber, id);
CREATE INDEX plain_events_broadcast_id_idx ON plain_events (id) WHERE subscriber IS NULL;
