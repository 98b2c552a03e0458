-- aiwg: a claim in one statement (issue 15). A claim was a transaction of four round trips:
-- `BEGIN`, a `SELECT … FOR UPDATE SKIP LOCKED` that read the jobs, an `UPDATE` of the jobs the
-- store had moved to `running` in Rust, `COMMIT`. This function is the SQL twin of
-- `apply::claim` (aiwg-core/src/store/mod.rs), so the pick and the update can be one
-- statement: `queued` → `running`, the next attempt (the same one for a job resuming after
-- an approval), `retry_at` cleared, the change appended to `history`, and, unless resuming,
-- `started_at` set and every step pending again. The store's tests check it against
-- `apply::claim`.

CREATE OR REPLACE FUNCTION aiwg_claimed_job(job jsonb, at timestamptz)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    resuming boolean := COALESCE((job->>'resume_after_approval')::boolean, false);
    attempt bigint := (job->>'attempt')::bigint
        + CASE WHEN resuming OR (job->>'attempt')::bigint >= 4294967295 THEN 0 ELSE 1 END;
    stamp text := to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
    change jsonb := jsonb_build_object('status', 'running', 'at', stamp, 'attempt', attempt);
    progress jsonb := COALESCE(job->'progress', '{}'::jsonb);
BEGIN
    IF resuming THEN
        change := change || jsonb_build_object('reason', 'resumed after approval');
    END IF;
    job := job || jsonb_build_object(
        'status', 'running',
        'attempt', attempt,
        'retry_at', NULL,
        'history', COALESCE(job->'history', '[]'::jsonb) || jsonb_build_array(change));
    IF NOT resuming THEN
        job := job || jsonb_build_object(
            'started_at', stamp,
            'progress', jsonb_build_object(
                'completed', '[]'::jsonb,
                'in_progress', '[]'::jsonb,
                'pending', COALESCE(progress->'completed', '[]'::jsonb)
                    || COALESCE(progress->'in_progress', '[]'::jsonb)
                    || COALESCE(progress->'pending', '[]'::jsonb)));
    END IF;
    RETURN job;
END
$$;

-- The claim itself: picks up to `claim_max` due jobs (highest priority first, then enqueue
-- order, skipping rows other claims hold), moves them to `running` under a fresh lease and
-- records their events, in one statement. When it comes upon a job of a concurrency group it
-- claims nothing and answers how many it saw (`grouped`), and the store claims that batch
-- with the group checked under the group's lock. The answer has one row with `id` NULL when
-- nothing was claimed.
--
-- `jit = off`: the planner's estimate of how many queued rows pass the filter is poor on a
-- table that churns as a queue does, and with a long queue the pick's estimated cost passed
-- `jit_above_cost`: every claim then spent tens of milliseconds compiling itself (measured
-- with 30 000 queued jobs: 90 ms for a claim of 28). A function's own setting is the one way
-- to keep that from a single statement outside a transaction.
CREATE OR REPLACE FUNCTION aiwg_claim(claim_at timestamptz, claim_max bigint,
                                      claim_owner text, claim_ttl_micros bigint)
RETURNS TABLE (grouped bigint, id uuid, last_seq bigint, lease_token bigint,
               lease_expires_at timestamptz, job jsonb)
LANGUAGE plpgsql VOLATILE SET jit = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH p AS (
        SELECT j.id, j.priority, j.queue_seq,
               j.job->>'concurrency_group' IS NOT NULL AS grouped
        FROM aiwg_jobs j
        WHERE j.status = 'queued'
          AND (j.retry_at IS NULL OR j.retry_at <= GREATEST(claim_at, now()))
          AND (j.job->>'concurrency_group' IS NULL
               OR NOT EXISTS (SELECT 1 FROM aiwg_jobs g WHERE g.status = 'running'
                   AND g.job->>'concurrency_group' = j.job->>'concurrency_group'
                   AND g.lease_expires_at > GREATEST(claim_at, now())))
        ORDER BY j.priority DESC, j.queue_seq
        LIMIT claim_max FOR UPDATE OF j SKIP LOCKED),
    u AS (
        UPDATE aiwg_jobs a SET status = 'running', queue_seq = NULL, retry_at = NULL,
            lease_owner = claim_owner,
            lease_token = nextval('aiwg_lease_token_seq'),
            lease_expires_at = GREATEST(claim_at, now())
                + claim_ttl_micros * interval '1 microsecond',
            job = aiwg_claimed_job(a.job, claim_at),
            last_seq = a.last_seq + 1,
            updated_at = now()
        FROM p
        WHERE a.id = p.id AND NOT EXISTS (SELECT 1 FROM p WHERE p.grouped)
        RETURNING a.id, a.last_seq, a.lease_token, a.lease_expires_at, a.job,
            p.priority, p.queue_seq),
    e AS (
        INSERT INTO aiwg_job_events (job_id, seq, at, kind)
        SELECT u.id, u.last_seq, claim_at,
            jsonb_build_object('kind', 'status', 'from', 'queued', 'to', 'running',
                'attempt', u.job->'attempt')
            || CASE WHEN COALESCE((u.job->>'resume_after_approval')::boolean, false)
               THEN jsonb_build_object('reason', 'resumed after approval')
               ELSE '{}'::jsonb END
        FROM u)
    SELECT c.grouped, u.id, u.last_seq, u.lease_token, u.lease_expires_at, u.job
    FROM (SELECT count(*) FILTER (WHERE p.grouped) AS grouped FROM p) c
    LEFT JOIN u ON true
    ORDER BY u.priority DESC, u.queue_seq;
END
$$;
