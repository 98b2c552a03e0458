#!/usr/bin/env bash
# What a job's claim and outcome cost PostgreSQL, part by part (BENCHMARKS.md, session 35).
#
#     bash scripts/pg_job_cycle.sh [rounds]
#
# One connection, no engine: each cycle is one PL/pgSQL call that claims 32 jobs with the
# jobs' claim function and records their outcomes (a one-step job's `step_started`,
# `step_finished` and `completed` events, a completed document) with the outcomes' function, as
# the engine's no-op job does; 600 cycles by `pgbench` (`synchronous_commit = off`) over 20 000
# queued jobs of 780 B. Every variant runs in a fresh schema made by the migrations of
# `aiwg-core/migrations/jobs` (dropped at the end), the variants alternating within each round:
#
#   as_is        the functions as the migrations leave them
#   no_events    the claim's `running` event and the outcome's three not written
#   no_document  the claim does not move the document to `running`, the outcome does not write
#                the one it is given
#   both         neither events nor document
#   split        the unchanging fields in a `spec` column added last, the rest in `job` (the
#                functions unchanged, the outcome given only the rest)
#   columns      the table rebuilt with its unchanging columns and document first, every
#                changing column after them, `attempt`, `started_at`, `finished_at`,
#                `dead_letter`, `progress`, `result`, `error` as columns: a claim that sets
#                columns, an outcome that writes status, times, `progress` and `result`
#                (the functions made from the migrations' with those writes swapped in)
#
# Only `as_is` is a store; the others are measurements (a job's row would be wrong). Prints, per
# run, the machine's CPU per job (from /proc/stat: PostgreSQL must run on this machine, nothing
# else should), the write-ahead log per job and the time per cycle.
#
# Environment: AIWG_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test; a
# superuser, for CHECKPOINT), AIWG_CYCLE_VARIANTS (default: all six, in the order above).
# Needs psql, pgbench and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-3}
url=${AIWG_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
variants=${AIWG_CYCLE_VARIANTS:-as_is no_events no_document both split columns}
schema="aiwg_cycle_$$"
work=$(mktemp -d)
trap 'psql "$url" -q -c "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

sql() { PGOPTIONS="-c search_path=$schema -c client_min_messages=warning" psql "$url" -q -v ON_ERROR_STOP=1 "$@"; }
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }

# The variants' functions, made from the text of the functions the migrations leave (so they
# follow every later migration): dumped from a schema migrated once here.
outcomes_sig='aiwg_record_outcomes(uuid[], bigint[], timestamptz[], text[], text[], timestamptz[],
    text[], timestamptz[], timestamptz[], text[], timestamptz[], text[], timestamptz[], text[])'
