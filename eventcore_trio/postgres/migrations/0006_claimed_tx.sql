-- Migration 6: the tx of a transaction that had an id before it appended is an id it claims at
-- that moment, never one a setting vouches for. A setting's mark survives a savepoint
-- rolled back, the writer lock taken in it does not: a role that replayed the mark could
-- give its events an id that readers had passed while no lock held them back (found by
-- a review of migration 5).
--
-- A template for Python's str.format, filled in by eventcore_trio/postgres/_schema.py:
--   s                    the schema, double-quoted
-- Each placeholder stands in single braces; a literal brace is doubled.
-- Released: never edit, add a migration instead.

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
