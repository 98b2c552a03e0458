-- aiwg: the per-project claim reads the projects' heads only once its walk of the queue is
-- through, past the walk's last job as the walk found it, and passes over the projects at their
-- limit there before it counts their running jobs (issue 15).
--
-- 0026 walked the queue's first jobs in claim order and read on through the heads of every
-- project with queued jobs in one statement of two branches, on the understanding that a `FOR`
-- loop fetches ten rows at a time, so that the heads were read only once the loop had gone
-- through the walk. It fetches ten, then fifty at a time: a claim that went past the queue's
-- tenth job read every project's head (three index probes a project: the next project, its
-- running jobs counted, its first job) even when it found its jobs further on in the walk, and
-- the heads found the walk's end again (`OFFSET walk_rows - 1`, as many rows as the walk) to
-- read past it. `pg_stat_statements` of `pg_queue`'s per-project burn-down (64 projects,
-- 15 000 jobs, the default limit of one job a project): the heads 110 us of the claim's
-- 476 us a job, in 2 240 passes of 1 867 claims. Now the walk and the heads are two
-- statements, in that order: the heads run only when the walk read `walk_rows` jobs and they
-- were not enough, and start past the walk's last job as the walk read it. And the heads pass
-- over the projects at their limit (`at_limit`, read once a pass) before counting their
-- running jobs or reading their first job: such a project costs them one probe.
--
-- What is started is the same: the first jobs in claim order whose project has room.
-- `at_limit` holds exactly the projects whose running jobs reach the limit (the heads' own
-- count, in the pass's snapshot a statement earlier), and every project's running jobs are
-- counted again under its lock before a job of it starts. A claim of one job past 64 full
-- projects' 193 queued jobs reads 272 rows instead of 336
-- (`a_per_project_claim_passes_over_full_projects_heads`).
--
-- The body is 0026's otherwise; its settings are restated because `CREATE OR REPLACE` resets
-- them.

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
    picked uuid[];            -- the jobs this pass takes, in claim order...
    picked_k int[];           -- ...and the index of each one's project in `projects`
    i int;
    -- How far a pass walks the queue in claim order before it reads the projects' heads:
    -- thirty jobs or more beyond what it may start, for the projects at their limit and those
    -- another claim is taking at the same moment (it walks the same jobs first).
    walk_rows bigint := 10 * (LEAST(claim_max, 1000) / 10 + 4);
    at_limit text[];          -- the projects at their limit when the pass began
    phase int;                -- 1: the walk; 2: the heads past it
    walked bigint;            -- the jobs the walk read...
    walk_priority integer;    -- ...and the last one's place in claim order
    walk_seq bigint;
BEGIN
    IF claim_max <= 0 OR project_limit <= 0 THEN
        RETURN;
    END IF;
    -- Each pass walks the queue's first jobs, then (when they were not enough) reads at most
    -- as many jobs per project as may start (the project's running jobs counted in the pass's
    -- snapshot; every project's counted again under its lock); a job passed over may
    -- hide the next job of its project, so then another pass reads on, without it (and
    -- without the groups already checked). A few passes at most: what is left to the next
    -- claim is only what other claims were taking at the same moment.
    WHILE again AND got < claim_max AND passes < 4 LOOP
    again := false;
    passes := passes + 1;
    picked := '{}';
    picked_k := '{}';
    -- The projects at their limit in the pass's snapshot: the running jobs are few (at most
    -- the workers of every instance), and read once here instead of counted per job walked.
    SELECT coalesce(array_agg(r.project_path), '{}') INTO at_limit
    FROM (SELECT r.project_path FROM aiwg_jobs r
          WHERE r.status = 'running' COLLATE "C" AND r.lease_expires_at > due
          GROUP BY r.project_path HAVING count(*) >= project_limit) r;
    -- Two statements: the walk, then, only when it read `walk_rows` jobs (so it was not the
    -- whole queue) and they were not enough, the heads past its last job. (One statement for
    -- both, as 0026 had, read the heads with the walk's second fetch: a `FOR` loop fetches ten
    -- rows, then fifty at a time; and found the walk's end again to read past it.)
    walked := 0;
    FOR phase IN 1 .. 2 LOOP
        EXIT WHEN phase = 2 AND (got >= claim_max OR walked < walk_rows);
        FOR c IN
            -- Phase 1, the walk: the queue's first jobs in claim order, each with whether it
            -- may start as far as the pass's snapshot shows (its project's running jobs, its
            -- group): with more projects than workers (a forge host's many repositories) most
            -- projects have room and these hold what the claim takes. The walk streams from
            -- the index of queued jobs: a claim that finds its jobs among the first reads no
            -- further. Phase 2, only when the walk was not the whole queue: the head jobs of
            -- every project with room, in claim order, past the walk's last job: the jobs of
            -- projects at their limit (a few projects with long queues) are never read, and a
            -- project at its limit in the pass's snapshot costs the heads one probe (the next
            -- project), not three. Each phase's `WHERE phase = …` is a one-time filter of the
            -- plan: the other branch does not run.
            WITH RECURSIVE p AS (
                (SELECT q.project_path FROM aiwg_jobs q WHERE q.status = 'queued'
                 ORDER BY q.project_path LIMIT 1)
                UNION ALL
                SELECT (SELECT q.project_path FROM aiwg_jobs q
                        WHERE q.status = 'queued' AND q.project_path > p.project_path
                        ORDER BY q.project_path LIMIT 1)
                FROM p WHERE p.project_path IS NOT NULL)
            (SELECT j.id, j.project_path, j.job->>'concurrency_group' AS grp,
                    j.priority, j.queue_seq,
                    NOT (j.project_path = ANY(at_limit))
                    AND (j.job->>'concurrency_group' IS NULL
                         OR NOT (j.job->>'concurrency_group' = ANY(groups))
                         AND NOT EXISTS (SELECT 1 FROM aiwg_jobs g WHERE g.status = 'running'
                             AND g.job->>'concurrency_group' = j.job->>'concurrency_group'
                             AND g.lease_expires_at > due)) AS ok
             FROM aiwg_jobs j
             WHERE phase = 1 AND j.status = 'queued'
               AND (j.retry_at IS NULL OR j.retry_at <= due)
               AND j.id <> ALL(tried)
             ORDER BY j.priority DESC, j.queue_seq
             LIMIT walk_rows)
            UNION ALL
            (SELECT h.id, h.project_path, h.grp, h.priority, h.queue_seq, true
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
                   AND (-j.priority, j.queue_seq) > (-walk_priority, walk_seq)
                   AND (j.job->>'concurrency_group' IS NULL
                        OR NOT (j.job->>'concurrency_group' = ANY(groups))
                        AND NOT EXISTS (SELECT 1 FROM aiwg_jobs g WHERE g.status = 'running'
                            AND g.job->>'concurrency_group' = j.job->>'concurrency_group'
                            AND g.lease_expires_at > due))
                 ORDER BY j.priority DESC, j.queue_seq
                 LIMIT LEAST(claim_max, project_limit - r.running)) h
             WHERE phase = 2 AND p.project_path IS NOT NULL
               AND NOT (p.project_path = ANY(at_limit))
               AND r.running < project_limit
             ORDER BY h.priority DESC, h.queue_seq)
        LOOP
            EXIT WHEN got >= claim_max;
            IF phase = 1 THEN
                walked := walked + 1;
                walk_priority := c.priority;
                walk_seq := c.queue_seq;
            END IF;
            CONTINUE WHEN NOT c.ok OR c.project_path = ANY(shut);
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
            -- Not shut: a job this pass picked and could not start gives its room back, and the
            -- next pass may take the project's next job (the walk reads several of a project).
            CONTINUE WHEN rooms[k] <= 0;
            IF c.grp IS NOT NULL THEN
                -- The group's running job is looked for in a statement of its own, after its
                -- lock is taken: its snapshot then sees the job a claim that held the lock
                -- before started (a claim releases its locks after its commit is visible).
                -- Checked in the lock's own expression, with the expression's snapshot taken
                -- before the lock, a claim that had just committed went unseen and two jobs of
                -- one group ran at once.
                IF c.grp = ANY(groups)
                   OR NOT pg_try_advisory_xact_lock(
                       aiwg_lock_key(lock_scope, 'concurrency:' || c.grp))
                THEN
                    groups := array_append(groups, c.grp);
                    tried := array_append(tried, c.id);
                    again := true;
                    CONTINUE;
                END IF;
                groups := array_append(groups, c.grp);
                IF EXISTS (SELECT 1 FROM aiwg_jobs g WHERE g.status = 'running'
                       AND g.job->>'concurrency_group' = c.grp AND g.lease_expires_at > due)
                THEN
                    tried := array_append(tried, c.id);
                    again := true;
                    CONTINUE;
                END IF;
            END IF;
            picked := array_append(picked, c.id);
            picked_k := array_append(picked_k, k);
            rooms[k] := rooms[k] - 1;
            got := got + 1;
        END LOOP;
    END LOOP;
    -- Fewer than eight jobs (every claim of a project at its default limit of one, and most
    -- claims of hosts with a few projects): each starts with a static statement, planned once
    -- per connection, that finds it by key alone; the status is compared in the "C" collation
    -- so that no index of queued jobs can serve it. More: the pass's jobs start together, one
    -- update and one insert of events for all of them, planned on each call (`EXECUTE`) for
    -- the jobs it names and the table as it is (a plan kept from a call made while the table
    -- was small reads a whole index to find them).
    IF cardinality(picked) < 8 THEN
        FOR i IN 1 .. cardinality(picked) LOOP
            FOR claimed IN
                WITH p AS (
                    SELECT q.id FROM aiwg_jobs q
                    WHERE q.id = picked[i] AND q.status = 'queued' COLLATE "C"
                    FOR UPDATE OF q SKIP LOCKED),
                u AS (
                    UPDATE aiwg_jobs a SET status = 'running', queue_seq = NULL, retry_at = NULL,
                        lease_owner = claim_owner,
                        lease_token = nextval('aiwg_lease_token_seq'),
                        lease_expires_at = due + claim_ttl_micros * interval '1 microsecond',
                        job = aiwg_claimed_job(a.job, claim_at),
                        last_seq = a.last_seq + 1,
                        updated_at = now()
                    FROM p
                    WHERE a.id = picked[i] AND a.id = p.id
                    RETURNING a.id, a.last_seq, a.lease_token, a.lease_expires_at, a.job),
                e AS (
                    INSERT INTO aiwg_job_events (job_id, seq, at, kind)
                    SELECT u.id, u.last_seq, claim_at,
                        jsonb_build_object('kind', 'status', 'from', 'queued', 'to', 'running',
                            'attempt', u.job->'attempt')
                        || CASE WHEN COALESCE((u.job->>'resume_after_approval')::boolean, false)
                           THEN jsonb_build_object('reason', 'resumed after approval')
                           ELSE '{}'::jsonb END
                    FROM u)
                SELECT u.id, u.last_seq, u.lease_token, u.lease_expires_at, u.job
                FROM u
            LOOP
                picked[i] := NULL;
                id := claimed.id;
                last_seq := claimed.last_seq;
                lease_token := claimed.lease_token;
                lease_expires_at := claimed.lease_expires_at;
                job := claimed.job;
                RETURN NEXT;
            END LOOP;
        END LOOP;
    ELSE
        FOR claimed IN EXECUTE $claim$
            WITH p AS (
                SELECT q.id, array_position($1, q.id) AS ord FROM aiwg_jobs q
                WHERE q.id = ANY($1) AND q.status = 'queued'
                FOR UPDATE OF q SKIP LOCKED),
            u AS (
                UPDATE aiwg_jobs a SET status = 'running', queue_seq = NULL, retry_at = NULL,
                    lease_owner = $2,
                    lease_token = nextval('aiwg_lease_token_seq'),
                    lease_expires_at = $3 + $4 * interval '1 microsecond',
                    job = aiwg_claimed_job(a.job, $5),
                    last_seq = a.last_seq + 1,
                    updated_at = now()
                FROM p
                WHERE a.id = p.id AND a.id = ANY($1)
                RETURNING a.id, a.last_seq, a.lease_token, a.lease_expires_at, a.job, p.ord),
            e AS (
                INSERT INTO aiwg_job_events (job_id, seq, at, kind)
                SELECT u.id, u.last_seq, $5,
                    jsonb_build_object('kind', 'status', 'from', 'queued', 'to', 'running',
                        'attempt', u.job->'attempt')
                    || CASE WHEN COALESCE((u.job->>'resume_after_approval')::boolean, false)
                       THEN jsonb_build_object('reason', 'resumed after approval')
                       ELSE '{}'::jsonb END
                FROM u)
            SELECT u.id, u.last_seq, u.lease_token, u.lease_expires_at, u.job, u.ord
            FROM u ORDER BY u.ord
            $claim$ USING picked, claim_owner, due, claim_ttl_micros, claim_at
        LOOP
            picked[claimed.ord] := NULL;
            id := claimed.id;
            last_seq := claimed.last_seq;
            lease_token := claimed.lease_token;
            lease_expires_at := claimed.lease_expires_at;
            job := claimed.job;
            RETURN NEXT;
        END LOOP;
    END IF;
    IF cardinality(picked) > 0 THEN
        -- A job left in `picked` was claimed (or cancelled) meanwhile by someone else: its
        -- room is back, and another pass reads on without it.
        FOR i IN 1 .. cardinality(picked) LOOP
            IF picked[i] IS NOT NULL THEN
                tried := array_append(tried, picked[i]);
                rooms[picked_k[i]] := rooms[picked_k[i]] + 1;
                got := got - 1;
                again := true;
            END IF;
        END LOOP;
    END IF;
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
ALTER FUNCTION aiwg_claim_limited(timestamptz, bigint, text, bigint, bigint, text)
    SET enable_sort = off;
ALTER FUNCTION aiwg_claim_limited(timestamptz, bigint, text, bigint, bigint, text)
    SET enable_bitmapscan = off;
ALTER FUNCTION aiwg_claim_limited(timestamptz, bigint, text, bigint, bigint, text)
    SET enable_indexscan = on;

ALTER FUNCTION aiwg_claim_limited(timestamptz, bigint, text, bigint, bigint, text)
    SET enable_seqscan = off;
