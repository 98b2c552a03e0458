-- aiwg: room on each page of `aiwg_jobs` for the updates of a running job (issue 15). A step's
-- event and a cancel request change only columns no index reads (`job`, `last_seq`,
-- `updated_at`, `cancel_requested`), so PostgreSQL can write them as heap-only tuples, which
-- touch no index, when the new row version fits on the row's own page. At the default fill
-- factor (100) the pages were full and such an update wrote an entry into each of the table's
-- indexes. (A claim, an outcome and a heartbeat change indexed columns and gain nothing.)
ALTER TABLE aiwg_jobs SET (fillfactor = 70);
