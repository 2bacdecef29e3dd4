-- Migration 4: the tx of transactions that had an id before announcing themselves is at least the
-- xmax of a snapshot taken after the announcement, and they own an id at least that
-- large (docs/postgres.md, "The read horizon"), for any number of them at once; group
-- commit never waits for a stream that another transaction holds; what each host runs.
--
-- A template for Python's str.format, filled in by eventcore_trio/postgres/_schema.py:
--   s                    the schema, double-quoted
--   stream_locks         the advisory-lock space of the schema's streams (an int)
--   writer_lock          the advisory-lock key of the schema's event writers (a bigint)
--   schema_name          the schema's name as a string literal
--   floor_setting        the name of the setting that keeps a transaction's floor, quoted
--   shared_lock_timeout  how long a shared group commit waits for a lock
-- Each placeholder stands in single braces; a literal brace is doubled.
-- Released: never edit, add a migration instead.

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
