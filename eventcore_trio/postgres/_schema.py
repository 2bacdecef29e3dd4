"""The PostgreSQL schema, its versioned migrations, and how they are applied.

Migrations run in one transaction under a transaction-level advisory lock, so several
processes may migrate at once: one applies, the others wait and then find nothing to do.
A database whose schema is newer than this library is refused, never downgraded.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from .. import __version__
from .._errors import ConfigurationError, DatabaseError, SchemaVersionError
from ._keys import migration_lock_key, stream_lock_space, writer_lock_key
from ._pool import Pool

MINIMUM_SERVER_VERSION_NUM: Final = 130000
"""PostgreSQL 13: the first version with ``xid8``, ``pg_current_xact_id()`` and
``pg_snapshot_xmin()``, on which the gap-free read rests, and core ``gen_random_uuid()``."""

#: How long a shared group-commit statement (``append_many``) may wait for a lock that
#: another transaction holds before it gives up, writing nothing (see `_group_commit`).
SHARED_LOCK_TIMEOUT: Final = "50ms"

_SCHEMA_NAME: Final = re.compile(r"\A[a-z_][a-z0-9_]{0,62}\Z")


def check_schema_name(schema: object) -> str:
    """Validate the schema option: a plain lower-case SQL identifier, used unquoted-safe,
    outside the ``pg_`` prefix that PostgreSQL keeps for itself."""
    if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
        raise ConfigurationError(
            f"schema must be a lower-case SQL identifier (letters, digits, '_', at most 63 "
            f"characters, not starting with a digit), got {schema!r}"
        )
    if schema.startswith("pg_"):
        # PostgreSQL reserves the prefix for system schemas: CREATE SCHEMA refuses it
        # (42939), so the store could never be migrated there.
        raise ConfigurationError(
            f"schema {schema!r} starts with 'pg_', which PostgreSQL reserves for system "
            "schemas: choose another name"
        )
    return schema


#: PostgreSQL's longest identifier, in bytes (NAMEDATALEN - 1): channel names included.
MAX_IDENTIFIER_BYTES: Final = 63


def channel_name(schema: str, suffix: str = "") -> str:
    """A LISTEN/NOTIFY channel of *schema*: ``eventcore_<schema><suffix>``, or, when that is
    longer than PostgreSQL allows (a schema of more than 53 characters), the schema's first
    characters and a hash of the whole name, so that it always fits and stays distinct.

    A longer name would make ``pg_notify`` fail and LISTEN silently truncate it.
    """
    name = f"eventcore_{schema}{suffix}"
    if len(name.encode()) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.blake2b(schema.encode(), digest_size=6).hexdigest()
    keep = MAX_IDENTIFIER_BYTES - len("eventcore_") - len(suffix) - len(digest) - 1
    return f"eventcore_{schema[:keep]}_{digest}{suffix}"


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel on which the store announces committed appends."""
    return channel_name(schema)


