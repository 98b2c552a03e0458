-- aiwg: the queue's tally (0013) is kept once per statement that moves jobs into or out of
-- `queued`, not once per job (issue 15).
--
-- A row trigger kept it: every job a claim started, a retry or a recovery queued again, a
-- cancel took out, called a PL/pgSQL function that upserted the backend's tally row, so a
-- claim of 32 jobs wrote that row 32 times. Since 0030 a claim and an outcome write so little
-- else that those calls were about a tenth of the database's CPU a job (`perf` of
-- `scripts/pg_job_cycle.sh`, BENCHMARKS.md, session 37).
--
-- Now a statement trigger counts the statement's rows with transition tables: the jobs that
-- are queued after it less those that were before it. Every row an `UPDATE` changes is in both
-- tables once, so the difference is exactly what the row trigger added up, and the upsert runs
-- only when it is not zero. A column list (`UPDATE OF status`) cannot go with transition
-- tables, so it fires after every `UPDATE` of `aiwg_jobs` (heartbeats and step events too);
-- those count their rows and write nothing. Deletes keep their row trigger (only a queued job's
-- delete calls it).

DO $do$
BEGIN
    EXECUTE format($f$
        CREATE FUNCTION aiwg_tally_updated() RETURNS trigger
        LANGUAGE plpgsql AS $body$
        DECLARE
            n bigint;
        BEGIN
            SELECT (SELECT count(*) FROM now_rows WHERE status = 'queued')
                 - (SELECT count(*) FROM was_rows WHERE status = 'queued')
              INTO n;
            IF n <> 0 THEN
                INSERT INTO %1$I.aiwg_queue_tally AS t (pid, queued)
                VALUES (pg_backend_pid(), n)
                ON CONFLICT (pid) DO UPDATE SET queued = t.queued + EXCLUDED.queued;
            END IF;
            RETURN NULL;
        END
        $body$
    $f$, current_schema());
END
$do$;

DROP TRIGGER aiwg_jobs_tally_updated ON aiwg_jobs;
CREATE TRIGGER aiwg_jobs_tally_updated AFTER UPDATE ON aiwg_jobs
    REFERENCING OLD TABLE AS was_rows NEW TABLE AS now_rows
    FOR EACH STATEMENT EXECUTE FUNCTION aiwg_tally_updated();
