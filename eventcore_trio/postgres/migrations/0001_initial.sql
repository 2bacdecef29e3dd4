-- Migration 1: streams, events (immutable), subscriptions, projections, hosts, dead letters, the
-- append function.
--
-- A template for Python's str.format, filled in by eventcore_trio/postgres/_schema.py:
--   s                    the schema, double-quoted
--   stream_locks         the advisory-lock space of the schema's streams (an int)
-- Each placeholder stands in single braces; a literal brace is doubled.
-- Released: never edit, add a migration instead.

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
