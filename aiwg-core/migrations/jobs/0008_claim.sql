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
