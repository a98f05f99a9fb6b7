#!/usr/bin/env bash
# Runs every test: unit tests, and the integration tests against a private
# PostgreSQL and a Tansu broker (both installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --bins
cargo test --workspace "$@"
