-- aiwg: submits into a bounded queue are inserted before the queue's lock is taken, and only
-- the count and the commit are made under it (issue 15).
--
-- The admitter's statement (0011) took the queue's advisory lock first, then counted, inserted
-- the jobs that fit and their events, and held the lock until it committed: every instance's
-- batches of submits were written one after another, the database's work on each (the job
-- documents, the indexes, the events) done while every other batch waited. With two stores
-- and 32 submitters, most of each batch's time was spent waiting for the lock, and the
-- machine was half idle.
--
-- `aiwg_admit` is now the admitter's statement for every batch. An unbounded batch takes no
-- lock. A bounded one takes the lock at once when nobody holds it, and then counts and
-- inserts as 0011's statement did; so does one with an idempotency key, which waits for the
-- lock if it must (see below). Otherwise a bounded batch does not wait for it: it inserts its
-- jobs (those that the queue, as last committed, still has room for) and their events first,
-- then takes the lock and counts: the sum of the tallies (0013) now includes this
-- transaction's own jobs, which its insert counted, and every job that the lock's previous
-- holders committed. A job of the batch whose place does not fit under that count is deleted
-- again (its events with it, by 0022's trigger) and answered as refused. What a batch admits
-- is what 0011's statement admitted from the same count; the jobs are simply written before
-- it is known. Under the lock there is a sum and a commit.
--
-- A job that could not fit even in the queue as last committed (the count read before the
-- insert, without the lock) is not inserted at all: a queue that is full refuses a flood of
-- submits without writing and deleting them. That count can only be higher than the one
-- under the lock by jobs that left the queue since (claims); such a job is refused as it
-- would have been a moment before.
--
-- Only a batch without idempotency keys inserts before the lock; a lone submit still takes
-- the lock first too (0007's statement: it has nothing to be written beside, and is quicker
-- so). An insert waits for another transaction only when both insert the same key; a
-- transaction that waits for the lock after its insert holds no key, so no transaction
-- holding the lock ever waits for one waiting for it (a deadlock), whichever of the ways, or
-- an earlier version's, each submit takes.
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
        FROM unnest(ids, priorities, projects, workflows, retry_ats, created_ats, jobs, kinds,
            ats, caps, keys, fingerprints)
            WITH ORDINALITY AS x(id, priority, project_path, workflow, retry_at, created_at,
                job, kind, at, cap, idempotency_key, fingerprint, ord)),
    t AS (SELECT k.*, count(k.cap) FILTER (WHERE NOT k.known) OVER (ORDER BY k.ord) AS place
        FROM k),
    c AS (SELECT t.* FROM t
        WHERE t.cap IS NULL OR (NOT t.known AND queued_before + t.place <= t.cap)),
    u AS (INSERT INTO aiwg_jobs (id, status, priority, project_path, workflow, queue_seq,
            retry_at, created_at, idempotency_key, fingerprint, last_seq, job)
        SELECT c.id, 'queued', c.priority, c.project_path, c.workflow,
            nextval('aiwg_queue_seq'), c.retry_at, c.created_at, c.idempotency_key,
            c.fingerprint, 1, c.job::jsonb
        FROM c ORDER BY c.ord
        ON CONFLICT (idempotency_key) DO NOTHING RETURNING aiwg_jobs.id),
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
