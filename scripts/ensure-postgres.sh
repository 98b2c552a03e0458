#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 with a `test` database (trust auth),
# installing Debian's postgresql and starting it with pg_ctlcluster when none runs.
# Prints the URL the tests read from AIWG_TEST_DATABASE_URL.
set -euo pipefail
url="${AIWG_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
ready() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }
if ! command -v pg_isready >/dev/null 2>&1 || ! ready; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "installing PostgreSQL from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
  fi
  for v in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$v" main start >&2 || true
  done
  for _ in $(seq 1 60); do ready && break; sleep 1; done
  ready || { echo "PostgreSQL did not come up" >&2; exit 1; }
fi
psql "postgres://postgres@127.0.0.1:5432/postgres" -qtAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
  || psql "postgres://postgres@127.0.0.1:5432/postgres" -qc "CREATE DATABASE test" >&2
echo "$url"
