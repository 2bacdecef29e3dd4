-- Migration 8: tags, queries over them, and conditional appends: dynamic consistency
-- boundaries (issue 28, decision record 14, docs/postgres.md "Decisions over a query").
--
-- A template for Python's str.format, filled in by eventcore_trio/postgres/_schema.py:
--   s                    the schema, double-quoted
--   stream_locks         the advisory-lock space of the schema's streams (an int)
--   tag_locks            the advisory-lock space of its types and tags (an int)
--   writer_lock          the advisory-lock key of the schema's event writers (a bigint)
--   floor_setting        the name of the setting that keeps a transaction's floor, quoted
--   shared_lock_timeout  how long a shared group commit waits for a lock
-- Each placeholder stands in single braces; a literal brace is doubled.
-- Released: never edit, add a migration instead.
--
-- The lock keys. An event of type t carrying tags G *carries* the keys (t, ·), and (t, g)
-- and (·, g) for each g in G: hashtext(t || chr(31) || g), the empty string standing for
-- "any type" and "no tag" (types and tags hold no control characters). Every append takes
-- its events' keys in shared mode, after the writer lock and its streams' locks and before
-- its transaction draws an id, so appenders never wait for each other. A query item (types
-- T, tags S) is *guarded* by (t, s1) for each t in T, s1 its first tag, or (·, s1) when T is
-- empty, or (t, ·) for each t when S is: every event it matches carries its guard key. A
-- decision takes its query's guard keys exclusively (an item with neither types nor tags,
-- or a query of more than 128 keys, takes the writer lock exclusively): while it holds
-- them, no transaction can be writing an event it matches. An append carrying more than
-- 128 keys takes the *wide* key (tag_locks, 0) exclusively instead of its keys, and every
-- decision takes the wide key in shared mode: one lock instead of hundreds in PostgreSQL's
-- shared lock table, which neither plain appenders nor readers of events take, and which
-- no transaction holds shared before it appends (so it is never upgraded: two outbox
-- transactions each appending a wide event do not deadlock). A hash that happens to be 0
-- only adds waits.

-- Existing events carry no tags; a constant default adds the column without a rewrite.
ALTER TABLE {s}.events ADD COLUMN tags text[] COLLATE "C" NOT NULL DEFAULT '{{}}';
-- NOT VALID: checked for new rows, without reading every stored event (all have none).
ALTER TABLE {s}.events ADD CONSTRAINT events_tags_count CHECK (cardinality(tags) <= 64) NOT VALID;

-- A dead letter keeps its event's tags too (replays and listings show the event as read).
ALTER TABLE {s}.dead_letters ADD COLUMN tags text[] COLLATE "C" NOT NULL DEFAULT '{{}}';

-- One row per (tag, event): a query's tagged item walks one tag's rows in the global order,
-- so a LIMIT stops early (a GIN index cannot return rows in (tx, position) order). The type
-- is included so that an item with types filters without visiting the events.
CREATE TABLE {s}.event_tags (
    tag text COLLATE "C" NOT NULL CHECK (length(tag) BETWEEN 1 AND 255),
    tx bigint NOT NULL,
    position bigint NOT NULL,
    type text COLLATE "C" NOT NULL,
    PRIMARY KEY (tag, tx, position) INCLUDE (type)
);
CREATE TRIGGER event_tags_immutable BEFORE UPDATE OR DELETE ON {s}.event_tags
    FOR EACH ROW EXECUTE FUNCTION {s}.refuse_event_change();
CREATE TRIGGER event_tags_no_truncate BEFORE TRUNCATE ON {s}.event_tags
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_event_change();

-- The keys events of these types and tags carry, distinct and sorted. p_tags holds each
-- event's tags joined by chr(31) ('' or NULL: none); a NULL array, no event has any.
CREATE FUNCTION {s}.carried_keys(p_type text[], p_tags text[]) RETURNS int[]
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF p_tags IS NULL THEN
        RETURN ARRAY(SELECT DISTINCT hashtext(t.type || chr(31)) FROM unnest(p_type) AS t(type)
                     ORDER BY 1);
    END IF;
    RETURN ARRAY(
        SELECT DISTINCT c.k
        FROM unnest(p_type, p_tags) AS e(type, tags)
        CROSS JOIN LATERAL (
            SELECT hashtext(e.type || chr(31))
            UNION ALL
            SELECT hashtext(x.key)
            FROM unnest(string_to_array(nullif(e.tags, ''), chr(31))) AS g(tag),
                 LATERAL (VALUES (e.type || chr(31) || g.tag), (chr(31) || g.tag)) AS x(key)
        ) AS c(k)
        ORDER BY 1);
