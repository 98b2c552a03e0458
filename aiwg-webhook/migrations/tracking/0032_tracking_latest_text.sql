-- aiwg: the newest text any instance rendered for a job's tracking comment, with the sequence
-- number of the job event it shows.
--
-- Instances edit one comment from their own view of the job; nothing ordered their edits, so a
-- slow instance's edit of an older state could land after another's final one. Each writer now
-- records what it is about to write here (kept only when newer) and, after each edit, writes
-- the newest recorded text again when it is newer than its own.
ALTER TABLE aiwg_tracking_comments
    ADD COLUMN latest_seq  bigint,
    ADD COLUMN latest_text text;
