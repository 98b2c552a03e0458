-- aiwg: outbound webhook subscriptions and their delivery outbox (one row per event and
-- subscription). Times are Unix nanoseconds (bigint) so they round-trip exactly.

CREATE TABLE aiwg_webhook_subscriptions (
    id                   uuid    PRIMARY KEY,
    url                  text    NOT NULL,
    events               jsonb   NOT NULL,
    description          text,
    enabled              boolean NOT NULL,
    disabled_reason      text,
    -- [{"secret": "whsec_…", "expires_at": "…" | null}], the current key first.
    keys                 jsonb   NOT NULL,
    created_at_ns        bigint  NOT NULL,
    updated_at_ns        bigint  NOT NULL,
    failing_since_ns     bigint,
    consecutive_failures integer NOT NULL DEFAULT 0
);

-- No foreign key: deleting a subscription deletes its deliveries in the same transaction, and
-- an event fanned out while a subscription is being deleted must not fail for the others.
CREATE TABLE aiwg_webhook_deliveries (
    id                  uuid    PRIMARY KEY,
    subscription_id     uuid    NOT NULL,
    event_type          text    NOT NULL,
    payload             text    NOT NULL,
    state               text    NOT NULL CHECK (state IN ('pending', 'succeeded', 'failed', 'retrying')),
    created_at_ns       bigint  NOT NULL,
    next_attempt_at_ns  bigint,
    scheduled_attempts  integer NOT NULL DEFAULT 0,
    -- The next attempt is a manual retry.
    manual              boolean NOT NULL DEFAULT false,
    attempts            jsonb   NOT NULL DEFAULT '[]',
    lease_token         uuid,
    lease_owner         text,
    lease_expires_at_ns bigint
);

-- Claim order: open deliveries by due time.
CREATE INDEX aiwg_webhook_deliveries_due_idx ON aiwg_webhook_deliveries (next_attempt_at_ns, id)
    WHERE state IN ('pending', 'retrying');
-- Leases in flight per subscription (the per-subscription cap) and by expiry.
CREATE INDEX aiwg_webhook_deliveries_leased_idx ON aiwg_webhook_deliveries (subscription_id, lease_expires_at_ns)
    WHERE lease_token IS NOT NULL;
CREATE INDEX aiwg_webhook_deliveries_lease_expiry_idx ON aiwg_webhook_deliveries (lease_expires_at_ns)
    WHERE lease_token IS NOT NULL;
-- The delivery log: a subscription's deliveries newest first.
CREATE INDEX aiwg_webhook_deliveries_sub_idx ON aiwg_webhook_deliveries (subscription_id, id DESC);
