#!/usr/bin/env bash
# The project's test command (the README's second quick-start command): installs the pinned real
# peers (claude, opencode, GitHub example payloads), makes sure PostgreSQL runs, then runs every
# test of the workspace with every feature.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-peers.sh
# shellcheck disable=SC1091
source .peers/env
AIWG_TEST_DATABASE_URL=$(bash scripts/ensure-postgres.sh)
export AIWG_TEST_DATABASE_URL
cargo test --workspace --all-features "$@"
