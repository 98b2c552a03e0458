-- aiwg: the claim finds the rows it picked by their keys (issue 15). The claim keeps one
-- (generic) plan (0010), and a generic plan does not know how many jobs a claim asks for: it
-- takes `LIMIT claim_max` for a tenth of the queued jobs. With a few thousand jobs in the
-- table its update then joined the picked rows to the table by hashing the whole table, a
-- sequential scan of every job (finished ones too) on every claim, where it needs the picked
-- ones only: measured with 6 000 jobs in the table, 3 000 of them queued, one claim after
-- another on one connection (pgbench, commits not waiting for the disk), 5.5-6.5 ms a claim.
-- Naming the picked rows by primary key as well (`a.id = ANY(ARRAY(…))`) makes the update
-- read them through the key whatever the estimate: 0.5-0.65 ms. (Bigger tables did get the
-- keyed plan, because there the whole table cost more to hash.) The body is 0008's
-- otherwise; its settings are restated here because `CREATE OR REPLACE` resets them.

CREATE OR REPLACE FUNCTION aiwg_claim(claim_at timestamptz, claim_max bigint,
                                      claim_owner text, claim_ttl_micros bigint)
RETURNS TABLE (grouped bigint, id uuid, last_seq bigint, lease_token bigint,
               lease_expires_at timestamptz, job jsonb)
LANGUAGE plpgsql VOLATILE SET jit = off SET plan_cache_mode = force_generic_plan AS $$
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
        WHERE a.id = p.id AND a.id = ANY(ARRAY(SELECT p.id FROM p))
          AND NOT EXISTS (SELECT 1 FROM p WHERE p.grouped)
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
