#!/usr/bin/env bash
# Helpers to run a throwaway PostgreSQL cluster with wal_level=logical.
# Sourced by demo.sh. PostgreSQL refuses to run as root, so as root every
# server command runs as the `postgres` user.

pg_bindir() {
  if [[ -n "${PG_BIN:-}" ]]; then echo "${PG_BIN}"; return; fi
  for v in 17 16 15; do
    if [[ -x "/usr/lib/postgresql/${v}/bin/initdb" ]]; then echo "/usr/lib/postgresql/${v}/bin"; return; fi
  done
  dirname "$(command -v initdb)"
}

as_pg() {
  if [[ "$(id -u)" == "0" ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# pg_start DIR PORT: initdb into DIR and start on PORT (trust auth, loopback only).
pg_start() {
  local dir="$1" port="$2" bin
  bin="$(pg_bindir)"
  mkdir -p "${dir}"
  if [[ "$(id -u)" == "0" ]]; then chown postgres: "${dir}"; fi
  as_pg "${bin}/initdb" -D "${dir}/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
  as_pg "${bin}/pg_ctl" -D "${dir}/data" -l "${dir}/postgres.log" -w -o \
    "-p ${port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=${dir} -c wal_level=logical" \
    start >/dev/null
}

pg_stop() {
  local dir="$1"
  as_pg "$(pg_bindir)/pg_ctl" -D "${dir}/data" -m fast -w stop >/dev/null 2>&1 || true
}
