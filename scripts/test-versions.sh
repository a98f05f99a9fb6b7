#!/usr/bin/env bash
# The compatibility run: a core subset of the integration tests (delivery,
# backfill order, restart and kill, TLS, search_path, status, standby,
# failover, logical decoding messages, the Debezium layout)
# against PostgreSQL 16, 17 and 18 (scripts/install-postgres-versions.sh);
# scripts/test.sh runs the whole suite against 15. Extra arguments go to
# the test binary.
set -euo pipefail
cd "$(dirname "$0")/.."

subset=(
  delivery::
  edges::the_backfill_keeps_insertion_order_and_the_stream_commit_order
  edges::a_retried_first_backfill_loses_nothing_deleted_meanwhile
  tls::verify_full_needs_the_ca_and_require_does_not
  security::functions_planted_on_the_search_path_are_never_called
  operations::status_tells_healthy_from_degraded_and_broken
  operations::readiness_follows_the_slot_lock_and_a_standby_takes_over
  operations::a_failover_to_a_promoted_standby_keeps_the_slot_from_postgres_17
  compat::messages_and_rows_mixed_in_transactions_keep_commit_order
  compat::a_debezium_outbox_table_is_relayed_as_debeziums_router_does
)
installed="$(scripts/install-postgres-versions.sh)"
while read -r major bin; do
  echo "== PostgreSQL ${major}: $("${bin}/postgres" --version) (${bin})"
  # --workspace, as scripts/test.sh: the same features, so the same test
  # binary (-p outbox alone would rebuild much of the workspace).
  PG_BIN="${bin}" cargo test --workspace --test main -- "${subset[@]}" "$@" </dev/null
done <<<"${installed}"
