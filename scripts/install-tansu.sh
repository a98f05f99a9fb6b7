#!/usr/bin/env bash
# Installs the Tansu Kafka-protocol broker used by the integration tests.
# Idempotent: a binary of the pinned version already in place is reused, so a
# warm machine skips the ~20 minute build entirely.
set -euo pipefail

TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
TANSU_ROOT="${TANSU_ROOT:-${HOME}/.cache/outbox-relay/tansu-${TANSU_VERSION}}"
bin="${TANSU_ROOT}/bin/tansu"

# The install root is versioned, so a binary there is the pinned version.
if [[ -x "${bin}" ]]; then
  echo "tansu ${TANSU_VERSION} already installed at ${bin}"
  exit 0
fi

echo "installing tansu ${TANSU_VERSION} into ${TANSU_ROOT} (first time only, about 20 minutes on 2 cores)"
# A plain install has no storage engine; these features give memory://, sqlite:// and postgres://.
cargo install tansu --version "=${TANSU_VERSION}" --locked \
  --features dynostore,libsql,postgres --root "${TANSU_ROOT}"
echo "tansu installed at ${bin}"
