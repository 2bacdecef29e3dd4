-- Migration 7: projection versions (eventcore_trio/_versions.py): which version of each
-- projection serves reads, and the changelog of switches.
--
-- A template for Python's str.format, filled in by eventcore_trio/postgres/_schema.py:
--   s                    the schema, double-quoted
-- Each placeholder stands in single braces; a literal brace is doubled.
-- Released: never edit, add a migration instead.

-- One row per projection (the projector's name, without a version) once a version of it
-- has run: the version that serves, and those an operator's switch back withdrew.
CREATE TABLE {s}.serving_versions (
    name text COLLATE "C" PRIMARY KEY,
    version integer NOT NULL CHECK (version BETWEEN 1 AND 1000000),
    withdrawn integer[] NOT NULL DEFAULT '{{}}',
    since timestamptz NOT NULL DEFAULT now()
);

-- Every change of a projection's serving version, oldest first (by id). tx/position: how
-- far the new version had applied (its greatest unit checkpoint), NULL when nothing.
CREATE TABLE {s}.version_switches (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text COLLATE "C" NOT NULL,
    from_version integer,
    to_version integer NOT NULL,
    tx bigint,
    position bigint,
    switched_at timestamptz NOT NULL DEFAULT now(),
    reason text NOT NULL CHECK (reason IN ('first', 'caught-up', 'manual')),
    CONSTRAINT version_switches_position_pair CHECK ((tx IS NULL) = (position IS NULL))
);
CREATE INDEX version_switches_name_idx ON {s}.version_switches (name, id);

-- A unit of a superseded or withdrawn version records that it stopped for that reason.
ALTER TABLE {s}.subscriptions DROP CONSTRAINT subscriptions_state_check;
ALTER TABLE {s}.subscriptions ADD CONSTRAINT subscriptions_state_check
    CHECK (state IN ('running', 'failed', 'stopped', 'replaying', 'superseded'));

-- Backfill: every projection that ran before versions (names carried no version suffix
-- then) serves version 1, so that upgrading a running system never hands serving to a
-- new, empty version. A unit's row names its projection with a partition suffix
-- ("orders[2/4]"), stripped here as eventcore_trio/_partitions.py parses it.
WITH ran AS (
    SELECT regexp_replace(subscription_name, '\[(0|[1-9][0-9]*)/([1-9][0-9]*)\]$', '')
           AS name, tx, position
    FROM {s}.subscriptions
    UNION ALL
    SELECT name, NULL, NULL FROM {s}.projections
), reached AS (
    SELECT name, (max(ARRAY[tx, position]) FILTER (WHERE tx IS NOT NULL)) AS at
    FROM ran GROUP BY name
), served AS (
    INSERT INTO {s}.serving_versions (name, version)
    SELECT name, 1 FROM reached
    RETURNING name
)
INSERT INTO {s}.version_switches (name, from_version, to_version, tx, position, reason)
SELECT r.name, NULL, 1, r.at[1], r.at[2], 'first'
FROM reached r JOIN served USING (name)
ORDER BY r.name;
