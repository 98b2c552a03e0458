-- A running job's events written together: one write may carry many events of one job (an
-- agent's output lines that waited while the previous write was on its way), numbered in
-- order, with one update of the job's row. Before, each event was its own write, so an
-- agent's output was recorded at the pace of the database's commits (about 2 000 lines a
-- second on loopback): a job printing 50 000 lines took half a minute to record them.
--
-- `ids`, `tokens`, `ats`, `modes` and `steps` are per write (one write per job), as in 0030:
-- `ats` fences the write (the lease must not have expired by then), and `modes`/`steps` move
-- the job's progress (a write that moves the progress carries one event). `counts` is how
-- many events each write carries. The events are `owners` (the write's place in the arrays
-- above, from 1), `places` (the event's place in its write, from 1), `ev_ats` and `kinds`.
--
-- The function of 0030 (one event a write) stays beside this one, a function of other
-- arguments: instances still running the release before this one go on writing through it
-- while the others are upgraded, and nothing of this release calls it. A later migration may
-- drop it once no such instance can be left.

CREATE FUNCTION aiwg_append_events(ids uuid[], tokens bigint[], ats timestamptz[],
                                   counts integer[], modes smallint[], steps text[],
                                   owners integer[], places integer[], ev_ats timestamptz[],
                                   kinds text[], relaxed boolean)
RETURNS TABLE (ord bigint, last_seq bigint, version text)
LANGUAGE plpgsql VOLATILE
SET jit = off SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    IF relaxed THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    RETURN QUERY
    WITH t AS (
        SELECT * FROM unnest(ids, tokens, ats, counts, modes, steps) WITH ORDINALITY
            AS t(id, token, at, n, mode, step, ord)),
    u AS (
        UPDATE aiwg_jobs a SET last_seq = a.last_seq + t.n,
            progress = CASE t.mode
                WHEN 0 THEN a.progress
                WHEN 1 THEN jsonb_build_object(
                    'completed', COALESCE(a.progress->'completed', '[]'::jsonb),
                    'in_progress',
                        (COALESCE(a.progress->'in_progress', '[]'::jsonb) - t.step)
                        || jsonb_build_array(t.step),
                    'pending', COALESCE(a.progress->'pending', '[]'::jsonb) - t.step)
                ELSE jsonb_build_object(
                    'completed',
                        CASE WHEN COALESCE(a.progress->'completed', '[]'::jsonb) ? t.step
                        THEN a.progress->'completed'
                        ELSE COALESCE(a.progress->'completed', '[]'::jsonb)
                            || jsonb_build_array(t.step) END,
                    'in_progress',
                        COALESCE(a.progress->'in_progress', '[]'::jsonb) - t.step,
                    'pending', COALESCE(a.progress->'pending', '[]'::jsonb) - t.step)
                END,
            updated_at = CASE t.mode WHEN 0 THEN a.updated_at ELSE now() END
        FROM t
        WHERE a.id = t.id AND a.id = ANY(ids)
          AND a.lease_token = t.token AND a.lease_expires_at > GREATEST(t.at, now())
        RETURNING a.id, a.last_seq, t.n, t.ord, a.xmin::text AS version),
    e AS (
        INSERT INTO aiwg_job_events (job_id, seq, at, kind)
        SELECT u.id, u.last_seq - u.n + k.i, k.at, k.kind::jsonb
        FROM u JOIN unnest(owners, places, ev_ats, kinds) AS k(owner, i, at, kind)
          ON k.owner = u.ord)
    SELECT u.ord, u.last_seq, u.version FROM u;
END
$$;