# Each migration is a template over {s} (the quoted schema) and {stream_locks}. Never edit a
# migration once released: add a new one. (Before the first release the history was squashed
# into migration 1.)
_MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: streams, events (immutable), subscriptions, projections, hosts, dead letters, the
    # append function.
    """
    CREATE TABLE {s}.streams (
        stream_id text COLLATE "C" PRIMARY KEY,
        -- Number of events in the stream; 0 for a stream that was only checked, never written.
        version bigint NOT NULL CHECK (version >= 0)
    );

    -- The partitioning hash of a stream id (see eventcore_trio/_partitions.py): the first
    -- four bytes of SHA-256 over its UTF-8 bytes, unsigned. Never change it: checkpoints of
    -- partitioned projections depend on which partition each stream is in.
    CREATE FUNCTION {s}.stream_hash(stream_id text) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
        SELECT ('x' || left(encode(sha256(convert_to(stream_id, 'UTF8')), 'hex'), 8))
               ::bit(32)::bigint
    $fn$;

    CREATE TABLE {s}.events (
        -- The writing transaction's id (xid8 as bigint). Readers only read rows whose tx is
        -- below the xmin of their snapshot: every such transaction has ended, so no row with a
        -- smaller (tx, position) can appear later. See docs/postgres.md, "gap-free reads".
        tx bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
        position bigint GENERATED ALWAYS AS IDENTITY,
        stream_id text COLLATE "C" NOT NULL,
        stream_version bigint NOT NULL CHECK (stream_version >= 1),
        event_id uuid NOT NULL,
        type text COLLATE "C" NOT NULL,
        data jsonb NOT NULL,
        metadata jsonb NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        -- {s}.stream_hash(stream_id), stored so that a partition's read is a WHERE clause,
        -- not a hash per row read. The append function computes it once per stream (a
        -- generated column hashed every row again: a fifth of a 100-event insert's time).
        -- Anything else that inserts events must set it the same way.
        stream_hash bigint NOT NULL,
        CONSTRAINT events_pkey PRIMARY KEY (tx, position),
        CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
        CONSTRAINT events_event_id_key UNIQUE (event_id)
    );
    -- read_events with an event-type filter walks this index in (tx, position) order per type.
    CREATE INDEX events_type_tx_position_idx ON {s}.events (type, tx, position);

    CREATE TABLE {s}.subscriptions (
        subscription_name text COLLATE "C" PRIMARY KEY,
        -- The checkpoint: NULL before the first batch and after a reset.
        tx bigint,
        position bigint,
        -- pg_control_system().system_identifier of the cluster the position belongs to.
        system_identifier text,
        updated_at timestamptz NOT NULL DEFAULT now(),
        -- The projector's filter as JSON, so status can count lag in matching events.
        filter jsonb,
        state text NOT NULL DEFAULT 'stopped'
            CHECK (state IN ('running', 'failed', 'stopped', 'replaying')),
        -- The last leader's process, host and session; status names it only while that
        -- session (leader_backend_pid) holds the projection's lock.
        leader_pid integer,
        leader_host text,
        leader_application text,
        leader_backend_pid integer,
        last_error text,
        CONSTRAINT subscriptions_position_pair CHECK ((tx IS NULL) = (position IS NULL))
    );

    -- How many partitions each projection run by the runtime has: the authority every unit
    -- checks when it starts and, fenced, when a batch commits (see _subscriptions).
    CREATE TABLE {s}.projections (
        name text COLLATE "C" PRIMARY KEY,
        partitions integer NOT NULL CHECK (partitions BETWEEN 1 AND 1024),
        updated_at timestamptz NOT NULL DEFAULT now()
    );

    -- Hosts running run_projections with balancing: what each leads and stands by for. A
    -- row counts only while its membership lock (lock_key) is held by backend_pid.
    CREATE TABLE {s}.hosts (
        host_id text COLLATE "C" PRIMARY KEY,
        backend_pid integer NOT NULL,
        lock_key bigint NOT NULL,
        leads text[] NOT NULL DEFAULT '{{}}',
        stands_by text[] NOT NULL DEFAULT '{{}}',
        pid integer,
        hostname text,
        application text,
        joined_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );

    CREATE FUNCTION {s}.refuse_event_change() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        RAISE EXCEPTION USING
            ERRCODE = 'EV002',
            MESSAGE = 'events are immutable: UPDATE, DELETE and TRUNCATE are refused',
            HINT = 'append a compensating event instead';
    END
    $fn$;
    CREATE TRIGGER events_immutable BEFORE UPDATE OR DELETE ON {s}.events
        FOR EACH ROW EXECUTE FUNCTION {s}.refuse_event_change();
    CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON {s}.events
        FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_event_change();

    CREATE TABLE {s}.dead_letters (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        subscription_name text COLLATE "C" NOT NULL,
        tx bigint NOT NULL,
        position bigint NOT NULL,
        event_id uuid NOT NULL,
        stream_id text COLLATE "C" NOT NULL,
        stream_version bigint NOT NULL,
        type text COLLATE "C" NOT NULL,
        -- Kept as text: an undecodable event is stored exactly as it was read.
        data text NOT NULL,
        metadata text NOT NULL,
        decode_error text,
        event_recorded_at timestamptz NOT NULL,
        error_type text NOT NULL,
        error_message text NOT NULL,
        retries integer NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX dead_letters_subscription_idx
        ON {s}.dead_letters (subscription_name, tx, position);

    -- p_streams must be distinct and sorted: locking stream rows in one global order is what
    -- keeps concurrent multi-stream appends from deadlocking. Events come grouped by stream,
    -- in order; p_event_stream is each event's 1-based stream index, p_offset its 1-based
    -- position within its stream's part (both NULL for one stream), p_counts each stream's
    -- number of new events.
    CREATE FUNCTION {s}.append_events(
        p_streams text[],
        p_expected bigint[],
        p_counts int[],
        p_event_stream int[],
        p_offset int[],
        p_event_id uuid[],
        p_type text[],
        p_data jsonb[],
        p_metadata jsonb[]
    ) RETURNS TABLE (last_tx bigint, last_position bigint, versions bigint[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_versions bigint[] := '{{}}';
        v_hashes bigint[] := '{{}}';
        v_version bigint;
        v_key int;
    BEGIN
        -- Every stream's lock first, before this transaction holds an id (advisory locks
        -- need none; row locks and writes do). So of two appends to one stream, the later
        -- gets the larger transaction id: readers order events by (tx, position), and each
        -- stream's versions come in order. A row lock taken before waiting for the next
        -- stream would give the waiter an older id than the append it waited for. Keys are
        -- taken in key order (two-int form: apart from the store's bigint session locks), so
        -- concurrent appends cannot deadlock even if two streams share a key.
        FOR v_key IN SELECT DISTINCT hashtext(x) FROM unnest(p_streams) AS x ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock({stream_locks}, v_key);
        END LOOP;
        FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
            SELECT s.version INTO v_version FROM {s}.streams s
                WHERE s.stream_id = p_streams[i] FOR UPDATE;
            IF NOT FOUND THEN
                -- A concurrent creator makes this wait for its commit, then do nothing.
                INSERT INTO {s}.streams (stream_id, version) VALUES (p_streams[i], 0)
                    ON CONFLICT DO NOTHING;
                SELECT s.version INTO v_version FROM {s}.streams s
                    WHERE s.stream_id = p_streams[i] FOR UPDATE;
            END IF;
            IF p_expected[i] IS NOT NULL AND p_expected[i] <> v_version THEN
                RAISE EXCEPTION USING
                    ERRCODE = 'EV001',
                    MESSAGE = format('stream %s is at version %s, expected %s',
                                     p_streams[i], v_version, p_expected[i]),
                    DETAIL = json_build_object('stream_id', p_streams[i],
                                               'expected', p_expected[i],
                                               'actual', v_version)::text;
            END IF;
            v_versions := v_versions || v_version;
            v_hashes := v_hashes || {s}.stream_hash(p_streams[i]);
        END LOOP;

        IF coalesce(array_length(p_type, 1), 0) = 0 THEN
            RETURN QUERY SELECT NULL::bigint, NULL::bigint, v_versions;
            RETURN;
        END IF;

        -- The client sends NULL instead of arrays that carry nothing: stream indexes and
        -- offsets for a single-stream append, ids when none were given, metadata when every
        -- event's is empty. unnest() pads a NULL array with NULLs, hence the coalesces.
        INSERT INTO {s}.events
            (stream_id, stream_version, event_id, type, data, metadata, stream_hash)
        SELECT p_streams[coalesce(e.si, 1)],
               v_versions[coalesce(e.si, 1)] + coalesce(e.off, e.ord),
               coalesce(e.id, gen_random_uuid()), e.type, e.data,
               coalesce(e.meta, '{{}}'::jsonb), v_hashes[coalesce(e.si, 1)]
        FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset)
             WITH ORDINALITY AS e(type, data, meta, id, si, off, ord)
        ORDER BY e.ord;

        UPDATE {s}.streams AS s SET version = s.version + c.n
        FROM unnest(p_streams, p_counts) AS c(stream_id, n)
        WHERE s.stream_id = c.stream_id AND c.n > 0;

        -- No NOTIFY here: the store notifies after the commit (see _notifier), since
        -- notifying transactions commit one at a time.
        RETURN QUERY SELECT pg_current_xact_id()::text::bigint,
                            currval('{s}.events_position_seq'::regclass),
                            v_versions;
    END
    $fn$;

    -- Several independent appends in one statement and one transaction: what concurrent
    -- appenders of one store share (see _group_commit). Each request is all or nothing on its
    -- own: one whose expected versions do not hold gets its conflict back and writes nothing,
    -- while the others are written. p_request gives each stream entry's request (1-based,
    -- ascending, entries of one request together and sorted by stream); a stream may appear
    -- in several requests, which then apply in request order. p_event_stream is each event's
    -- 1-based entry index (across requests), p_offset its 1-based place in its entry. No
    -- savepoints: every check is made before anything is written.
    CREATE FUNCTION {s}.append_many(
        p_request int[],
        p_streams text[],
        p_expected bigint[],
        p_counts int[],
        p_event_stream int[],
        p_offset int[],
        p_event_id uuid[],
        p_type text[],
        p_data jsonb[],
        p_metadata jsonb[]
    ) RETURNS TABLE (request int, last_tx bigint, last_position bigint, versions bigint[],
                     conflict text)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_entries int := coalesce(array_length(p_streams, 1), 0);
        v_names text[] := '{{}}';
        v_current bigint[] := '{{}}';
        v_base bigint[] := array_fill(NULL::bigint, ARRAY[v_entries]);
        v_hashes bigint[] := array_fill(NULL::bigint, ARRAY[v_entries]);
        v_conflicts text[] := '{{}}';
        v_written_streams text[];
        v_written_versions bigint[];
        v_written_positions bigint[];
        v_name text;
        v_version bigint;
        v_key int;
        v_first int;
        v_last int;
        v_at int;
        v_ok boolean;
        i int := 1;
    BEGIN
        -- Every stream's lock in key order before any write, as in append_events.
        FOR v_key IN SELECT DISTINCT hashtext(x) FROM unnest(p_streams) AS x ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock({stream_locks}, v_key);
        END LOOP;
        -- Each distinct stream's row, in name order.
        FOR v_name IN SELECT DISTINCT x FROM unnest(p_streams) AS x ORDER BY 1 LOOP
            SELECT st.version INTO v_version FROM {s}.streams st
                WHERE st.stream_id = v_name FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO {s}.streams (stream_id, version) VALUES (v_name, 0)
                    ON CONFLICT DO NOTHING;
                SELECT st.version INTO v_version FROM {s}.streams st
                    WHERE st.stream_id = v_name FOR UPDATE;
            END IF;
            v_names := v_names || v_name;
            v_current := v_current || v_version;
        END LOOP;
        -- Requests in order, against the versions the earlier ones leave.
        FOR r IN 1 .. coalesce(p_request[v_entries], 0) LOOP
            v_first := i;
            WHILE i <= v_entries AND p_request[i] = r LOOP
                i := i + 1;
            END LOOP;
            v_last := i - 1;
            v_ok := true;
            v_conflicts := v_conflicts || NULL::text;
            FOR k IN v_first .. v_last LOOP
                v_at := array_position(v_names, p_streams[k]);
                IF p_expected[k] IS NOT NULL AND p_expected[k] <> v_current[v_at] THEN
                    v_ok := false;
                    v_conflicts[r] := json_build_object('stream_id', p_streams[k],
                                                        'expected', p_expected[k],
                                                        'actual', v_current[v_at])::text;
                    EXIT;
                END IF;
            END LOOP;
            CONTINUE WHEN NOT v_ok;
            FOR k IN v_first .. v_last LOOP
                v_at := array_position(v_names, p_streams[k]);
                v_base[k] := v_current[v_at];
                v_current[v_at] := v_current[v_at] + p_counts[k];
                v_hashes[k] := {s}.stream_hash(p_streams[k]);
            END LOOP;
        END LOOP;

        WITH inserted AS (
            INSERT INTO {s}.events
                (stream_id, stream_version, event_id, type, data, metadata, stream_hash)
            SELECT p_streams[e.si], v_base[e.si] + e.off, coalesce(e.id, gen_random_uuid()),
                   e.type, e.data, coalesce(e.meta, '{{}}'::jsonb), v_hashes[e.si]
            FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset)
                 WITH ORDINALITY AS e(type, data, meta, id, si, off, ord)
            WHERE v_base[e.si] IS NOT NULL
            ORDER BY e.ord
            RETURNING stream_id, stream_version, position
        )
        SELECT array_agg(stream_id), array_agg(stream_version), array_agg(position)
        INTO v_written_streams, v_written_versions, v_written_positions
        FROM inserted;

        UPDATE {s}.streams AS st SET version = c.version
        FROM unnest(v_names, v_current) AS c(stream_id, version)
        WHERE st.stream_id = c.stream_id AND st.version <> c.version;

        -- Per request: each entry's version before it (NULL when refused), and the position
        -- of its last event (the greatest among its streams' last events).
        RETURN QUERY
        SELECT g.request,
               CASE WHEN g.last_position IS NULL THEN NULL
                    ELSE pg_current_xact_id()::text::bigint END,
               g.last_position, g.versions, v_conflicts[g.request]
        FROM (
            SELECT p_request[k] AS request,
                   array_agg(v_base[k] ORDER BY k) AS versions,
                   max(ev.position) AS last_position
            FROM generate_subscripts(p_streams, 1) AS k
            LEFT JOIN unnest(v_written_streams, v_written_versions, v_written_positions)
                AS ev(stream_id, stream_version, position)
                ON p_counts[k] > 0 AND v_base[k] IS NOT NULL
                AND ev.stream_id = p_streams[k] AND ev.stream_version = v_base[k] + p_counts[k]
            GROUP BY p_request[k]
        ) AS g
        ORDER BY g.request;
    END
    $fn$;
    """,
    # 2: snapshots (a cache of folded stream states; never the source of truth).
    """
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
    """,
    # 3: a read horizon made of event writers only (docs/postgres.md, "The read horizon").
    # Appends announce themselves with a shared transaction lock before they can hold the
    # transaction id their events carry; readers held back by the snapshot's xmin ask for
    # the horizon of announced writers and read up to it in a statement that follows.
    """
    ALTER TABLE {s}.streams ADD COLUMN last_tx bigint NOT NULL DEFAULT 0;

    -- Announce this transaction as an event writer (the shared writer lock), take its
    -- streams' locks, and return the least tx its events may carry. A transaction that had
    -- an id before announcing itself (appending after writing rows of its own) carries the
    -- last id assigned at this point instead, with positions drawn after it: no reader can
    -- have passed those, since a reader's horizon is at most its own snapshot's xmax. Only a
    -- fresh snapshot gives that id, so this needs READ COMMITTED, unless the transaction
    -- announced itself at its start (store.transaction(), which sets eventcore_trio.writer).
    CREATE FUNCTION {s}.begin_append(p_streams text[]) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_had_xid boolean := pg_current_xact_id_if_assigned() IS NOT NULL;
        v_key int;
    BEGIN
        PERFORM pg_advisory_xact_lock_shared({writer_lock});
        -- Every stream's lock next, before this transaction holds an id (advisory locks
        -- need none; row locks and writes do). So of two appends to one stream, the later
        -- gets the larger transaction id: readers order events by (tx, position), and each
        -- stream's versions come in order. Keys are taken in key order (two-int form: apart
        -- from the store's bigint locks), so concurrent appends cannot deadlock even if two
        -- streams share a key.
        FOR v_key IN SELECT DISTINCT hashtext(x) FROM unnest(p_streams) AS x ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock({stream_locks}, v_key);
        END LOOP;
        IF NOT v_had_xid
           OR current_setting('eventcore_trio.writer', true) IS NOT DISTINCT FROM {schema_name}
        THEN
            RETURN 0;
        END IF;
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION USING
                ERRCODE = 'EV003',
                MESSAGE = 'this transaction wrote before appending events, at '
                    || current_setting('transaction_isolation')
                    || ' isolation: append first, use READ COMMITTED, or open it with '
                    || 'store.transaction()';
        END IF;
        -- The last id assigned so far: a reader that has not seen this transaction's lock
        -- reads below its own xmax, at most this + 1, so it may have passed rows with this
        -- tx, but only at positions below the ones drawn from now on.
        RETURN pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 1;
    END
    $fn$;

    -- The horizon for a read that starts after this statement: every event with a smaller
    -- tx is committed, or will never exist. held_back says whether committed events wait
    -- above the snapshot's xmin (when not, the horizon is that xmin and no lock is read).
    -- Else: the smallest transaction id among announced writers (holders of the writer
    -- lock), capped by the snapshot's xmax, from one view of the lock table taken after
    -- this statement's snapshot. A writer announces itself before it holds an id, so one
    -- with an id below the cap holds the lock at the view, or has ended (and is visible to
    -- the read that follows). Ids are 32 bits in pg_locks: widened next to the xmax.
    CREATE FUNCTION {s}.read_horizon(OUT horizon bigint, OUT held_back boolean)
    LANGUAGE plpgsql STABLE AS $fn$
    DECLARE
        v_snapshot pg_snapshot := pg_current_snapshot();
        v_xmin bigint := pg_snapshot_xmin(v_snapshot)::text::bigint;
        v_xmax bigint := pg_snapshot_xmax(v_snapshot)::text::bigint;
        v_near bigint := v_xmax + 2147483648;
    BEGIN
        -- max(tx): one step of a backward index scan (an EXISTS may become a seq scan).
        held_back := v_xmin < v_xmax
            AND coalesce((SELECT max(tx) FROM {s}.events) >= v_xmin, false);
        IF NOT held_back THEN
            horizon := v_xmin;
            RETURN;
        END IF;
        SELECT least(v_xmax, min(v_near - ((v_near - v.xid) % 4294967296)))
        INTO horizon
        FROM (
            SELECT bool_or(locktype = 'advisory' AND granted AND objsubid = 1
                           AND ((classid::bigint << 32) | objid::bigint) = {writer_lock}
                           AND database = (SELECT oid FROM pg_database
                                           WHERE datname = current_database())) AS writer,
                   min(transactionid::text::bigint)
                       FILTER (WHERE locktype = 'transactionid' AND granted
                               AND mode = 'ExclusiveLock') AS xid
            FROM pg_locks
            WHERE locktype IN ('advisory', 'transactionid')
            GROUP BY virtualtransaction
        ) AS v
        WHERE v.writer AND v.xid IS NOT NULL;
    END
    $fn$;

    CREATE OR REPLACE FUNCTION {s}.append_events(
        p_streams text[],
        p_expected bigint[],
        p_counts int[],
        p_event_stream int[],
        p_offset int[],
        p_event_id uuid[],
        p_type text[],
        p_data jsonb[],
        p_metadata jsonb[]
    ) RETURNS TABLE (last_tx bigint, last_position bigint, versions bigint[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_versions bigint[] := '{{}}';
        v_hashes bigint[] := '{{}}';
        v_version bigint;
        v_last_tx bigint;
        v_floor bigint;
        v_tx bigint;
    BEGIN
        v_floor := {s}.begin_append(p_streams);
        FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
            SELECT s.version, s.last_tx INTO v_version, v_last_tx FROM {s}.streams s
                WHERE s.stream_id = p_streams[i] FOR UPDATE;
            IF NOT FOUND THEN
                -- A concurrent creator makes this wait for its commit, then do nothing.
                INSERT INTO {s}.streams (stream_id, version) VALUES (p_streams[i], 0)
                    ON CONFLICT DO NOTHING;
                SELECT s.version, s.last_tx INTO v_version, v_last_tx FROM {s}.streams s
                    WHERE s.stream_id = p_streams[i] FOR UPDATE;
            END IF;
            v_floor := greatest(v_floor, v_last_tx);
            IF p_expected[i] IS NOT NULL AND p_expected[i] <> v_version THEN
                RAISE EXCEPTION USING
                    ERRCODE = 'EV001',
                    MESSAGE = format('stream %s is at version %s, expected %s',
                                     p_streams[i], v_version, p_expected[i]),
                    DETAIL = json_build_object('stream_id', p_streams[i],
                                               'expected', p_expected[i],
                                               'actual', v_version)::text;
            END IF;
            v_versions := v_versions || v_version;
            v_hashes := v_hashes || {s}.stream_hash(p_streams[i]);
        END LOOP;

        IF coalesce(array_length(p_type, 1), 0) = 0 THEN
            RETURN QUERY SELECT NULL::bigint, NULL::bigint, v_versions;
            RETURN;
        END IF;

        -- The client sends NULL instead of arrays that carry nothing: stream indexes and
        -- offsets for a single-stream append, ids when none were given, metadata when every
        -- event's is empty. unnest() pads a NULL array with NULLs, hence the coalesces.
        v_tx := greatest(pg_current_xact_id()::text::bigint, v_floor);
        INSERT INTO {s}.events
            (tx, stream_id, stream_version, event_id, type, data, metadata, stream_hash)
        SELECT v_tx, p_streams[coalesce(e.si, 1)],
               v_versions[coalesce(e.si, 1)] + coalesce(e.off, e.ord),
               coalesce(e.id, gen_random_uuid()), e.type, e.data,
               coalesce(e.meta, '{{}}'::jsonb), v_hashes[coalesce(e.si, 1)]
        FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset)
             WITH ORDINALITY AS e(type, data, meta, id, si, off, ord)
        ORDER BY e.ord;

        UPDATE {s}.streams AS s SET version = s.version + c.n, last_tx = v_tx
        FROM unnest(p_streams, p_counts) AS c(stream_id, n)
        WHERE s.stream_id = c.stream_id AND c.n > 0;

        -- No NOTIFY here: the store notifies after the commit (see _notifier), since
        -- notifying transactions commit one at a time.
        RETURN QUERY SELECT v_tx, currval('{s}.events_position_seq'::regclass), v_versions;
    END
    $fn$;

    -- Several independent appends in one statement and one transaction: what concurrent
    -- appenders of one store share (see _group_commit). Each request is all or nothing on its
    -- own: one whose expected versions do not hold gets its conflict back and writes nothing,
    -- while the others are written. p_request gives each stream entry's request (1-based,
    -- ascending, entries of one request together and sorted by stream); a stream may appear
    -- in several requests, which then apply in request order. p_event_stream is each event's
    -- 1-based entry index (across requests), p_offset its 1-based place in its entry. No
    -- savepoints: every check is made before anything is written.
    CREATE OR REPLACE FUNCTION {s}.append_many(
        p_request int[],
        p_streams text[],
        p_expected bigint[],
        p_counts int[],
        p_event_stream int[],
        p_offset int[],
        p_event_id uuid[],
        p_type text[],
        p_data jsonb[],
        p_metadata jsonb[]
    ) RETURNS TABLE (request int, last_tx bigint, last_position bigint, versions bigint[],
                     conflict text)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_entries int := coalesce(array_length(p_streams, 1), 0);
        v_names text[] := '{{}}';
        v_current bigint[] := '{{}}';
        v_base bigint[] := array_fill(NULL::bigint, ARRAY[v_entries]);
        v_hashes bigint[] := array_fill(NULL::bigint, ARRAY[v_entries]);
        v_conflicts text[] := '{{}}';
        v_written_streams text[];
        v_written_versions bigint[];
        v_written_positions bigint[];
        v_name text;
        v_version bigint;
        v_last_tx bigint;
        v_floor bigint;
        v_tx bigint;
        v_first int;
        v_last int;
        v_at int;
        v_ok boolean;
        i int := 1;
    BEGIN
        -- Announced, and every stream's lock taken, before any write, as in append_events.
        v_floor := {s}.begin_append(p_streams);
        -- Each distinct stream's row, in name order.
        FOR v_name IN SELECT DISTINCT x FROM unnest(p_streams) AS x ORDER BY 1 LOOP
            SELECT st.version, st.last_tx INTO v_version, v_last_tx FROM {s}.streams st
                WHERE st.stream_id = v_name FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO {s}.streams (stream_id, version) VALUES (v_name, 0)
                    ON CONFLICT DO NOTHING;
                SELECT st.version, st.last_tx INTO v_version, v_last_tx FROM {s}.streams st
                    WHERE st.stream_id = v_name FOR UPDATE;
            END IF;
            v_floor := greatest(v_floor, v_last_tx);
            v_names := v_names || v_name;
            v_current := v_current || v_version;
        END LOOP;
        -- Requests in order, against the versions the earlier ones leave.
        FOR r IN 1 .. coalesce(p_request[v_entries], 0) LOOP
            v_first := i;
            WHILE i <= v_entries AND p_request[i] = r LOOP
                i := i + 1;
            END LOOP;
            v_last := i - 1;
            v_ok := true;
            v_conflicts := v_conflicts || NULL::text;
            FOR k IN v_first .. v_last LOOP
                v_at := array_position(v_names, p_streams[k]);
                IF p_expected[k] IS NOT NULL AND p_expected[k] <> v_current[v_at] THEN
                    v_ok := false;
                    v_conflicts[r] := json_build_object('stream_id', p_streams[k],
                                                        'expected', p_expected[k],
                                                        'actual', v_current[v_at])::text;
                    EXIT;
                END IF;
            END LOOP;
            CONTINUE WHEN NOT v_ok;
            FOR k IN v_first .. v_last LOOP
                v_at := array_position(v_names, p_streams[k]);
                v_base[k] := v_current[v_at];
                v_current[v_at] := v_current[v_at] + p_counts[k];
                v_hashes[k] := {s}.stream_hash(p_streams[k]);
            END LOOP;
        END LOOP;

        v_tx := greatest(pg_current_xact_id()::text::bigint, v_floor);
        WITH inserted AS (
            INSERT INTO {s}.events
                (tx, stream_id, stream_version, event_id, type, data, metadata, stream_hash)
            SELECT v_tx, p_streams[e.si], v_base[e.si] + e.off, coalesce(e.id, gen_random_uuid()),
                   e.type, e.data, coalesce(e.meta, '{{}}'::jsonb), v_hashes[e.si]
            FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset)
                 WITH ORDINALITY AS e(type, data, meta, id, si, off, ord)
            WHERE v_base[e.si] IS NOT NULL
            ORDER BY e.ord
            RETURNING stream_id, stream_version, position
        )
        SELECT array_agg(stream_id), array_agg(stream_version), array_agg(position)
        INTO v_written_streams, v_written_versions, v_written_positions
        FROM inserted;

        UPDATE {s}.streams AS st SET version = c.version, last_tx = v_tx
        FROM unnest(v_names, v_current) AS c(stream_id, version)
        WHERE st.stream_id = c.stream_id AND st.version <> c.version;

        -- Per request: each entry's version before it (NULL when refused), and the position
        -- of its last event (the greatest among its streams' last events).
        RETURN QUERY
        SELECT g.request,
               CASE WHEN g.last_position IS NULL THEN NULL ELSE v_tx END,
               g.last_position, g.versions, v_conflicts[g.request]
        FROM (
            SELECT p_request[k] AS request,
                   array_agg(v_base[k] ORDER BY k) AS versions,
                   max(ev.position) AS last_position
            FROM generate_subscripts(p_streams, 1) AS k
            LEFT JOIN unnest(v_written_streams, v_written_versions, v_written_positions)
                AS ev(stream_id, stream_version, position)
                ON p_counts[k] > 0 AND v_base[k] IS NOT NULL
                AND ev.stream_id = p_streams[k] AND ev.stream_version = v_base[k] + p_counts[k]
            GROUP BY p_request[k]
        ) AS g
        ORDER BY g.request;
    END
    $fn$;
    """,
    # 4: the tx of transactions that had an id before announcing themselves is at least the
    # xmax of a snapshot taken after the announcement, and they own an id at least that
    # large (docs/postgres.md, "The read horizon"), for any number of them at once; group
    # commit never waits for a stream that another transaction holds; what each host runs.
    """
    -- The least tx the events of a transaction that has just announced itself may carry.
    -- 0 when it had no id before it announced itself: its own id, assigned from now on, is
    -- enough. Otherwise the greatest of its id and the xmax of a snapshot taken now, negated
    -- (a fresh floor, see below), or the floor an earlier append of the transaction kept.
    -- Every reader that did not see the announcement reads below the xmax of a snapshot
    -- taken before it, which is at most this one's (xmax is the latest *completed* id + 1,
    -- and only grows); every reader that saw it reads below the transaction's own id. A
    -- fresh floor may be an id nobody has been assigned yet, so the append that uses it
    -- claims one at least as large (a subtransaction's, assigned by its write, after this
    -- point) that completes with the transaction, and only then keeps the floor for the
    -- rest of the transaction: an append that writes no events keeps nothing, so a kept
    -- floor is always owned. (The writer lock is held as long as the kept floor; a savepoint
    -- rolled back takes both.) A fresh snapshot needs READ COMMITTED, unless the transaction
    -- announced itself at its start (store.transaction(), which sets eventcore_trio.writer).
    CREATE FUNCTION {s}.writer_floor(p_had_xid boolean) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_floor bigint;
    BEGIN
        IF NOT p_had_xid
           OR current_setting('eventcore_trio.writer', true) IS NOT DISTINCT FROM {schema_name}
        THEN
            RETURN 0;
        END IF;
        v_floor := nullif(current_setting({floor_setting}, true), '')::bigint;
        IF v_floor IS NOT NULL THEN
            RETURN v_floor;
        END IF;
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION USING
                ERRCODE = 'EV003',
                MESSAGE = 'this transaction wrote before appending events, at '
                    || current_setting('transaction_isolation')
                    || ' isolation: append first, use READ COMMITTED, or open it with '
                    || 'store.transaction()';
        END IF;
        RETURN -greatest(pg_current_xact_id()::text::bigint,
                         pg_snapshot_xmax(pg_current_snapshot())::text::bigint);
    END
    $fn$;

    -- Announce this transaction as an event writer (the shared writer lock), take its
    -- streams' locks in key order (before the transaction holds an id, unless it already
    -- did: so of two appends to one stream the later gets the larger id; key order, in the
    -- two-int form apart from the store's bigint locks, so that concurrent appends cannot
    -- deadlock), then return its floor (see writer_floor: negative when fresh).
    CREATE OR REPLACE FUNCTION {s}.begin_append(p_streams text[]) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_had_xid boolean := pg_current_xact_id_if_assigned() IS NOT NULL;
        v_key int;
    BEGIN
        PERFORM pg_advisory_xact_lock_shared({writer_lock});
        FOR v_key IN SELECT DISTINCT hashtext(x) FROM unnest(p_streams) AS x ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock({stream_locks}, v_key);
        END LOOP;
        IF NOT v_had_xid THEN
            RETURN 0;
        END IF;
        RETURN {s}.writer_floor(true);
    END
    $fn$;

    CREATE OR REPLACE FUNCTION {s}.append_events(
        p_streams text[],
        p_expected bigint[],
        p_counts int[],
        p_event_stream int[],
        p_offset int[],
        p_event_id uuid[],
        p_type text[],
        p_data jsonb[],
        p_metadata jsonb[]
    ) RETURNS TABLE (last_tx bigint, last_position bigint, versions bigint[])
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_versions bigint[] := '{{}}';
        v_hashes bigint[] := '{{}}';
        v_version bigint;
        v_last_tx bigint;
        v_floor bigint;
        v_fresh boolean;
        v_tx bigint;
    BEGIN
        v_floor := {s}.begin_append(p_streams);
        v_fresh := v_floor < 0;
        v_floor := abs(v_floor);
        FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
            SELECT s.version, s.last_tx INTO v_version, v_last_tx FROM {s}.streams s
                WHERE s.stream_id = p_streams[i] FOR UPDATE;
            IF NOT FOUND THEN
                -- A concurrent creator makes this wait for its commit, then do nothing.
                INSERT INTO {s}.streams (stream_id, version) VALUES (p_streams[i], 0)
                    ON CONFLICT DO NOTHING;
                SELECT s.version, s.last_tx INTO v_version, v_last_tx FROM {s}.streams s
                    WHERE s.stream_id = p_streams[i] FOR UPDATE;
            END IF;
            -- Per-stream order: never below the tx of the stream's last append.
            v_floor := greatest(v_floor, v_last_tx);
            IF p_expected[i] IS NOT NULL AND p_expected[i] <> v_version THEN
                RAISE EXCEPTION USING
                    ERRCODE = 'EV001',
                    MESSAGE = format('stream %s is at version %s, expected %s',
                                     p_streams[i], v_version, p_expected[i]),
                    DETAIL = json_build_object('stream_id', p_streams[i],
                                               'expected', p_expected[i],
                                               'actual', v_version)::text;
            END IF;
            v_versions := v_versions || v_version;
            v_hashes := v_hashes || {s}.stream_hash(p_streams[i]);
        END LOOP;

        IF coalesce(array_length(p_type, 1), 0) = 0 THEN
            RETURN QUERY SELECT NULL::bigint, NULL::bigint, v_versions;
            RETURN;
        END IF;

        -- The client sends NULL instead of arrays that carry nothing: stream indexes and
        -- offsets for a single-stream append, ids when none were given, metadata when every
        -- event's is empty. unnest() pads a NULL array with NULLs, hence the coalesces.
        v_tx := greatest(pg_current_xact_id()::text::bigint, v_floor);
        INSERT INTO {s}.events
            (tx, stream_id, stream_version, event_id, type, data, metadata, stream_hash)
        SELECT v_tx, p_streams[coalesce(e.si, 1)],
               v_versions[coalesce(e.si, 1)] + coalesce(e.off, e.ord),
               coalesce(e.id, gen_random_uuid()), e.type, e.data,
               coalesce(e.meta, '{{}}'::jsonb), v_hashes[coalesce(e.si, 1)]
        FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset)
             WITH ORDINALITY AS e(type, data, meta, id, si, off, ord)
        ORDER BY e.ord;

        IF v_fresh AND v_floor > pg_current_xact_id()::text::bigint THEN
            -- The same update in a subtransaction: its id, assigned by this write, is at
            -- least the floor and completes with this transaction (see writer_floor). The
            -- handler never runs (no statement raises EV999); it is what makes the block a
            -- subtransaction.
            BEGIN
                UPDATE {s}.streams AS s SET version = s.version + c.n, last_tx = v_tx
                FROM unnest(p_streams, p_counts) AS c(stream_id, n)
                WHERE s.stream_id = c.stream_id AND c.n > 0;
            EXCEPTION WHEN SQLSTATE 'EV999' THEN
                RAISE;
            END;
        ELSE
            UPDATE {s}.streams AS s SET version = s.version + c.n, last_tx = v_tx
            FROM unnest(p_streams, p_counts) AS c(stream_id, n)
            WHERE s.stream_id = c.stream_id AND c.n > 0;
        END IF;
        IF v_fresh THEN
            -- Owned now: later appends of this transaction keep it (see writer_floor).
            PERFORM set_config({floor_setting}, v_floor::text, true);
        END IF;

        -- No NOTIFY here: the store notifies after the commit (see _notifier), since
        -- notifying transactions commit one at a time.
        RETURN QUERY SELECT v_tx, currval('{s}.events_position_seq'::regclass), v_versions;
    END
    $fn$;

    -- As before, with one difference: a shared statement does not wait for other
    -- transactions. Stream locks are tried, never awaited (so no order is needed either); a
    -- request that names a stream whose lock another transaction holds (an open outbox
    -- transaction, a lone append waiting for one) comes back busy, having written nothing,
    -- and the client sends it again on its own, so requests for other streams never wait
    -- behind it. Any other wait is cut short by a lock timeout (below).
    DROP FUNCTION {s}.append_many(int[], text[], bigint[], int[], int[], int[], uuid[],
                                  text[], jsonb[], jsonb[]);
    CREATE FUNCTION {s}.append_many(
        p_request int[],
        p_streams text[],
        p_expected bigint[],
        p_counts int[],
        p_event_stream int[],
        p_offset int[],
        p_event_id uuid[],
        p_type text[],
        p_data jsonb[],
        p_metadata jsonb[]
    ) RETURNS TABLE (request int, last_tx bigint, last_position bigint, versions bigint[],
                     conflict text, busy boolean)
    LANGUAGE plpgsql AS $fn$
    DECLARE
        v_had_xid boolean := pg_current_xact_id_if_assigned() IS NOT NULL;
        v_entries int := coalesce(array_length(p_streams, 1), 0);
        v_free int[] := '{{}}';
        v_names text[] := '{{}}';
        v_current bigint[] := '{{}}';
        v_base bigint[] := array_fill(NULL::bigint, ARRAY[v_entries]);
        v_hashes bigint[] := array_fill(NULL::bigint, ARRAY[v_entries]);
        v_conflicts text[] := '{{}}';
        v_busy boolean[] := '{{}}';
        v_written_streams text[];
        v_written_versions bigint[];
        v_written_positions bigint[];
        v_name text;
        v_version bigint;
        v_last_tx bigint;
        v_floor bigint;
        v_fresh boolean;
        v_tx bigint;
        v_key int;
        v_first int;
        v_last int;
        v_at int;
        v_ok boolean;
        i int := 1;
    BEGIN
        -- Nor for anything else another transaction holds: an event id that an open
        -- transaction has inserted (the unique index waits for it), a row or table lock
        -- taken by hand. Past this the statement fails, having written nothing, and every
        -- request is sent again on its own (see _group_commit).
        PERFORM set_config('lock_timeout', '{shared_lock_timeout}', true);
        PERFORM pg_advisory_xact_lock_shared({writer_lock});
        FOR v_key IN SELECT DISTINCT hashtext(x) FROM unnest(p_streams) AS x LOOP
            IF pg_try_advisory_xact_lock({stream_locks}, v_key) THEN
                v_free := v_free || v_key;
            END IF;
        END LOOP;
        v_floor := {s}.writer_floor(v_had_xid);
        v_fresh := v_floor < 0;
        v_floor := abs(v_floor);
        -- The row of each distinct stream whose lock this transaction holds, in name order.
        FOR v_name IN SELECT DISTINCT x FROM unnest(p_streams) AS x
                      WHERE hashtext(x) = ANY(v_free) ORDER BY 1 LOOP
            SELECT st.version, st.last_tx INTO v_version, v_last_tx FROM {s}.streams st
                WHERE st.stream_id = v_name FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO {s}.streams (stream_id, version) VALUES (v_name, 0)
                    ON CONFLICT DO NOTHING;
                SELECT st.version, st.last_tx INTO v_version, v_last_tx FROM {s}.streams st
                    WHERE st.stream_id = v_name FOR UPDATE;
            END IF;
            v_floor := greatest(v_floor, v_last_tx);
            v_names := v_names || v_name;
            v_current := v_current || v_version;
        END LOOP;
        -- Requests in order, against the versions the earlier ones leave.
        FOR r IN 1 .. coalesce(p_request[v_entries], 0) LOOP
            v_first := i;
            WHILE i <= v_entries AND p_request[i] = r LOOP
                i := i + 1;
            END LOOP;
            v_last := i - 1;
            v_ok := true;
            v_conflicts := v_conflicts || NULL::text;
            v_busy := v_busy || false;
            FOR k IN v_first .. v_last LOOP
                v_at := array_position(v_names, p_streams[k]);
                IF v_at IS NULL THEN
                    v_ok := false;
                    v_busy[r] := true;
                    EXIT;
                END IF;
                IF p_expected[k] IS NOT NULL AND p_expected[k] <> v_current[v_at] THEN
                    v_ok := false;
                    v_conflicts[r] := json_build_object('stream_id', p_streams[k],
                                                        'expected', p_expected[k],
                                                        'actual', v_current[v_at])::text;
                    EXIT;
                END IF;
            END LOOP;
            CONTINUE WHEN NOT v_ok;
            FOR k IN v_first .. v_last LOOP
                v_at := array_position(v_names, p_streams[k]);
                v_base[k] := v_current[v_at];
                v_current[v_at] := v_current[v_at] + p_counts[k];
                v_hashes[k] := {s}.stream_hash(p_streams[k]);
            END LOOP;
        END LOOP;

        v_tx := greatest(pg_current_xact_id()::text::bigint, v_floor);
        WITH inserted AS (
            INSERT INTO {s}.events
                (tx, stream_id, stream_version, event_id, type, data, metadata, stream_hash)
            SELECT v_tx, p_streams[e.si], v_base[e.si] + e.off, coalesce(e.id, gen_random_uuid()),
                   e.type, e.data, coalesce(e.meta, '{{}}'::jsonb), v_hashes[e.si]
            FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset)
                 WITH ORDINALITY AS e(type, data, meta, id, si, off, ord)
            WHERE v_base[e.si] IS NOT NULL
            ORDER BY e.ord
            RETURNING stream_id, stream_version, position
        )
        SELECT array_agg(stream_id), array_agg(stream_version), array_agg(position)
        INTO v_written_streams, v_written_versions, v_written_positions
        FROM inserted;

        IF v_written_positions IS NULL THEN
            -- Nothing written (every request busy or refused): nothing to claim or keep.
            NULL;
        ELSIF v_fresh AND v_floor > pg_current_xact_id()::text::bigint THEN
            -- In a subtransaction, as in append_events (see writer_floor).
            BEGIN
                UPDATE {s}.streams AS st SET version = c.version, last_tx = v_tx
                FROM unnest(v_names, v_current) AS c(stream_id, version)
                WHERE st.stream_id = c.stream_id AND st.version <> c.version;
            EXCEPTION WHEN SQLSTATE 'EV999' THEN
                RAISE;
            END;
            PERFORM set_config({floor_setting}, v_floor::text, true);
        ELSE
            UPDATE {s}.streams AS st SET version = c.version, last_tx = v_tx
            FROM unnest(v_names, v_current) AS c(stream_id, version)
            WHERE st.stream_id = c.stream_id AND st.version <> c.version;
            IF v_fresh THEN
                PERFORM set_config({floor_setting}, v_floor::text, true);
            END IF;
        END IF;

        RETURN QUERY
        SELECT g.request,
               CASE WHEN g.last_position IS NULL THEN NULL ELSE v_tx END,
               g.last_position, g.versions, v_conflicts[g.request], v_busy[g.request]
        FROM (
            SELECT p_request[k] AS request,
                   array_agg(v_base[k] ORDER BY k) AS versions,
                   max(ev.position) AS last_position
            FROM generate_subscripts(p_streams, 1) AS k
            LEFT JOIN unnest(v_written_streams, v_written_versions, v_written_positions)
                AS ev(stream_id, stream_version, position)
                ON p_counts[k] > 0 AND v_base[k] IS NOT NULL
                AND ev.stream_id = p_streams[k] AND ev.stream_version = v_base[k] + p_counts[k]
            GROUP BY p_request[k]
        ) AS g
        ORDER BY g.request;
    END
    $fn$;

    -- The horizon for a read that starts after this statement, as in migration 3, with
    -- one more cap. PostgreSQL assigns a transaction id (and snapshots count it as running)
    -- a moment before the id's own lock appears in pg_locks (AssignTransactionId: the
    -- proc array first, XactLockTableInsert after), so an announced writer may hold an id
    -- that the lock view does not show yet. Every id assigned before this statement's
    -- snapshot is in its list of running ids; so the horizon also stays at or below each
    -- running id of the snapshot that no transaction-id lock in the view accounts for (a
    -- writer in that moment, or a transaction that ended between the snapshot and the view,
    -- which costs nothing but a shorter read). One view of pg_locks serves both caps. And on
    -- a hot standby, the xmin rule only.
    CREATE OR REPLACE FUNCTION {s}.read_horizon(OUT horizon bigint, OUT held_back boolean)
    LANGUAGE plpgsql STABLE AS $fn$
    DECLARE
        v_snapshot pg_snapshot := pg_current_snapshot();
        v_xmin bigint := pg_snapshot_xmin(v_snapshot)::text::bigint;
        v_xmax bigint := pg_snapshot_xmax(v_snapshot)::text::bigint;
        v_near bigint := v_xmax + 2147483648;
    BEGIN
        -- max(tx): one step of a backward index scan (an EXISTS may become a seq scan).
        -- On a hot standby the lock view shows no writers (advisory locks are not
        -- replicated): only the xmin rule holds there. (A standby counts every id it has
        -- not seen end as running, so the xmin rule is safe on it.)
        held_back := v_xmin < v_xmax
            AND NOT pg_is_in_recovery()
            AND coalesce((SELECT max(tx) FROM {s}.events) >= v_xmin, false);
        IF NOT held_back THEN
            horizon := v_xmin;
            RETURN;
        END IF;
        WITH view AS MATERIALIZED (
            SELECT virtualtransaction,
                   locktype = 'advisory' AND granted AND objsubid = 1
                       AND ((classid::bigint << 32) | objid::bigint) = {writer_lock}
                       AND database = (SELECT oid FROM pg_database
                                       WHERE datname = current_database()) AS writer,
                   -- The owner's lock on its own id, widened next to the xmax.
                   CASE WHEN locktype = 'transactionid' AND granted AND mode = 'ExclusiveLock'
                        THEN v_near - ((v_near - transactionid::text::bigint) % 4294967296)
                   END AS xid
            FROM pg_locks
            WHERE locktype IN ('advisory', 'transactionid')
        ), writers AS (
            SELECT min(xid) AS xid FROM view
            GROUP BY virtualtransaction
            HAVING bool_or(writer)
        )
        SELECT least(
            v_xmax,
            (SELECT min(xid) FROM writers),
            (SELECT min(r.x) FROM (
                 SELECT x::text::bigint AS x FROM pg_snapshot_xip(v_snapshot) AS x
             ) AS r
             WHERE NOT EXISTS (SELECT 1 FROM view WHERE view.xid = r.x))
        )
        INTO horizon;
    END
    $fn$;

    -- The projectors (names) each balancing host runs, so that a unit is planned only
    -- over the hosts that can run it; NULL for a host that has not said.
    ALTER TABLE {s}.hosts ADD COLUMN runs text[];

    -- The last event folded into a snapshot, as recorded: its id and its recorded_at. A
    -- snapshot is trusted only while the stream's event at its version is still that event
    -- (a restore may have rewritten the stream since). The id alone does not name it: a
    -- writer that retries a lost event with its own id (an idempotency key) records that id
    -- again, at a later recorded_at. NULL for snapshots taken before this migration: never
    -- trusted.
    ALTER TABLE {s}.snapshots ADD COLUMN event_id uuid, ADD COLUMN event_recorded_at timestamptz;
    """,
    # 5: no role can hijack the store's functions or forge its events (issue 32). Every
    # function runs with a fixed search_path; appends run as the schema's owner (SECURITY
    # DEFINER), check what they are given, and are executable only by roles granted them
    # (`eventcore-trio migrate --grant ROLE`, see `_grants`); the settings by which a
    # transaction says it announced itself or keeps a floor carry a mark only the owner's
    # functions can make.
    """
    -- PostgreSQL prefers a function or operator of the exact argument types from any schema
    -- on the caller's search_path over pg_catalog's polymorphic one (CVE-2018-1058): a role
    -- that may create objects in public could plant public.unnest(text[]) and run its code
    -- inside every append. Each function sees pg_catalog only (pg_temp last, as advised);
    -- every table it names is schema-qualified.
    ALTER FUNCTION {s}.stream_hash(text) SET search_path = pg_catalog, pg_temp;
    ALTER FUNCTION {s}.refuse_event_change() SET search_path = pg_catalog, pg_temp;
    ALTER FUNCTION {s}.begin_append(text[]) SET search_path = pg_catalog, pg_temp;
    ALTER FUNCTION {s}.read_horizon() SET search_path = pg_catalog, pg_temp;

    -- The key of the marks below: readable by the owner alone, whatever default privileges
    -- the owner has set (no grant of `_grants` names it).
    CREATE TABLE {s}.mark_secret (secret bytea NOT NULL);
    REVOKE ALL ON {s}.mark_secret FROM PUBLIC;
    DO $do$
    DECLARE
        v_grantee oid;
    BEGIN
        FOR v_grantee IN
            SELECT DISTINCT a.grantee FROM pg_class AS c, aclexplode(c.relacl) AS a
            WHERE c.oid = '{s}.mark_secret'::regclass AND a.grantee <> c.relowner
        LOOP
            EXECUTE 'REVOKE ALL ON {s}.mark_secret FROM '
                || CASE WHEN v_grantee = 0 THEN 'PUBLIC'
                        ELSE quote_ident(pg_get_userbyid(v_grantee)) END;
        END LOOP;
    END
    $do$;
    INSERT INTO {s}.mark_secret
        SELECT uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid());

    -- A keyed digest of p_what. Any session may set any eventcore_trio.* setting, so a
    -- setting the append functions trust must carry a mark that only they can make, of
    -- something no other transaction has: a caller cannot choose the tx of its events.
    -- (PL/pgSQL, here and below: it keeps its plans for the session, where a SQL function
    -- called from another would be planned at every call.)
    CREATE FUNCTION {s}.mark(p_what text) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    BEGIN
        RETURN (SELECT encode(sha256(k.secret || sha256(k.secret || convert_to(p_what, 'UTF8'))),
                              'hex')
                FROM {s}.mark_secret AS k);
    END
    $fn$;

    -- The mark of "this transaction announced itself before it had an id": of the session
    -- and its virtual transaction id, which no other transaction ever has (NULL if the
    -- lock view does not show it, which makes no mark).
    CREATE FUNCTION {s}.writer_mark() RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    DECLARE
        v_vxid text;
    BEGIN
        SELECT l.virtualtransaction INTO v_vxid FROM pg_locks AS l
        WHERE l.locktype = 'virtualxid' AND l.pid = pg_backend_pid() AND l.granted
          AND l.virtualxid = l.virtualtransaction
        LIMIT 1;
        IF v_vxid IS NULL THEN
            RETURN NULL;
        END IF;
        RETURN {s}.mark('writer/' || pg_backend_pid()::text || '/' || v_vxid);
    END
    $fn$;

    -- The kept floor's setting: the floor and its mark, bound to this transaction's id.
    CREATE FUNCTION {s}.floor_mark(p_floor bigint) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    BEGIN
        RETURN p_floor::text || '/'
               || {s}.mark('floor/' || pg_current_xact_id()::text || '/' || p_floor::text);
    END
    $fn$;

    -- The floor an earlier append of this transaction kept, or NULL: none, or a setting
    -- that is not this transaction's own mark (set by hand), which counts as none.
    CREATE FUNCTION {s}.kept_floor() RETURNS bigint
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    DECLARE
        v_kept text := current_setting({floor_setting}, true);
        v_floor bigint;
    BEGIN
        IF v_kept IS NULL OR v_kept !~ '^[0-9]{{1,18}}/[0-9a-f]{{64}}$' THEN
            RETURN NULL;
        END IF;
        v_floor := split_part(v_kept, '/', 1)::bigint;
        IF v_kept = {s}.floor_mark(v_floor) THEN
            RETURN v_floor;
        END IF;
        RETURN NULL;
    END
    $fn$;

    -- Announce this transaction as an event writer at its start, for store.transaction()
    -- at REPEATABLE READ or SERIALIZABLE: the writer lock, and, while the transaction has
    -- no id yet, its mark (see writer_floor). Called later, it only takes the lock.
    CREATE FUNCTION {s}.announce_writer() RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    BEGIN
        PERFORM pg_advisory_xact_lock_shared({writer_lock});
        IF pg_current_xact_id_if_assigned() IS NULL THEN
            PERFORM set_config('eventcore_trio.writer', {s}.writer_mark(), true);
        END IF;
    END
    $fn$;

    -- As in migration 4, with the settings checked for their marks.
    CREATE OR REPLACE FUNCTION {s}.writer_floor(p_had_xid boolean) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
    DECLARE
        v_floor bigint;
        v_writer text;
    BEGIN
        IF NOT p_had_xid THEN
            RETURN 0;
        END IF;
        -- Two steps: the mark (a look at pg_locks) only when there is a setting to check.
        v_writer := coalesce(current_setting('eventcore_trio.writer', true), '');
        IF v_writer <> '' THEN
            IF v_writer = {s}.writer_mark() THEN
                RETURN 0;
            END IF;
        END IF;
        v_floor := {s}.kept_floor();
        IF v_floor IS NOT NULL THEN
            RETURN v_floor;
        END IF;
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION USING
                ERRCODE = 'EV003',
                MESSAGE = 'this transaction wrote before appending events, at '
                    || current_setting('transaction_isolation')
                    || ' isolation: append first, use READ COMMITTED, or open it with '
                    || 'store.transaction()';
        END IF;
        RETURN -greatest(pg_current_xact_id()::text::bigint,
                         pg_snapshot_xmax(pg_current_snapshot())::text::bigint);
    END
    $fn$;

    -- What an append function is given, checked before anything is locked or written: the
    -- functions run as the owner, so their callers need no rights on events or streams, and
    -- nothing a caller sends may leave a stream's versions out of step with its events. Each
    -- array is one-dimensional from 1, sized by the streams (entries) or by the events; each
    -- event's stream index and offset are exactly the layout p_counts gives (versions follow
    -- from it); and for append_many, requests are numbered 1, 2, ... in order. Transaction
    -- ids, positions and recorded_at are never arguments.
    CREATE FUNCTION {s}.check_append(
        p_many boolean,
        p_request int[],
        p_streams text[],
        p_expected bigint[],
        p_counts int[],
        p_event_stream int[],
        p_offset int[],
        p_event_id uuid[],
        p_type text[],
        p_data jsonb[],
        p_metadata jsonb[]
    ) RETURNS void
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    DECLARE
        v_streams int := coalesce(cardinality(p_streams), 0);
        v_events int := coalesce(cardinality(p_type), 0);
        v_stream_dims text := CASE WHEN v_streams > 0 THEN '[1:' || v_streams || ']' END;
        v_event_dims text := CASE WHEN v_events > 0 THEN '[1:' || v_events || ']' END;
        v_ok boolean;
    BEGIN
        v_ok := array_dims(p_streams) IS NOT DISTINCT FROM v_stream_dims
            AND array_dims(p_expected) IS NOT DISTINCT FROM v_stream_dims
            AND array_dims(p_counts) IS NOT DISTINCT FROM v_stream_dims
            AND array_dims(p_type) IS NOT DISTINCT FROM v_event_dims
            AND array_dims(p_data) IS NOT DISTINCT FROM v_event_dims
            AND (p_metadata IS NULL OR array_dims(p_metadata) IS NOT DISTINCT FROM v_event_dims)
            AND (p_event_id IS NULL OR array_dims(p_event_id) IS NOT DISTINCT FROM v_event_dims)
            AND (0 <= ALL (p_counts)) IS TRUE;
        IF v_ok AND p_many THEN
            v_ok := array_dims(p_request) IS NOT DISTINCT FROM v_stream_dims
                AND (1 <= ALL (p_request)) IS TRUE
                AND (v_streams = 0 OR p_request[1] = 1)
                AND NOT EXISTS (SELECT FROM generate_subscripts(p_request, 1) AS r(k)
                                WHERE r.k > 1
                                  AND p_request[r.k] - p_request[r.k - 1] NOT IN (0, 1));
        END IF;
        IF v_ok THEN
            IF NOT p_many AND p_event_stream IS NULL AND p_offset IS NULL THEN
                -- One stream, its events in order.
                v_ok := v_streams = 1 AND p_counts[1] = v_events;
            ELSE
                SELECT coalesce(sum(c.n), 0) = v_events INTO v_ok FROM unnest(p_counts) AS c(n);
                IF v_ok THEN
                    SELECT coalesce(array_agg(s.k ORDER BY s.k, o.n), '{{}}') = p_event_stream
                           AND coalesce(array_agg(o.n ORDER BY s.k, o.n), '{{}}') = p_offset
                    INTO v_ok
                    FROM generate_subscripts(p_counts, 1) AS s(k),
                         generate_series(1, p_counts[s.k]) AS o(n);
                END IF;
            END IF;
        END IF;
        IF v_ok IS NOT TRUE THEN
            RAISE EXCEPTION USING
                ERRCODE = 'EV004',
                MESSAGE = 'malformed append: the arrays must be one-dimensional, sized by the '
                    || 'streams or by the events, and the events laid out by stream as '
                    || 'p_counts says',
                HINT = 'append through eventcore-trio (PostgresStore.append_atomic), which '
                    || 'builds these arguments';
        END IF;
    END
    $fn$;

    -- As in migration 4, as the owner (SECURITY DEFINER) with the fixed search_path, the
    -- arguments checked first (check_append) and the kept floor marked (floor_mark).
    CREATE OR REPLACE FUNCTION {s}.append_events(
        p_streams text[],
        p_expected bigint[],
        p_counts int[],
        p_event_stream int[],
        p_offset int[],
        p_event_id uuid[],
        p_type text[],
        p_data jsonb[],
        p_metadata jsonb[]
    ) RETURNS TABLE (last_tx bigint, last_position bigint, versions bigint[])
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    DECLARE
        v_versions bigint[] := '{{}}';
        v_hashes bigint[] := '{{}}';
        v_version bigint;
        v_last_tx bigint;
        v_floor bigint;
        v_fresh boolean;
        v_tx bigint;
    BEGIN
        PERFORM {s}.check_append(false, NULL, p_streams, p_expected, p_counts,
                                 p_event_stream, p_offset, p_event_id, p_type, p_data,
                                 p_metadata);
        v_floor := {s}.begin_append(p_streams);
        v_fresh := v_floor < 0;
        v_floor := abs(v_floor);
        FOR i IN 1 .. coalesce(array_length(p_streams, 1), 0) LOOP
            SELECT s.version, s.last_tx INTO v_version, v_last_tx FROM {s}.streams s
                WHERE s.stream_id = p_streams[i] FOR UPDATE;
            IF NOT FOUND THEN
                -- A concurrent creator makes this wait for its commit, then do nothing.
                INSERT INTO {s}.streams (stream_id, version) VALUES (p_streams[i], 0)
                    ON CONFLICT DO NOTHING;
                SELECT s.version, s.last_tx INTO v_version, v_last_tx FROM {s}.streams s
                    WHERE s.stream_id = p_streams[i] FOR UPDATE;
            END IF;
            -- Per-stream order: never below the tx of the stream's last append.
            v_floor := greatest(v_floor, v_last_tx);
            IF p_expected[i] IS NOT NULL AND p_expected[i] <> v_version THEN
                RAISE EXCEPTION USING
                    ERRCODE = 'EV001',
                    MESSAGE = format('stream %s is at version %s, expected %s',
                                     p_streams[i], v_version, p_expected[i]),
                    DETAIL = json_build_object('stream_id', p_streams[i],
                                               'expected', p_expected[i],
                                               'actual', v_version)::text;
            END IF;
            v_versions := v_versions || v_version;
            v_hashes := v_hashes || {s}.stream_hash(p_streams[i]);
        END LOOP;

        IF coalesce(array_length(p_type, 1), 0) = 0 THEN
            RETURN QUERY SELECT NULL::bigint, NULL::bigint, v_versions;
            RETURN;
        END IF;

        -- The client sends NULL instead of arrays that carry nothing: stream indexes and
        -- offsets for a single-stream append, ids when none were given, metadata when every
        -- event's is empty. unnest() pads a NULL array with NULLs, hence the coalesces.
        v_tx := greatest(pg_current_xact_id()::text::bigint, v_floor);
        INSERT INTO {s}.events
            (tx, stream_id, stream_version, event_id, type, data, metadata, stream_hash)
        SELECT v_tx, p_streams[coalesce(e.si, 1)],
               v_versions[coalesce(e.si, 1)] + coalesce(e.off, e.ord),
               coalesce(e.id, gen_random_uuid()), e.type, e.data,
               coalesce(e.meta, '{{}}'::jsonb), v_hashes[coalesce(e.si, 1)]
        FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset)
             WITH ORDINALITY AS e(type, data, meta, id, si, off, ord)
        ORDER BY e.ord;

        IF v_fresh AND v_floor > pg_current_xact_id()::text::bigint THEN
            -- The same update in a subtransaction: its id, assigned by this write, is at
            -- least the floor and completes with this transaction (see writer_floor). The
            -- handler never runs (no statement raises EV999); it is what makes the block a
            -- subtransaction.
            BEGIN
                UPDATE {s}.streams AS s SET version = s.version + c.n, last_tx = v_tx
                FROM unnest(p_streams, p_counts) AS c(stream_id, n)
                WHERE s.stream_id = c.stream_id AND c.n > 0;
            EXCEPTION WHEN SQLSTATE 'EV999' THEN
                RAISE;
            END;
        ELSE
            UPDATE {s}.streams AS s SET version = s.version + c.n, last_tx = v_tx
            FROM unnest(p_streams, p_counts) AS c(stream_id, n)
            WHERE s.stream_id = c.stream_id AND c.n > 0;
        END IF;
        IF v_fresh THEN
            -- Owned now: later appends of this transaction keep it (see writer_floor).
            PERFORM set_config({floor_setting}, {s}.floor_mark(v_floor), true);
        END IF;

        -- No NOTIFY here: the store notifies after the commit (see _notifier), since
        -- notifying transactions commit one at a time.
        RETURN QUERY SELECT v_tx, currval('{s}.events_position_seq'::regclass), v_versions;
    END
    $fn$;

    CREATE OR REPLACE FUNCTION {s}.append_many(
        p_request int[],
        p_streams text[],
        p_expected bigint[],
        p_counts int[],
        p_event_stream int[],
        p_offset int[],
        p_event_id uuid[],
        p_type text[],
        p_data jsonb[],
        p_metadata jsonb[]
    ) RETURNS TABLE (request int, last_tx bigint, last_position bigint, versions bigint[],
                     conflict text, busy boolean)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    DECLARE
        v_had_xid boolean := pg_current_xact_id_if_assigned() IS NOT NULL;
        v_entries int := coalesce(array_length(p_streams, 1), 0);
        v_free int[] := '{{}}';
        v_names text[] := '{{}}';
        v_current bigint[] := '{{}}';
        v_base bigint[] := array_fill(NULL::bigint, ARRAY[v_entries]);
        v_hashes bigint[] := array_fill(NULL::bigint, ARRAY[v_entries]);
        v_conflicts text[] := '{{}}';
        v_busy boolean[] := '{{}}';
        v_written_streams text[];
        v_written_versions bigint[];
        v_written_positions bigint[];
        v_name text;
        v_version bigint;
        v_last_tx bigint;
        v_floor bigint;
        v_fresh boolean;
        v_tx bigint;
        v_key int;
        v_first int;
        v_last int;
        v_at int;
        v_ok boolean;
        i int := 1;
    BEGIN
        PERFORM {s}.check_append(true, p_request, p_streams, p_expected, p_counts,
                                 p_event_stream, p_offset, p_event_id, p_type, p_data,
                                 p_metadata);
        -- Nor for anything else another transaction holds: an event id that an open
        -- transaction has inserted (the unique index waits for it), a row or table lock
        -- taken by hand. Past this the statement fails, having written nothing, and every
        -- request is sent again on its own (see _group_commit).
        PERFORM set_config('lock_timeout', '{shared_lock_timeout}', true);
        PERFORM pg_advisory_xact_lock_shared({writer_lock});
        FOR v_key IN SELECT DISTINCT hashtext(x) FROM unnest(p_streams) AS x LOOP
            IF pg_try_advisory_xact_lock({stream_locks}, v_key) THEN
                v_free := v_free || v_key;
            END IF;
        END LOOP;
        v_floor := {s}.writer_floor(v_had_xid);
        v_fresh := v_floor < 0;
        v_floor := abs(v_floor);
        -- The row of each distinct stream whose lock this transaction holds, in name order.
        FOR v_name IN SELECT DISTINCT x FROM unnest(p_streams) AS x
                      WHERE hashtext(x) = ANY(v_free) ORDER BY 1 LOOP
            SELECT st.version, st.last_tx INTO v_version, v_last_tx FROM {s}.streams st
                WHERE st.stream_id = v_name FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO {s}.streams (stream_id, version) VALUES (v_name, 0)
                    ON CONFLICT DO NOTHING;
                SELECT st.version, st.last_tx INTO v_version, v_last_tx FROM {s}.streams st
                    WHERE st.stream_id = v_name FOR UPDATE;
            END IF;
            v_floor := greatest(v_floor, v_last_tx);
            v_names := v_names || v_name;
            v_current := v_current || v_version;
        END LOOP;
        -- Requests in order, against the versions the earlier ones leave.
        FOR r IN 1 .. coalesce(p_request[v_entries], 0) LOOP
            v_first := i;
            WHILE i <= v_entries AND p_request[i] = r LOOP
                i := i + 1;
            END LOOP;
            v_last := i - 1;
            v_ok := true;
            v_conflicts := v_conflicts || NULL::text;
            v_busy := v_busy || false;
            FOR k IN v_first .. v_last LOOP
                v_at := array_position(v_names, p_streams[k]);
                IF v_at IS NULL THEN
                    v_ok := false;
                    v_busy[r] := true;
                    EXIT;
                END IF;
                IF p_expected[k] IS NOT NULL AND p_expected[k] <> v_current[v_at] THEN
                    v_ok := false;
                    v_conflicts[r] := json_build_object('stream_id', p_streams[k],
                                                        'expected', p_expected[k],
                                                        'actual', v_current[v_at])::text;
                    EXIT;
                END IF;
            END LOOP;
            CONTINUE WHEN NOT v_ok;
            FOR k IN v_first .. v_last LOOP
                v_at := array_position(v_names, p_streams[k]);
                v_base[k] := v_current[v_at];
                v_current[v_at] := v_current[v_at] + p_counts[k];
                v_hashes[k] := {s}.stream_hash(p_streams[k]);
            END LOOP;
        END LOOP;

        v_tx := greatest(pg_current_xact_id()::text::bigint, v_floor);
        WITH inserted AS (
            INSERT INTO {s}.events
                (tx, stream_id, stream_version, event_id, type, data, metadata, stream_hash)
            SELECT v_tx, p_streams[e.si], v_base[e.si] + e.off, coalesce(e.id, gen_random_uuid()),
                   e.type, e.data, coalesce(e.meta, '{{}}'::jsonb), v_hashes[e.si]
            FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset)
                 WITH ORDINALITY AS e(type, data, meta, id, si, off, ord)
            WHERE v_base[e.si] IS NOT NULL
            ORDER BY e.ord
            RETURNING stream_id, stream_version, position
        )
        SELECT array_agg(stream_id), array_agg(stream_version), array_agg(position)
        INTO v_written_streams, v_written_versions, v_written_positions
        FROM inserted;

        IF v_written_positions IS NULL THEN
            -- Nothing written (every request busy or refused): nothing to claim or keep.
            NULL;
        ELSIF v_fresh AND v_floor > pg_current_xact_id()::text::bigint THEN
            -- In a subtransaction, as in append_events (see writer_floor).
            BEGIN
                UPDATE {s}.streams AS st SET version = c.version, last_tx = v_tx
                FROM unnest(v_names, v_current) AS c(stream_id, version)
                WHERE st.stream_id = c.stream_id AND st.version <> c.version;
            EXCEPTION WHEN SQLSTATE 'EV999' THEN
                RAISE;
            END;
            PERFORM set_config({floor_setting}, {s}.floor_mark(v_floor), true);
        ELSE
            UPDATE {s}.streams AS st SET version = c.version, last_tx = v_tx
            FROM unnest(v_names, v_current) AS c(stream_id, version)
            WHERE st.stream_id = c.stream_id AND st.version <> c.version;
            IF v_fresh THEN
                PERFORM set_config({floor_setting}, {s}.floor_mark(v_floor), true);
            END IF;
        END IF;

        RETURN QUERY
        SELECT g.request,
               CASE WHEN g.last_position IS NULL THEN NULL ELSE v_tx END,
               g.last_position, g.versions, v_conflicts[g.request], v_busy[g.request]
        FROM (
            SELECT p_request[k] AS request,
                   array_agg(v_base[k] ORDER BY k) AS versions,
                   max(ev.position) AS last_position
            FROM generate_subscripts(p_streams, 1) AS k
            LEFT JOIN unnest(v_written_streams, v_written_versions, v_written_positions)
                AS ev(stream_id, stream_version, position)
                ON p_counts[k] > 0 AND v_base[k] IS NOT NULL
                AND ev.stream_id = p_streams[k] AND ev.stream_version = v_base[k] + p_counts[k]
            GROUP BY p_request[k]
        ) AS g
        ORDER BY g.request;
    END
    $fn$;

    -- Only roles granted them may append (`eventcore-trio migrate --grant ROLE`); the owner
    -- keeps every right. The rest are the append functions' own parts.
    REVOKE EXECUTE ON FUNCTION
        {s}.append_events(text[], bigint[], int[], int[], int[], uuid[], text[], jsonb[],
                          jsonb[]),
        {s}.append_many(int[], text[], bigint[], int[], int[], int[], uuid[], text[], jsonb[],
                        jsonb[]),
        {s}.announce_writer(),
        {s}.begin_append(text[]),
        {s}.writer_floor(boolean),
        {s}.check_append(boolean, int[], text[], bigint[], int[], int[], int[], uuid[], text[],
                         jsonb[], jsonb[]),
        {s}.mark(text),
        {s}.writer_mark(),
        {s}.floor_mark(bigint),
        {s}.kept_floor()
    FROM PUBLIC;
    """,
    # 6: the tx of a transaction that had an id before it appended is an id it claims at
    # that moment, never one a setting vouches for. A setting's mark survives a savepoint
    # rolled back, the writer lock taken in it does not: a role that replayed the mark could
    # give its events an id that readers had passed while no lock held them back (found by
    # a review of migration 5).
    """
    -- Per transaction, the row it wrote to claim an id: its xmin is the claim, `top` the
    -- transaction. A row of its own, never one shared with the session's other transactions
    -- (a prepared one keeps its row locked until COMMIT PREPARED: a shared row made the
    -- session's next claim wait for it, found by a review). The owner's alone (a role that
    -- could write a row here could vouch for an id of its choosing).
    CREATE TABLE {s}.writer_claims (pid int NOT NULL, top xid8 NOT NULL, PRIMARY KEY (pid, top));
    REVOKE ALL ON {s}.writer_claims FROM PUBLIC;
    DO $do$
    DECLARE
        v_grantee oid;
    BEGIN
        FOR v_grantee IN
            SELECT DISTINCT a.grantee FROM pg_class AS c, aclexplode(c.relacl) AS a
            WHERE c.oid = '{s}.writer_claims'::regclass AND a.grantee <> c.relowner
        LOOP
            EXECUTE 'REVOKE ALL ON {s}.writer_claims FROM '
                || CASE WHEN v_grantee = 0 THEN 'PUBLIC'
                        ELSE quote_ident(pg_get_userbyid(v_grantee)) END;
        END LOOP;
    END
    $do$;

    -- The least tx the events of a transaction that has just announced itself may carry:
    -- 0 when it had no id before (its own id, assigned from now on, is enough); otherwise
    -- an id claimed now, by a subtransaction that completes with it. An id assigned now is
    -- at least the xmax of every snapshot taken before (xmax is the latest completed id + 1,
    -- ids are assigned in order), so every reader that did not see the announcement reads
    -- below it, at any isolation (no fresh snapshot is needed); every reader that saw it
    -- reads below the transaction's own id. Later appends of the transaction reuse the claim
    -- while the writer lock they took with it still holds readers back: while the row
    -- version that made the claim is visible to the transaction, since a savepoint rolled
    -- back takes both. Positive: owned, as a kept floor was in migration 4. The settings of
    -- migration 5 no longer vouch for anything; the announcement at BEGIN is still what
    -- lets REPEATABLE READ and SERIALIZABLE transactions write before appending.
    CREATE OR REPLACE FUNCTION {s}.writer_floor(p_had_xid boolean) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
    DECLARE
        v_top xid8;
        v_top_id bigint;
        v_claim bigint;
    BEGIN
        IF NOT p_had_xid THEN
            RETURN 0;
        END IF;
        IF current_setting('transaction_isolation') <> 'read committed'
           AND coalesce(current_setting('eventcore_trio.writer', true), '')
               IS DISTINCT FROM {s}.writer_mark()
        THEN
            RAISE EXCEPTION USING
                ERRCODE = 'EV003',
                MESSAGE = 'this transaction wrote before appending events, at '
                    || current_setting('transaction_isolation')
                    || ' isolation: append first, use READ COMMITTED, or open it with '
                    || 'store.transaction()';
        END IF;
        v_top := pg_current_xact_id();
        v_top_id := v_top::text::bigint;
        SELECT c.xmin::text::bigint INTO v_claim FROM {s}.writer_claims AS c
            WHERE c.pid = pg_backend_pid() AND c.top = v_top;
        IF NOT FOUND THEN
            -- A subtransaction (the handler never runs), so that the claim is an id of
            -- its own, assigned now.
            BEGIN
                INSERT INTO {s}.writer_claims AS c (pid, top) VALUES (pg_backend_pid(), v_top)
                RETURNING c.xmin::text::bigint INTO v_claim;
            EXCEPTION WHEN SQLSTATE 'EV999' THEN
                RAISE;
            END;
            -- The session's rows of transactions that have ended go, never waiting: rows of
            -- running (prepared) ones are above the xmin, rows another transaction is
            -- deleting are skipped; and only at READ COMMITTED, where a row deleted since
            -- the snapshot is no serialization failure. The next claim takes what is left.
            IF current_setting('transaction_isolation') = 'read committed' THEN
                DELETE FROM {s}.writer_claims AS c
                WHERE c.ctid = ANY (ARRAY(
                    SELECT o.ctid FROM {s}.writer_claims AS o
                    WHERE o.pid = pg_backend_pid()
                      AND o.top < pg_snapshot_xmin(pg_current_snapshot())
                    FOR UPDATE SKIP LOCKED));
            END IF;
        END IF;
        -- xmin is a 32-bit id, assigned after the transaction's own and less than 2^31 ids
        -- later: widened next to it.
        RETURN v_top_id + ((v_claim - v_top_id % 4294967296) % 4294967296 + 4294967296)
                          % 4294967296;
    END
    $fn$;
    """,
)

