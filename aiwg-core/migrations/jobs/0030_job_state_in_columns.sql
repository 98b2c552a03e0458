-- aiwg: a job's changing part is kept in columns of its own; its document holds only what
-- never changes after the submit (issue 15).
--
-- Until now `aiwg_jobs.job` held the whole job, and every claim and every outcome moved,
-- parsed and rewrote that document (about 780 bytes for a job with nothing in it): the claim
-- in SQL (`aiwg_claimed_job`, two concatenations over the whole document), the outcome from
-- Rust (the whole job serialised, parsed into JSONB again by the database, and its row
-- written whole). `scripts/pg_job_cycle.sh` measured that at about a third of the database's
-- CPU per job and a third of its write-ahead log (BENCHMARKS.md, session 35).
--
-- Now the document is written once, at the submit, without the fields that change
-- (`aiwg_job_document`), and those are columns: `status`, `retry_at` and `cancel_requested`
-- were already, and `attempt`, `started_at`, `finished_at`, `dead_letter`,
-- `resume_after_approval`, `progress`, `history`, `approvals`, `result` and `error` are too,
-- in a table made anew (below). The store reads a job as its document and its state (`aiwg_job_state`, one small JSON
-- object of those columns, with the job's own field names) and writes the state only, given as
-- such an object (`aiwg_job_columns`, which also fills the columns of the jobs already here
-- and of each new one from its whole job). A claim moves the job to `running` in the columns
-- (`aiwg_claimed_state`, the twin of `apply::claim`, as `aiwg_claimed_job` was), a step event
-- moves `progress` alone, and an outcome writes the state.
--
-- Every instance sharing the database must run a version with this migration: an earlier one
-- would read jobs without their state. Its functions are dropped (`aiwg_claimed_job`, 0020's
-- and 0028's `aiwg_record_outcomes`) or change shape, so such an instance fails loudly rather
-- than writing states nobody reads.

-- A job's document without its changing fields: what `job` holds.
CREATE FUNCTION aiwg_job_document(job jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT job - '{status, retry_at, cancel_requested, attempt, started_at, finished_at,
                   dead_letter, resume_after_approval, progress, history, approvals, result,
                   error}'::text[]
$$;

-- The columns of a job's state (or of a whole job), from its JSON: what the store writes.
-- (`status`, `retry_at` and `cancel_requested` are written by each statement on its own.)
CREATE FUNCTION aiwg_job_columns(state jsonb)
RETURNS TABLE (attempt bigint, started_at timestamptz, finished_at timestamptz,
               dead_letter boolean, resume_after_approval boolean, progress jsonb,
               history jsonb, approvals jsonb, result jsonb, error jsonb)
LANGUAGE sql STABLE AS $$
    SELECT COALESCE((state->>'attempt')::bigint, 0),
        (state->>'started_at')::timestamptz,
        (state->>'finished_at')::timestamptz,
        COALESCE((state->>'dead_letter')::boolean, false),
        COALESCE((state->>'resume_after_approval')::boolean, false),
        COALESCE(state->'progress',
            '{"completed": [], "in_progress": [], "pending": []}'::jsonb),
        COALESCE(state->'history', '[]'::jsonb),
        COALESCE(state->'approvals', '[]'::jsonb),
        NULLIF(state->'result', 'null'::jsonb),
        NULLIF(state->'error', 'null'::jsonb)
$$;

-- The table is made anew, its columns in this order: what never changes after the submit
-- first, the document last of them, then what does. PostgreSQL logs an update of a row that
-- stays on its page without the unchanged head and tail of the row, so a claim's, an event's
-- or an outcome's record leaves the document out (session 35's prototype: 3.9 KB of
-- write-ahead log a job instead of 5.6). Columns added to the old table would have come after
-- the document, with `status` and the lease before it: the document would have been logged
-- with every change. The jobs already here are copied with their state taken from their
-- documents, meanwhile every other writer waits (the lock); their queued tallies (0013) hold
-- as they are, the rows being the same.
LOCK TABLE aiwg_jobs IN ACCESS EXCLUSIVE MODE;

CREATE TABLE aiwg_jobs_0030 (
    -- What never changes after the submit.
    id                    uuid        NOT NULL,
    priority              integer     NOT NULL,
    project_path          text        NOT NULL,
    workflow              text        NOT NULL,
    created_at            timestamptz NOT NULL,
    idempotency_key       text,
    fingerprint           text,
    job                   jsonb       NOT NULL,
    -- What does: the queue, the lease, the events' numbering...
    status                text        NOT NULL,
    queue_seq             bigint,
    retry_at              timestamptz,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    lease_owner           text,
    lease_token           bigint,
    lease_expires_at      timestamptz,
    cancel_requested      boolean     NOT NULL DEFAULT false,
    last_seq              bigint      NOT NULL DEFAULT 0,
    approval_expires_at   timestamptz,
    -- ...and the rest of the job's state.
    attempt               bigint      NOT NULL DEFAULT 0,
    started_at            timestamptz,
    finished_at           timestamptz,
    dead_letter           boolean     NOT NULL DEFAULT false,
    resume_after_approval boolean     NOT NULL DEFAULT false,
    progress              jsonb       NOT NULL
        DEFAULT '{"completed": [], "in_progress": [], "pending": []}',
    history               jsonb       NOT NULL DEFAULT '[]',
    approvals             jsonb       NOT NULL DEFAULT '[]',
    result                jsonb,
    error                 jsonb
) WITH (fillfactor = 70);

INSERT INTO aiwg_jobs_0030
SELECT o.id, o.priority, o.project_path, o.workflow, o.created_at, o.idempotency_key,
    o.fingerprint, aiwg_job_document(o.job), o.status, o.queue_seq, o.retry_at, o.updated_at,
    o.lease_owner, o.lease_token, o.lease_expires_at, o.cancel_requested, o.last_seq,
    o.approval_expires_at, s.*
FROM aiwg_jobs o CROSS JOIN LATERAL aiwg_job_columns(o.job) s;

DROP TABLE aiwg_jobs;
ALTER TABLE aiwg_jobs_0030 RENAME TO aiwg_jobs;

-- The constraints, indexes and triggers of before, by the same names, but for one: the
-- idempotency keys' unique index leaves out the jobs without one (most), as every index of the
-- table gets an entry at each status change (`status` is indexed: no such update is a heap-only
-- one), and those of null keys were never looked up (`pg_job_cycle.sh`: 145 B less write-ahead
-- log a job). Its inserts name that index by its predicate (`ON CONFLICT … WHERE`).
ALTER TABLE aiwg_jobs
    ADD CONSTRAINT aiwg_jobs_pkey PRIMARY KEY (id),
    ADD CONSTRAINT aiwg_jobs_status_check CHECK (status IN
        ('queued', 'running', 'awaiting_approval', 'completed', 'failed', 'cancelled',
         'timed_out')),
    ADD CONSTRAINT aiwg_jobs_check
        CHECK ((status = 'running') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    ADD CONSTRAINT aiwg_jobs_check1 CHECK ((status = 'queued') = (queue_seq IS NOT NULL)),
    ADD CONSTRAINT aiwg_jobs_approval_check
        CHECK ((status = 'awaiting_approval') = (approval_expires_at IS NOT NULL));

CREATE UNIQUE INDEX aiwg_jobs_idempotency_key_key ON aiwg_jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX aiwg_jobs_claim_idx ON aiwg_jobs (priority DESC, queue_seq)
    WHERE status = 'queued';
CREATE INDEX aiwg_jobs_lease_idx ON aiwg_jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX aiwg_jobs_status_id_idx ON aiwg_jobs (status, id DESC);
CREATE INDEX aiwg_jobs_workflow_id_idx ON aiwg_jobs (workflow, id DESC);
CREATE INDEX aiwg_jobs_approval_idx ON aiwg_jobs (approval_expires_at)
    WHERE status = 'awaiting_approval';
CREATE INDEX aiwg_jobs_queued_project_idx ON aiwg_jobs (project_path, priority DESC, queue_seq)
    WHERE status = 'queued';
CREATE INDEX aiwg_jobs_running_project_idx ON aiwg_jobs (project_path)
    WHERE status = 'running' COLLATE "C";

CREATE TRIGGER aiwg_jobs_tally_inserted AFTER INSERT ON aiwg_jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION aiwg_tally_inserted();
CREATE TRIGGER aiwg_jobs_tally_updated AFTER UPDATE OF status ON aiwg_jobs
    FOR EACH ROW WHEN ((OLD.status = 'queued') IS DISTINCT FROM (NEW.status = 'queued'))
    EXECUTE FUNCTION aiwg_tally_moved();
CREATE TRIGGER aiwg_jobs_tally_deleted AFTER DELETE ON aiwg_jobs
    FOR EACH ROW WHEN (OLD.status = 'queued')
    EXECUTE FUNCTION aiwg_tally_moved();
CREATE TRIGGER aiwg_jobs_events_deleted AFTER DELETE ON aiwg_jobs
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION aiwg_delete_events_of_deleted_jobs();
CREATE TRIGGER aiwg_jobs_events_truncated AFTER TRUNCATE ON aiwg_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiwg_truncate_events_of_truncated_jobs();

ANALYZE aiwg_jobs;

-- A job's state, from its row, as one JSON object with the job's own field names: what the
-- store reads beside the document.
CREATE FUNCTION aiwg_job_state(j aiwg_jobs) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('status', j.status, 'retry_at', j.retry_at,
        'cancel_requested', j.cancel_requested, 'attempt', j.attempt,
        'started_at', j.started_at, 'finished_at', j.finished_at,
        'dead_letter', j.dead_letter, 'resume_after_approval', j.resume_after_approval,
        'progress', j.progress, 'history', j.history, 'approvals', j.approvals,
        'result', j.result, 'error', j.error)
$$;

-- The twin of `apply::claim` on a job's state (as 0008's `aiwg_claimed_job` was on its
-- document): the next attempt (the same one for a job resuming after an approval), its start,
-- the steps all pending again (unless resuming) and the change in the history.
CREATE FUNCTION aiwg_claimed_state(c_attempt bigint, c_resuming boolean,
                                   c_started_at timestamptz, c_progress jsonb,
                                   c_history jsonb, c_at timestamptz)
RETURNS TABLE (attempt bigint, started_at timestamptz, progress jsonb, history jsonb)
LANGUAGE sql STABLE AS $$
    SELECT n.attempt,
        CASE WHEN c_resuming THEN c_started_at ELSE c_at END,
        CASE WHEN c_resuming OR (COALESCE(c_progress->'completed', '[]'::jsonb) = '[]'::jsonb
                                 AND COALESCE(c_progress->'in_progress', '[]'::jsonb)
                                     = '[]'::jsonb)
        THEN c_progress
        ELSE jsonb_build_object('completed', '[]'::jsonb, 'in_progress', '[]'::jsonb,
            'pending', COALESCE(c_progress->'completed', '[]'::jsonb)
                || COALESCE(c_progress->'in_progress', '[]'::jsonb)
                || COALESCE(c_progress->'pending', '[]'::jsonb)) END,
        c_history || jsonb_build_array(
            jsonb_build_object('status', 'running',
                'at', to_char(c_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                'attempt', n.attempt)
            || CASE WHEN c_resuming THEN jsonb_build_object('reason', 'resumed after approval')
               ELSE '{}'::jsonb END)
    FROM (SELECT CASE WHEN c_resuming OR c_attempt >= 4294967295 THEN c_attempt
                 ELSE c_attempt + 1 END AS attempt) n
$$;

DROP FUNCTION aiwg_claim(timestamptz, bigint, text, bigint);
DROP FUNCTION aiwg_claim_limited(timestamptz, bigint, text, bigint, bigint, text);
DROP FUNCTION aiwg_claimed_job(jsonb, timestamptz);
DROP FUNCTION aiwg_append_events(uuid[], bigint[], timestamptz[], text[], smallint[], text[],
                                 boolean);
DROP FUNCTION aiwg_leased_jobs(uuid[], bigint[], timestamptz[]);
DROP FUNCTION aiwg_record_outcomes(uuid[], bigint[], timestamptz[], text[], text[],
                                   timestamptz[], text[], timestamptz[], timestamptz[], text[],
                                   timestamptz[], text[]);
DROP FUNCTION aiwg_record_outcomes(uuid[], bigint[], timestamptz[], text[], text[],
                                   timestamptz[], text[], timestamptz[], timestamptz[], text[],
                                   timestamptz[], text[], timestamptz[], text[]);

-- 0019's claim, with the state moved in the columns and returned beside the document.
CREATE FUNCTION aiwg_claim(claim_at timestamptz, claim_max bigint, claim_owner text,
                           claim_ttl_micros bigint)
RETURNS TABLE (grouped bigint, id uuid, last_seq bigint, lease_token bigint,
               lease_expires_at timestamptz, job jsonb, state jsonb)
LANGUAGE plpgsql VOLATILE
SET jit = off SET plan_cache_mode = force_generic_plan SET enable_sort = off
SET enable_bitmapscan = off SET enable_indexscan = on SET enable_seqscan = off AS $$
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
            (attempt, started_at, progress, history) = (
                SELECT * FROM aiwg_claimed_state(a.attempt, a.resume_after_approval,
                    a.started_at, a.progress, a.history, claim_at)),
            last_seq = a.last_seq + 1,
            updated_at = now()
        FROM p
        WHERE a.id = p.id AND a.id = ANY(ARRAY(SELECT p.id FROM p))
          AND NOT EXISTS (SELECT 1 FROM p WHERE p.grouped)
        RETURNING a.id, a.last_seq, a.lease_token, a.lease_expires_at, a.job,
            aiwg_job_state(a) AS state, a.attempt, a.resume_after_approval,
            p.priority, p.queue_seq),
    e AS (
        INSERT INTO aiwg_job_events (job_id, seq, at, kind)
        SELECT u.id, u.last_seq, claim_at,
            jsonb_build_object('kind', 'status', 'from', 'queued', 'to', 'running',
                'attempt', u.attempt)
            || CASE WHEN u.resume_after_approval
               THEN jsonb_build_object('reason', 'resumed after approval')
               ELSE '{}'::jsonb END
        FROM u)
    SELECT c.grouped, u.id, u.last_seq, u.lease_token, u.lease_expires_at, u.job, u.state
    FROM (SELECT count(*) FILTER (WHERE p.grouped) AS grouped FROM p) c
    LEFT JOIN u ON true
    ORDER BY u.priority DESC, u.queue_seq;
END
$$;

-- 0027's claim under a per-project limit, with the state moved in the columns and returned
-- beside the document.
CREATE FUNCTION aiwg_claim_limited(claim_at timestamptz, claim_max bigint,
                                   claim_owner text, claim_ttl_micros bigint,
                                   project_limit bigint, lock_scope text)
RETURNS TABLE (id uuid, last_seq bigint, lease_token bigint,
               lease_expires_at timestamptz, job jsonb, state jsonb)
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
                        (attempt, started_at, progress, history) = (
                            SELECT * FROM aiwg_claimed_state(a.attempt,
                                a.resume_after_approval, a.started_at, a.progress,
                                a.history, claim_at)),
                        last_seq = a.last_seq + 1,
                        updated_at = now()
                    FROM p
                    WHERE a.id = picked[i] AND a.id = p.id
                    RETURNING a.id, a.last_seq, a.lease_token, a.lease_expires_at, a.job,
                        aiwg_job_state(a) AS state, a.attempt, a.resume_after_approval),
                e AS (
                    INSERT INTO aiwg_job_events (job_id, seq, at, kind)
                    SELECT u.id, u.last_seq, claim_at,
                        jsonb_build_object('kind', 'status', 'from', 'queued', 'to', 'running',
                            'attempt', u.attempt)
                        || CASE WHEN u.resume_after_approval
                           THEN jsonb_build_object('reason', 'resumed after approval')
                           ELSE '{}'::jsonb END
                    FROM u)
                SELECT u.id, u.last_seq, u.lease_token, u.lease_expires_at, u.job, u.state
                FROM u
            LOOP
                picked[i] := NULL;
                id := claimed.id;
                last_seq := claimed.last_seq;
                lease_token := claimed.lease_token;
                lease_expires_at := claimed.lease_expires_at;
                job := claimed.job;
                state := claimed.state;
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
                    (attempt, started_at, progress, history) = (
                        SELECT * FROM aiwg_claimed_state(a.attempt, a.resume_after_approval,
                            a.started_at, a.progress, a.history, $5)),
                    last_seq = a.last_seq + 1,
                    updated_at = now()
                FROM p
                WHERE a.id = p.id AND a.id = ANY($1)
                RETURNING a.id, a.last_seq, a.lease_token, a.lease_expires_at, a.job,
                    aiwg_job_state(a) AS state, a.attempt, a.resume_after_approval, p.ord),
            e AS (
                INSERT INTO aiwg_job_events (job_id, seq, at, kind)
                SELECT u.id, u.last_seq, $5,
                    jsonb_build_object('kind', 'status', 'from', 'queued', 'to', 'running',
                        'attempt', u.attempt)
                    || CASE WHEN u.resume_after_approval
                       THEN jsonb_build_object('reason', 'resumed after approval')
                       ELSE '{}'::jsonb END
                FROM u)
            SELECT u.id, u.last_seq, u.lease_token, u.lease_expires_at, u.job, u.state, u.ord
            FROM u ORDER BY u.ord
            $claim$ USING picked, claim_owner, due, claim_ttl_micros, claim_at
        LOOP
            picked[claimed.ord] := NULL;
            id := claimed.id;
            last_seq := claimed.last_seq;
            lease_token := claimed.lease_token;
            lease_expires_at := claimed.lease_expires_at;
            job := claimed.job;
            state := claimed.state;
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

