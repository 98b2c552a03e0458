-- aiwg: the completer's statements read the jobs they name by key whatever the table held when
-- they were planned (issue 15). The completer (a batch of events, a batch of outcomes' reads,
-- a batch of outcomes' writes) sent three statements, each a join of its arrays to
-- `aiwg_jobs`. Each connection keeps a generic plan of each, made once: made while the table
-- held a handful of jobs (a fresh database, the first jobs of a connection), it hashed the
-- whole table, a sequential scan, and kept doing so however many jobs came since, until the
-- table was analyzed again (never, with autovacuum off) or the connection closed. The three
-- are functions now, whose settings price sequential and bitmap scans out: the only plan left
-- reads each named row through the primary key. Their bodies are the statements of before.
-- None of them names `status`: a row with a lease token is a running one (the table's
-- `CHECK`), so the token fences it alone.

-- A batch of events: fences each event's row (lease token, lease not over at the event's
-- time), numbers the event, moves the job's progress for step events (`modes`: 0 unchanged,
-- 1 `StepStarted`, 2 a successful `StepFinished` of `steps`) as `Progress::start` and
-- `Progress::finish` do, and inserts the events. `relaxed`: the transaction does not wait for
-- the disk. One row per event written: its position in the arrays (from 1), its `seq` and,
-- for a step event, the job as the event left it with the row's version (the completer keeps
-- them, so that the job's outcome, when it comes next, needs no read).
CREATE OR REPLACE FUNCTION aiwg_append_events(ids uuid[], tokens bigint[], ats timestamptz[],
                                              kinds text[], modes smallint[], steps text[],
                                              relaxed boolean)
RETURNS TABLE (ord bigint, last_seq bigint, version text, job jsonb)
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
        SELECT * FROM unnest(ids, tokens, ats, kinds, modes, steps) WITH ORDINALITY
            AS t(id, token, at, kind, mode, step, ord)),
    u AS (
        UPDATE aiwg_jobs a SET last_seq = a.last_seq + 1,
            job = CASE t.mode WHEN 0 THEN a.job ELSE jsonb_set(a.job, '{progress}',
                CASE t.mode
                WHEN 1 THEN jsonb_build_object(
                    'completed', COALESCE(a.job->'progress'->'completed', '[]'::jsonb),
                    'in_progress',
                        (COALESCE(a.job->'progress'->'in_progress', '[]'::jsonb) - t.step)
                        || jsonb_build_array(t.step),
                    'pending', COALESCE(a.job->'progress'->'pending', '[]'::jsonb) - t.step)
                ELSE jsonb_build_object(
                    'completed',
                        CASE WHEN COALESCE(a.job->'progress'->'completed', '[]'::jsonb) ? t.step
                        THEN a.job->'progress'->'completed'
                        ELSE COALESCE(a.job->'progress'->'completed', '[]'::jsonb)
                            || jsonb_build_array(t.step) END,
                    'in_progress',
                        COALESCE(a.job->'progress'->'in_progress', '[]'::jsonb) - t.step,
                    'pending', COALESCE(a.job->'progress'->'pending', '[]'::jsonb) - t.step)
                END) END,
            updated_at = CASE t.mode WHEN 0 THEN a.updated_at ELSE now() END
        FROM t
        WHERE a.id = t.id AND a.id = ANY(ids)
          AND a.lease_token = t.token AND a.lease_expires_at > GREATEST(t.at, now())
        RETURNING a.id, a.last_seq, t.at, t.kind, t.ord,
            CASE WHEN t.mode <> 0 THEN a.xmin::text END AS version,
            CASE WHEN t.mode <> 0 THEN a.job END AS job),
    e AS (
        INSERT INTO aiwg_job_events (job_id, seq, at, kind)
        SELECT u.id, u.last_seq, u.at, u.kind::jsonb FROM u)
    SELECT u.ord, u.last_seq, u.version, u.job FROM u;
END
$$;

-- The jobs whose leases (`tokens`) still hold at `ats`, with their row versions, for the
-- outcomes about to be written whose jobs the completer does not hold as their last step
-- event left them.
CREATE OR REPLACE FUNCTION aiwg_leased_jobs(ids uuid[], tokens bigint[], ats timestamptz[])
RETURNS TABLE (job jsonb, version text)
LANGUAGE plpgsql STABLE
SET jit = off SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT a.job, a.xmin::text
    FROM aiwg_jobs a
    JOIN unnest(ids, tokens, ats) AS t(id, token, at) ON a.id = t.id
    WHERE a.id = ANY(ids) AND a.lease_token = t.token
      AND a.lease_expires_at > GREATEST(t.at, now());
END
$$;

-- A batch of outcomes: writes each job as the outcome left it, ends its lease and inserts its
-- last event (`last_kind` at `last_at`, when the outcome carried one) and its outcome's event,
-- if the row is still the version read (`versions`) and the lease still holds. One row per
-- job written: its id and `seq` (its outcome's event).
CREATE OR REPLACE FUNCTION aiwg_record_outcomes(ids uuid[], tokens bigint[], ats timestamptz[],
                                                versions text[], statuses text[],
                                                retry_ats timestamptz[], jobs text[],
                                                approval_ats timestamptz[],
                                                ev_ats timestamptz[], kinds text[],
                                                last_ats timestamptz[], last_kinds text[])
RETURNS TABLE (id uuid, last_seq bigint)
LANGUAGE plpgsql VOLATILE
SET jit = off SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH t AS (
        SELECT * FROM unnest(ids, tokens, ats, versions, statuses, retry_ats, jobs,
                             approval_ats, ev_ats, kinds, last_ats, last_kinds)
            AS t(id, token, at, version, status, retry_at, job, approval_expires_at,
                 ev_at, kind, last_at, last_kind)),
    u AS (
        UPDATE aiwg_jobs a SET status = t.status,
            queue_seq = CASE WHEN t.status = 'queued' THEN nextval('aiwg_queue_seq') END,
            retry_at = t.retry_at, cancel_requested = FALSE, job = t.job::jsonb,
            last_seq = a.last_seq + CASE WHEN t.last_kind IS NULL THEN 1 ELSE 2 END,
            lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL,
            approval_expires_at = t.approval_expires_at, updated_at = now()
        FROM t
        WHERE a.id = t.id AND a.id = ANY(ids)
          AND a.xmin::text = t.version
          AND a.lease_token = t.token
          AND a.lease_expires_at > GREATEST(t.at, now())
        RETURNING a.id, a.last_seq, t.ev_at, t.kind, t.last_at, t.last_kind),
    e AS (
        INSERT INTO aiwg_job_events (job_id, seq, at, kind)
        SELECT u.id, u.last_seq - 1, u.last_at, u.last_kind::jsonb FROM u
            WHERE u.last_kind IS NOT NULL
        UNION ALL SELECT u.id, u.last_seq, u.ev_at, u.kind::jsonb FROM u)
    SELECT u.id, u.last_seq FROM u;
END
$$;
