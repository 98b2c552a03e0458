-- aiwg: every change to whom events go is announced (issue 15). Each instance holds the
-- enabled subscriptions and their filters (`PgDispatchStore`'s subscriber list), so that a job
-- event costs no query to learn whom it goes to: before, every status change of every job
-- read every subscription, secrets included, once per instance that saw it. A subscription
-- added, removed, enabled, disabled or given other filters, by aiwg or by anyone else writing
-- the table, notifies channel `aiwg_webhook_subscriptions` with the table's schema as payload,
-- when its transaction commits; every store listening for that schema drops what it holds.
-- Changes to a subscription's health (its failures, counted on every attempt), URL, keys or
-- description do not notify: the list holds none of them.

CREATE OR REPLACE FUNCTION aiwg_subscriptions_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('aiwg_webhook_subscriptions', TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

CREATE TRIGGER aiwg_subscriptions_added_or_removed
    AFTER INSERT OR DELETE OR TRUNCATE ON aiwg_webhook_subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION aiwg_subscriptions_changed();

CREATE TRIGGER aiwg_subscriptions_changed
    AFTER UPDATE ON aiwg_webhook_subscriptions
    FOR EACH ROW
    WHEN (OLD.enabled IS DISTINCT FROM NEW.enabled
          OR OLD.events IS DISTINCT FROM NEW.events
          OR OLD.id IS DISTINCT FROM NEW.id
          OR OLD.created_at_ns IS DISTINCT FROM NEW.created_at_ns)
    EXECUTE FUNCTION aiwg_subscriptions_changed();
