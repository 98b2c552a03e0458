#!/usr/bin/env bash
# What a job's claim and outcome cost PostgreSQL, part by part (BENCHMARKS.md, sessions 35
# to 38).
#
#     bash scripts/pg_job_cycle.sh [rounds]
#
# One connection, no engine: each cycle is one PL/pgSQL call that claims a batch of jobs (32
# unless AIWG_CYCLE_BATCH says otherwise) with the jobs' claim function and records their
# outcomes (a one-step job's `step_started`, `step_finished` and `completed` events, a
# completed job's state) with the outcomes' function, as the engine's no-op job does; 19 200
# jobs' worth of cycles (600 of 32) by `pgbench` (`synchronous_commit = off`) over 20 000
# queued jobs of 780 B, their ids ordered by time as the store's are (UUID v7). Every variant
# runs in a fresh schema made by the migrations of `aiwg-core/migrations/jobs` (dropped at the
# end), the variants alternating within each round:
#
#   as_is        the functions as the migrations leave them
#   no_events    the claim's `running` event and the outcome's three not written
#   before_0030  the migrations before 0030: each job's whole document moved by the claim
#                (`aiwg_claimed_job`) and written whole by the outcome, its state in it
#   before_0031  the migrations before 0031: the queue's tally kept by a row trigger, an
#                upsert of the tally for every job a claim starts
#   outcome_events_packed  the outcome's three events in one row (a JSON array of them,
#                each with its time): what a layout of one row per statement and job would
#                write (a measurement: nothing reads such rows)
#   events_json  the events' `kind` a `json` column (checked text) instead of `jsonb`
#   lists_skip_running  the list indexes (`aiwg_jobs_status_id_idx`,
#                `aiwg_jobs_workflow_id_idx`) partial, without running jobs: a claim adds
#                no entry to them (a measurement: listing running jobs would need its own way)
#   no_checks    the `CHECK` constraints of both tables dropped (a measurement: what
#                reading and preparing them costs every statement)
#   no_function_settings  the claim's and the outcomes' functions without their `SET`
#                clauses (a measurement: what applying them on every call costs against
#                the plans they choose)
#   no_tally     the queue's tally not kept on updates (0031's statement trigger dropped; a
#                measurement: what the trigger costs a claim and an outcome)
#
# (Session 35's prototypes of 0030, `no_document`, `both`, `split` and `columns`, are in this
# script as of commit 7f6d978.) `as_is` and the `before_*` variants are stores; the others are
# measurements (a job's events missing, or kept where nothing reads them). Prints, per run, the
# machine's CPU per job (from /proc/stat: PostgreSQL must run on this machine, nothing else
# should), the write-ahead log per job and the time per cycle.
#
# Environment: AIWG_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test; a
# superuser, for CHECKPOINT), AIWG_CYCLE_VARIANTS (default: as_is, no_events, before_0030),
# AIWG_CYCLE_BATCH (the jobs a cycle claims, default 32; the cycles are 19 200 jobs' worth),
# AIWG_CYCLE_OUTCOMES (the most outcomes one call of the outcomes' function records, default
# the batch: a cycle's outcomes in several statements, in its one transaction),
# AIWG_CYCLE_PERF (a path prefix: each variant's cycles also recorded by `perf record -a -g`
# into `<prefix>.<variant>.<round>`, for `perf report`; the figures then include perf's cost).
# Needs psql, pgbench and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-3}
url=${AIWG_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
variants=${AIWG_CYCLE_VARIANTS:-as_is no_events before_0030}
batch=${AIWG_CYCLE_BATCH:-32}
outcomes=${AIWG_CYCLE_OUTCOMES:-$batch}
cycles=$(( 19200 / batch ))
schema="aiwg_cycle_$$"
work=$(mktemp -d)
trap 'psql "$url" -q -c "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

sql() { PGOPTIONS="-c search_path=$schema -c client_min_messages=warning" psql "$url" -q -v ON_ERROR_STOP=1 "$@"; }
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }

