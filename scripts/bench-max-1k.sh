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
# left as it was found). Prints one line per run: max, p99.9 and p99 in µs from the
# scheduled send time, the max from the actual write and the generator's largest lateness
# (their difference is the generator's own delay), and the host's steal ticks during the run.
# Brokers: the node, the node with mqtt.direct_delivery = false (every message through
# rumqttd), mosquitto, and `mqtt-floor` (bench/src/bin/mqtt-floor.rs: a relay that does the
# least a broker can, so its figures are the generator's and the host's floor).
# BROKERS ("node node-rumqttd mosquitto floor") narrows the brokers.
# DAMON_STATES ("on off") and MODES ("default fifo") narrow the matrix, e.g.
# DAMON_STATES=on MODES=default for the machine as it is (no root needed then).
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
RP=$(free_port); V5=$(free_port); H=$(free_port)
FEDMESH_DATA_DIR=$WORK/r FEDMESH_MQTT__LISTEN_V4=127.0.0.1:$RP FEDMESH_MQTT__LISTEN_V5=127.0.0.1:$V5 \
  FEDMESH_HTTP__LISTEN=127.0.0.1:$H FEDMESH_NODE__LOG=warn FEDMESH_MQTT__DIRECT_DELIVERY=false \
  ./target/release/fedmesh run >"$WORK/r.log" 2>&1 &
RPID=$!
FP=$(free_port)
./target/release/mqtt-floor --port "$FP" >"$WORK/f.log" 2>&1 &
FPID=$!
DAMON=/sys/kernel/mm/damon/admin/kdamonds/0/state
DAMON_WAS=$(cat "$DAMON" 2>/dev/null || echo none)
# Writing the state it already has fails (EBUSY).
set_damon() { [ "$(cat "$DAMON")" = "$1" ] || echo "$1" >"$DAMON"; }
restore() {
  [ "$DAMON_WAS" = none ] || set_damon "$DAMON_WAS" || true
  kill "$MPID" "$NPID" "$RPID" "$FPID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap restore EXIT
wait_port "$MP" "$MPID"
wait_port "$NP" "$NPID"
wait_port "$RP" "$RPID"
wait_port "$FP" "$FPID"
sleep 1 # let the node finish starting (p2p, store)
steal() { awk '/^cpu /{print $9}' /proc/stat; }
read -r -a damon_states <<<"${DAMON_STATES:-on off}"
read -r -a modes <<<"${MODES:-default fifo}"
read -r -a brokers <<<"${BROKERS:-node node-rumqttd mosquitto floor}"
[ "$DAMON_WAS" = none ] && damon_states=(absent)
for i in $(seq "$R"); do
  for damon in "${damon_states[@]}"; do
    [ "$damon" = absent ] || set_damon "$damon"
    for mode in "${modes[@]}"; do
      pre=()
      if [ "$mode" = fifo ]; then
        for p in "$MPID" "$NPID" "$RPID" "$FPID"; do chrt -a -f -p 10 "$p" >/dev/null; done
        pre=(chrt -f 10)
      elif [ "${MODES:-}" != default ]; then
        for p in "$MPID" "$NPID" "$RPID" "$FPID"; do chrt -a -o -p 0 "$p" >/dev/null; done
      fi
      for b in "${brokers[@]}"; do
        case $b in node) p=$NP ;; node-rumqttd) p=$RP ;; floor) p=$FP ;; *) p=$MP ;; esac
        s0=$(steal)
        # Capture first, parse after: piping into jq started jq (≈ 5 ms of CPU) during the
        # run's first milliseconds, and the broker thread woken on that CPU waited for it.
        out=$("${pre[@]}" ./target/release/mqtt-load --port "$p" --rate 1000 --duration "$D" --json 2>/dev/null)
        r=$(tail -1 <<<"$out" | jq -r '[.latency_us.max, .latency_us.p999, .latency_us.p99, .latency_from_write_us.max, .send_lag_us.max] | @tsv')
        echo "round $i  damon $damon  $mode  $b  max/p99.9/p99 µs: $(cut -f1-3 <<<"$r")  max from write / generator lateness µs: $(cut -f4-5 <<<"$r")  steal +$(($(steal) - s0))"
      done
    done
  done
done
