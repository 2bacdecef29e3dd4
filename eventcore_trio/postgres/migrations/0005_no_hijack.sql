-- Migration 5: no role can hijack the store's functions or forge its events (issue 32). Every
-- function runs with a fixed search_path; appends run as the schema's owner (SECURITY
-- DEFINER), check what they are given, and are executable only by roles granted them
-- (`eventcore-trio migrate --grant ROLE`, see `_grants`); the settings by which a
-- transaction says it announced itself or keeps a floor carry a mark only the owner's
-- functions can make.
--
-- A template for Python's str.format, filled in by eventcore_trio/postgres/_schema.py:
--   s                    the schema, double-quoted
--   stream_locks         the advisory-lock space of the schema's streams (an int)
--   writer_lock          the advisory-lock key of the schema's event writers (a bigint)
--   floor_setting        the name of the setting that keeps a transaction's floor, quoted
--   shared_lock_timeout  how long a shared group commit waits for a lock
-- Each placeholder stands in single braces; a literal brace is doubled.
-- Released: never edit, add a migration instead.

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
