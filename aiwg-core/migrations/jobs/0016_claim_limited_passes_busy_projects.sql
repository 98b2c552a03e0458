-- aiwg: a claim under a per-project limit no longer waits for a project another claim is
-- taking while other projects have room (issue 15). The claim of 0012 waited for the lock of
-- the first project it needed, then only tried the later ones. Two engines' claims start with
-- the same project (the first job in claim order), so one waited for the other's commit even
-- when dozens of other projects had room: in the per-project burn-down of `pg_queue` a third
-- of the claims' time was that wait.
--
-- Now every project's lock is only tried. A project another claim holds is passed over: that
-- claim is either starting one of its jobs or finding it full, and the next claim sees which.
-- Only a claim that got nothing and holds no lock at all (every project with room was being
-- claimed) waits, for the first project it passed over, and then reads again. It waits
-- holding no lock, so two claims still never deadlock. The body is 0015's otherwise; its
-- settings are restated because `CREATE OR REPLACE` resets them.

CREATE OR REPLACE FUNCTION aiwg_claim_limited(claim_at timestamptz, claim_max bigint,
                                              claim_owner text, claim_ttl_micros bigint,
                                              project_limit bigint, lock_scope text)
RETURNS TABLE (id uuid, last_seq bigint, lease_token bigint,
               lease_expires_at timestamptz, job jsonb)
LANGUAGE plpgsql VOLATILE SET jit = off AS $$
#variable_conflict use_column
DECLARE
    due timestamptz := GREATEST(claim_at, now());
    c record;
    claimed record;
    got bigint := 0;
    holding boolean := false; -- whether this claim holds an advisory lock yet
    busy text;                -- the first project passed over, locked by another claim
    projects text[] := '{}';  -- the projects whose lock this claim holds...
    rooms bigint[] := '{}';   -- ...and how many more of their jobs may start
    shut text[] := '{}';      -- projects without room, or locked by another claim
    groups text[] := '{}';    -- groups checked (busy, locked elsewhere, or taken here)
    tried uuid[] := '{}';     -- jobs passed over (group busy, row taken meanwhile)
    again boolean := true;    -- whether passing over a job may have hidden another
    passes int := 0;
    k int;
    running bigint;
