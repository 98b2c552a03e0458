-- aiwg: the outbox's record of finished attempts is planned once per connection, and the
-- advisory-lock key function is inlined (issue 15, part 4).
--
-- `aiwg_finish_deliveries` was an SQL function: PostgreSQL plans the statement in an SQL
-- function's body again at every call (it keeps no plan between calls), about 0.13 ms of the
-- 0.49 ms a call of ten deliveries took. In PL/pgSQL the statement's plan is kept for the
-- connection; `plan_cache_mode = force_generic_plan` makes that one plan at the first call,
-- under the settings below, so it reads through the indexes whatever the statistics say, as
-- before. Same arguments, same rows, same fencing by lease token.
CREATE OR REPLACE FUNCTION aiwg_finish_deliveries(ids uuid[], tokens uuid[], new_attempts jsonb[],
    scheduled integer[], states text[], next_at bigint[])
RETURNS SETOF uuid LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_indexscan = on SET jit = off
SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN QUERY
    UPDATE aiwg_webhook_deliveries d
    SET attempts = d.attempts || jsonb_build_array(u.attempt),
        scheduled_attempts = d.scheduled_attempts + u.sched, manual = FALSE,
        state = u.state, next_attempt_at_ns = u.next, lease_token = NULL,
        lease_owner = NULL, lease_expires_at_ns = NULL
    FROM unnest(ids, tokens, new_attempts, scheduled, states, next_at)
        AS u(id, tok, attempt, sched, state, next)
    WHERE d.id = u.id AND d.lease_token = u.tok
    RETURNING d.id;
END
$$;

-- As the jobs' migration 0023 explains: STABLE, so that the claim's locks inline it.
CREATE OR REPLACE FUNCTION aiwg_lock_key(scope text, name text)
RETURNS bigint LANGUAGE sql STABLE STRICT PARALLEL SAFE AS $$
    SELECT ('x' || encode(substring(sha256(convert_to(scope, 'UTF8') || '\x00'::bytea
        || convert_to(name, 'UTF8')) FROM 1 FOR 8), 'hex'))::bit(64)::bigint
$$;