# A fresh schema migrated by the migrations before `$1` (default: all of them).
migrate() {
  psql "$url" -q -c "DROP SCHEMA IF EXISTS $schema CASCADE" -c "CREATE SCHEMA $schema" 2>/dev/null
  for f in $(ls aiwg-core/migrations/jobs/*.sql | sort); do
    [[ -z ${1:-} || $(basename "$f") < "$1" ]] || continue
    sql -1 -f "$f" >/dev/null
  done
}

# The no_events variant's functions, made from the text of the functions the migrations leave
# (so they follow every later migration), each cut asserted.
outcomes_sig='aiwg_record_outcomes(uuid[], bigint[], timestamptz[], text[], text[], timestamptz[],
    text[], timestamptz[], timestamptz[], text[], timestamptz[], text[], timestamptz[], text[])'
migrate
sql -At -c "SELECT pg_get_functiondef('aiwg_claim(timestamptz, bigint, text, bigint)'::regprocedure)" \
  > "$work/claim.sql"
sql -At -c "SELECT pg_get_functiondef('$outcomes_sig'::regprocedure)" > "$work/outcomes.sql"
python3 - "$work" <<'PY'
import sys
work = sys.argv[1]
claim = open(f'{work}/claim.sql').read() + ';\n'
outc = open(f'{work}/outcomes.sql').read() + ';\n'

def cut(text, start, end):
    a, b = text.index(start), text.index(end)
    return text[:a].rstrip().rstrip(',') + '\n' + text[b:]

ev = '    e AS (\n        INSERT INTO aiwg_job_events'
open(f'{work}/no_events.sql', 'w').write(
    cut(claim, ev, '    SELECT c.grouped') + cut(outc, ev, '    SELECT u.id, u.last_seq FROM u;'))
packed = """    e AS (
        INSERT INTO aiwg_job_events (job_id, seq, at, kind)
        SELECT u.id, u.last_seq - 2, u.first_at, jsonb_build_array(
            jsonb_build_object('at', u.first_at, 'kind', u.first_kind::jsonb),
            jsonb_build_object('at', u.last_at, 'kind', u.last_kind::jsonb),
            jsonb_build_object('at', u.ev_at, 'kind', u.kind::jsonb)) FROM u)
"""
a = outc.index(ev); b = outc.index('    SELECT u.id, u.last_seq FROM u;')
open(f'{work}/outcome_events_packed.sql', 'w').write(outc[:a] + packed + outc[b:])
# json: the event kinds kept as checked text (json), not parsed into jsonb.
open(f'{work}/events_json.sql', 'w').write(
    'ALTER TABLE aiwg_job_events ALTER kind TYPE json;\n'
    + claim.replace("ELSE '{}'::jsonb END", "ELSE '{}'::jsonb END)::json")
           .replace("jsonb_build_object('kind', 'status', 'from', 'queued'", "(jsonb_build_object('kind', 'status', 'from', 'queued'")
    + outc.replace('_kind::jsonb FROM u', '_kind::json FROM u').replace('u.kind::jsonb FROM u', 'u.kind::json FROM u'))
PY

cat > "$work/no_checks.sql" <<'SQL'
ALTER TABLE aiwg_jobs DROP CONSTRAINT aiwg_jobs_status_check, DROP CONSTRAINT aiwg_jobs_check,
    DROP CONSTRAINT aiwg_jobs_check1, DROP CONSTRAINT aiwg_jobs_approval_check;
ALTER TABLE aiwg_job_events DROP CONSTRAINT aiwg_job_events_seq_check;
SQL
cat > "$work/no_function_settings.sql" <<'SQL'
ALTER FUNCTION aiwg_claim(timestamptz, bigint, text, bigint) RESET ALL;
SQL
echo "ALTER FUNCTION $outcomes_sig RESET ALL;" >> "$work/no_function_settings.sql"
echo "DROP TRIGGER aiwg_jobs_tally_updated ON aiwg_jobs;" > "$work/no_tally.sql"
cat > "$work/lists_skip_running.sql" <<'SQL'
DROP INDEX aiwg_jobs_status_id_idx, aiwg_jobs_workflow_id_idx;
CREATE INDEX aiwg_jobs_status_id_idx ON aiwg_jobs (status, id DESC) WHERE status <> 'running';
CREATE INDEX aiwg_jobs_workflow_id_idx ON aiwg_jobs (workflow, id DESC) WHERE status <> 'running';
SQL

# A completed job, whole (what the outcome wrote before 0030), and its state alone (what it
# writes since).
doc='{"id":"0190b0c0-0000-7000-8000-000000000000","workflow":"noop","project_path":"/tmp/aiwg-bench/p0","params":{},"guidance":null,"priority":0,"status":"completed","attempt":1,"max_attempts":1,"timeout":3600000,"created_at":"2026-12-06T11:20:00.123456Z","started_at":"2026-12-06T11:20:00.223456Z","finished_at":"2026-12-06T11:20:00.323456Z","retry_at":null,"progress":{"completed":["run"],"in_progress":[],"pending":[]},"result":{"summary":"done","output":null,"artifacts":[],"cost_usd":null,"usage":null},"error":null,"dead_letter":false,"trigger":{"source":"api","actor":"bench","extra":{}},"history":[{"status":"queued","at":"2026-12-06T11:20:00.123456Z"},{"status":"running","at":"2026-12-06T11:20:00.223456Z","attempt":1},{"status":"completed","at":"2026-12-06T11:20:00.323456Z","attempt":1}],"cancel_requested":false,"idempotency_key":null,"max_budget_usd":null,"resume_after_approval":false,"approval":null}'
state='{"status":"completed","retry_at":null,"cancel_requested":false,"attempt":1,"started_at":"2026-12-06T11:20:00.223456Z","finished_at":"2026-12-06T11:20:00.323456Z","dead_letter":false,"resume_after_approval":false,"progress":{"completed":["run"],"in_progress":[],"pending":[]},"history":[{"status":"queued","at":"2026-12-06T11:20:00.123456Z"},{"status":"running","at":"2026-12-06T11:20:00.223456Z","attempt":1},{"status":"completed","at":"2026-12-06T11:20:00.323456Z","attempt":1}],"approvals":[],"result":{"summary":"done","output":null,"artifacts":[],"cost_usd":null,"usage":null},"error":null}'

# A queued job, whole.
queued="jsonb_build_object('id', g.id, 'workflow', 'noop', 'project_path', '/tmp/aiwg-bench/p0',
    'params', '{}'::jsonb, 'guidance', null, 'priority', 0, 'max_attempts', 1,
    'timeout', 3600000, 'created_at', '2026-12-06T11:20:00.123456Z',
    'trigger', '{\"source\":\"api\",\"actor\":\"bench\",\"extra\":{}}'::jsonb,
    'idempotency_key', null, 'max_budget_usd', null,
    'status', 'queued', 'attempt', 0, 'started_at', null, 'finished_at', null,
    'retry_at', null, 'progress', '{\"completed\":[],\"in_progress\":[],\"pending\":[\"run\"]}'::jsonb,
    'result', null, 'error', null, 'dead_letter', false,
    'history', '[{\"status\":\"queued\",\"at\":\"2026-12-06T11:20:00.123456Z\"}]'::jsonb,
    'cancel_requested', false, 'resume_after_approval', false, 'approval', null)"

# The cycle: claim $batch, then their outcomes, $outcomes a call (`$1`: the job or state the
# outcome writes).
cycle() {
  cat <<SQL
CREATE OR REPLACE FUNCTION aiwg_bench_cycle() RETURNS int LANGUAGE plpgsql AS \$\$
DECLARE all_ids uuid[]; all_toks bigint[]; ids uuid[]; toks bigint[]; n int; total int; k int := 1;
BEGIN
  SELECT array_agg(c.id), array_agg(c.lease_token) INTO all_ids, all_toks
  FROM aiwg_claim(now(), $batch, 'w', 30000000) c WHERE c.id IS NOT NULL;
  total := cardinality(all_ids);
  WHILE k <= total LOOP
  ids := all_ids[k:k + $outcomes - 1]; toks := all_toks[k:k + $outcomes - 1];
  n := cardinality(ids); k := k + n;
  PERFORM aiwg_record_outcomes(ids, toks, array_fill(now(), ARRAY[n]),
     array_fill(pg_current_xact_id()::xid::text, ARRAY[n]), array_fill('completed'::text, ARRAY[n]),
     array_fill(NULL::timestamptz, ARRAY[n]), array_fill('$1'::text, ARRAY[n]),
     array_fill(NULL::timestamptz, ARRAY[n]),
     array_fill(now(), ARRAY[n]), array_fill('{"kind":"status","from":"running","to":"completed","attempt":1}'::text, ARRAY[n]),
     array_fill(now(), ARRAY[n]), array_fill('{"kind":"step_finished","step":"run","ok":true}'::text, ARRAY[n]),
     array_fill(now(), ARRAY[n]), array_fill('{"kind":"step_started","step":"run"}'::text, ARRAY[n]));
  END LOOP;
  RETURN total;
END \$\$;
SQL
}

# Makes the schema for `$1` and fills it.
prepare() {
  local cols="id, status, priority, project_path, workflow, queue_seq, created_at, last_seq"
  local vals="g.id, 'queued', 0, '/tmp/aiwg-bench/p0', 'noop', nextval('aiwg_queue_seq'), now(), 1"
  # Ids ordered by time as the store's are (UUID v7: 48 bits of milliseconds first).
  local from="FROM (SELECT (lpad(to_hex(1765000000000 + n), 12, '0') || '7' ||
      substr(md5(n::text), 1, 3) || '8' || substr(md5(n::text), 4, 15))::uuid AS id
      FROM generate_series(1, 20000) n) g"
  case $1 in
    as_is | no_events | lists_skip_running | before_0031 | outcome_events_packed | events_json \
      | no_checks | no_function_settings | no_tally)
      if [ "$1" = before_0031 ]; then migrate 0031; else migrate; fi
      [ "$1" = as_is ] || [ "$1" = before_0031 ] || sql -f "$work/$1.sql"
      cycle "$state" | sql
      sql -c "INSERT INTO aiwg_jobs ($cols, job, attempt, started_at, finished_at, dead_letter,
          resume_after_approval, progress, history, approvals, result, error)
          SELECT $vals, aiwg_job_document(d.job), s.*
          $from CROSS JOIN LATERAL (SELECT $queued AS job) d
          CROSS JOIN LATERAL aiwg_job_columns(d.job) s" ;;
    before_0030)
      migrate 0030
      cycle "$doc" | sql
      sql -c "INSERT INTO aiwg_jobs ($cols, job) SELECT $vals, $queued $from" ;;
    *) echo "unknown variant: $1" >&2; exit 2 ;;
  esac
  sql -c "INSERT INTO aiwg_job_events (job_id, seq, at, kind)
      SELECT id, 1, now(), '{\"kind\":\"status\",\"to\":\"queued\"}' FROM aiwg_jobs"
  sql -c "SELECT aiwg_recount_queued()" -c "VACUUM ANALYZE aiwg_jobs" \
    -c "VACUUM ANALYZE aiwg_job_events" -c "CHECKPOINT" >/dev/null
}

echo "SELECT aiwg_bench_cycle();" > "$work/cycle.sql"
hz=$(getconf CLK_TCK)
for round in $(seq 1 "$rounds"); do
  for v in $variants; do
    prepare "$v"
    w0=$(psql "$url" -Atq -c "SELECT pg_current_wal_lsn()")
    b0=$(busy)
    ms=$(PGOPTIONS="-c synchronous_commit=off -c search_path=$schema" \
      ${AIWG_CYCLE_PERF:+perf record -q -a -g -o "$AIWG_CYCLE_PERF.$v.$round" --} \
      pgbench -n -f "$work/cycle.sql" -t "$cycles" -c 1 "$url" 2>&1 | tee "$work/pgbench.log" \
      | awk '/latency average/ {print $4}') \
      || { echo "$v: pgbench failed:" >&2; grep -m 3 -i error "$work/pgbench.log" >&2; exit 1; }
    b1=$(busy)
    w1=$(psql "$url" -Atq -c "SELECT pg_current_wal_lsn()")
    n=$(sql -Atq -c "SELECT count(*) FROM aiwg_jobs WHERE status = 'completed'")
    [ "$n" -gt 0 ] || { echo "$v: no job completed" >&2; exit 1; }
    wal=$(psql "$url" -Atq -c "SELECT (pg_wal_lsn_diff('$w1', '$w0') / $n)::int")
    printf 'round %s %-12s CPU %4d µs a job, WAL %5d B a job, %s ms a cycle of %s (outcomes by %s)\n' \
      "$round" "$v" $(( (b1 - b0) * 1000000 / hz / n )) "$wal" "$ms" "$batch" "$outcomes"
  done
done