BEGIN
    IF claim_max <= 0 OR project_limit <= 0 THEN
        RETURN;
    END IF;
    -- Each pass reads at most as many jobs per project as may start (the project's running
    -- jobs counted in the pass's snapshot, counted again under its lock); a job passed over may
    -- hide the next job of its project, so then another pass reads on, without it (and
    -- without the groups already checked). A few passes at most: what is left to the next
    -- claim is only what other claims were taking at the same moment.
    WHILE again AND got < claim_max AND passes < 4 LOOP
    again := false;
    passes := passes + 1;
    FOR c IN
        WITH RECURSIVE p AS (
            (SELECT q.project_path FROM aiwg_jobs q WHERE q.status = 'queued'
             ORDER BY q.project_path LIMIT 1)
            UNION ALL
            SELECT (SELECT q.project_path FROM aiwg_jobs q
                    WHERE q.status = 'queued' AND q.project_path > p.project_path
                    ORDER BY q.project_path LIMIT 1)
            FROM p WHERE p.project_path IS NOT NULL)
        SELECT h.id, h.project_path, h.grp
        FROM p
        CROSS JOIN LATERAL (
            SELECT count(*) AS running FROM aiwg_jobs r
            WHERE r.status = 'running' COLLATE "C" AND r.project_path = p.project_path
              AND r.lease_expires_at > due) r
        CROSS JOIN LATERAL (
            SELECT j.id, j.project_path, j.priority, j.queue_seq,
                   j.job->>'concurrency_group' AS grp
            FROM aiwg_jobs j
            WHERE j.status = 'queued' AND j.project_path = p.project_path
              AND (j.retry_at IS NULL OR j.retry_at <= due)
              AND j.id <> ALL(tried)
              AND (j.job->>'concurrency_group' IS NULL
                   OR NOT (j.job->>'concurrency_group' = ANY(groups))
                   AND NOT EXISTS (SELECT 1 FROM aiwg_jobs g WHERE g.status = 'running'
                       AND g.job->>'concurrency_group' = j.job->>'concurrency_group'
                       AND g.lease_expires_at > due))
            ORDER BY j.priority DESC, j.queue_seq
            LIMIT LEAST(claim_max, project_limit - r.running)) h
        WHERE p.project_path IS NOT NULL AND r.running < project_limit
        ORDER BY h.priority DESC, h.queue_seq
    LOOP
        EXIT WHEN got >= claim_max;
        CONTINUE WHEN c.project_path = ANY(shut);
        k := array_position(projects, c.project_path);
        IF k IS NULL THEN
            IF NOT pg_try_advisory_xact_lock(aiwg_lock_key(lock_scope, c.project_path)) THEN
                busy := COALESCE(busy, c.project_path);
                shut := array_append(shut, c.project_path);
                CONTINUE;
            END IF;
            holding := true;
            SELECT count(*) INTO running FROM aiwg_jobs r
            WHERE r.status = 'running' COLLATE "C" AND r.project_path = c.project_path
              AND r.lease_expires_at > due;
            projects := array_append(projects, c.project_path);
            rooms := array_append(rooms, project_limit - running);
            k := cardinality(projects);
        END IF;
        IF rooms[k] <= 0 THEN
            shut := array_append(shut, c.project_path);
            CONTINUE;
        END IF;
        IF c.grp IS NOT NULL THEN
            IF c.grp = ANY(groups)
               OR NOT pg_try_advisory_xact_lock(
                   aiwg_lock_key(lock_scope, 'concurrency:' || c.grp))
               OR EXISTS (SELECT 1 FROM aiwg_jobs g WHERE g.status = 'running'
                   AND g.job->>'concurrency_group' = c.grp AND g.lease_expires_at > due)
            THEN
                groups := array_append(groups, c.grp);
                tried := array_append(tried, c.id);
                again := true;
                CONTINUE;
            END IF;
            groups := array_append(groups, c.grp);
        END IF;
        UPDATE aiwg_jobs a SET status = 'running', queue_seq = NULL, retry_at = NULL,
            lease_owner = claim_owner,
            lease_token = nextval('aiwg_lease_token_seq'),
            lease_expires_at = due + claim_ttl_micros * interval '1 microsecond',
            job = aiwg_claimed_job(a.job, claim_at),
            last_seq = a.last_seq + 1,
            updated_at = now()
        WHERE a.id = (SELECT q.id FROM aiwg_jobs q
                      WHERE q.id = c.id AND q.status = 'queued'
                      FOR UPDATE SKIP LOCKED)
        RETURNING a.id, a.last_seq, a.lease_token, a.lease_expires_at, a.job INTO claimed;
        IF NOT FOUND THEN -- claimed (or cancelled) meanwhile by someone else
            tried := array_append(tried, c.id);
            again := true;
            CONTINUE;
        END IF;
        INSERT INTO aiwg_job_events (job_id, seq, at, kind)
        VALUES (claimed.id, claimed.last_seq, claim_at,
            jsonb_build_object('kind', 'status', 'from', 'queued', 'to', 'running',
                'attempt', claimed.job->'attempt')
            || CASE WHEN COALESCE((claimed.job->>'resume_after_approval')::boolean, false)
               THEN jsonb_build_object('reason', 'resumed after approval')
               ELSE '{}'::jsonb END);
        rooms[k] := rooms[k] - 1;
        got := got + 1;
        id := claimed.id;
        last_seq := claimed.last_seq;
        lease_token := claimed.lease_token;
        lease_expires_at := claimed.lease_expires_at;
        job := claimed.job;
        RETURN NEXT;
    END LOOP;
    -- Every project with room was locked by other claims, and this one holds no lock: wait
    -- for the first of them (holding nothing, so no deadlock), then read again.
    IF got = 0 AND NOT holding AND busy IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(aiwg_lock_key(lock_scope, busy));
        holding := true;
        busy := NULL;
        shut := '{}';
        again := true;
        passes := passes - 1; -- the wait is not a pass: read at least once more
    END IF;
    END LOOP;
END
$$;

ALTER FUNCTION aiwg_claim_limited(timestamptz, bigint, text, bigint, bigint, text)
    SET plan_cache_mode = force_generic_plan;
