-- aiwg: approval gates (issue 17). A job may pause before a step in `awaiting_approval`,
-- holding no lease, until it is approved (back to `queued`), rejected or its approval expires
-- (`cancelled`). `approval_expires_at` is a copy of the open approval's deadline, for the sweep.

ALTER TABLE aiwg_jobs DROP CONSTRAINT aiwg_jobs_status_check;
ALTER TABLE aiwg_jobs ADD CONSTRAINT aiwg_jobs_status_check CHECK (status IN
    ('queued', 'running', 'awaiting_approval', 'completed', 'failed', 'cancelled', 'timed_out'));
ALTER TABLE aiwg_jobs ADD COLUMN approval_expires_at timestamptz;
ALTER TABLE aiwg_jobs ADD CONSTRAINT aiwg_jobs_approval_check
    CHECK ((status = 'awaiting_approval') = (approval_expires_at IS NOT NULL));
CREATE INDEX aiwg_jobs_approval_idx ON aiwg_jobs (approval_expires_at)
    WHERE status = 'awaiting_approval';