LATEST_SCHEMA_VERSION: Final = len(_MIGRATIONS)


def _render(template: str, schema: str) -> str:
    return template.format(
        s=f'"{schema}"',
        stream_locks=stream_lock_space(schema),
        writer_lock=writer_lock_key(schema),
        schema_name=f"'{schema}'",
        floor_setting=f"'eventcore_trio.tx_floor_{schema}'",
        shared_lock_timeout=SHARED_LOCK_TIMEOUT,
    )


async def migrate(pool: Pool, schema: str) -> int:
    """Bring *schema* up to the latest version; return the number of migrations applied.

    A schema already at the latest version is only read: no lock, no DDL, so a runtime role
    (one with the grants of `runtime_grants`, which may not run DDL) may migrate=True too.

    Raises:
        ConfigurationError: the schema needs migrating and this role may not do it (it
            does not own the schema, or may not create it in this database).
        SchemaVersionError: the schema is newer than this library.
    """
    current = await schema_version(pool, schema)
    if current is not None and current >= LATEST_SCHEMA_VERSION:
        _check_not_newer(schema, current)
        return 0
    try:
        return await _apply_migrations(pool, schema)
    except DatabaseError as exc:
        if exc.sqlstate != INSUFFICIENT_PRIVILEGE:
            raise
        role = await pool.fetchval("SELECT current_user")
        raise ConfigurationError(
            f"role {role!r} may not migrate schema {schema!r} ({exc}): run `eventcore-trio "
            f"migrate --schema {schema}` as the schema's owner, or open the store with "
            'migrate=False once the owner has migrated it (docs/operations.md, "Roles and '
            'grants")'
        ) from exc


