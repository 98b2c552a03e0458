#!/usr/bin/env bash
# The project's test command (the README's second quick-start command): installs the pinned real
# peers (claude, codex, opencode, GitHub example payloads), makes sure PostgreSQL and the message
# brokers (NATS, RabbitMQ, Redis) run, then runs every
# test of the workspace with every feature.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-peers.sh
# shellcheck disable=SC1091
source .peers/env
AIWG_TEST_DATABASE_URL=$(bash scripts/ensure-postgres.sh)
export AIWG_TEST_DATABASE_URL
bash scripts/ensure-brokers.sh
cargo test --workspace --all-features "$@"
