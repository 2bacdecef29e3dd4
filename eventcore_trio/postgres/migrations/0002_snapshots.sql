-- Migration 2: snapshots (a cache of folded stream states; never the source of truth).
--
-- A template for Python's str.format, filled in by eventcore_trio/postgres/_schema.py:
--   s                    the schema, double-quoted
-- Each placeholder stands in single braces; a literal brace is doubled.
-- Released: never edit, add a migration instead.

CREATE TABLE {s}.snapshots (
    stream_id text COLLATE "C" NOT NULL,
    -- The registered state name and the schema version of its fields.
    state text COLLATE "C" NOT NULL,
    state_version bigint NOT NULL CHECK (state_version >= 1),
    -- How many of the stream's events are folded into data.
    stream_version bigint NOT NULL CHECK (stream_version >= 1),
    data jsonb NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, state)
);
