-- aiwg: inbound webhook de-duplication. One row per delivery key (platform + delivery id):
-- pending while the first request creates its job (`job_id` NULL, `until` = end of the claim's
-- lease), then done (`job_id` set, `until` = end of the remembering period). A row whose
-- `until` passed is as good as absent: the next claim takes it over.
CREATE TABLE aiwg_inbound_deliveries (
    key    text        PRIMARY KEY,
    job_id uuid,
    until  timestamptz NOT NULL
);

CREATE INDEX aiwg_inbound_deliveries_until_idx ON aiwg_inbound_deliveries (until);