END
$fn$;

-- A query as the client sends it: *branches*, each an index walk. A branch with a tag
-- (p_tag) reads that tag's rows, of one of p_types (joined by chr(31); NULL: any type),
-- whose event carries every tag of p_tags (joined; '': none besides p_tag); a branch
-- without a tag and with one type reads that type's events; a branch with neither matches
-- every event. p_after_tx: the tx of the position the read or condition is after (NULL:
-- none). Its guard: the keys of its branches (see the top of this file), and whether
-- a branch matches every event (then the writer lock guards it). Checked first: the arrays'
-- shapes, and READ COMMITTED (at a stricter level the transaction's snapshot predates the
-- locks, and would miss what they wait for). One function for the three: each call of a
-- function with a fixed search_path costs tens of microseconds.
CREATE FUNCTION {s}.query_guard(p_tag text[], p_types text[], p_tags text[],
                                p_after_tx bigint, OUT keys int[], OUT every_event boolean)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF coalesce(cardinality(p_tag), 0) NOT BETWEEN 1 AND 4096
       OR array_dims(p_types) IS DISTINCT FROM array_dims(p_tag)
       OR array_dims(p_tags) IS DISTINCT FROM array_dims(p_tag)
       OR array_ndims(p_tag) <> 1
    THEN
        RAISE EXCEPTION USING
            ERRCODE = 'EV004',
            MESSAGE = 'malformed query: 1 to 4096 branches, one array entry each',
            HINT = 'read through eventcore-trio (PostgresStore.read_query), which builds '
                || 'these arguments';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'EV006',
            MESSAGE = 'a query''s read and a conditional append need READ COMMITTED, not '
                || current_setting('transaction_isolation')
                || ': the transaction''s snapshot predates the locks that make them safe',
            HINT = 'call read_query and append_tagged outside a transaction of your own, or '
                || 'in one at READ COMMITTED';
    END IF;
    -- A position is at most (xmax, 0) of a snapshot taken now: one beyond it was never
    -- given by this store (a read's position is an event's or a snapshot's xmax), and a
    -- condition after it would pass over events written later.
    IF p_after_tx > pg_snapshot_xmax(pg_current_snapshot())::text::bigint THEN
        RAISE EXCEPTION USING
            ERRCODE = 'EV008',
            MESSAGE = format('the position %s:… is ahead of everything this store has '
                             'written', p_after_tx);
    END IF;
    every_event := EXISTS (SELECT FROM unnest(p_tag, p_types) AS b(tag, types)
                           WHERE b.tag IS NULL AND b.types IS NULL);
    keys := ARRAY(
        SELECT DISTINCT hashtext(coalesce(t.type, '') || chr(31) || coalesce(b.tag, ''))
        FROM unnest(p_tag, p_types) AS b(tag, types)
        LEFT JOIN LATERAL unnest(string_to_array(b.types, chr(31))) AS t(type) ON true
        WHERE b.tag IS NOT NULL OR b.types IS NOT NULL
        ORDER BY 1);
    -- Thousands of exclusive locks would fill PostgreSQL's shared lock table (every
    -- session's locks fail meanwhile): one coarse lock guards such a query instead.
    IF cardinality(keys) > 128 THEN
        every_event := true;
        keys := '{{}}';
    END IF;
END
$fn$;

-- Tag keys in key order, each once: exclusively those in p_exclusive, the rest shared.
CREATE FUNCTION {s}.take_keys(p_shared int[], p_exclusive int[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_key int;
    v_exclusive boolean;
BEGIN
    FOR v_key, v_exclusive IN
        SELECT k.key, bool_or(k.exclusive)
        FROM (SELECT s.key, false FROM unnest(p_shared) AS s(key)
              UNION ALL
              SELECT x.key, true FROM unnest(p_exclusive) AS x(key)) AS k(key, exclusive)
        GROUP BY k.key ORDER BY k.key
    LOOP
        IF v_exclusive THEN
            PERFORM pg_advisory_xact_lock({tag_locks}, v_key);
        ELSE
            PERFORM pg_advisory_xact_lock_shared({tag_locks}, v_key);
        END IF;
    END LOOP;
END
$fn$;

-- The events' least tx (writer_floor), for an append that has just taken its keys. A
-- transaction that had an id before claims a fresh id whenever its last claim may be below
-- a snapshot taken before these keys were: a decision that read while holding one of them
-- took such a snapshot, and every event carrying a key must sort after the snapshots taken
-- before its writer held it (reusing a claim made before would put the event below a read
-- that did not see it). At READ COMMITTED this statement's snapshot is taken after the
-- keys: a claim at or above its xmax is above every earlier one; at stricter levels the
-- snapshot is old, so the claim is always fresh there. A fresh claim is one more
-- subtransaction (PostgreSQL keeps 64 per transaction in shared memory before it spills).
CREATE FUNCTION {s}.fresh_floor(p_had_xid boolean) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_claimed boolean;
    v_floor bigint;
BEGIN
    IF NOT p_had_xid THEN
        RETURN 0;
    END IF;
    v_claimed := EXISTS (SELECT FROM {s}.writer_claims AS c
                         WHERE c.pid = pg_backend_pid() AND c.top = pg_current_xact_id());
    v_floor := {s}.writer_floor(true);
    IF v_claimed
       AND (current_setting('transaction_isolation') <> 'read committed'
            OR v_floor < pg_snapshot_xmax(pg_current_snapshot())::text::bigint)
    THEN
        -- A new version of the claim's row, written by a subtransaction: its xmin is an id
        -- assigned now (the handler never runs; it makes the block a subtransaction).
        BEGIN
            UPDATE {s}.writer_claims AS c SET top = c.top
            WHERE c.pid = pg_backend_pid() AND c.top = pg_current_xact_id();
        EXCEPTION WHEN SQLSTATE 'EV999' THEN
            RAISE;
        END;
        v_floor := {s}.writer_floor(true);
    END IF;
    RETURN v_floor;
END
$fn$;

-- As begin_append (migration 4), with the events' keys: the writer lock, the streams'
-- locks, the keys shared (or, for an append carrying more than 128 keys, the wide key
-- exclusively: see the top of this file), then the floor.
CREATE FUNCTION {s}.begin_append(p_streams text[], p_keys int[]) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_had_xid boolean := pg_current_xact_id_if_assigned() IS NOT NULL;
    v_every boolean := coalesce(cardinality(p_keys) > 128, false);
    v_key int;
BEGIN
    PERFORM pg_advisory_xact_lock_shared({writer_lock});
    FOR v_key IN SELECT DISTINCT hashtext(x) FROM unnest(p_streams) AS x ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock({stream_locks}, v_key);
    END LOOP;
    IF v_every THEN
        PERFORM pg_advisory_xact_lock({tag_locks}, 0);
    ELSE
        FOREACH v_key IN ARRAY p_keys LOOP
            PERFORM pg_advisory_xact_lock_shared({tag_locks}, v_key);
        END LOOP;
    END IF;
    RETURN {s}.fresh_floor(v_had_xid);
END
$fn$;

-- Each event's tags as the client sends them: NULL (no event has any), or one entry per
-- event. The tags themselves are checked by the table's constraints.
CREATE FUNCTION {s}.check_tags(p_type text[], p_tags text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF p_tags IS NOT NULL AND array_dims(p_tags) IS DISTINCT FROM array_dims(p_type) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'EV004',
            MESSAGE = 'malformed append: p_tags must be NULL or hold one entry per event',
            HINT = 'append through eventcore-trio (PostgresStore.append_atomic), which '
                || 'builds these arguments';
    END IF;
END
$fn$;

-- As append_events (migration 5), with each event's tags (see check_tags), which it stores
-- in events.tags and event_tags, and the keys the events carry taken with the streams'.
CREATE FUNCTION {s}.append_events(
    p_streams text[],
    p_expected bigint[],
    p_counts int[],
    p_event_stream int[],
    p_offset int[],
    p_event_id uuid[],
    p_type text[],
    p_data jsonb[],
    p_metadata jsonb[],
    p_tags text[]
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
    PERFORM {s}.check_tags(p_type, p_tags);
    v_floor := {s}.begin_append(p_streams, {s}.carried_keys(p_type, p_tags));
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

    v_tx := greatest(pg_current_xact_id()::text::bigint, v_floor);
    IF p_tags IS NULL THEN
        INSERT INTO {s}.events
            (tx, stream_id, stream_version, event_id, type, data, metadata, stream_hash)
        SELECT v_tx, p_streams[coalesce(e.si, 1)],
               v_versions[coalesce(e.si, 1)] + coalesce(e.off, e.ord),
               coalesce(e.id, gen_random_uuid()), e.type, e.data,
               coalesce(e.meta, '{{}}'::jsonb), v_hashes[coalesce(e.si, 1)]
        FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset)
             WITH ORDINALITY AS e(type, data, meta, id, si, off, ord)
        ORDER BY e.ord;
    ELSE
        WITH inserted AS (
            INSERT INTO {s}.events AS ev
                (tx, stream_id, stream_version, event_id, type, data, metadata, stream_hash,
                 tags)
            SELECT v_tx, p_streams[coalesce(e.si, 1)],
                   v_versions[coalesce(e.si, 1)] + coalesce(e.off, e.ord),
                   coalesce(e.id, gen_random_uuid()), e.type, e.data,
                   coalesce(e.meta, '{{}}'::jsonb), v_hashes[coalesce(e.si, 1)],
                   coalesce(string_to_array(nullif(e.tags, ''), chr(31)), '{{}}')
            FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset,
                        p_tags)
                 WITH ORDINALITY AS e(type, data, meta, id, si, off, tags, ord)
            ORDER BY e.ord
            RETURNING ev.tx, ev.position, ev.type, ev.tags
        )
        INSERT INTO {s}.event_tags (tag, tx, position, type)
        SELECT g.tag, i.tx, i.position, i.type FROM inserted AS i, unnest(i.tags) AS g(tag);
    END IF;

    IF v_fresh AND v_floor > pg_current_xact_id()::text::bigint THEN
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
        PERFORM set_config({floor_setting}, {s}.floor_mark(v_floor), true);
    END IF;

    -- No NOTIFY here: the store notifies after the commit (see _notifier).
    RETURN QUERY SELECT v_tx, currval('{s}.events_position_seq'::regclass), v_versions;
END
$fn$;

-- The function of migration 5, for a client of an earlier version still running: the same
-- append with no tags, so that it takes its events' type keys too.
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
BEGIN
    RETURN QUERY SELECT * FROM {s}.append_events(p_streams, p_expected, p_counts,
        p_event_stream, p_offset, p_event_id, p_type, p_data, p_metadata, NULL::text[]);
END
$fn$;

-- As append_many (migration 5), with each event's tags. A request whose keys another
-- transaction holds exclusively (a decision between its check and its commit), or that
-- carries more than 128 keys, is busy: sent again on its own, where it waits.
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
    p_metadata jsonb[],
    p_tags text[]
) RETURNS TABLE (request int, last_tx bigint, last_position bigint, versions bigint[],
                 conflict text, busy boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_had_xid boolean := pg_current_xact_id_if_assigned() IS NOT NULL;
    v_entries int := coalesce(array_length(p_streams, 1), 0);
    v_requests int := coalesce(p_request[v_entries], 0);
    v_free int[] := '{{}}';
    v_names text[] := '{{}}';
    v_current bigint[] := '{{}}';
    v_base bigint[] := array_fill(NULL::bigint, ARRAY[v_entries]);
    v_hashes bigint[] := array_fill(NULL::bigint, ARRAY[v_entries]);
    v_conflicts text[] := '{{}}';
    v_busy boolean[] := '{{}}';
    v_keys_busy boolean[] := array_fill(false, ARRAY[v_requests]);
    v_keys int[];
    v_request int;
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
    PERFORM {s}.check_tags(p_type, p_tags);
    PERFORM set_config('lock_timeout', '{shared_lock_timeout}', true);
    PERFORM pg_advisory_xact_lock_shared({writer_lock});
    FOR v_key IN SELECT DISTINCT hashtext(x) FROM unnest(p_streams) AS x LOOP
        IF pg_try_advisory_xact_lock({stream_locks}, v_key) THEN
            v_free := v_free || v_key;
        END IF;
    END LOOP;
    -- Each request's keys, tried (never waited for: the statement holds other locks).
    FOR v_request, v_keys IN
        SELECT p_request[e.si],
               {s}.carried_keys(array_agg(e.type),
                                CASE WHEN p_tags IS NOT NULL THEN array_agg(e.tags) END)
        FROM unnest(p_type, p_event_stream, p_tags) AS e(type, si, tags)
        GROUP BY p_request[e.si]
    LOOP
        IF cardinality(v_keys) > 128 THEN
            v_keys_busy[v_request] := true;
        ELSE
            FOREACH v_key IN ARRAY v_keys LOOP
                IF NOT pg_try_advisory_xact_lock_shared({tag_locks}, v_key) THEN
                    v_keys_busy[v_request] := true;
                    EXIT;
                END IF;
            END LOOP;
        END IF;
    END LOOP;
    v_floor := {s}.fresh_floor(v_had_xid);
    v_fresh := v_floor < 0;
    v_floor := abs(v_floor);
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
    FOR r IN 1 .. v_requests LOOP
        v_first := i;
        WHILE i <= v_entries AND p_request[i] = r LOOP
            i := i + 1;
        END LOOP;
        v_last := i - 1;
        v_ok := true;
        v_conflicts := v_conflicts || NULL::text;
        v_busy := v_busy || v_keys_busy[r];
        CONTINUE WHEN v_keys_busy[r];
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
        INSERT INTO {s}.events AS ev
            (tx, stream_id, stream_version, event_id, type, data, metadata, stream_hash, tags)
        SELECT v_tx, p_streams[e.si], v_base[e.si] + e.off, coalesce(e.id, gen_random_uuid()),
               e.type, e.data, coalesce(e.meta, '{{}}'::jsonb), v_hashes[e.si],
               coalesce(string_to_array(nullif(e.tags, ''), chr(31)), '{{}}')
        FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset, p_tags)
             WITH ORDINALITY AS e(type, data, meta, id, si, off, tags, ord)
        WHERE v_base[e.si] IS NOT NULL
        ORDER BY e.ord
        RETURNING ev.stream_id, ev.stream_version, ev.position, ev.tx, ev.type, ev.tags
    ), tagged AS (
        INSERT INTO {s}.event_tags (tag, tx, position, type)
        SELECT g.tag, i.tx, i.position, i.type FROM inserted AS i, unnest(i.tags) AS g(tag)
    )
    SELECT array_agg(stream_id), array_agg(stream_version), array_agg(position)
    INTO v_written_streams, v_written_versions, v_written_positions
    FROM inserted;

    IF v_written_positions IS NULL THEN
        NULL;
    ELSIF v_fresh AND v_floor > pg_current_xact_id()::text::bigint THEN
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

-- The function of migration 5 for earlier clients: the same shared append with no tags.
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
BEGIN
    RETURN QUERY SELECT * FROM {s}.append_many(p_request, p_streams, p_expected, p_counts,
        p_event_stream, p_offset, p_event_id, p_type, p_data, p_metadata, NULL::text[]);
END
$fn$;

-- The events matching a query's branches (see query_guard) after (p_after_tx,
-- p_after_position): at most p_limit per branch (NULL: all), in no particular order. A
-- tagged branch whose p_tags is '' has no tag besides p_tag: its walk needs no visit to the
-- events. PL/pgSQL, STABLE: its plan is kept for the session, and it reads in its caller's
-- snapshot (the caller's statement is what takes one after the locks). ROWS: a handful,
-- so that a caller's generic plan joins it to the events by key, not by a merge over all.
CREATE FUNCTION {s}.query_hits(p_tag text[], p_types text[], p_tags text[],
                               p_after_tx bigint, p_after_position bigint, p_limit bigint)
RETURNS TABLE (tx bigint, event_position bigint)
LANGUAGE plpgsql STABLE ROWS 10 SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT DISTINCT m.tx, m.position
    FROM unnest(p_tag, p_types, p_tags) AS b(tag, types, tags)
    CROSS JOIN LATERAL (
        (SELECT t.tx, t.position FROM {s}.event_tags AS t
         WHERE b.tag IS NOT NULL AND t.tag = b.tag
           AND (t.tx, t.position) > (p_after_tx, p_after_position)
           AND (b.types IS NULL OR t.type = ANY (string_to_array(b.types, chr(31))))
           AND (b.tags = '' OR EXISTS (
                SELECT FROM {s}.events AS x
                WHERE x.tx = t.tx AND x.position = t.position
                  AND x.tags @> string_to_array(b.tags, chr(31))))
         ORDER BY t.tx, t.position LIMIT p_limit)
        UNION ALL
        (SELECT x.tx, x.position FROM {s}.events AS x
         WHERE b.tag IS NULL AND b.types IS NOT NULL AND x.type = b.types
           AND (x.tx, x.position) > (p_after_tx, p_after_position)
         ORDER BY x.tx, x.position LIMIT p_limit)
        UNION ALL
        (SELECT x.tx, x.position FROM {s}.events AS x
         WHERE b.tag IS NULL AND b.types IS NULL
           AND (x.tx, x.position) > (p_after_tx, p_after_position)
         ORDER BY x.tx, x.position LIMIT p_limit)
    ) AS m(tx, position);
END
$fn$;

-- A decision's read: the query's guard keys (exclusively, each for an instant: every
-- transaction that may be writing a matching event ends first, and none can begin to
-- until this statement ends), then the matching events in a snapshot taken after them.
-- Each row carries that snapshot's xmax: every matching event not returned is after
-- (xmax, 0) or, when p_limit cut the read short, after the last one returned (decision
-- record 14). No match: one row of NULLs with the xmax.
CREATE FUNCTION {s}.read_query(p_tag text[], p_types text[], p_tags text[],
                               p_after_tx bigint, p_after_position bigint, p_limit bigint)
RETURNS TABLE (tx bigint, event_position bigint, stream_id text, stream_version bigint,
               event_id uuid, type text, data jsonb, metadata jsonb,
               recorded_at timestamptz, tags text[], snapshot_xmax bigint)
LANGUAGE plpgsql SECURITY DEFINER ROWS 10 SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_column
DECLARE
    v_guard record;
BEGIN
    v_guard := {s}.query_guard(p_tag, p_types, p_tags, p_after_tx);
    IF v_guard.every_event THEN
        PERFORM pg_advisory_xact_lock({writer_lock});
    ELSE
        PERFORM pg_advisory_xact_lock_shared({writer_lock});
        -- An append carrying too many keys holds the wide key instead of them.
        PERFORM pg_advisory_xact_lock_shared({tag_locks}, 0);
    END IF;
    -- In key order (the array is sorted): the order every transaction takes them in.
    PERFORM pg_advisory_xact_lock({tag_locks}, k.key) FROM unnest(v_guard.keys) AS k(key);
    RETURN QUERY
    SELECT e.tx, e.position, e.stream_id::text, e.stream_version, e.event_id, e.type::text,
           e.data, e.metadata, e.recorded_at, e.tags::text[],
           pg_snapshot_xmax(pg_current_snapshot())::text::bigint
    FROM {s}.query_hits(p_tag, p_types, p_tags, p_after_tx, p_after_position, p_limit) AS h
    -- Each hit looked up by its key, whatever the statistics say (OFFSET 0 keeps the
    -- planner from turning the lookups into a join that scans every event: with a stale
    -- estimate of a freshly loaded table, a hash join over all of them cost 20 ms a read).
    CROSS JOIN LATERAL (SELECT x.* FROM {s}.events AS x
                        WHERE x.tx = h.tx AND x.position = h.event_position OFFSET 0) AS e
    ORDER BY e.tx, e.position
    LIMIT p_limit;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, NULL::bigint, NULL::text, NULL::bigint, NULL::uuid,
            NULL::text, NULL::jsonb, NULL::jsonb, NULL::timestamptz, NULL::text[],
            pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    END IF;
END
$fn$;

-- A decision's append: the query's guard keys exclusively, held to commit, then the check
-- in a snapshot taken after them (no transaction that may write a matching event is still
-- running, and none can start until this one ends), then the append. A matching event
-- after (p_after_tx, p_after_position) (NULLs: any) raises EV005 with up to ten
-- positions in DETAIL ("tx:position,..."), nothing written, no id drawn. Locks in the order
-- of every append: the writer lock, the stream, the tag keys by key.
CREATE FUNCTION {s}.append_conditional(
    p_stream text,
    p_expected bigint,
    p_event_id uuid[],
    p_type text[],
    p_data jsonb[],
    p_metadata jsonb[],
    p_tags text[],
    p_query_tag text[],
    p_query_types text[],
    p_query_tags text[],
    p_after_tx bigint,
    p_after_position bigint
) RETURNS TABLE (last_tx bigint, last_position bigint, versions bigint[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_column
DECLARE
    v_guard record;
    v_carried int[];
    v_every boolean;
    v_conflicts text;
BEGIN
    v_guard := {s}.query_guard(p_query_tag, p_query_types, p_query_tags, p_after_tx);
    v_carried := {s}.carried_keys(p_type, p_tags);
    v_every := v_guard.every_event;
    IF v_every THEN
        PERFORM pg_advisory_xact_lock({writer_lock});
    ELSE
        PERFORM pg_advisory_xact_lock_shared({writer_lock});
    END IF;
    PERFORM pg_advisory_xact_lock({stream_locks}, hashtext(p_stream));
    IF NOT v_every THEN
        IF coalesce(cardinality(v_carried) > 128, false) THEN
            -- Its own events are wide: the wide key exclusively, as begin_append takes it.
            PERFORM pg_advisory_xact_lock({tag_locks}, 0);
            v_carried := '{{}}';
        ELSE
            PERFORM pg_advisory_xact_lock_shared({tag_locks}, 0);
        END IF;
    END IF;
    PERFORM {s}.take_keys(CASE WHEN v_every THEN '{{}}'::int[] ELSE v_carried END,
                          v_guard.keys);
    SELECT string_agg(h.tx || ':' || h.event_position, ',' ORDER BY h.tx, h.event_position)
    INTO v_conflicts
    FROM (SELECT q.tx, q.event_position
          FROM {s}.query_hits(p_query_tag, p_query_types, p_query_tags,
                              coalesce(p_after_tx, 0), coalesce(p_after_position, 0), 10) AS q
          ORDER BY q.tx, q.event_position LIMIT 10) AS h;
    IF v_conflicts IS NOT NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'EV005',
            MESSAGE = 'append condition failed: events matching the query were appended '
                || 'after the decision''s read',
            DETAIL = v_conflicts;
    END IF;
    RETURN QUERY SELECT * FROM {s}.append_events(ARRAY[p_stream], ARRAY[p_expected],
        ARRAY[coalesce(cardinality(p_type), 0)], NULL, NULL, p_event_id, p_type, p_data,
        p_metadata, p_tags);
END
$fn$;

REVOKE EXECUTE ON FUNCTION
    {s}.append_events(text[], bigint[], int[], int[], int[], uuid[], text[], jsonb[],
                      jsonb[], text[]),
    {s}.append_many(int[], text[], bigint[], int[], int[], int[], uuid[], text[], jsonb[],
                    jsonb[], text[]),
    {s}.read_query(text[], text[], text[], bigint, bigint, bigint),
    {s}.append_conditional(text, bigint, uuid[], text[], jsonb[], jsonb[], text[], text[],
                           text[], text[], bigint, bigint),
    {s}.begin_append(text[], int[]),
    {s}.fresh_floor(boolean),
    {s}.take_keys(int[], int[])
FROM PUBLIC;
REVOKE ALL ON {s}.event_tags FROM PUBLIC;

-- Roles granted the runtime rights before this migration (`migrate --grant`) keep them:
-- the new functions and table, to every role that may run the old append function.
DO $do$
DECLARE
    v_role text;
BEGIN
    FOR v_role IN
        SELECT DISTINCT quote_ident(pg_get_userbyid(a.grantee))
        FROM pg_proc AS p, aclexplode(p.proacl) AS a
        WHERE p.oid = '{s}.append_events(text[], bigint[], int[], int[], int[], uuid[], '
                      'text[], jsonb[], jsonb[])'::regprocedure
          AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        EXECUTE 'GRANT SELECT ON {s}.event_tags TO ' || v_role;
        EXECUTE 'GRANT EXECUTE ON FUNCTION '
            || '{s}.append_events(text[], bigint[], int[], int[], int[], uuid[], text[], '
            || 'jsonb[], jsonb[], text[]), '
            || '{s}.append_many(int[], text[], bigint[], int[], int[], int[], uuid[], '
            || 'text[], jsonb[], jsonb[], text[]), '
            || '{s}.read_query(text[], text[], text[], bigint, bigint, bigint), '
            || '{s}.append_conditional(text, bigint, uuid[], text[], jsonb[], jsonb[], '
            || 'text[], text[], text[], text[], bigint, bigint) TO ' || v_role;
    END LOOP;
END
$do$;
