-- aiwg: the outbox's claim and its attempts' record, each one call (issue 15, part 4).
--
-- A claim was seven round trips (begin; the due deliveries; the locks of their subscriptions;
-- their leases in flight; the new leases; the subscriptions; commit), and the dispatcher's
-- slots wait for it: on a loopback receiver the PostgreSQL outbox sent a twentieth of what the
-- in-memory one sends. `aiwg_claim_deliveries` does the same work in one call.
--
-- Both statements also read only through indexes whatever the statistics say. Written inline,
-- each kept the generic plan made while the outbox was small: the leases' update and the
-- attempts' record read the whole table (a sequential scan joined to the ids by hash) and the
-- claim read every open delivery as a bitmap and sorted them, at every call, however far the
-- table had grown since.

-- The advisory-lock key of `name` in `scope`: the first eight bytes of SHA-256(scope, 0,
-- name), as `aiwg_core::util::advisory_lock_key` computes it in Rust (the jobs' migration 0012
-- defines the same function; both definitions are this one, so either may run first).
CREATE OR REPLACE FUNCTION aiwg_lock_key(scope text, name text)
RETURNS bigint LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT ('x' || encode(substring(sha256(convert_to(scope, 'UTF8') || '\x00'::bytea
        || convert_to(name, 'UTF8')) FROM 1 FOR 8), 'hex'))::bit(64)::bigint
$$;

-- Claims up to `claim_max` open deliveries due at `due` of enabled subscriptions, in due order,
-- with at most `cap` leases in flight per subscription (`cap` NULL: no cap), reading at most
-- `fetch_max` candidates; leases them to `owner_name` until `expires` (Unix nanoseconds) under new
-- random tokens. Returns each claimed delivery (`delivery_id` …) beside its subscription's row
-- (`id`, `url` …), in claim order.
--
-- Candidates are locked `FOR UPDATE SKIP LOCKED`, so two claimers never take the same
-- delivery. Under a cap, each candidate subscription's advisory lock is taken (in the order of
-- the subscriptions' ids, which every claimer follows: no deadlocks), then the leases in
-- flight are counted in a statement of their own, which sees what the claimers that held the
-- locks before committed: the cap holds across instances.
CREATE FUNCTION aiwg_claim_deliveries(due bigint, cap bigint, claim_max integer,
    fetch_max integer, owner_name text, expires bigint, lock_scope text)
RETURNS TABLE (delivery_id uuid, subscription_id uuid, event_type text, payload text,
    scheduled_attempts integer, manual boolean, lease_token uuid,
    id uuid, url text, events jsonb, description text, enabled boolean,
    disabled_reason text, keys jsonb, created_at_ns bigint, updated_at_ns bigint,
    failing_since_ns bigint, consecutive_failures integer)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    c_ids uuid[];
    c_subs uuid[];
    subs uuid[];
    take uuid[];
BEGIN
    SELECT coalesce(array_agg(c.id ORDER BY c.next_attempt_at_ns, c.id), '{}'),
           coalesce(array_agg(c.subscription_id ORDER BY c.next_attempt_at_ns, c.id), '{}')
    INTO c_ids, c_subs
    FROM (
        SELECT d.id, d.subscription_id, d.next_attempt_at_ns
        FROM aiwg_webhook_deliveries d
        JOIN aiwg_webhook_subscriptions s ON s.id = d.subscription_id
        WHERE d.state IN ('pending', 'retrying') AND d.next_attempt_at_ns <= due
          AND (d.lease_token IS NULL OR d.lease_expires_at_ns <= due) AND s.enabled
          AND (cap IS NULL OR (SELECT count(*) FROM aiwg_webhook_deliveries l
               WHERE l.subscription_id = d.subscription_id AND l.lease_token IS NOT NULL
                 AND l.lease_expires_at_ns > due) < cap)
        ORDER BY d.next_attempt_at_ns, d.id
        LIMIT fetch_max
        FOR UPDATE OF d SKIP LOCKED
    ) c;
    IF cardinality(c_ids) = 0 THEN
        RETURN;
    END IF;
    IF cap IS NULL THEN
        take := c_ids[1:claim_max];
    ELSE
        SELECT array_agg(DISTINCT x ORDER BY x) INTO subs FROM unnest(c_subs) AS x;
        -- One statement; the locks are taken row by row in the array's order.
        PERFORM pg_advisory_xact_lock(aiwg_lock_key(lock_scope, 'webhook subscription ' || x))
        FROM unnest(subs) AS x;
        SELECT coalesce(array_agg(c.id ORDER BY c.ord), '{}') INTO take
        FROM (
            SELECT c.id, c.ord, c.sub,
                   row_number() OVER (PARTITION BY c.sub ORDER BY c.ord) AS n
            FROM unnest(c_ids, c_subs) WITH ORDINALITY AS c(id, sub, ord)
        ) c
        LEFT JOIN (
            SELECT l.subscription_id, count(*) AS in_flight
            FROM aiwg_webhook_deliveries l
            WHERE l.subscription_id = ANY (subs) AND l.lease_token IS NOT NULL
              AND l.lease_expires_at_ns > due
            GROUP BY l.subscription_id
        ) f ON f.subscription_id = c.sub
        WHERE c.n <= cap - coalesce(f.in_flight, 0);
        take := take[1:claim_max];
    END IF;
    RETURN QUERY
    WITH u AS (
        UPDATE aiwg_webhook_deliveries d
        SET lease_token = gen_random_uuid(), lease_owner = owner_name,
            lease_expires_at_ns = expires
        FROM unnest(take) WITH ORDINALITY AS p(id, ord)
        WHERE d.id = p.id
        RETURNING d.id, d.subscription_id, d.event_type, d.payload, d.scheduled_attempts,
            d.manual, d.lease_token, p.ord
    )
    SELECT u.id, u.subscription_id, u.event_type, u.payload, u.scheduled_attempts, u.manual,
           u.lease_token, s.id, s.url, s.events, s.description, s.enabled, s.disabled_reason,
           s.keys, s.created_at_ns, s.updated_at_ns, s.failing_since_ns,
           s.consecutive_failures
    FROM u JOIN aiwg_webhook_subscriptions s ON s.id = u.subscription_id
    ORDER BY u.ord;
