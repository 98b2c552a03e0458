-- aiwg: the claims walk the queue in claim order whatever the statistics say (issue 15). Each
-- claim (`aiwg_claim`, 0008/0014, and `aiwg_claim_limited`, 0012/0015/0016) keeps one generic
-- plan per connection (0010), made from the statistics of its moment. Two such plans made the
-- claims read what they did not need, over and over:
--
-- - When the statistics showed few queued jobs (a table analyzed while its jobs had finished,
--   then a burst submitted), `aiwg_claim` read every queued job through the index of queued
--   jobs by project (0012) as a bitmap, sorted them all and took the first few: every claim
--   read and sorted the whole queue. In `pg_queue`, after the latency part, the wide
--   burn-down's claims read three times the pages they read on a fresh table.
-- - After a burst of finished jobs, `aiwg_claim_limited` counted each project's running jobs
--   with a bitmap scan of the index of running jobs by project (0015). That index keeps an
--   entry for every job that ran until the table is vacuumed; a plain index scan marks the
--   entries of finished jobs dead as it passes them, a bitmap scan never does, so every count
--   visited every finished job of its project again: 70 pages per project, 4 500 per claim.
--
-- A claim never needs a sort to find its jobs, nor a bitmap: the index of queued jobs in
-- claim order (`aiwg_jobs_claim_idx`), or of a project's queued jobs in claim order
-- (`aiwg_jobs_queued_project_idx`), gives them in order and the walk stops after the jobs it
-- may take; a project's running jobs are a handful. With sorts and bitmaps priced out and
-- index scans allowed whatever the session says, those are the plans PostgreSQL keeps. The
-- sorts left are of the jobs a claim picked (a few), which every plan has.

ALTER FUNCTION aiwg_claim(timestamptz, bigint, text, bigint)
    SET enable_sort = off;
ALTER FUNCTION aiwg_claim(timestamptz, bigint, text, bigint)
    SET enable_bitmapscan = off;
ALTER FUNCTION aiwg_claim(timestamptz, bigint, text, bigint)
    SET enable_indexscan = on;
ALTER FUNCTION aiwg_claim_limited(timestamptz, bigint, text, bigint, bigint, text)
    SET enable_sort = off;
ALTER FUNCTION aiwg_claim_limited(timestamptz, bigint, text, bigint, bigint, text)
    SET enable_bitmapscan = off;
ALTER FUNCTION aiwg_claim_limited(timestamptz, bigint, text, bigint, bigint, text)
    SET enable_indexscan = on;
