-- aiwg: a submit into a bounded queue in one statement (issue 15). The store used to open a
-- transaction, take the queue's advisory lock, count the queued jobs and insert: five round
-- trips. This function takes the lock and counts in a statement of its own, so the count is
-- read after the lock is held and sees every job inserted by the lock's previous holders (a
-- VOLATILE function's statements each take a new snapshot); the caller inserts in the same
-- statement, and the lock is held until that statement commits.

CREATE OR REPLACE FUNCTION aiwg_queue_has_room(lock_key bigint, capacity bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    RETURN (SELECT count(*) FROM aiwg_jobs WHERE status = 'queued') < capacity;
END
$$;
