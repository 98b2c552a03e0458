#!/usr/bin/env bash
# Out-of-process HTTP load (issue 15, part 6): the release example servers (axum and actix-web)
# and bare servers answering the same bytes, each in its own process, driven by the load
# generator (`benches/src/bin/load.rs`) in a third. Prints `ratio <name> <value>` lines:
#   http_github_vs_bare          signed GitHub issue_comment (8.8 KB) → 202, axum
#   http_trigger_axum_vs_bare    POST /workflows/trigger → 202, axum
#   http_trigger_actix_vs_bare   the same on actix-web
#   http_status_vs_bare          GET /workflows/{job_id}/status → 200 (about 1 KB), axum
#   http_jobs_vs_bare            GET /jobs?limit=50 → 200 (about 50 KB), axum (REQUESTS / 4 of them)
# Usage: scripts/http_load.sh [REQUESTS (default 20000)] [CONNECTIONS (default 32)]
# AIWG_LOAD_STORAGE=postgres runs the servers on PostgreSQL (benches/http/aiwg-postgres.yaml,
# built with `--features postgres`): each in a fresh schema of AIWG_TEST_DATABASE_URL's
# database (default postgres://postgres@127.0.0.1:5432/test), dropped at the end (needs psql);
# the bare server of the reads then reads the rows aiwg's store reads, in the axum server's schema.
# AIWG_LOAD_ONLY=writes runs only the first three, AIWG_LOAD_ONLY=reads only the reads (after
# a thousand triggers, so that there are jobs to read).
# Not part of `cargo test`: it measures wall-clock throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${1:-20000}
CONNECTIONS=${2:-32}
ROUNDS=${AIWG_LOAD_ROUNDS:-3}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
STORAGE=${AIWG_LOAD_STORAGE:-memory}
ONLY=${AIWG_LOAD_ONLY:-all}
CONFIG=benches/http/aiwg.yaml
FEATURES=()
if [ "$STORAGE" = postgres ]; then
  CONFIG=benches/http/aiwg-postgres.yaml
  FEATURES=(--features postgres)
fi
# AIWG_LOAD_BIN=<dir> runs the four binaries found there instead (say, another commit's
# build, for an A/B comparison) and builds nothing.
BIN=${AIWG_LOAD_BIN:-target/release}
if [ -z "${AIWG_LOAD_BIN:-}" ]; then
  cargo build --release -q -p aiwg-examples "${FEATURES[@]}" --bin server --bin actix_server
  cargo build --release -q -p aiwg-benches --bin load --bin bare_server
fi
WORK=$(mktemp -d)
PIDS=()
SCHEMAS=()
DB_URL=${AIWG_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for s in "${SCHEMAS[@]}"; do psql -q "$DB_URL" -c "DROP SCHEMA IF EXISTS $s CASCADE" || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
export AIWG_API_KEY=load-test-api-key-0123456789
export GITHUB_WEBHOOK_SECRET=load-test-github-secret
export AIWG_PROJECT_ROOT=$WORK
export RUST_LOG=${RUST_LOG:-warn}

# Waits until something answers on 127.0.0.1:$1.
wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  return 1
}
start() { # port, command...
  local port=$1; shift
  "$@" >"$WORK/$port.log" 2>&1 &
  PIDS+=($!)
  wait_port "$port"
}

# On PostgreSQL: a fresh schema per server (named in the URL's search_path). Runs in a
# command substitution (a subshell), so the schema is recorded for cleanup by its caller.
schema_for() { echo "aiwg_load_$$_$1"; }
database_for() { # server name
  local schema
  schema=$(schema_for "$1")
  psql -q "$DB_URL" -c "CREATE SCHEMA $schema" >/dev/null
  local sep='?'
  case "$DB_URL" in *\?*) sep='&' ;; esac
  echo "${DB_URL}${sep}options=-c%20search_path%3D${schema}"
}
if [ "$STORAGE" = postgres ]; then
  AIWG_SECRET_KEY=$("$BIN/server" gen-secret-key load)
  export AIWG_SECRET_KEY
  SCHEMAS+=("$(schema_for axum)" "$(schema_for actix)")
  AXUM_DB=$(database_for axum)
  ACTIX_DB=$(database_for actix)
