#!/usr/bin/env bash
# The whole system on one machine, in one command: a private PostgreSQL, an
# embedded Kafka-protocol broker (librdkafka's mock cluster), the relay, the
# burger stand's kitchen writing events and its stock consumer applying them.
# Every event is printed as it moves (written, published, applied), then a
# reconciliation; exits non-zero if it does not add up. Cleans up on Ctrl-C.
#
#   scripts/demo.sh [--seconds N] [--rate N] [--kafka-brokers HOST:PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh
scripts/install-deps.sh --postgres-only >/dev/null

echo "demo: building (the first build compiles librdkafka, a few minutes)"
cargo build --quiet -p pg-outbox-relay --bin outbox-relay && cargo build --quiet -p outbox-consumer-example --example demo

dir="$(mktemp -d /tmp/outbox-demo.XXXXXX)"
chmod 755 "${dir}"
port="$(free_port)"
cleanup() {
  pg_stop "${dir}"
  rm -rf "${dir}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pg_start "${dir}" "${port}"
echo "demo: postgres on 127.0.0.1:${port} (wal_level=logical)"

target="${CARGO_TARGET_DIR:-target}"
"${target}/debug/examples/demo" \
  --database-url "postgres://postgres@127.0.0.1:${port}/postgres?sslmode=disable" \
  --relay-bin "${target}/debug/outbox-relay" "$@"
