#!/usr/bin/env bash
# Runs Herald on this machine, all in one process (`herald dev`), against a local
# nats-server with JetStream; every message goes to a local sink Maildir (.dev/maildir).
# The README's first command. Stop with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --dev
# mail-parser (via mail-auth) declares rust-version 1.98 but builds and passes on 1.95.
cargo build --ignore-rust-version -p herald

mkdir -p .dev/nats
nats_pid=""
if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  .tools/venv/bin/nats-server -a 127.0.0.1 -p 4222 -m 8222 -js -sd .dev/nats >.dev/nats.log 2>&1 &
  nats_pid=$!
  trap '[ -n "$nats_pid" ] && kill "$nats_pid" 2>/dev/null; wait 2>/dev/null' EXIT
  for _ in $(seq 50); do
    curl -fsS "http://127.0.0.1:8222/healthz?js-enabled-only=true" >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "nats-server with JetStream on 127.0.0.1:4222 (store .dev/nats, log .dev/nats.log)"
else
  echo "using the nats-server already listening on 127.0.0.1:4222"
fi
HERALD_LOG_FORMAT=${HERALD_LOG_FORMAT:-text} target/debug/herald dev "$@"
