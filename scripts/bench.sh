#!/usr/bin/env bash
# Benchmarks the relay on this machine: starts a private PostgreSQL and a Tansu
# broker (memory storage, so the broker is not the bottleneck), builds the
# relay in release mode, runs `outbox-bench`, and leaves report.md, report.json
# and SVG plots in the output folder (default bench-results/<date>).
#
#   scripts/bench.sh [outbox-bench flags, e.g. --events 200000 --seconds 20]
#   OUTBOX_BENCH_RELAY_BIN=/path/to/outbox-relay scripts/bench.sh   # another relay build (A/B)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh
scripts/install-tansu.sh >/dev/null

cargo build --quiet --release -p pg-outbox-relay --bin outbox-relay -p outbox-bench --bin outbox-bench
target="${CARGO_TARGET_DIR:-target}"

dir="$(mktemp -d /tmp/outbox-bench.XXXXXX)"
chmod 755 "${dir}"
pg_port="$(free_port)"
kafka_port="$(free_port)"
tansu_pid=""
cleanup() {
  [[ -n "${tansu_pid}" ]] && kill "${tansu_pid}" 2>/dev/null || true
  pg_stop "${dir}"
  rm -rf "${dir}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pg_start "${dir}" "${pg_port}"
as_pg "$(pg_bindir)/createdb" -h 127.0.0.1 -p "${pg_port}" -U postgres bench
"${TANSU_BIN:-${HOME}/.cache/outbox-relay/tansu-0.6.0/bin/tansu}" broker \
  --listener-url "tcp://127.0.0.1:${kafka_port}" --advertised-listener-url "tcp://127.0.0.1:${kafka_port}" \
  --storage-engine memory://tansu/ >"${dir}/tansu.log" 2>&1 &
tansu_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/${kafka_port}") 2>/dev/null && break; sleep 0.1; done

out="bench-results/$(date +%Y%m%d-%H%M%S)"
"${target}/release/outbox-bench" \
  --database-url "postgres://postgres@127.0.0.1:${pg_port}/bench?sslmode=disable" \
  --kafka-brokers "127.0.0.1:${kafka_port}" \
  --relay-bin "${OUTBOX_BENCH_RELAY_BIN:-${target}/release/outbox-relay}" \
  --broker-pid "${tansu_pid}" --out "${out}" "$@"
echo "report: ${out}/report.md"
