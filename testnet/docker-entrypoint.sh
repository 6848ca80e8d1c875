#!/bin/sh
# Starts a fedmesh node in a container. When BOOTSTRAP_HTTP is set (e.g. http://node0:8080), waits
# for that node's /status, reads its node id and bootstraps from /dns4/BOOTSTRAP_HOST/tcp/4001.
set -eu
if [ -n "${BOOTSTRAP_HTTP:-}" ]; then
  id=""
  for _ in $(seq 1 120); do
    id=$(curl -fsS "$BOOTSTRAP_HTTP/status" 2>/dev/null | sed -n 's/.*"node_id":"\([^"]*\)".*/\1/p') || true
    [ -n "$id" ] && break
    sleep 1
  done
  [ -n "$id" ] || { echo "bootstrap node at $BOOTSTRAP_HTTP never answered" >&2; exit 1; }
  # The node resolves the name at every dial (libp2p's DNS transport), so a bootstrap container
  # that comes back with another address is found again.
  export FEDMESH_P2P__BOOTSTRAP="/dns4/${BOOTSTRAP_HOST}/tcp/4001/p2p/${id}"
fi
exec fedmesh run "$@"
