#!/usr/bin/env bash
# What a job's claim and outcome cost PostgreSQL, part by part, and River's fetch and
# completion on the same terms (BENCHMARKS.md, sessions 35 to 39).
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
#   tiny_document  every job's document a few bytes (what the row's width costs)
#   typed_outcome  the outcome given the state's scalar fields as typed arrays, its JSON
#                fields as text each, and only the history's new entries (appended when the
#                row holds as many as the outcome says): a prototype, not a store
#   without_lease, without_running_project, without_status_id, without_workflow_id
#                one index of the jobs' table dropped (what keeping it costs)
#   no_history   the history column left as it is by the claim and the outcome (what keeping
#                the status changes twice, as history entries and as events, costs);
#                `no_history_claim` and `no_history_outcome` leave it on one side only;
#                `no_history_wide` as `no_history`, every queued job's history holding from
#                the start as many entries as a completed job's (the row as wide as as_is's
#                at the end: what of no_history's difference is the row's width)
#   claim_no_entry, claim_no_progress, claim_entry_inline  the claim's state change taken
#                apart: without the history's new entry; without the progress's reset; the
#                attempt and the start set alone and the entry appended by an expression of the
#                row (no subquery, no progress reset; first attempts only: a measurement)
#   claim_expressions  every branch of the claim's state change as expressions of the row
#                (no subquery); `claim_expr_no_progress` the same without the progress's
#                reset, `claim_expr_progress_same` with the progress set to itself
#   running_one_index  the lease index dropped and the list indexes without running jobs: a
#                claim adds an entry to the running projects' index alone, besides the key's
#   bare         no events, no state returned by the claim, no tally kept on updates; then
#   bare_columns the claim setting only the attempt and the start, the outcome only the
#                status, the finish time and the result; then
#   bare_columns_two_indexes  the lease, running-project and list indexes dropped: the
#                three together say how far each part of a job's work is from River's
#   river        River's own cycle (`riverqueue` 0.5's fetch and completion statements, the
#                rows its client reads back) on River's own schema (its migrations, from
#                `riverqueue-migrate` 0.5.0 in cargo's registry: `cargo fetch --manifest-path
#                benches/peers/Cargo.toml` brings it), 20 000 available jobs of no arguments
#
# (Session 35's prototypes of 0030, `no_document`, `both`, `split` and `columns`, are in this
# script as of commit 7f6d978.) `as_is` and the `before_*` variants are stores; the others are
# measurements (a job's events missing, or kept where nothing reads them); `river` is the
# baseline. Prints, per run, the machine's CPU per job (from /proc/stat: PostgreSQL must run on
# this machine, nothing else should), the write-ahead log per job and the time per cycle.
#
# Environment: AIWG_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test; a
# superuser, for CHECKPOINT), AIWG_CYCLE_VARIANTS (default: as_is, no_events, before_0030),
# AIWG_CYCLE_BATCH (the jobs a cycle claims, default 32; the cycles are 19 200 jobs' worth),
# AIWG_CYCLE_OUTCOMES (the most outcomes one call of the outcomes' function records, default
# the batch: a cycle's outcomes in several statements, in its one transaction),
# AIWG_CYCLE_PERF (a path prefix: each variant's cycles also recorded by `perf record -a -g`
# into `<prefix>.<variant>.<round>`, for `perf report`; the figures then include perf's cost).
# Needs psql, pgbench and python3.
#
# A difference of a few µs a job may be the backend's heap, not the SQL: the cycle's one call
# frees all it allocated at its end, and past glibc's trim threshold the heap goes back to the
# kernel and is faulted in again by the next call (BENCHMARKS.md, session 40). Count the
# backend's minor faults, or run against a PostgreSQL started with MALLOC_TRIM_THRESHOLD_
# raised, before reading such a difference as the SQL's cost.
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
fresh_schema() {
  psql "$url" -q -c "DROP SCHEMA IF EXISTS $schema CASCADE" -c "CREATE SCHEMA $schema" 2>/dev/null
}
migrate() {
  fresh_schema
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
assert claim.count('aiwg_job_state(a) AS state') == 1
nostate = claim.replace('aiwg_job_state(a) AS state', 'NULL::jsonb AS state')
# bare: no events, no state returned by the claim, no tally kept on updates (a measurement:
# how near River's cycle the rest of a job's work is).
open(f'{work}/bare.sql', 'w').write(
    'DROP TRIGGER aiwg_jobs_tally_updated ON aiwg_jobs;\n'
    + cut(nostate, ev, '    SELECT c.grouped') + cut(outc, ev, '    SELECT u.id, u.last_seq FROM u;'))
# bare_columns: bare, and the claim sets only the attempt and the start (no history entry, no
# progress reset) while the outcome writes only the status, the finish time and the result
# (no state parsed into the other columns): how near River a job's row alone comes.
claimed = '''(attempt, started_at, progress, history) = (
                SELECT * FROM aiwg_claimed_state(a.attempt, a.resume_after_approval,
                    a.started_at, a.progress, a.history, claim_at)),'''
assert nostate.count(claimed) == 1, 'claim state'
outcols = '''attempt = t.s_attempt, started_at = t.s_started_at,
            finished_at = t.s_finished_at, dead_letter = t.s_dead_letter,
            resume_after_approval = t.s_resume, progress = t.s_progress,
            history = t.s_history, approvals = t.s_approvals, result = t.s_result,
            error = t.s_error,'''
assert outc.count(outcols) == 1, 'outcome columns'
lean_state = 'attempt = a.attempt + 1, started_at = claim_at,'
lean_claim = nostate.replace(claimed, lean_state)
lean_outc = (outc.replace(outcols, "finished_at = t.at, result = '{\"summary\":\"done\"}'::jsonb,")
             .replace('CROSS JOIN LATERAL aiwg_job_columns(t.state) s', 'CROSS JOIN LATERAL aiwg_job_columns(NULL::jsonb) s'))
open(f'{work}/bare_columns.sql', 'w').write(
    'DROP TRIGGER aiwg_jobs_tally_updated ON aiwg_jobs;\n'
    + cut(lean_claim, ev, '    SELECT c.grouped') + cut(lean_outc, ev, '    SELECT u.id, u.last_seq FROM u;'))
# typed_outcome: the outcome given the state's scalar fields as typed arrays, its JSON
# fields as text each (progress, approvals, result, error), and of the history only the new
# entries, appended to the row's when the row holds as many as the completer knows of.
typed = outc
a = typed.index('CREATE OR REPLACE FUNCTION'); b = typed.index('RETURNS TABLE')
typed = typed[:a] + '''CREATE OR REPLACE FUNCTION aiwg_record_outcomes_typed(ids uuid[], tokens bigint[],
    ats timestamptz[], versions text[], statuses text[], retry_ats timestamptz[],
    attempts bigint[], started_ats timestamptz[], finished_ats timestamptz[],
    dead_letters boolean[], resumes boolean[], progresses text[], history_lens int[],
    history_tails text[], approvalss text[], results text[], errors text[],
    approval_ats timestamptz[], ev_ats timestamptz[], kinds text[], last_ats timestamptz[],
    last_kinds text[], first_ats timestamptz[], first_kinds text[])
 ''' + typed[b:]
a = typed.index('    WITH t AS ('); b = typed.index('    u AS (')
typed = typed[:a] + '''    WITH t AS (
        SELECT * FROM unnest(ids, tokens, ats, versions, statuses, retry_ats, attempts,
                    started_ats, finished_ats, dead_letters, resumes, progresses, history_lens,
                    history_tails, approvalss, results, errors, approval_ats, ev_ats, kinds,
                    last_ats, last_kinds, first_ats, first_kinds)
            AS t(id, token, at, version, status, retry_at, s_attempt, s_started_at,
                 s_finished_at, s_dead_letter, s_resume, s_progress, history_len, history_tail,
                 s_approvals, s_result, s_error, approval_expires_at, ev_at, kind, last_at,
                 last_kind, first_at, first_kind)),
''' + typed[b:]
typed = typed.replace('progress = t.s_progress,', 'progress = t.s_progress::jsonb,')
typed = typed.replace('history = t.s_history, approvals = t.s_approvals, result = t.s_result,',
    'history = a.history || t.history_tail::jsonb, approvals = t.s_approvals::jsonb,\n            result = t.s_result::jsonb,')
typed = typed.replace('error = t.s_error,', 'error = t.s_error::jsonb,')
typed = typed.replace('AND a.xmin::text = t.version', 'AND a.xmin::text = t.version\n          AND jsonb_array_length(a.history) = t.history_len')
assert typed.count('::jsonb') >= 5 and 'jsonb_array_length' in typed
open(f'{work}/typed_outcome.sql', 'w').write(typed)
# no_history: the history column left as it is by the claim and the outcome (the status
# events hold the same changes): the claim sets the attempt and the start alone (a first
# attempt's progress needs no reset), the outcome writes every other column of the state.
history_claim = claim.replace(claimed, lean_state)
history_outc = outc.replace('history = t.s_history,', 'history = a.history,')
open(f'{work}/no_history.sql', 'w').write(history_claim + history_outc)
open(f'{work}/no_history_claim.sql', 'w').write(history_claim)
open(f'{work}/no_history_outcome.sql', 'w').write(history_outc)
open(f'{work}/no_history_wide.sql', 'w').write(history_claim + history_outc)
# claim_*: the claim's state change taken apart (the history's entry, the progress's reset,
# the subquery); each a measurement.
def claimed_only(columns):
    return claimed.replace('(attempt, started_at, progress, history)', f'({columns})') \
        .replace('SELECT *', 'SELECT ' + ', '.join('s.' + c for c in columns.split(', '))) \
        .replace('claim_at)),', 'claim_at) s),')
open(f'{work}/claim_no_entry.sql', 'w').write(
    claim.replace(claimed, claimed_only('attempt, started_at, progress')))
open(f'{work}/claim_no_progress.sql', 'w').write(
    claim.replace(claimed, claimed_only('attempt, started_at, history')))
at = """to_char(claim_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
open(f'{work}/claim_entry_inline.sql', 'w').write(claim.replace(claimed, lean_state + f"""
            history = a.history || jsonb_build_array(jsonb_build_object('status', 'running',
                'at', {at}, 'attempt', a.attempt + 1)),"""))
next_attempt = """CASE WHEN a.resume_after_approval OR a.attempt >= 4294967295 THEN a.attempt
                ELSE a.attempt + 1 END"""
reset = """progress = CASE WHEN a.resume_after_approval
                OR (COALESCE(a.progress->'completed', '[]'::jsonb) = '[]'::jsonb
                    AND COALESCE(a.progress->'in_progress', '[]'::jsonb) = '[]'::jsonb)
                THEN a.progress
                ELSE jsonb_build_object('completed', '[]'::jsonb, 'in_progress', '[]'::jsonb,
                    'pending', COALESCE(a.progress->'completed', '[]'::jsonb)
                        || COALESCE(a.progress->'in_progress', '[]'::jsonb)
                        || COALESCE(a.progress->'pending', '[]'::jsonb)) END,"""
def expressions(progress):
    return f"""attempt = {next_attempt},
            started_at = CASE WHEN a.resume_after_approval THEN a.started_at ELSE claim_at END,
            {progress}
            history = a.history || jsonb_build_array(CASE WHEN a.resume_after_approval
                THEN jsonb_build_object('status', 'running', 'at', {at},
                    'attempt', {next_attempt}, 'reason', 'resumed after approval')
                ELSE jsonb_build_object('status', 'running', 'at', {at},
                    'attempt', {next_attempt}) END),"""
for name, progress in (('claim_expressions', reset), ('claim_expr_no_progress', ''),
                       ('claim_expr_progress_same', 'progress = a.progress,')):
    open(f'{work}/{name}.sql', 'w').write(claim.replace(claimed, expressions(progress)))
# bare_columns_two_indexes: and without the list indexes, the running projects' and the
# lease's (what River's table has: its key and the fetch index, and two GIN indexes).
open(f'{work}/bare_columns_two_indexes.sql', 'w').write(open(f'{work}/bare_columns.sql').read()
    + 'DROP INDEX aiwg_jobs_status_id_idx, aiwg_jobs_workflow_id_idx, aiwg_jobs_running_project_idx, aiwg_jobs_lease_idx;\n')
# without_<index>: the schema as it is less one index of the jobs' table (a measurement: what
# keeping that index costs a claim and an outcome).
for index in ('lease', 'running_project', 'status_id', 'workflow_id'):
    open(f'{work}/without_{index}.sql', 'w').write(f'DROP INDEX aiwg_jobs_{index}_idx;\n')
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
cat > "$work/running_one_index.sql" <<'SQL'
DROP INDEX aiwg_jobs_status_id_idx, aiwg_jobs_workflow_id_idx, aiwg_jobs_lease_idx;
CREATE INDEX aiwg_jobs_status_id_idx ON aiwg_jobs (status, id DESC) WHERE status <> 'running';
CREATE INDEX aiwg_jobs_workflow_id_idx ON aiwg_jobs (workflow, id DESC) WHERE status <> 'running';
SQL
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

# A completed one-step job's history (for `no_history_wide`'s queued jobs).
wide_history='[{"status":"queued","at":"2026-12-06T11:20:00.123456Z"},{"status":"running","at":"2026-12-06T11:20:00.223456Z","attempt":1},{"status":"completed","at":"2026-12-06T11:20:00.323456Z","attempt":1}]'

# The cycle: claim $batch, then their outcomes, $outcomes a call (`$1`: the outcomes'
# function, `aiwg_record_outcomes` unless given; `$2`: its arguments that carry the job or the
# state it writes, `$state` unless given).
cycle() {
  local function=${1:-aiwg_record_outcomes}
  local written=${2:-"array_fill('$state'::text, ARRAY[n])"}
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
  PERFORM $function(ids, toks, array_fill(now(), ARRAY[n]),
     array_fill(pg_current_xact_id()::xid::text, ARRAY[n]), array_fill('completed'::text, ARRAY[n]),
     array_fill(NULL::timestamptz, ARRAY[n]), $written,
     array_fill(NULL::timestamptz, ARRAY[n]),
     array_fill(now(), ARRAY[n]), array_fill('{"kind":"status","from":"running","to":"completed","attempt":1}'::text, ARRAY[n]),
     array_fill(now(), ARRAY[n]), array_fill('{"kind":"step_finished","step":"run","ok":true}'::text, ARRAY[n]),
     array_fill(now(), ARRAY[n]), array_fill('{"kind":"step_started","step":"run"}'::text, ARRAY[n]));
  END LOOP;
  RETURN total;
END \$\$;
SQL
}

# River's own cycle, for the `river` variant: its fetch (`riverqueue` 0.5's claim statement,
# `standard_claim_sql`) of $batch jobs, then their completion (its completer's statement),
# $outcomes a call, each with the rows River's client reads back; on River's own schema (its
# migrations, as `riverqueue-migrate` 0.5 ships them, from cargo's registry: `cargo fetch
# --manifest-path benches/peers/Cargo.toml` brings them).
river_cycle() {
  local projection="j.id, j.attempt, j.attempted_at, j.attempted_by, j.created_at,
      j.args AS encoded_args, coalesce(j.errors, '{}'::jsonb[]) AS errors, j.finalized_at,
      j.kind, j.max_attempts, j.metadata, j.priority, j.queue, j.scheduled_at,
      j.state::text AS state, j.tags::text[] AS tags, j.unique_key,
      j.unique_states::text AS unique_states"
  # River's completer's `should_cancel`.
  local cancel="(job_input.state IN ('available', 'retryable', 'scheduled')
      AND job.metadata ? 'cancel_attempted_at')"
  cat <<SQL
CREATE OR REPLACE FUNCTION aiwg_bench_cycle() RETURNS int LANGUAGE plpgsql AS \$\$
DECLARE all_ids bigint[]; ids bigint[]; n int; m int; total int; k int := 1;
BEGIN
  WITH locked AS (
      SELECT id FROM river_job WHERE state = 'available' AND queue = 'default'
          AND scheduled_at <= now() AND (NULL::text[] IS NULL OR kind = any(NULL::text[]))
          AND NOT EXISTS (SELECT 1 FROM river_queue WHERE name = 'default'
                          AND paused_at IS NOT NULL)
      ORDER BY priority, scheduled_at, id LIMIT $batch FOR UPDATE SKIP LOCKED),
  j AS (
      UPDATE river_job AS j SET state = 'running', attempt = j.attempt + 1,
          attempted_at = now(),
          attempted_by = array_append(CASE WHEN array_length(j.attempted_by, 1) >= 100
              THEN j.attempted_by[array_length(j.attempted_by, 1) + 2 - 100:]
              ELSE j.attempted_by END, 'bench')
      FROM locked WHERE j.id = locked.id
      RETURNING $projection)
  SELECT array_agg(j.id) INTO all_ids FROM j;
  total := coalesce(cardinality(all_ids), 0);
  WHILE k <= total LOOP
  ids := all_ids[k:k + $outcomes - 1];
  n := cardinality(ids); k := k + n;
  WITH job_input AS (
      SELECT * FROM unnest(ids, array_fill(false, ARRAY[n]), array_fill(0::smallint, ARRAY[n]),
          array_fill(NULL::jsonb, ARRAY[n]), array_fill(now(), ARRAY[n]),
          array_fill(false, ARRAY[n]), array_fill('{}'::jsonb, ARRAY[n]),
          array_fill(NULL::timestamptz, ARRAY[n]), array_fill('completed'::text, ARRAY[n]))
      AS job_input(id, attempt_do_update, attempt, errors, finalized_at,
                   metadata_do_merge, metadata_updates, scheduled_at, state)),
  updated AS (
      UPDATE river_job AS job SET
          attempt = CASE WHEN job.state = 'running' AND NOT $cancel
              AND job_input.attempt_do_update THEN job_input.attempt ELSE job.attempt END,
          errors = CASE WHEN job.state = 'running' AND job_input.errors IS NOT NULL
              THEN array_append(coalesce(job.errors, '{}'), job_input.errors) ELSE job.errors END,
          finalized_at = CASE WHEN job.state = 'running' AND $cancel THEN now()
              WHEN job.state = 'running' AND job_input.finalized_at IS NOT NULL
              THEN job_input.finalized_at ELSE job.finalized_at END,
          metadata = CASE WHEN job_input.metadata_do_merge
              THEN job.metadata || job_input.metadata_updates ELSE job.metadata END,
          scheduled_at = CASE WHEN job.state = 'running' AND NOT $cancel
              AND job_input.scheduled_at IS NOT NULL
              THEN job_input.scheduled_at ELSE job.scheduled_at END,
          state = CASE WHEN job.state = 'running' AND $cancel
              THEN 'cancelled'::river_job_state
              WHEN job.state = 'running' THEN job_input.state::river_job_state
              ELSE job.state END
      FROM job_input
      WHERE job.id = job_input.id AND (job.state = 'running' OR job_input.metadata_do_merge)
      RETURNING job.*)
  SELECT count(*) INTO m FROM (
      SELECT ${projection//j./job.} FROM river_job AS job JOIN job_input ON job.id = job_input.id
      WHERE NOT EXISTS (SELECT 1 FROM updated WHERE updated.id = job.id)
      UNION ALL SELECT ${projection//j./job.} FROM updated AS job) c;
  END LOOP;
  RETURN total;
END \$\$;
SQL
}

# What typed_outcome's function is given for a completed one-step job's state.
typed_state="array_fill(1::bigint, ARRAY[n]),
     array_fill('2026-12-06T11:20:00.223456Z'::timestamptz, ARRAY[n]),
     array_fill('2026-12-06T11:20:00.323456Z'::timestamptz, ARRAY[n]),
     array_fill(false, ARRAY[n]), array_fill(false, ARRAY[n]),
     array_fill('{\"completed\":[\"run\"],\"in_progress\":[],\"pending\":[]}'::text, ARRAY[n]),
     array_fill(2, ARRAY[n]),
     array_fill('[{\"status\":\"completed\",\"at\":\"2026-12-06T11:20:00.323456Z\",\"attempt\":1}]'::text, ARRAY[n]),
     array_fill('[]'::text, ARRAY[n]),
     array_fill('{\"summary\":\"done\",\"output\":null,\"artifacts\":[],\"cost_usd\":null,\"usage\":null}'::text, ARRAY[n]),
     array_fill(NULL::text, ARRAY[n])"

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
      | no_checks | no_function_settings | no_tally | tiny_document | typed_outcome | bare \
      | bare_columns | bare_columns_two_indexes | without_lease | without_running_project \
      | without_status_id | without_workflow_id | running_one_index | no_history \
      | no_history_claim | no_history_outcome | no_history_wide | claim_no_entry \
      | claim_no_progress | claim_entry_inline | claim_expressions | claim_expr_no_progress \
      | claim_expr_progress_same)
      if [ "$1" = before_0031 ]; then migrate 0031; else migrate; fi
      [ "$1" = as_is ] || [ "$1" = before_0031 ] || [ "$1" = tiny_document ] \
        || sql -f "$work/$1.sql"
      case $1 in
        typed_outcome) cycle aiwg_record_outcomes_typed "$typed_state" | sql ;;
        *) cycle | sql ;;
      esac
      # tiny_document: every job's document a few bytes (a measurement: what the row's width
      # costs the updates that write a new version of it).
      local document="aiwg_job_document(d.job)"
      [ "$1" = tiny_document ] && document="jsonb_build_object('id', g.id)"
      local job=$queued
      [ "$1" = no_history_wide ] && job="jsonb_set($queued, '{history}', '$wide_history')"
      sql -c "INSERT INTO aiwg_jobs ($cols, job, attempt, started_at, finished_at, dead_letter,
          resume_after_approval, progress, history, approvals, result, error)
          SELECT $vals, $document, s.*
          $from CROSS JOIN LATERAL (SELECT $job AS job) d
          CROSS JOIN LATERAL aiwg_job_columns(d.job) s" ;;
    before_0030)
      migrate 0030
      cycle aiwg_record_outcomes "array_fill('$doc'::text, ARRAY[n])" | sql
      sql -c "INSERT INTO aiwg_jobs ($cols, job) SELECT $vals, $queued $from" ;;
    river)
      local migrations
      migrations=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/riverqueue-migrate-0.5.0/migrations/main \
        2>/dev/null | head -1)
      [ -n "$migrations" ] || {
        echo "river: riverqueue-migrate 0.5.0 is not in cargo's registry;" \
          "run cargo fetch --manifest-path benches/peers/Cargo.toml" >&2
        exit 2
      }
      fresh_schema
      for f in $(ls "$migrations"/*.up.sql | sort); do
        sed 's#/\* TEMPLATE: schema \*/##g' "$f" | sql -1 >/dev/null
      done
      river_cycle | sql
      # As River's `insert_many` queues a job of no arguments.
      sql -c "INSERT INTO river_job (args, kind, max_attempts, priority, queue, scheduled_at)
          SELECT '{}', 'noop', 25, 1, 'default', now() - interval '1 second'
          FROM generate_series(1, 20000)"
      sql -c "VACUUM ANALYZE river_job" -c "CHECKPOINT" >/dev/null
      return ;;
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
    if [ "$v" = river ]; then
      n=$(sql -Atq -c "SELECT count(*) FROM river_job WHERE state = 'completed'")
    else
      n=$(sql -Atq -c "SELECT count(*) FROM aiwg_jobs WHERE status = 'completed'")
    fi
    [ "$n" -gt 0 ] || { echo "$v: no job completed" >&2; exit 1; }
    wal=$(psql "$url" -Atq -c "SELECT (pg_wal_lsn_diff('$w1', '$w0') / $n)::int")
    printf 'round %s %-12s CPU %4d µs a job, WAL %5d B a job, %s ms a cycle of %s (outcomes by %s)\n' \
      "$round" "$v" $(( (b1 - b0) * 1000000 / hz / n )) "$wal" "$ms" "$batch" "$outcomes"
  done
done
