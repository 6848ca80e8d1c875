#!/usr/bin/env bash
# QoS 0 flood soak (issue #6.3): bounded memory under a flood towards a slow subscriber,
# with QoS 1 traffic alongside, through the fedmesh node and, for comparison, mosquitto.
#
# For each broker (node first, then mosquitto), two target/release/mqtt-load runs at once:
#   flood   QoS 0, $SIZE B payloads, one publisher as fast as possible for $DURATION, one
#           subscriber consuming at most one message per $SUB_DELAY_US µs (a slow
#           subscriber, which stops at most $DRAIN_MAX after the flood: what it has not
#           received by then counts as lost); it samples the broker's RSS (VmRSS) every
#           second (--rss-pid) until then;
#   qos1    QoS 1, $Q1_SIZE B, one publisher at a fixed $Q1_RATE msg/s for $DURATION, one
#           ordinary subscriber, on another topic: does QoS 1 keep flowing meanwhile?
# The node runs with FEDMESH_MQTT__MEMORY_BUDGET_MB=$BUDGET_MB and log level warn; its
# /metrics is scraped at the end (fedmesh_broker_dropped_total{reason="slow_subscriber"},
# fedmesh_broker{kind="inbound_dropped"|"outbound_dropped"}). The node's max RSS is checked
# against budget + margin, margin = $MARGIN_BASE_MB + $MARGIN_PCT % of the budget (see
# "Memory the budget does not cover" in broker/src/settings.rs). mosquitto gets the
# settings of scripts/bench-mqtt.sh (slow subscriber's queue bounded at 1 MiB).
#
# Output: a markdown summary on stdout and in $OUT/results.md, each run's JSON in
# $OUT/*.json, the node's log in $OUT/node.log and its last /metrics in $OUT/metrics.txt.
# Exit status 1 when the node's RSS exceeded budget + margin or QoS 1 stopped flowing.
#
# Environment: BUDGET_MB (64), DURATION (60s), SIZE (1024), SUB_DELAY_US (100),
# DRAIN_MAX (10s), Q1_RATE (500), Q1_SIZE (256), MARGIN_BASE_MB (64), MARGIN_PCT (25),
# OUT (target/soak), BROKERS ("node mosquitto"), BENCH_NO_BUILD (unset).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BUDGET_MB=${BUDGET_MB:-64}
DURATION=${DURATION:-60s}
SIZE=${SIZE:-1024}
SUB_DELAY_US=${SUB_DELAY_US:-100}
DRAIN_MAX=${DRAIN_MAX:-10s}
Q1_RATE=${Q1_RATE:-500}
Q1_SIZE=${Q1_SIZE:-256}
MARGIN_BASE_MB=${MARGIN_BASE_MB:-64}
MARGIN_PCT=${MARGIN_PCT:-25}
OUT=${OUT:-$ROOT/target/soak}
BROKERS=${BROKERS:-node mosquitto}
LOAD=$ROOT/target/release/mqtt-load
NODE=$ROOT/target/release/fedmesh
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

for t in jq curl; do
  command -v $t >/dev/null || { echo "soak.sh needs $t" >&2; exit 1; }
done
if [ -z "${BENCH_NO_BUILD:-}" ]; then
  cargo build --release -p fedmesh-node -p fedmesh-bench
fi
[ -x "$NODE" ] && [ -x "$LOAD" ] || { echo "missing $NODE or $LOAD" >&2; exit 1; }

mkdir -p "$OUT"
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
bench_work # $WORK, and $PIDS to stop on exit
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

soak() { # name port pid
  local name=$1 port=$2 pid=$3
  echo "soak $name: QoS 0 $SIZE B flood to a subscriber at 1 msg / $SUB_DELAY_US µs, QoS 1 $Q1_RATE msg/s alongside, $DURATION" >&2
  "$LOAD" --port "$port" --qos 0 --size "$SIZE" --duration "$DURATION" \
    --sub-delay-us "$SUB_DELAY_US" --topic soak/flood --client-prefix "flood.$RANDOM" \
    --rss-pid "$pid" --drain 2s --drain-max "$DRAIN_MAX" --json >"$OUT/$name-flood.json" 2>"$OUT/$name-flood.err" &
  local flood=$!
  "$LOAD" --port "$port" --qos 1 --size "$Q1_SIZE" --rate "$Q1_RATE" --duration "$DURATION" \
    --topic soak/q1 --client-prefix "q1.$RANDOM" --drain 5s --json \
    >"$OUT/$name-qos1.json" 2>"$OUT/$name-qos1.err" &
  local q1=$!
  wait "$flood" || { echo "flood run against $name failed: $(tail -n 3 "$OUT/$name-flood.err")" >&2; return 1; }
  wait "$q1" || { echo "QoS 1 run against $name failed: $(tail -n 3 "$OUT/$name-qos1.err")" >&2; return 1; }
}