async def _apply_migrations(pool: Pool, schema: str) -> int:
    async with pool.acquire() as conn, conn.transaction():
        # Every statement of a migration resolves names in pg_catalog alone, whatever the
        # role's search_path holds: what another role planted there never runs as the owner.
        # (Everything of the store's is schema-qualified.)
        await conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
        await conn.execute(
            "SELECT pg_catalog.pg_advisory_xact_lock($1::bigint)", migration_lock_key(schema)
        )
        # Created only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the
        # database even when the schema exists, which its owner may well not have.
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = $1)", schema
        ):
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        if await conn.fetchval(_MIGRATIONS_TABLE, f'"{schema}".schema_migrations') is None:
            await conn.execute(
                f'CREATE TABLE "{schema}".schema_migrations ('
                "    version int PRIMARY KEY,"
                "    library_version text NOT NULL,"
                "    applied_at timestamptz NOT NULL DEFAULT now())"
            )
        current = await conn.fetchval(
            f'SELECT coalesce(max(version), 0) FROM "{schema}".schema_migrations'
        )
        _check_not_newer(schema, current)
        for version in range(current + 1, LATEST_SCHEMA_VERSION + 1):
            await conn.execute(_render(_MIGRATIONS[version - 1], schema))
            await conn.execute(
                f'INSERT INTO "{schema}".schema_migrations (version, library_version) '
                "VALUES ($1, $2)",
                version,
                __version__,
            )
        return LATEST_SCHEMA_VERSION - int(current)


