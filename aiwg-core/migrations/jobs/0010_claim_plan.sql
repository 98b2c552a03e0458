-- aiwg: the claim keeps one plan (issue 15). PL/pgSQL caches the plan of the claim's query,
-- but PostgreSQL's plan cache planned it anew on every call: it keeps a generic plan only when
-- its estimated cost is close to that of the plans made for the call's values, and the
-- generic plan of a `LIMIT $n` query is estimated for a tenth of the queued rows. Planning
-- this statement (four CTEs) costs more than running it: measured on one session, 1 000 calls
-- on an empty queue took 420 µs each with the default (`auto`) and 54 µs with the generic
-- plan; 1 000 claims of one job each from 2 000 queued took 836 µs and 317 µs. The generic
-- plan is the one the claim is written for: the claim index in priority order, stopped at
-- the limit, then each picked row by primary key.
ALTER FUNCTION aiwg_claim(timestamptz, bigint, text, bigint)
    SET plan_cache_mode = force_generic_plan;
