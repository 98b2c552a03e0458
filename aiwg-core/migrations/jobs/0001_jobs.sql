-- aiwg: jobs and their event history.
--
-- The full job is kept as JSONB in `job`; the other columns are copies of the fields that
-- queries filter and sort on, kept in sync by the store on every write, plus the lease.
-- Later migrations (0002, ...) add the outbound-delivery and inbound de-duplication tables.

-- Lease fencing tokens: every claim takes a fresh one.
CREATE SEQUENCE aiwg_lease_token_seq AS bigint;
-- Enqueue order: a job gets a new number whenever it becomes `queued` (creation or retry), so
-- jobs of equal priority run first-in first-out.
CREATE SEQUENCE aiwg_queue_seq AS bigint;

CREATE TABLE aiwg_jobs (
    id               uuid        PRIMARY KEY,
    status           text        NOT NULL CHECK (status IN
                         ('queued', 'running', 'completed', 'failed', 'cancelled', 'timed_out')),
    priority         integer     NOT NULL,
    project_path     text        NOT NULL,
    workflow         text        NOT NULL,
    queue_seq        bigint,
    retry_at         timestamptz,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_token      bigint,
    lease_expires_at timestamptz,
    cancel_requested boolean     NOT NULL DEFAULT false,
    idempotency_key  text        UNIQUE,
    fingerprint      text,
    -- The sequence number of the job's last event.
    last_seq         bigint      NOT NULL DEFAULT 0,
    job              jsonb       NOT NULL,
    CHECK ((status = 'running') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK ((status = 'queued') = (queue_seq IS NOT NULL))
);

-- Claim order: highest priority first, then enqueue order.
CREATE INDEX aiwg_jobs_claim_idx ON aiwg_jobs (priority DESC, queue_seq) WHERE status = 'queued';
-- Running jobs per project (per-project limit) and by lease expiry (recovery).
CREATE INDEX aiwg_jobs_running_project_idx ON aiwg_jobs (project_path) WHERE status = 'running';
CREATE INDEX aiwg_jobs_lease_idx ON aiwg_jobs (lease_expires_at) WHERE status = 'running';
-- Listing newest first, filtered by status or workflow (the primary key serves the unfiltered list).
CREATE INDEX aiwg_jobs_status_id_idx ON aiwg_jobs (status, id DESC);
CREATE INDEX aiwg_jobs_workflow_id_idx ON aiwg_jobs (workflow, id DESC);

CREATE TABLE aiwg_job_events (
    job_id uuid        NOT NULL REFERENCES aiwg_jobs (id) ON DELETE CASCADE,
    seq    bigint      NOT NULL CHECK (seq > 0),
    at     timestamptz NOT NULL,
    kind   jsonb       NOT NULL,
    PRIMARY KEY (job_id, seq)
);
