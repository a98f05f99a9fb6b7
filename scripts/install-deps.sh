#!/usr/bin/env bash
# Installs what the build and the integration tests need, idempotently:
#  - OpenSSL's headers and pkg-config, for librdkafka's TLS and SASL SCRAM
#    (the rdkafka `ssl` feature links the system's OpenSSL);
#  - PostgreSQL server binaries (initdb, pg_ctl, postgres), from Debian's packages;
#  - the Tansu Kafka-protocol broker (scripts/install-tansu.sh, cached),
#    unless called with --postgres-only (the demo needs no Tansu).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! pkg-config --exists openssl 2>/dev/null; then
  echo "installing OpenSSL headers and pkg-config (librdkafka TLS)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq libssl-dev pkg-config
else
  echo "openssl headers present ($(pkg-config --modversion openssl))"
fi

have_pg=""
for v in 17 16 15; do
  if [[ -x "/usr/lib/postgresql/${v}/bin/initdb" ]]; then have_pg="${v}"; break; fi
done
if [[ -z "${have_pg}" ]] && ! command -v initdb >/dev/null 2>&1; then
  echo "installing PostgreSQL server binaries"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql-15 || apt-get install -y -qq postgresql
else
  echo "postgresql server binaries present (${have_pg:-on PATH})"
fi
if ! id postgres >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]]; then
  # The tests run server programs as this user when started as root.
  useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
fi

if [[ "${1:-}" != "--postgres-only" ]]; then
  scripts/install-tansu.sh
fi
