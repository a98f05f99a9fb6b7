#!/usr/bin/env bash
# Runs every test: unit tests, and the integration tests against a private
# PostgreSQL 15 and a Tansu broker (both installed here when missing); then,
# without arguments, a core subset against PostgreSQL 16, 17 and 18
# (scripts/test-versions.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --bins
cargo test --workspace "$@"
if [[ $# -eq 0 ]]; then
  scripts/test-versions.sh
fi
