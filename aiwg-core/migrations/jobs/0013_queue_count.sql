-- aiwg: the queued jobs are counted as they come and go, not recounted on every submit
-- (issue 15). A submit into a bounded queue counted the queued jobs under the queue's lock
-- (0007, 0011): one row read per queued job, so a backlog made every submit slower, and the
-- count took the database's CPU. Measured over HTTP on PostgreSQL with 9 000 jobs queued:
-- 5-7 ms per count, and counts took most of the database's time at 1 500 submits/s.
--
-- Now each backend keeps its own tally of the jobs its transactions queued and dequeued (a
-- row per backend process id, written only by that backend, so concurrent transactions
-- never wait on one another for it), and the count is the sum of the tallies. Triggers keep
-- the tallies: every way a job enters or leaves `queued` (insert, claim, retry, recovery,
-- cancel, resume after an approval, delete) is a write to `aiwg_jobs`. The sum taken under
-- the queue's lock sees exactly what a count of the rows would: the tallies commit with the
-- rows they count. The row of process id 0 holds the tallies of backends that are gone
-- (folded into it under the queue's lock; see `aiwg_queued_under_lock`).
--
-- Not counted: `TRUNCATE aiwg_jobs` (run `aiwg_recount_queued()` after one).

-- Writers are held off while the tally starts from the current count.
LOCK TABLE aiwg_jobs IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE aiwg_queue_tally (
    pid integer PRIMARY KEY,
    queued bigint NOT NULL
);

-- Inserts: once per statement (a batch of thousands is one write, not thousands). The
-- tally is written by the trigger functions themselves, not through a shared SQL function: a
-- PL/pgSQL statement keeps its plan, a SQL function's body is planned at every call.
CREATE OR REPLACE FUNCTION aiwg_tally_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    SELECT count(*) INTO n FROM inserted WHERE status = 'queued';
    IF n > 0 THEN
        INSERT INTO aiwg_queue_tally AS t (pid, queued) VALUES (pg_backend_pid(), n)
        ON CONFLICT (pid) DO UPDATE SET queued = t.queued + EXCLUDED.queued;
    END IF;
    RETURN NULL;
END
$$;

-- Updates and deletes: per row, only for the rows that enter or leave `queued`.
CREATE OR REPLACE FUNCTION aiwg_tally_moved() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta bigint := CASE WHEN TG_OP = 'UPDATE' AND NEW.status = 'queued' THEN 1 ELSE -1 END;
BEGIN
    INSERT INTO aiwg_queue_tally AS t (pid, queued) VALUES (pg_backend_pid(), delta)
    ON CONFLICT (pid) DO UPDATE SET queued = t.queued + EXCLUDED.queued;
    RETURN NULL;
END
$$;

CREATE TRIGGER aiwg_jobs_tally_inserted AFTER INSERT ON aiwg_jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION aiwg_tally_inserted();

CREATE TRIGGER aiwg_jobs_tally_updated AFTER UPDATE OF status ON aiwg_jobs
    FOR EACH ROW WHEN ((OLD.status = 'queued') IS DISTINCT FROM (NEW.status = 'queued'))
    EXECUTE FUNCTION aiwg_tally_moved();

CREATE TRIGGER aiwg_jobs_tally_deleted AFTER DELETE ON aiwg_jobs
    FOR EACH ROW WHEN (OLD.status = 'queued')
    EXECUTE FUNCTION aiwg_tally_moved();

-- Starts (or restarts) the tally from a count of the rows, under the queue's writers' lock.
CREATE OR REPLACE FUNCTION aiwg_recount_queued()
RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n bigint;
BEGIN
    LOCK TABLE aiwg_jobs IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM aiwg_queue_tally;
    SELECT count(*) INTO n FROM aiwg_jobs WHERE status = 'queued';
    INSERT INTO aiwg_queue_tally (pid, queued) VALUES (0, n);
    RETURN n;
END
$$;

SELECT aiwg_recount_queued();

-- The queue's lock, then the count (0011), now the sum of the tallies. Every so often the
-- tallies of backends that are gone are folded into row 0 (under the lock, so by one
-- caller at a time; a gone backend's row has no transaction left to write it).
CREATE OR REPLACE FUNCTION aiwg_queued_under_lock(lock_key bigint)
RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    tallies bigint;
    n bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT count(*), COALESCE(sum(queued), 0) INTO tallies, n FROM aiwg_queue_tally;
    IF tallies > 128 THEN
        WITH gone AS (
            DELETE FROM aiwg_queue_tally t
            WHERE t.pid <> 0
              AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = t.pid)
            RETURNING t.queued)
        UPDATE aiwg_queue_tally SET queued = queued + (SELECT COALESCE(sum(queued), 0) FROM gone)
        WHERE pid = 0;
    END IF;
    RETURN n;
END
$$;

-- The one-job submit's check (0007), on the same count.
CREATE OR REPLACE FUNCTION aiwg_queue_has_room(lock_key bigint, capacity bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN aiwg_queued_under_lock(lock_key) < capacity;
END
$$;
