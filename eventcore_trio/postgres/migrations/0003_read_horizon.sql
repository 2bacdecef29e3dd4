-- Migration 3: a read horizon made of event writers only (docs/postgres.md, "The read horizon").
-- Appends announce themselves with a shared transaction lock before they can hold the
-- transaction id their events carry; readers held back by the snapshot's xmin ask for
-- the horizon of announced writers and read up to it in a statement that follows.
--
-- A template for Python's str.format, filled in by eventcore_trio/postgres/_schema.py:
--   s                    the schema, double-quoted
--   stream_locks         the advisory-lock space of the schema's streams (an int)
--   writer_lock          the advisory-lock key of the schema's event writers (a bigint)
--   schema_name          the schema's name as a string literal
-- Each placeholder stands in single braces; a literal brace is doubled.
-- Released: never edit, add a migration instead.

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