migrate() {
  psql "$url" -q -c "DROP SCHEMA IF EXISTS $schema CASCADE" -c "CREATE SCHEMA $schema" 2>/dev/null
  for f in $(ls aiwg-core/migrations/jobs/*.sql | sort); do sql -1 -f "$f" >/dev/null; done
}
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

def no_events(c, o):
    ev = '    e AS (\n        INSERT INTO aiwg_job_events'
    return cut(c, ev, '    SELECT c.grouped'), cut(o, ev, '    SELECT u.id, u.last_seq FROM u;')

def no_document(c, o):
    c2 = c.replace('job = aiwg_claimed_job(a.job, claim_at),', 'job = a.job,')
    o2 = o.replace('job = t.job::jsonb,', 'job = a.job,')
    assert c2 != c and o2 != o
    return c2, o2

def columns(c, o):
    # The claim sets the changing columns instead of moving the document; the outcome writes
    # the status and times (as before), `result` (given where the document was) and `progress`
    # (every step done) instead of the document, and no history (the status events hold it).
    def swap(text, old, new):
        assert old in text, old
        return text.replace(old, new)
    c = swap(c, 'job = aiwg_claimed_job(a.job, claim_at),',
             "attempt = a.attempt + 1, started_at = claim_at,\n"
             "            progress = jsonb_build_object('completed', '[]'::jsonb,\n"
             "                'in_progress', '[]'::jsonb,\n"
             "                'pending', COALESCE(a.progress->'completed', '[]'::jsonb)\n"
             "                    || COALESCE(a.progress->'in_progress', '[]'::jsonb)\n"
             "                    || COALESCE(a.progress->'pending', '[]'::jsonb)),")
    c = swap(c, 'RETURNING a.id, a.last_seq, a.lease_token, a.lease_expires_at, a.job,',
             'RETURNING a.id, a.last_seq, a.lease_token, a.lease_expires_at, a.job, a.attempt,')
    c = swap(c, "'attempt', u.job->'attempt')", "'attempt', u.attempt)")
    o = swap(o, 'job = t.job::jsonb,',
             "finished_at = t.at, result = t.job::jsonb,\n"
             "            progress = jsonb_build_object('completed',\n"
             "                COALESCE(a.progress->'completed', '[]'::jsonb)\n"
             "                    || COALESCE(a.progress->'in_progress', '[]'::jsonb)\n"
             "                    || COALESCE(a.progress->'pending', '[]'::jsonb),\n"
             "                'in_progress', '[]'::jsonb, 'pending', '[]'::jsonb),")
    return c, o

for name, (c, o) in {
    'no_events': no_events(claim, outc),
    'no_document': no_document(claim, outc),
    'both': no_document(*no_events(claim, outc)),
    'columns': columns(claim, outc),
}.items():
    open(f'{work}/{name}.sql', 'w').write(c + o)
PY

# The completed document the outcome writes (the split variant's without the unchanging part).
doc='{"id":"0190b0c0-0000-7000-8000-000000000000","workflow":"noop","project_path":"/tmp/aiwg-bench/p0","params":{},"guidance":null,"priority":0,"status":"completed","attempt":1,"max_attempts":1,"timeout":3600000,"created_at":"2026-12-06T11:20:00.123456Z","started_at":"2026-12-06T11:20:00.223456Z","finished_at":"2026-12-06T11:20:00.323456Z","retry_at":null,"progress":{"completed":["run"],"in_progress":[],"pending":[]},"result":{"summary":"done","output":null,"artifacts":[],"cost_usd":null,"usage":null},"error":null,"dead_letter":false,"trigger":{"source":"api","actor":"bench","extra":{}},"history":[{"status":"queued","at":"2026-12-06T11:20:00.123456Z"},{"status":"running","at":"2026-12-06T11:20:00.223456Z","attempt":1},{"status":"completed","at":"2026-12-06T11:20:00.323456Z","attempt":1}],"cancel_requested":false,"idempotency_key":null,"max_budget_usd":null,"resume_after_approval":false,"approval":null}'
rest='{"status":"completed","attempt":1,"started_at":"2026-12-06T11:20:00.223456Z","finished_at":"2026-12-06T11:20:00.323456Z","retry_at":null,"progress":{"completed":["run"],"in_progress":[],"pending":[]},"result":{"summary":"done","output":null,"artifacts":[],"cost_usd":null,"usage":null},"error":null,"dead_letter":false,"history":[{"status":"queued","at":"2026-12-06T11:20:00.123456Z"},{"status":"running","at":"2026-12-06T11:20:00.223456Z","attempt":1},{"status":"completed","at":"2026-12-06T11:20:00.323456Z","attempt":1}],"cancel_requested":false,"resume_after_approval":false,"approval":null}'

# The unchanging fields of a queued job, and the rest.
unchanging="'id', g.id, 'workflow', 'noop', 'project_path', '/tmp/aiwg-bench/p0',
    'params', '{}'::jsonb, 'guidance', null, 'priority', 0, 'max_attempts', 1,
    'timeout', 3600000, 'created_at', '2026-12-06T11:20:00.123456Z',
    'trigger', '{\"source\":\"api\",\"actor\":\"bench\",\"extra\":{}}'::jsonb,
    'idempotency_key', null, 'max_budget_usd', null"
changing="'status', 'queued', 'attempt', 0, 'started_at', null, 'finished_at', null,
    'retry_at', null, 'progress', '{\"completed\":[],\"in_progress\":[],\"pending\":[\"run\"]}'::jsonb,
    'result', null, 'error', null, 'dead_letter', false,
    'history', '[{\"status\":\"queued\",\"at\":\"2026-12-06T11:20:00.123456Z\"}]'::jsonb,
    'cancel_requested', false, 'resume_after_approval', false, 'approval', null"

# The cycle: claim 32 (`$1`: the claim's call), then their outcomes (`$2`: the outcomes' call
# after the ids, tokens and times).
cycle() {
  cat <<SQL
CREATE OR REPLACE FUNCTION aiwg_bench_cycle() RETURNS int LANGUAGE plpgsql AS \$\$
DECLARE ids uuid[]; toks bigint[]; n int;
BEGIN
  SELECT array_agg(c.id), array_agg(c.lease_token) INTO ids, toks
  FROM $1 c WHERE c.id IS NOT NULL;
  n := cardinality(ids);
  PERFORM $2(ids, toks, array_fill(now(), ARRAY[n]),
     array_fill(pg_current_xact_id()::xid::text, ARRAY[n]), array_fill('completed'::text, ARRAY[n]),
     $3
     array_fill(now(), ARRAY[n]), array_fill('{"kind":"status","from":"running","to":"completed","attempt":1}'::text, ARRAY[n]),
     array_fill(now(), ARRAY[n]), array_fill('{"kind":"step_finished","step":"run","ok":true}'::text, ARRAY[n]),
     array_fill(now(), ARRAY[n]), array_fill('{"kind":"step_started","step":"run"}'::text, ARRAY[n]));
  RETURN n;
END \$\$;
SQL
}
outcome_args() {
  echo "array_fill(NULL::timestamptz, ARRAY[n]), array_fill('$1'::text, ARRAY[n]), array_fill(NULL::timestamptz, ARRAY[n]),"
}

columns_schema() {
  cat <<'SQL'
DROP TABLE aiwg_jobs CASCADE;
CREATE TABLE aiwg_jobs (
    id uuid PRIMARY KEY, priority integer NOT NULL, project_path text NOT NULL,
    workflow text NOT NULL, created_at timestamptz NOT NULL, idempotency_key text UNIQUE,
    fingerprint text, job jsonb NOT NULL,
    status text NOT NULL CHECK (status IN ('queued', 'running', 'awaiting_approval', 'completed',
        'failed', 'cancelled', 'timed_out')),
    queue_seq bigint, retry_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now(),
    lease_owner text, lease_token bigint, lease_expires_at timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false, last_seq bigint NOT NULL DEFAULT 0,
    approval_expires_at timestamptz, attempt integer NOT NULL DEFAULT 0,
    started_at timestamptz, finished_at timestamptz, dead_letter boolean NOT NULL DEFAULT false,
    progress jsonb, result jsonb, error jsonb,
    CHECK ((status = 'running') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK ((status = 'queued') = (queue_seq IS NOT NULL)),
    CHECK ((status = 'awaiting_approval') = (approval_expires_at IS NOT NULL))
) WITH (fillfactor = 70);
CREATE INDEX ON aiwg_jobs (priority DESC, queue_seq) WHERE status = 'queued';
CREATE INDEX ON aiwg_jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX ON aiwg_jobs (status, id DESC);
CREATE INDEX ON aiwg_jobs (workflow, id DESC);
CREATE INDEX ON aiwg_jobs (approval_expires_at) WHERE status = 'awaiting_approval';
CREATE INDEX ON aiwg_jobs (project_path, priority DESC, queue_seq) WHERE status = 'queued';
CREATE INDEX ON aiwg_jobs (project_path COLLATE "C") WHERE status = ('running' COLLATE "C");
CREATE TRIGGER aiwg_jobs_tally_inserted AFTER INSERT ON aiwg_jobs
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION aiwg_tally_inserted();
CREATE TRIGGER aiwg_jobs_tally_updated AFTER UPDATE OF status ON aiwg_jobs FOR EACH ROW
    WHEN ((OLD.status = 'queued') IS DISTINCT FROM (NEW.status = 'queued'))
    EXECUTE FUNCTION aiwg_tally_moved();

SQL
}

# Makes the schema for `$1` and fills it.
prepare() {
  migrate
  local insert="INSERT INTO aiwg_jobs (id, status, priority, project_path, workflow, queue_seq,
      created_at, last_seq, job"
  local from="FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 20000)) g;"
  case $1 in
    as_is | no_events | no_document | both)
      [ "$1" = as_is ] || sql -f "$work/$1.sql"
      cycle "aiwg_claim(now(), 32, 'w', 30000000)" aiwg_record_outcomes "$(outcome_args "$doc")" | sql
      sql -c "$insert) SELECT g.id, 'queued', 0, '/tmp/aiwg-bench/p0', 'noop',
          nextval('aiwg_queue_seq'), now(), 1, jsonb_build_object($unchanging, $changing) $from" ;;
    split)
      sql -c "ALTER TABLE aiwg_jobs ADD COLUMN spec jsonb"
      cycle "aiwg_claim(now(), 32, 'w', 30000000)" aiwg_record_outcomes "$(outcome_args "$rest")" | sql
      sql -c "$insert, spec) SELECT g.id, 'queued', 0, '/tmp/aiwg-bench/p0', 'noop',
          nextval('aiwg_queue_seq'), now(), 1, jsonb_build_object($changing),
          jsonb_build_object($unchanging) $from" ;;
    columns)
      columns_schema | sql
      sql -f "$work/columns.sql"
      cycle "aiwg_claim(now(), 32, 'w', 30000000)" aiwg_record_outcomes \
        "$(outcome_args '{"summary":"done","output":null,"artifacts":[],"cost_usd":null,"usage":null}')" | sql
      sql -c "$insert, progress) SELECT g.id, 'queued', 0, '/tmp/aiwg-bench/p0', 'noop',
          nextval('aiwg_queue_seq'), now(), 1, jsonb_build_object($unchanging),
          '{\"completed\":[],\"in_progress\":[],\"pending\":[\"run\"]}'::jsonb $from" ;;
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
      pgbench -n -f "$work/cycle.sql" -t 600 -c 1 "$url" 2>&1 | awk '/latency average/ {print $4}')
    b1=$(busy)
    w1=$(psql "$url" -Atq -c "SELECT pg_current_wal_lsn()")
    n=$(sql -Atq -c "SELECT count(*) FROM aiwg_jobs WHERE status = 'completed'")
    [ "$n" -gt 0 ] || { echo "$v: no job completed" >&2; exit 1; }
    wal=$(psql "$url" -Atq -c "SELECT (pg_wal_lsn_diff('$w1', '$w0') / $n)::int")
    printf 'round %s %-12s CPU %4d µs a job, WAL %5d B a job, %s ms a cycle of 32\n' \
      "$round" "$v" $(( (b1 - b0) * 1000000 / hz / n )) "$wal" "$ms"
  done
done