declare -A IDLE
for b in $BROKERS; do
  case $b in
    node)
      data=$(mktemp -d -p "$WORK")
      port=$(free_port); v5=$(free_port); http=$(free_port)
      FEDMESH_DATA_DIR="$data" \
        FEDMESH_MQTT__LISTEN_V4="127.0.0.1:$port" \
        FEDMESH_MQTT__LISTEN_V5="127.0.0.1:$v5" \
        FEDMESH_HTTP__LISTEN="127.0.0.1:$http" \
        FEDMESH_MQTT__MEMORY_BUDGET_MB="$BUDGET_MB" \
        FEDMESH_NODE__LOG=warn \
        "$NODE" run >"$OUT/node.log" 2>&1 &
      pid=$!; PIDS+=("$pid")
      wait_port "$port" "$pid"
      sleep 2 # p2p, store
      IDLE[node]=$(rss_kib "$pid")
      soak node "$port" "$pid"
      curl -fsS "http://127.0.0.1:$http/metrics" >"$OUT/metrics.txt"
      kill "$pid"; wait "$pid" 2>/dev/null || true
      ;;
    mosquitto)
      port=$(free_port)
      mosquitto_conf "$port" true >"$WORK/mosquitto.conf"
      "$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
      pid=$!; PIDS+=("$pid")
      wait_port "$port" "$pid"
      IDLE[mosquitto]=$(rss_kib "$pid")
      soak mosquitto "$port" "$pid"
      kill "$pid"; wait "$pid" 2>/dev/null || true
      ;;
    *) echo "unknown broker $b" >&2; exit 1 ;;
  esac
done

# ------------------------------------------------------------------ report
metric() { # name with labels -> value (0 when absent)
  awk -v m="$1" '$1 == m {print $2; found=1} END {if (!found) print 0}' "$OUT/metrics.txt"
}
FAIL=0
{
  echo "### QoS 0 flood soak: $DURATION, budget $BUDGET_MB MiB ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "| broker | idle RSS | max RSS | last RSS | flood sent (msg/s) | flood delivered | flood lost (by end + $DRAIN_MAX) | QoS 1 delivered (msg/s) | QoS 1 loss | QoS 1 p50 / p99 / max |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for b in $BROKERS; do
    jq -rn --slurpfile f "$OUT/$b-flood.json" --slurpfile q "$OUT/$b-qos1.json" \
      --arg b "$b" --argjson idle "${IDLE[$b]}" '
      def mib: "\((. / 1024 * 10 | round) / 10) MiB";
      def lat: if . >= 1000 then "\((. / 10 | round) / 100) ms" else "\(round) µs" end;
      $f[0] as $f | $q[0] as $q |
      "| \($b) | \($idle | mib) | \($f.rss.max_kib | mib) | \($f.rss.last_kib | mib) | \($f.sent) (\($f.send_rate | round)) | \($f.unique) | \(($f.loss_pct * 100 | round) / 100) % | \($q.unique) of \($q.sent) (\($q.recv_rate | round)) | \(($q.loss_pct * 1000 | round) / 1000) % | \($q.latency_us.p50 | lat) / \($q.latency_us.p99 | lat) / \($q.latency_us.max | lat) |"'
  done
  echo
  if [[ " $BROKERS " == *" node "* ]]; then
    max=$(jq .rss.max_kib "$OUT/node-flood.json")
    limit=$(( (BUDGET_MB + MARGIN_BASE_MB + BUDGET_MB * MARGIN_PCT / 100) * 1024 ))
    dropped=$(metric 'fedmesh_broker_dropped_total{reason="slow_subscriber"}')
    jumps=$(metric 'fedmesh_broker_drop_events_total{reason="slow_subscriber"}')
    inb=$(metric 'fedmesh_broker{kind="inbound_dropped"}')
    outb=$(metric 'fedmesh_broker{kind="outbound_dropped"}')
    lost=$(jq .lost "$OUT/node-flood.json")
    q1loss=$(jq .lost "$OUT/node-qos1.json")
    q1sent=$(jq .sent "$OUT/node-qos1.json")
    summaries=$(grep -c 'fedmesh::droplog' "$OUT/node.log" || true)
    echo "- node max RSS $((max / 1024)) MiB vs limit $((limit / 1024)) MiB = budget $BUDGET_MB + $MARGIN_BASE_MB + $MARGIN_PCT % of the budget: $([ "$max" -le "$limit" ] && echo OK || echo EXCEEDED)"
    echo "- /metrics: fedmesh_broker_dropped_total{reason=\"slow_subscriber\"} = $dropped in $jumps cursor jumps; broker inbound_dropped = $inb, outbound_dropped = $outb; the flood subscriber missed $lost"
    echo "- node log: $summaries droplog summary lines (at most one a second)"
    echo "- QoS 1 kept flowing: $(jq .unique "$OUT/node-qos1.json") of $q1sent delivered, $q1loss lost"
    [ "$max" -le "$limit" ] || FAIL=1
    [ "$q1sent" -gt 0 ] && [ "$(jq '.unique * 100 >= .sent * 99' "$OUT/node-qos1.json")" = true ] || FAIL=1
  fi
} | tee "$OUT/results.md"
exit $FAIL
