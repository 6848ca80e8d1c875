#!/bin/sh
# Starts a fedmesh node in a container. When BOOTSTRAP_HTTP is set (e.g. http://node0:8080), waits
# for that node's /status, reads its node id and bootstraps from BOOTSTRAP_HOST:4001 (resolved to IPv4).
set -eu
if [ -n "${BOOTSTRAP_HTTP:-}" ]; then
  id=""
  for _ in $(seq 1 120); do
    id=$(curl -fsS "$BOOTSTRAP_HTTP/status" 2>/dev/null | sed -n 's/.*"node_id":"\([^"]*\)".*/\1/p') || true
    [ -n "$id" ] && break
    sleep 1
  done
  [ -n "$id" ] || { echo "bootstrap node at $BOOTSTRAP_HTTP never answered" >&2; exit 1; }
  # The node's libp2p stack has no DNS transport: resolve the bootstrap host here.
  ip=$(getent hosts "$BOOTSTRAP_HOST" | awk '{print $1; exit}')
  [ -n "$ip" ] || { echo "cannot resolve $BOOTSTRAP_HOST" >&2; exit 1; }
  export FEDMESH_P2P__BOOTSTRAP="/ip4/${ip}/tcp/4001/p2p/${id}"
fi
exec fedmesh run "$@"
