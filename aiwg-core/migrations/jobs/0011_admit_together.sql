-- aiwg: submits that arrive together enter a bounded queue together (issue 15). Every submit
-- into a bounded queue takes the queue's advisory lock (0007) and holds it until its insert
-- commits, so that the next one counts it; submits were therefore one commit, and one wait for
-- the disk, after another whatever their number: measured with pgbench, 16 clients inserting
-- into a bounded queue made 300-410 inserts/s, 5 700 without the lock. The store now sends
-- the submits that wait while one is on its way as one statement (one lock, one count, one
-- commit for all of them); this function takes the lock and answers the count it was taken
-- for.

-- Takes the queue's lock (held until the caller's transaction ends) and answers how many jobs
-- are queued, counted after the lock is held (a VOLATILE function's statements each take a
-- new snapshot, so the count sees every job the lock's previous holders inserted).
CREATE OR REPLACE FUNCTION aiwg_queued_under_lock(lock_key bigint)
RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    RETURN (SELECT count(*) FROM aiwg_jobs WHERE status = 'queued');
END
$$;