END
$$;

-- Records finished attempts: appends each attempt to its delivery, sets its state and next
-- attempt, and ends its lease, each row fenced by its lease token. Returns the ids of the
-- deliveries recorded (a delivery whose lease was lost is not).
CREATE FUNCTION aiwg_finish_deliveries(ids uuid[], tokens uuid[], new_attempts jsonb[],
    scheduled integer[], states text[], next_at bigint[])
RETURNS SETOF uuid LANGUAGE sql VOLATILE AS $$
    UPDATE aiwg_webhook_deliveries d
    SET attempts = d.attempts || jsonb_build_array(u.attempt),
        scheduled_attempts = d.scheduled_attempts + u.sched, manual = FALSE,
        state = u.state, next_attempt_at_ns = u.next, lease_token = NULL,
        lease_owner = NULL, lease_expires_at_ns = NULL
    FROM unnest(ids, tokens, new_attempts, scheduled, states, next_at)
        AS u(id, tok, attempt, sched, state, next)
    WHERE d.id = u.id AND d.lease_token = u.tok
    RETURNING d.id
$$;

-- Every row both functions read is found through an index (the due deliveries in due order,
-- a subscription's leases, a delivery or a subscription by key): sequential scans, bitmaps and
-- sorts of the table are priced out, so those are the plans PostgreSQL keeps.
ALTER FUNCTION aiwg_claim_deliveries(bigint, bigint, integer, integer, text, bigint, text)
    SET enable_seqscan = off;
ALTER FUNCTION aiwg_claim_deliveries(bigint, bigint, integer, integer, text, bigint, text)
    SET enable_bitmapscan = off;
ALTER FUNCTION aiwg_claim_deliveries(bigint, bigint, integer, integer, text, bigint, text)
    SET enable_sort = off;
ALTER FUNCTION aiwg_claim_deliveries(bigint, bigint, integer, integer, text, bigint, text)
    SET enable_indexscan = on;
ALTER FUNCTION aiwg_claim_deliveries(bigint, bigint, integer, integer, text, bigint, text)
    SET jit = off;
ALTER FUNCTION aiwg_finish_deliveries(uuid[], uuid[], jsonb[], integer[], text[], bigint[])
    SET enable_seqscan = off;
ALTER FUNCTION aiwg_finish_deliveries(uuid[], uuid[], jsonb[], integer[], text[], bigint[])
    SET enable_bitmapscan = off;
ALTER FUNCTION aiwg_finish_deliveries(uuid[], uuid[], jsonb[], integer[], text[], bigint[])
    SET enable_indexscan = on;
ALTER FUNCTION aiwg_finish_deliveries(uuid[], uuid[], jsonb[], integer[], text[], bigint[])
    SET jit = off;
ALTER FUNCTION aiwg_claim_deliveries(bigint, bigint, integer, integer, text, bigint, text)
    SET plan_cache_mode = force_generic_plan;
