#!/usr/bin/env bash
# Makes sure the message brokers the aiwg-brokers tests use answer on 127.0.0.1: NATS with
# JetStream (4222), RabbitMQ (5672, guest/guest) and Redis (6379), starting whichever is not
# running with the commands known to work on the project's machines. Never restarts a running one.
set -euo pipefail
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_up() { for _ in $(seq 1 60); do up "$1" && return 0; sleep 1; done; echo "$2 did not come up on port $1" >&2; return 1; }
if ! up 6379; then
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no >&2
  wait_up 6379 redis
fi
if ! up 4222; then
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server >&2
  wait_up 4222 nats
fi
if ! up 5672; then
  rabbitmq-server -detached >&2
  wait_up 5672 rabbitmq
fi
echo "brokers ready: nats 4222, rabbitmq 5672, redis 6379" >&2
