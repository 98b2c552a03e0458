-- aiwg: the audit trail of trigger attempts (GET /audit).
--
-- One row per decision on a trigger attempt, accepted or refused, from the API or a platform.
-- `id` orders the trail (newest first is `ORDER BY id DESC`) and is the API's cursor.
CREATE TABLE aiwg_audit (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL,
    source      text        NOT NULL,
    key_name    text,
    actor       text,
    delivery_id text,
    repo        text,
    workflow    text,
    decision    text        NOT NULL CHECK (decision IN ('accepted', 'duplicate', 'refused')),
    reason      text,
    job_id      uuid
);

-- Retention deletes by time.
CREATE INDEX aiwg_audit_at ON aiwg_audit (at);
-- Filtered reads: by source or decision, newest first.
CREATE INDEX aiwg_audit_source ON aiwg_audit (source, id DESC);
CREATE INDEX aiwg_audit_decision ON aiwg_audit (decision, id DESC);