fi
AIWG_DATABASE_URL=${AXUM_DB:-} AIWG_API_PORT=3200 start 3200 "$BIN/server" --config "$CONFIG"
AIWG_DATABASE_URL=${ACTIX_DB:-} AIWG_API_PORT=3210 start 3210 "$BIN/actix_server" --config "$CONFIG"
start 3201 "$BIN/bare_server" axum 127.0.0.1:3201
start 3211 "$BIN/bare_server" actix 127.0.0.1:3211

common=(--requests "$REQUESTS" --connections "$CONNECTIONS" --rounds "$ROUNDS" --expect 202)
trigger=(--header "authorization: Bearer $AIWG_API_KEY" --header 'content-type: application/json'
  --body '{"workflow":"noop"}')
OUTS=()
if [ "$ONLY" != reads ]; then
  "$BIN/load" --name http_github_vs_bare "${common[@]}" \
    --ours http://127.0.0.1:3200/hooks/github --bare http://127.0.0.1:3201/hooks/github \
    --header 'x-github-event: issue_comment' --header 'content-type: application/json' \
    --unique-header x-github-delivery --github-secret "$GITHUB_WEBHOOK_SECRET" | tee "$WORK/github.out"
  "$BIN/load" --name http_trigger_axum_vs_bare "${common[@]}" "${trigger[@]}" \
    --ours http://127.0.0.1:3200/workflows/trigger --bare http://127.0.0.1:3201/workflows/trigger | tee "$WORK/axum.out"
  "$BIN/load" --name http_trigger_actix_vs_bare "${common[@]}" "${trigger[@]}" \
    --ours http://127.0.0.1:3210/workflows/trigger --bare http://127.0.0.1:3211/workflows/trigger | tee "$WORK/actix.out"
  OUTS+=("$WORK/github.out" "$WORK/axum.out" "$WORK/actix.out")
else
  # The reads want jobs to read: a thousand, as a run of the writes leaves tens of thousands.
  "$BIN/load" --name jobs_to_read --requests 1000 --connections 8 --rounds 1 --expect 202 \
    "${trigger[@]}" --ours http://127.0.0.1:3200/workflows/trigger >/dev/null
fi

if [ "$ONLY" != writes ]; then
  # The reads a client and the dashboard make, on axum: one job's status, and the newest page
  # of jobs. The bare server answers the bytes aiwg answered (saved here); on PostgreSQL it
  # first reads the rows aiwg's store reads for the read, on the same database.
  auth="authorization: Bearer $AIWG_API_KEY"
  curl -sf -H "$auth" -o "$WORK/jobs.json" 'http://127.0.0.1:3200/jobs?limit=50'
  JOB=$(sed -n 's/^{"jobs":\[{"job_id":"\([0-9a-f-]*\)".*/\1/p' "$WORK/jobs.json")
  [ -n "$JOB" ] || { echo "no job to read in GET /jobs's answer" >&2; exit 1; }
  curl -sf -H "$auth" -o "$WORK/status.json" "http://127.0.0.1:3200/workflows/$JOB/status"
  AIWG_BARE_STATUS=$WORK/status.json AIWG_BARE_JOBS=$WORK/jobs.json \
    AIWG_BARE_DATABASE_URL=${AXUM_DB:-} start 3202 "$BIN/bare_server" axum 127.0.0.1:3202
  reads=(--connections "$CONNECTIONS" --rounds "$ROUNDS" --expect 200 --method GET --header "$auth")
  "$BIN/load" --name http_status_vs_bare --requests "$REQUESTS" "${reads[@]}" \
    --ours "http://127.0.0.1:3200/workflows/$JOB/status" \
    --bare "http://127.0.0.1:3202/workflows/$JOB/status" | tee "$WORK/status.out"
  "$BIN/load" --name http_jobs_vs_bare --requests "$((REQUESTS / 4))" "${reads[@]}" \
    --ours 'http://127.0.0.1:3200/jobs?limit=50' --bare 'http://127.0.0.1:3202/jobs?limit=50' | tee "$WORK/jobs.out"
  OUTS+=("$WORK/status.out" "$WORK/jobs.out")
fi
echo
grep -h '^ratio ' "${OUTS[@]}"
