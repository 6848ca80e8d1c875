#!/usr/bin/env bash
# The maximum latency at 1 K msg/s (issue #6.1), node vs mosquitto, under four conditions
# (BENCHMARKS.md, "the 1 K msg/s maximum, with DAMON off and real-time priority"):
# the VM's DAMON (kdamond) on or off, and both brokers and the load generator at default
# scheduling or SCHED_FIFO 10. A diagnostic for this machine, not a product setting.
#
#   cargo build --release -p fedmesh-node -p fedmesh-bench
#   sudo scripts/bench-max-1k.sh [ROUNDS=3] [DURATION=10s]
#
# Needs root (chrt -f, and writing /sys/kernel/mm/damon/admin/kdamonds/0/state; DAMON is
# left as it was found). Prints one line per run: max, p99.9 and p99 in µs, and the
# host's steal ticks during the run.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-3}
D=${2:-10s}
WORK=$(mktemp -d)
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh
MP=$(free_port)
mosquitto_conf "$MP" true >"$WORK/m.conf"
"$MOSQUITTO" -c "$WORK/m.conf" >"$WORK/m.log" 2>&1 &
MPID=$!
NP=$(free_port); V5=$(free_port); H=$(free_port)
FEDMESH_DATA_DIR=$WORK/d FEDMESH_MQTT__LISTEN_V4=127.0.0.1:$NP FEDMESH_MQTT__LISTEN_V5=127.0.0.1:$V5 \
  FEDMESH_HTTP__LISTEN=127.0.0.1:$H FEDMESH_NODE__LOG=warn ./target/release/fedmesh run >"$WORK/n.log" 2>&1 &
NPID=$!
DAMON=/sys/kernel/mm/damon/admin/kdamonds/0/state
DAMON_WAS=$(cat "$DAMON" 2>/dev/null || echo none)
# Writing the state it already has fails (EBUSY).
set_damon() { [ "$(cat "$DAMON")" = "$1" ] || echo "$1" >"$DAMON"; }
restore() {
  [ "$DAMON_WAS" = none ] || set_damon "$DAMON_WAS" || true
  kill "$MPID" "$NPID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap restore EXIT
wait_port "$MP" "$MPID"
wait_port "$NP" "$NPID"
sleep 1 # let the node finish starting (p2p, store)
steal() { awk '/^cpu /{print $9}' /proc/stat; }
damon_states=(on off)
[ "$DAMON_WAS" = none ] && damon_states=(absent)
for i in $(seq "$R"); do
  for damon in "${damon_states[@]}"; do
    [ "$damon" = absent ] || set_damon "$damon"
    for mode in default fifo; do
      pre=()
      if [ "$mode" = fifo ]; then
        chrt -a -f -p 10 "$MPID" >/dev/null; chrt -a -f -p 10 "$NPID" >/dev/null; pre=(chrt -f 10)
      else
        chrt -a -o -p 0 "$MPID" >/dev/null; chrt -a -o -p 0 "$NPID" >/dev/null
      fi
      for b in node mosquitto; do
        p=$NP; [ "$b" = mosquitto ] && p=$MP
        s0=$(steal)
        r=$("${pre[@]}" ./target/release/mqtt-load --port "$p" --rate 1000 --duration "$D" --json 2>/dev/null |
          tail -1 | jq -r '[.latency_us.max, .latency_us.p999, .latency_us.p99] | @tsv')
        echo "round $i  damon $damon  $mode  $b  max/p99.9/p99 µs: $r  steal +$(($(steal) - s0))"
      done
    done
  done
done
