-- aiwg: the advisory-lock key function is inlined where it is called (issue 15).
--
-- `aiwg_lock_key` was declared IMMUTABLE, but `convert_to` in its body is STABLE, and
-- PostgreSQL inlines an SQL function only when its body is no more volatile than its
-- declaration. So every call ran the SQL-function machinery, its body planned again in every
-- statement that called it: a per-project claim (`aiwg_claim_limited`) and the outbox's claim
-- under a per-subscription cap take several locks per call, and eight locks in one statement
-- took about 50 µs longer than the inlined expression does (pgbench on a 2-core machine,
-- 0.27-0.29 ms a call against 0.23). Declared
-- STABLE (which it is: its value depends on nothing but its arguments and the database
-- encoding), the call is replaced by its expression. Same value, same keys as
-- `aiwg_core::util::advisory_lock_key`.
--
-- The outbox's migrations define the same function (0018) and make the same change (0024);
-- whichever runs last leaves this definition.
CREATE OR REPLACE FUNCTION aiwg_lock_key(scope text, name text)
RETURNS bigint LANGUAGE sql STABLE STRICT PARALLEL SAFE AS $$
    SELECT ('x' || encode(substring(sha256(convert_to(scope, 'UTF8') || '\x00'::bytea
        || convert_to(name, 'UTF8')) FROM 1 FOR 8), 'hex'))::bit(64)::bigint
$$;