-- 0020's batch of events: a step event moves the `progress` column. Every event's row
-- answers with its version, and the completer keeps the job it holds (moving its progress
-- as the statement did), so that the job's outcome needs no read after any event.
CREATE FUNCTION aiwg_append_events(ids uuid[], tokens bigint[], ats timestamptz[],
                                   kinds text[], modes smallint[], steps text[],
                                   relaxed boolean)
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
        SELECT * FROM unnest(ids, tokens, ats, kinds, modes, steps) WITH ORDINALITY
            AS t(id, token, at, kind, mode, step, ord)),
    u AS (
        UPDATE aiwg_jobs a SET last_seq = a.last_seq + 1,
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
        RETURNING a.id, a.last_seq, t.at, t.kind, t.ord, a.xmin::text AS version),
    e AS (
        INSERT INTO aiwg_job_events (job_id, seq, at, kind)
        SELECT u.id, u.last_seq, u.at, u.kind::jsonb FROM u)
    SELECT u.ord, u.last_seq, u.version FROM u;
END
$$;

-- 0020's read of leased jobs, with their state.
CREATE FUNCTION aiwg_leased_jobs(ids uuid[], tokens bigint[], ats timestamptz[])
RETURNS TABLE (job jsonb, state jsonb, version text)
LANGUAGE plpgsql STABLE
SET jit = off SET enable_seqscan = off SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT a.job, aiwg_job_state(a), a.xmin::text
    FROM aiwg_jobs a
    JOIN unnest(ids, tokens, ats) AS t(id, token, at) ON a.id = t.id
    WHERE a.id = ANY(ids) AND a.lease_token = t.token
      AND a.lease_expires_at > GREATEST(t.at, now());
