-- aiwg: a job's events are written without a foreign-key check; deleting jobs deletes their
-- events as before (issue 15).
--
-- Every event was checked against its job on insert (`REFERENCES aiwg_jobs (id)`): a query
-- per event, through SPI, that also locked the job's row. A one-step job writes five events,
-- and every statement that writes one already holds the job's row: each inserts its events
-- from the rows its own `UPDATE` or `INSERT` of `aiwg_jobs` returned (the claims, the
-- completer's functions, the admitter, cancels, approvals, retries), so the event's job
-- exists and nothing can delete it before the statement commits. Measured in `psql`: an update
-- of a job's row with the insert of its event, 28 µs with the check and 16 µs without.
--
-- What the constraint also did, `ON DELETE CASCADE`, two statement triggers do now, for aiwg's
-- purge and for anyone else's `DELETE` or `TRUNCATE` of jobs: the events of the deleted jobs
-- go in the same statement, by the events' primary key (a job's events lead it), in the
-- deleting table's own schema whatever the session's search path. A `TRUNCATE` of the jobs
-- also sets the tally of queued jobs (0013) to none; it had been left counting them.
--
-- The tally's triggers (0013) named their table without its schema, so a `DELETE` of a queued
-- job from a session whose search path did not lead to aiwg's tables failed ("relation
-- aiwg_queue_tally does not exist"). They are made again here naming it in the schema these
-- migrations run in: a row trigger on every claim, it stays plain SQL, planned once.

-- The name PostgreSQL gave 0001's inline `REFERENCES`.
ALTER TABLE aiwg_job_events DROP CONSTRAINT IF EXISTS aiwg_job_events_job_id_fkey;

CREATE OR REPLACE FUNCTION aiwg_delete_events_of_deleted_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DELETE FROM %I.aiwg_job_events WHERE job_id = ANY ($1)', TG_TABLE_SCHEMA)
        USING ARRAY(SELECT id FROM gone);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION aiwg_truncate_events_of_truncated_jobs() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    any_event boolean;
BEGIN
    -- Not when the same statement truncated the events too (`TRUNCATE aiwg_jobs,
    -- aiwg_job_events`): a table that statement still uses cannot be truncated again.
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.aiwg_job_events)', TG_TABLE_SCHEMA)
        INTO any_event;
    IF any_event THEN
        EXECUTE format('TRUNCATE %I.aiwg_job_events', TG_TABLE_SCHEMA);
    END IF;
    EXECUTE format('DELETE FROM %I.aiwg_queue_tally', TG_TABLE_SCHEMA);
    EXECUTE format('INSERT INTO %I.aiwg_queue_tally (pid, queued) VALUES (0, 0)',
        TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

DO $do$
BEGIN
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION aiwg_tally_inserted() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        DECLARE
            n bigint;
        BEGIN
            SELECT count(*) INTO n FROM inserted WHERE status = 'queued';
            IF n > 0 THEN
                INSERT INTO %1$I.aiwg_queue_tally AS t (pid, queued)
                VALUES (pg_backend_pid(), n)
                ON CONFLICT (pid) DO UPDATE SET queued = t.queued + EXCLUDED.queued;
            END IF;
            RETURN NULL;
        END
        $body$
    $f$, current_schema());
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION aiwg_tally_moved() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        DECLARE
            delta bigint := CASE WHEN TG_OP = 'UPDATE' AND NEW.status = 'queued'
                THEN 1 ELSE -1 END;
        BEGIN
            INSERT INTO %1$I.aiwg_queue_tally AS t (pid, queued)
            VALUES (pg_backend_pid(), delta)
            ON CONFLICT (pid) DO UPDATE SET queued = t.queued + EXCLUDED.queued;
            RETURN NULL;
        END
        $body$
    $f$, current_schema());
END
$do$;

CREATE TRIGGER aiwg_jobs_events_deleted
    AFTER DELETE ON aiwg_jobs
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION aiwg_delete_events_of_deleted_jobs();

CREATE TRIGGER aiwg_jobs_events_truncated
    AFTER TRUNCATE ON aiwg_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION aiwg_truncate_events_of_truncated_jobs();
