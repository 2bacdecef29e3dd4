-- Migration 9: personal data that can be forgotten (issue 29, decision record 15,
-- docs/personal-data.md): each event's subject and personal field names, the subjects'
-- data keys (wrapped by the application's key-encryption key), and the forgets' audit.
--
-- A template for Python's str.format, filled in by eventcore_trio/postgres/_schema.py:
--   s                    the schema, double-quoted
--   stream_locks         the advisory-lock space of the schema's streams (an int)
--   tag_locks, writer_lock, floor_setting  as in migration 8 (the append functions below
--                        are migration 8's, with the subjects added)
-- Each placeholder stands in single braces; a literal brace is doubled.
-- Released: never edit, add a migration instead.
--
-- Personal values are sealed in the client (AES-GCM under the subject's data key) before
-- they reach any of these functions: the database only ever holds envelopes, and the data
-- keys only wrapped. Forgetting deletes a subject's wrapped key (the row stays, with a NULL
-- key, as the forget's record): every envelope of the subject is unreadable from then on.

-- Existing events have no subject: NULL and a constant default add the columns without a
-- rewrite.
ALTER TABLE {s}.events ADD COLUMN subject text COLLATE "C";
ALTER TABLE {s}.events ADD COLUMN personal text[] COLLATE "C" NOT NULL DEFAULT '{{}}';
-- A forget deletes the snapshots of the streams holding the subject's personal events.
-- (Partial: the index holds only events with a subject; building it reads the table once.)
CREATE INDEX events_subject_idx ON {s}.events (subject, stream_id) WHERE subject IS NOT NULL;

-- A dead letter keeps its event's personal fields sealed, as the events row holds them,
-- and opens them when listed (while the subject's key exists).
ALTER TABLE {s}.dead_letters ADD COLUMN subject text COLLATE "C";
ALTER TABLE {s}.dead_letters ADD COLUMN personal text[] COLLATE "C" NOT NULL DEFAULT '{{}}';

-- One row per subject that ever had personal data: its data key wrapped by the KEK, made
-- on first use (INSERT ... ON CONFLICT DO NOTHING: two processes agree on the first), and
-- never replaced. A forget sets wrapped_key to NULL and records when, by which process,
-- and the position of its SubjectForgotten event: the row is then the tombstone that
-- refuses the subject's personal data for good, and the audit.
CREATE TABLE {s}.subject_keys (
    subject text COLLATE "C" PRIMARY KEY,
    wrapped_key bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    forgotten_at timestamptz,
    forgotten_host text,
    forgotten_pid integer,
    forgotten_tx bigint,
    forgotten_position bigint,
    CONSTRAINT subject_keys_forgotten CHECK (
        (wrapped_key IS NULL) = (forgotten_at IS NOT NULL)
        AND (forgotten_at IS NULL) = (forgotten_position IS NULL)
        AND (forgotten_tx IS NULL) = (forgotten_position IS NULL))
);
-- A tombstone never comes back to life (a new key for a forgotten subject would make
-- personal data appended after the forget readable), and rows are never deleted.
CREATE FUNCTION {s}.refuse_key_revival() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF TG_OP = 'DELETE' OR TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'subject keys are never deleted: forget a subject instead'
            USING ERRCODE = 'EV004';
    END IF;
    IF OLD.wrapped_key IS NULL THEN
        RAISE EXCEPTION 'subject % was forgotten: its key row is its audit record', OLD.subject
            USING ERRCODE = 'EV004';
    END IF;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER subject_keys_no_revival BEFORE UPDATE OR DELETE ON {s}.subject_keys
    FOR EACH ROW EXECUTE FUNCTION {s}.refuse_key_revival();
CREATE TRIGGER subject_keys_no_truncate BEFORE TRUNCATE ON {s}.subject_keys
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_key_revival();

-- Each event's subject (NULL: none) and personal field names joined by chr(31) ('': none),
-- as the client sends them: two NULL arrays when no event has a subject, else one entry
-- per event each. Then, for each subject whose personal fields are written, the lock of
-- its "$forgotten-<subject>" stream in shared mode, and its key's row read after it. A
-- forget appends to that stream, which takes its lock exclusively: it waits for the
-- appends that hold it shared to commit, and the ones that come later wait for the forget
-- (PostgreSQL queues them behind it) and then read its tombstone: refused (EV007). So every
-- personal event of a subject either precedes its forget, its events drawn first and
-- forgotten with the rest, or is refused. An advisory lock, not a row lock, so that the
-- forget has no transaction id while it waits: the id it draws afterwards puts its
-- SubjectForgotten event after every append it waited for. (At REPEATABLE READ the row is
-- read in the transaction's older snapshot and a forget in between goes unnoticed: the
-- events are then sealed under the deleted key, unreadable, as the forget's own are.)
CREATE FUNCTION {s}.check_subjects(p_type text[], p_subject text[], p_personal text[])
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_forgotten text;
    v_key int;
BEGIN
    IF p_subject IS NULL AND p_personal IS NULL THEN
        RETURN;
    END IF;
    IF array_dims(p_subject) IS DISTINCT FROM array_dims(p_type)
       OR array_dims(p_personal) IS DISTINCT FROM array_dims(p_type) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'EV004',
            MESSAGE = 'malformed append: p_subject and p_personal must both be NULL or hold '
                || 'one entry per event',
            HINT = 'append through eventcore-trio (PostgresStore.append_atomic), which '
                || 'builds these arguments';
    END IF;
    IF EXISTS (SELECT FROM unnest(p_subject, p_personal) AS x(subject, personal)
               WHERE x.personal <> '' AND x.subject IS NULL) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'EV004',
            MESSAGE = 'malformed append: personal fields without a subject';
    END IF;
    FOR v_key IN SELECT DISTINCT hashtext('$forgotten-' || x.subject)
                 FROM unnest(p_subject, p_personal) AS x(subject, personal)
                 WHERE x.personal <> '' ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock_shared({stream_locks}, v_key);
    END LOOP;
    SELECT min(k.subject) INTO v_forgotten
    FROM {s}.subject_keys AS k
    WHERE k.subject IN (SELECT x.subject FROM unnest(p_subject, p_personal)
                            AS x(subject, personal)
                        WHERE x.personal <> '')
      AND k.wrapped_key IS NULL;
    IF v_forgotten IS NOT NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'EV007',
            MESSAGE = format('subject %s was forgotten: its personal data is refused',
                             v_forgotten),
            DETAIL = v_forgotten;
    END IF;
END
$fn$;

-- As append_events (migration 8), with each event's subject and personal field names (see
-- check_subjects), stored in events.subject and events.personal.
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
    p_tags text[],
    p_subject text[],
    p_personal text[]
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

    -- After the streams' locks: the forgets of the subjects whose personal fields it
    -- writes, shared (see check_subjects).
    PERFORM {s}.check_subjects(p_type, p_subject, p_personal);

    IF coalesce(array_length(p_type, 1), 0) = 0 THEN
        RETURN QUERY SELECT NULL::bigint, NULL::bigint, v_versions;
        RETURN;
    END IF;

    v_tx := greatest(pg_current_xact_id()::text::bigint, v_floor);
    IF p_tags IS NULL AND p_subject IS NULL THEN
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
                 tags, subject, personal)
            SELECT v_tx, p_streams[coalesce(e.si, 1)],
                   v_versions[coalesce(e.si, 1)] + coalesce(e.off, e.ord),
                   coalesce(e.id, gen_random_uuid()), e.type, e.data,
                   coalesce(e.meta, '{{}}'::jsonb), v_hashes[coalesce(e.si, 1)],
                   coalesce(string_to_array(nullif(e.tags, ''), chr(31)), '{{}}'),
                   e.subject,
                   coalesce(string_to_array(nullif(e.personal, ''), chr(31)), '{{}}')
            FROM unnest(p_type, p_data, p_metadata, p_event_id, p_event_stream, p_offset,
                        p_tags, p_subject, p_personal)
                 WITH ORDINALITY AS e(type, data, meta, id, si, off, tags, subject, personal,
                                      ord)
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

-- As read_query (migration 8), with each event's subject and personal field names (the
-- client opens them); p_personal only tells this overload from migration 8's. The whole
-- body again, not a call of migration 8's: the subject and names must come from the same
-- snapshot as the events, taken after the locks (a join outside that call would read them
-- in the calling statement's older snapshot, and miss those of an event a writer committed
-- while the call waited for its keys).
CREATE FUNCTION {s}.read_query(p_tag text[], p_types text[], p_tags text[],
                               p_after_tx bigint, p_after_position bigint, p_limit bigint,
                               p_personal boolean)
RETURNS TABLE (tx bigint, event_position bigint, stream_id text, stream_version bigint,
               event_id uuid, type text, data jsonb, metadata jsonb,
               recorded_at timestamptz, tags text[], subject text, personal text[],
               snapshot_xmax bigint)
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
        PERFORM pg_advisory_xact_lock_shared({tag_locks}, 0);
    END IF;
    PERFORM pg_advisory_xact_lock({tag_locks}, k.key) FROM unnest(v_guard.keys) AS k(key);
    RETURN QUERY
    SELECT e.tx, e.position, e.stream_id::text, e.stream_version, e.event_id, e.type::text,
           e.data, e.metadata, e.recorded_at, e.tags::text[], e.subject::text,
           e.personal::text[], pg_snapshot_xmax(pg_current_snapshot())::text::bigint
    FROM {s}.query_hits(p_tag, p_types, p_tags, p_after_tx, p_after_position, p_limit) AS h
    CROSS JOIN LATERAL (SELECT x.* FROM {s}.events AS x
                        WHERE x.tx = h.tx AND x.position = h.event_position OFFSET 0) AS e
    ORDER BY e.tx, e.position
    LIMIT p_limit;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::bigint, NULL::bigint, NULL::text, NULL::bigint, NULL::uuid,
            NULL::text, NULL::jsonb, NULL::jsonb, NULL::timestamptz, NULL::text[], NULL::text,
            NULL::text[], pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
    END IF;
END
$fn$;

-- As append_conditional (migration 8), with each event's subject and personal field names.
CREATE FUNCTION {s}.append_conditional(
    p_stream text,
    p_expected bigint,
    p_event_id uuid[],
    p_type text[],
    p_data jsonb[],
    p_metadata jsonb[],
    p_tags text[],
    p_subject text[],
    p_personal text[],
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
        p_metadata, p_tags, p_subject, p_personal);
END
$fn$;

-- Migration 8's functions, for clients of an earlier version still running: the same
-- appends with no subjects.
CREATE OR REPLACE FUNCTION {s}.append_events(
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
BEGIN
    RETURN QUERY SELECT * FROM {s}.append_events(p_streams, p_expected, p_counts,
        p_event_stream, p_offset, p_event_id, p_type, p_data, p_metadata, p_tags,
        NULL::text[], NULL::text[]);
END
$fn$;

CREATE OR REPLACE FUNCTION {s}.append_conditional(
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
BEGIN
    RETURN QUERY SELECT * FROM {s}.append_conditional(p_stream, p_expected, p_event_id,
        p_type, p_data, p_metadata, p_tags, NULL::text[], NULL::text[], p_query_tag,
        p_query_types, p_query_tags, p_after_tx, p_after_position);
END
$fn$;

REVOKE EXECUTE ON FUNCTION
    {s}.append_events(text[], bigint[], int[], int[], int[], uuid[], text[], jsonb[],
                      jsonb[], text[], text[], text[]),
    {s}.read_query(text[], text[], text[], bigint, bigint, bigint, boolean),
    {s}.append_conditional(text, bigint, uuid[], text[], jsonb[], jsonb[], text[], text[],
                           text[], text[], text[], text[], bigint, bigint),
    {s}.check_subjects(text[], text[], text[])
FROM PUBLIC;
REVOKE ALL ON {s}.subject_keys FROM PUBLIC;

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
                      'text[], jsonb[], jsonb[], text[])'::regprocedure
          AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0
    LOOP
        EXECUTE 'GRANT SELECT, INSERT, UPDATE ON {s}.subject_keys TO ' || v_role;
        EXECUTE 'GRANT EXECUTE ON FUNCTION '
            || '{s}.append_events(text[], bigint[], int[], int[], int[], uuid[], text[], '
            || 'jsonb[], jsonb[], text[], text[], text[]), '
            || '{s}.read_query(text[], text[], text[], bigint, bigint, bigint, boolean), '
            || '{s}.append_conditional(text, bigint, uuid[], text[], jsonb[], jsonb[], '
            || 'text[], text[], text[], text[], text[], text[], bigint, bigint) TO ' || v_role;
    END LOOP;
END
$do$;
