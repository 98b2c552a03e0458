-- aiwg: an outcome written with the whole last step, its start included (issue 15).
--
-- When a job's last step's agent is done at its first poll (an executor that answers at once,
-- as a host's own backend may; an agent process never is) and left nothing else to record,
-- the engine writes the step's `step_started` and `step_finished` with the job's outcome
-- (`JobStore::finish_after_step`) instead of the start on its own and then the rest: the
-- completer wrote each in a batch of its own, one after the other, each waiting for
-- the batch on its way, so that such a job held its project's place (under a per-project
-- limit) for two batches. `pg_queue`'s per-project burn-down (64 projects, 64 workers) kept
-- about 40 of its 64 projects' jobs running, each about 17 ms from its claim's commit to its
-- outcome's.
--
-- This is 0020's function with a first event before the last one: `first_kinds[i]`, when not
-- null (only with a `last_kinds[i]`), is written at `last_seq - 2`, the last event at
-- `last_seq - 1` and the outcome's at `last_seq`, all in the one statement that fences the
-- row, as 0020's writes the last one and the outcome. 0020's function stays for a server of
-- an earlier version sharing the database.

CREATE OR REPLACE FUNCTION aiwg_record_outcomes(ids uuid[], tokens bigint[], ats timestamptz[],
                                                versions text[], statuses text[],
                                                retry_ats timestamptz[], jobs text[],
                                                approval_ats timestamptz[],
                                                ev_ats timestamptz[], kinds text[],
                                                last_ats timestamptz[], last_kinds text[],
                                                first_ats timestamptz[], first_kinds text[])
RETURNS TABLE (id uuid, last_seq bigint)
LANGUAGE plpgsql VOLATILE
SET jit = off SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH t AS (
        SELECT * FROM unnest(ids, tokens, ats, versions, statuses, retry_ats, jobs,
                             approval_ats, ev_ats, kinds, last_ats, last_kinds,
                             first_ats, first_kinds)
            AS t(id, token, at, version, status, retry_at, job, approval_expires_at,
                 ev_at, kind, last_at, last_kind, first_at, first_kind)),
    u AS (
        UPDATE aiwg_jobs a SET status = t.status,
            queue_seq = CASE WHEN t.status = 'queued' THEN nextval('aiwg_queue_seq') END,
            retry_at = t.retry_at, cancel_requested = FALSE, job = t.job::jsonb,
            last_seq = a.last_seq + 1
                + CASE WHEN t.last_kind IS NULL THEN 0 ELSE 1 END
                + CASE WHEN t.first_kind IS NULL THEN 0 ELSE 1 END,
            lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
            approval_expires_at = t.approval_expires_at, updated_at = now()
        FROM t
        WHERE a.id = t.id AND a.id = ANY(ids)
          AND a.xmin::text = t.version
          AND a.lease_token = t.token
          AND a.lease_expires_at > GREATEST(t.at, now())
          AND (t.first_kind IS NULL OR t.last_kind IS NOT NULL)
        RETURNING a.id, a.last_seq, t.ev_at, t.kind, t.last_at, t.last_kind, t.first_at,
                  t.first_kind),
    e AS (
        INSERT INTO aiwg_job_events (job_id, seq, at, kind)
        SELECT u.id, u.last_seq - 2, u.first_at, u.first_kind::jsonb FROM u
            WHERE u.first_kind IS NOT NULL
        UNION ALL SELECT u.id, u.last_seq - 1, u.last_at, u.last_kind::jsonb FROM u
            WHERE u.last_kind IS NOT NULL
        UNION ALL SELECT u.id, u.last_seq, u.ev_at, u.kind::jsonb FROM u)
    SELECT u.id, u.last_seq FROM u;
END
$$;