END
$$;

-- 0028's batch of outcomes, writing each job's state (`states`, as `aiwg_job_columns`
-- reads it) where the whole job was written. (Each state is parsed once, as the array is:
-- `aiwg_job_columns` is inlined, and given text would parse it once for each column, which
-- made the statement twice as slow.)
CREATE FUNCTION aiwg_record_outcomes(ids uuid[], tokens bigint[], ats timestamptz[],
                                     versions text[], statuses text[],
                                     retry_ats timestamptz[], states text[],
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
        SELECT t.*, s.attempt AS s_attempt, s.started_at AS s_started_at,
            s.finished_at AS s_finished_at, s.dead_letter AS s_dead_letter,
            s.resume_after_approval AS s_resume, s.progress AS s_progress,
            s.history AS s_history, s.approvals AS s_approvals, s.result AS s_result,
            s.error AS s_error
        FROM unnest(ids, tokens, ats, versions, statuses, retry_ats, states::jsonb[],
                    approval_ats, ev_ats, kinds, last_ats, last_kinds, first_ats, first_kinds)
            AS t(id, token, at, version, status, retry_at, state, approval_expires_at,
                 ev_at, kind, last_at, last_kind, first_at, first_kind)
        CROSS JOIN LATERAL aiwg_job_columns(t.state) s),
    u AS (
        UPDATE aiwg_jobs a SET status = t.status,
            queue_seq = CASE WHEN t.status = 'queued' THEN nextval('aiwg_queue_seq') END,
            retry_at = t.retry_at, cancel_requested = FALSE,
            attempt = t.s_attempt, started_at = t.s_started_at,
            finished_at = t.s_finished_at, dead_letter = t.s_dead_letter,
            resume_after_approval = t.s_resume, progress = t.s_progress,
            history = t.s_history, approvals = t.s_approvals, result = t.s_result,
            error = t.s_error,
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

-- 0029's admission, writing each new job's document and state columns from the whole job
-- (each job's text parsed once: `aiwg_job_columns` is inlined, and would parse a text argument
-- once for each column), its key matched by the keys' partial index.
CREATE OR REPLACE FUNCTION aiwg_admit(
    lock_key bigint, bounded boolean, ids uuid[], priorities int4[], projects text[],
    workflows text[], retry_ats timestamptz[], created_ats timestamptz[], jobs text[],
    kinds text[], ats timestamptz[], caps int8[], keys text[], fingerprints text[])
RETURNS TABLE (id uuid, inserted boolean) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    queued_before bigint := 0;
    locked boolean := false;
    counted bigint;
    cand_ids uuid[];
    cand_places bigint[];
    cand_caps bigint[];
    new_ids uuid[];
    refused uuid[];
BEGIN
    IF bounded THEN
        -- With a key, or when nobody else holds the lock: counted under it first.
        IF EXISTS (SELECT 1 FROM unnest(keys) AS x(key) WHERE x.key IS NOT NULL) THEN
            locked := true;
        ELSE
            locked := pg_try_advisory_xact_lock(lock_key);
        END IF;
        IF locked THEN
            queued_before := aiwg_queued_under_lock(lock_key);
        ELSE
            SELECT COALESCE(sum(t.queued), 0) INTO queued_before FROM aiwg_queue_tally t;
        END IF;
    END IF;
    -- `known`: a job whose key a job already has (or an earlier one of the batch): it takes
    -- no place in a bounded queue and is not admitted to one (its caller looks the key up).
    -- `place`: its place among the batch's bounded jobs that take one. The candidates are the
    -- unbounded jobs and the bounded ones that fit the count read above; `u` inserts those
    -- whose key is free.
    WITH k AS (
        SELECT x.*, x.idempotency_key IS NOT NULL AND (
                row_number() OVER (PARTITION BY x.idempotency_key ORDER BY x.ord) > 1
                OR EXISTS (SELECT 1 FROM aiwg_jobs j
                    WHERE j.idempotency_key = x.idempotency_key)) AS known
        FROM unnest(ids, priorities, projects, workflows, retry_ats, created_ats,
            jobs::jsonb[], kinds, ats, caps, keys, fingerprints)
            WITH ORDINALITY AS x(id, priority, project_path, workflow, retry_at, created_at,
                job, kind, at, cap, idempotency_key, fingerprint, ord)),
    t AS (SELECT k.*, count(k.cap) FILTER (WHERE NOT k.known) OVER (ORDER BY k.ord) AS place
        FROM k),
    c AS (SELECT t.* FROM t
        WHERE t.cap IS NULL OR (NOT t.known AND queued_before + t.place <= t.cap)),
    u AS (INSERT INTO aiwg_jobs (id, status, priority, project_path, workflow, queue_seq,
            retry_at, created_at, idempotency_key, fingerprint, last_seq, job, attempt,
            started_at, finished_at, dead_letter, resume_after_approval, progress, history,
            approvals, result, error)
        SELECT c.id, 'queued', c.priority, c.project_path, c.workflow,
            nextval('aiwg_queue_seq'), c.retry_at, c.created_at, c.idempotency_key,
            c.fingerprint, 1, aiwg_job_document(c.job), s.*
        FROM c CROSS JOIN LATERAL aiwg_job_columns(c.job) s
        ORDER BY c.ord
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING aiwg_jobs.id),
    e AS (INSERT INTO aiwg_job_events (job_id, seq, at, kind)
        SELECT u.id, 1, c.at, c.kind::jsonb FROM u JOIN c ON c.id = u.id)
    SELECT array_agg(c.id ORDER BY c.ord), array_agg(c.place ORDER BY c.ord),
        array_agg(c.cap ORDER BY c.ord), array_agg(u.id) FILTER (WHERE u.id IS NOT NULL)
    INTO cand_ids, cand_places, cand_caps, new_ids
    FROM c LEFT JOIN u ON u.id = c.id;

    IF bounded AND NOT locked AND cand_ids IS NOT NULL THEN
        -- The jobs queued by others, committed before the lock was held: the tallies' sum
        -- less this transaction's own jobs (each inserted job is queued).
        counted := aiwg_queued_under_lock(lock_key) - COALESCE(cardinality(new_ids), 0);
        SELECT array_agg(x.id) INTO refused
        FROM unnest(cand_ids, cand_places, cand_caps) AS x(id, place, cap)
        WHERE x.cap IS NOT NULL AND counted + x.place > x.cap;
        IF refused IS NOT NULL THEN
            DELETE FROM aiwg_jobs j WHERE j.id = ANY (refused) AND j.id = ANY (new_ids);
        END IF;
    END IF;

    RETURN QUERY
        SELECT x.id, x.id = ANY (COALESCE(new_ids, '{}'))
        FROM unnest(COALESCE(cand_ids, '{}')) AS x(id)
        WHERE NOT (x.id = ANY (COALESCE(refused, '{}')));
END
$$;
