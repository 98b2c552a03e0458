-- aiwg: one tracking comment per job on the forge that started it.
--
-- The instance that inserts a job's row creates the comment (the others wait for its id and
-- edit it); a claim without a comment id older than a minute may be taken over.
CREATE TABLE aiwg_tracking_comments (
    job_id      uuid        PRIMARY KEY,
    owner       text        NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    comment_id  text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX aiwg_tracking_comments_updated ON aiwg_tracking_comments (updated_at);