#: PostgreSQL's SQLSTATE for a statement the role lacks the privileges for.
INSUFFICIENT_PRIVILEGE: Final = "42501"

# The regclass of a schema's migrations table, or NULL while there is none.
_MIGRATIONS_TABLE: Final = "SELECT pg_catalog.to_regclass($1)"


async def schema_version(pool: Pool, schema: str) -> int | None:
    """The version *schema* is at (0 for a table of migrations with none applied), or None
    when it has no table of migrations (a missing or empty schema).

    Raises:
        ConfigurationError: this role may not use the schema (see `runtime_grants`).
    """
    try:
        if await pool.fetchval(_MIGRATIONS_TABLE, f'"{schema}".schema_migrations') is None:
            return None
        return int(
            await pool.fetchval(
                f'SELECT coalesce(max(version), 0) FROM "{schema}".schema_migrations'
            )
        )
    except DatabaseError as exc:
        if exc.sqlstate != INSUFFICIENT_PRIVILEGE:
            raise
        role = await pool.fetchval("SELECT current_user")
        raise ConfigurationError(
            f"role {role!r} may not use schema {schema!r} ({exc}): its owner grants a runtime "
            f"role what it needs with `eventcore-trio migrate --schema {schema} --grant "
            f'{role}` (docs/operations.md, "Roles and grants")'
        ) from exc


async def check_schema(pool: Pool, schema: str) -> None:
    """Refuse to run against a schema that is missing, outdated or newer than this library.

    Raises:
        SchemaVersionError: the schema is missing, outdated or newer.
        ConfigurationError: this role may not use the schema.
    """
    current = await schema_version(pool, schema)
    if current is None or current < LATEST_SCHEMA_VERSION:
        raise SchemaVersionError(
            f"schema {schema!r} is at version {current or 0}, this library needs "
            f"{LATEST_SCHEMA_VERSION}: run `eventcore-trio migrate` or open the store with "
            "migrate=True"
        )
    _check_not_newer(schema, current)


def _check_not_newer(schema: str, current: int) -> None:
    if current > LATEST_SCHEMA_VERSION:
        raise SchemaVersionError(
            f"schema {schema!r} is at version {current}, newer than this library "
            f"({__version__}) understands (up to {LATEST_SCHEMA_VERSION}); upgrade "
            "eventcore-trio in this process instead of running an old version against it"
        )
