#!/usr/bin/env bash
# A local fedmesh testnet: N real `fedmesh run` processes on loopback, each with its own data
# directory, generated key and ports; node 0 is every other node's bootstrap peer.
#
#   testnet/testnet.sh up [N]      start N nodes (default 3) and print how to reach each
#   testnet/testnet.sh status      show each node's /status summary
#   testnet/testnet.sh down        stop them (data directories are kept under $RUN_DIR)
#
# Environment: FEDMESH_BIN (default: target/release/fedmesh, built if missing), RUN_DIR (default
# testnet/run), BASE_PORT (default 21000; node i uses BASE_PORT+10*i .. +3).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
RUN_DIR="${RUN_DIR:-$here/run}"
BASE_PORT="${BASE_PORT:-21000}"
BIN="${FEDMESH_BIN:-$root/target/release/fedmesh}"

ports() { # i -> "mqtt_v4 mqtt_v5 http p2p"
  local b=$((BASE_PORT + 10 * $1))
  echo "$b $((b + 1)) $((b + 2)) $((b + 3))"
}

http_get() { # port path
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$2" >&3
  sed '1,/^\r$/d' <&3
  exec 3<&-
}

wait_healthy() { # i
  read -r _ _ http _ < <(ports "$1")
  for _ in $(seq 1 200); do
    if http_get "$http" /healthz 2>/dev/null | grep -q ok; then return 0; fi
    sleep 0.1
  done
  echo "node $1 did not become healthy; see $RUN_DIR/node-$1/node.log" >&2
  return 1
}

start_node() { # i bootstrap
  local i=$1 boot=$2
  local dir="$RUN_DIR/node-$i"
  read -r v4 v5 http p2p < <(ports "$i")
  mkdir -p "$dir"
  FEDMESH_DATA_DIR="$dir" \
  FEDMESH_NODE__NAME="node-$i" \
  FEDMESH_MQTT__LISTEN_V4="127.0.0.1:$v4" \
  FEDMESH_MQTT__LISTEN_V5="127.0.0.1:$v5" \
  FEDMESH_HTTP__LISTEN="127.0.0.1:$http" \
  FEDMESH_P2P__LISTEN="/ip4/127.0.0.1/tcp/$p2p" \
  FEDMESH_P2P__BOOTSTRAP="$boot" \
    nohup "$BIN" run >>"$dir/node.log" 2>&1 &
  echo $! >"$dir/pid"
  wait_healthy "$i"
}

node_id() { # i
  read -r _ _ http _ < <(ports "$1")
  http_get "$http" /status | sed -n 's/.*"node_id":"\([^"]*\)".*/\1/p'
}

cmd_up() {
  local n="${1:-3}"
  if [ ! -x "$BIN" ]; then
    echo "building $BIN" >&2
    (cd "$root" && cargo build --release -p fedmesh-node --bin fedmesh)
  fi
  mkdir -p "$RUN_DIR"
  start_node 0 ""
  local id0; id0="$(node_id 0)"
  read -r _ _ _ p2p0 < <(ports 0)
  local boot="/ip4/127.0.0.1/tcp/$p2p0/p2p/$id0"
  for i in $(seq 1 $((n - 1))); do start_node "$i" "$boot"; done
  echo "testnet up: $n nodes (bootstrap $boot)"
  printf '%-7s %-54s %-16s %-16s %s\n' node id mqtt-v3.1.1 mqtt-v5 http
  for i in $(seq 0 $((n - 1))); do
    read -r v4 v5 http _ < <(ports "$i")
    printf '%-7s %-54s %-16s %-16s %s\n' "node-$i" "$(node_id "$i")" "127.0.0.1:$v4" "127.0.0.1:$v5" "http://127.0.0.1:$http/status"
  done
  echo "submit a task: FEDMESH_MQTT__LISTEN_V4=127.0.0.1:$BASE_PORT $BIN task submit \"...\""
  echo "stop:          $0 down"
}

cmd_status() {
  for d in "$RUN_DIR"/node-*; do
    [ -d "$d" ] || continue
    local i="${d##*-}"
    read -r _ _ http _ < <(ports "$i")
    printf 'node-%s: ' "$i"
    http_get "$http" /status 2>/dev/null | head -c 300 || echo "down"
    echo
  done
}

cmd_down() {
  for p in "$RUN_DIR"/node-*/pid; do
    [ -f "$p" ] || continue
    kill "$(cat "$p")" 2>/dev/null || true
    rm -f "$p"
  done
  echo "testnet down (data kept in $RUN_DIR)"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  status) cmd_status ;;
  down) cmd_down ;;
  *) echo "usage: $0 up [N] | status | down" >&2; exit 2 ;;
esac
