#!/usr/bin/env bash
# MQTT through the fedmesh node vs Debian's mosquitto (issues #3.9a and #6.1).
#
# Runs the same load generator (target/release/mqtt-load, crate bench/) against
#   mosquitto      Debian's mosquitto 2.0.11 on a free loopback port, settings below
#                  (with set_tcp_nodelay true: the reference for the goals);
#   mosq-nagle     the same without set_tcp_nodelay (mosquitto's default), which moves
#                  more messages per second at QoS 1 (fewer, fuller TCP segments);
#   node           target/release/fedmesh run (defaults: proxy + embedded rumqttd; the
#                  proxy delivers client -> client messages directly when it can);
#   node-rumqttd   (BENCH_DIAG=1, the default) the same node with mqtt.direct_delivery =
#                  false: every message passes through rumqttd (the path before direct
#                  delivery, and still the path of retained messages, persistent sessions
#                  and shared subscriptions).
# Matrix (each cell REPS times, brokers interleaved, order alternating; medians):
#   throughput, as fast as possible: QoS 0/1 x 64 B/1 KiB x 1->1/1->4 (fan-out);
#   latency at a fixed rate: QoS 0, 64 B, 1 K msg/s (5 s) and 50 K msg/s (3 s).
# Prints markdown tables (also written to $OUT/results.md; every run's JSON is in
# $OUT/runs.jsonl). About 3 minutes on 2 cores.
#
# Environment: REPS (3), OUT (target/bench-mqtt), BENCH_DIAG (1), BENCH_NO_BUILD (unset).
#
# mosquitto is configured to be comparable with the node:
#   listener PORT 127.0.0.1     loopback only, like the node's default listeners;
#   allow_anonymous true        the node allows anonymous clients on loopback;
#   set_tcp_nodelay true        the node's proxy sets TCP_NODELAY on client sockets;
#   max_inflight_messages 100   rumqttd's per-connection outgoing QoS 1 window in the node;
#   max_queued_bytes 1048576    a slow subscriber's backlog is bounded at 1 MiB, like the
#   max_queued_messages 1000000   node's commit log per filter (5 segments of 205 KiB with
#                               the default 256 MiB budget); the count limit is raised so
#                               that the byte limit applies (the default, 1000 messages,
#                               would bound 64 B messages at 64 KB);
#   persistence false, log_dest none   nothing durable in rumqttd either; node log = warn.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

REPS=${REPS:-3}
OUT=${OUT:-$ROOT/target/bench-mqtt}
DIAG=${BENCH_DIAG:-1}
DRAIN=0.5s
LOAD=$ROOT/target/release/mqtt-load
NODE=$ROOT/target/release/fedmesh

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (Debian)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

if [ -z "${BENCH_NO_BUILD:-}" ]; then
  cargo build --release -p fedmesh-node -p fedmesh-bench
fi
[ -x "$NODE" ] || { echo "missing $NODE (cargo build --release -p fedmesh-node)" >&2; exit 1; }
[ -x "$LOAD" ] || { echo "missing $LOAD (cargo build --release -p fedmesh-bench)" >&2; exit 1; }

# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
bench_work # $WORK, and $PIDS to stop on exit

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

declare -A PORT PID
BROKERS=(mosquitto mosq-nagle node)

start_mosquitto() { # name nodelay(true|false)
  local name=$1
  PORT[$name]=$(free_port)
  mosquitto_conf "${PORT[$name]}" "$2" >"$WORK/$name.conf"
  "$MOSQUITTO" -c "$WORK/$name.conf" >"$WORK/$name.log" 2>&1 &
  PID[$name]=$!
  PIDS+=("${PID[$name]}")
  wait_port "${PORT[$name]}" "${PID[$name]}"
}
start_mosquitto mosquitto true
start_mosquitto mosq-nagle false

start_node() { # name [direct_delivery]
  local name=$1 direct=${2:-true} data v5 http
  data=$(mktemp -d -p "$WORK")
  PORT[$name]=$(free_port); v5=$(free_port); http=$(free_port)
  env FEDMESH_MQTT__DIRECT_DELIVERY="$direct" \
    FEDMESH_DATA_DIR="$data" \
    FEDMESH_MQTT__LISTEN_V4="127.0.0.1:${PORT[$name]}" \
    FEDMESH_MQTT__LISTEN_V5="127.0.0.1:$v5" \
    FEDMESH_HTTP__LISTEN="127.0.0.1:$http" \
    FEDMESH_NODE__LOG=warn \
    "$NODE" run >"$WORK/$name.log" 2>&1 &
  PID[$name]=$!
  PIDS+=("${PID[$name]}")
  wait_port "${PORT[$name]}" "${PID[$name]}"
}
start_node node
if [ "$DIAG" = 1 ]; then
  start_node node-rumqttd false
  BROKERS+=(node-rumqttd)
fi
sleep 1 # let the nodes finish starting (p2p, store)

mkdir -p "$OUT"
RUNS=$OUT/runs.jsonl
: >"$RUNS"
START=$(date +%s)

run_one() { # cell rep broker args...
  local cell=$1 rep=$2 broker=$3 before after json
  shift 3
  before=$(cpu_ticks "${PID[$broker]}")
  if ! json=$("$LOAD" --port "${PORT[$broker]}" --drain "$DRAIN" --json \
      --client-prefix "b$rep.$RANDOM" "$@" 2>"$WORK/load.err"); then
    echo "  $cell rep $rep $broker: FAILED: $(tail -n 3 "$WORK/load.err")" >&2
    json='{"failed":true}'
  fi
  after=$(cpu_ticks "${PID[$broker]}")
  jq -c --arg cell "$cell" --arg broker "$broker" --argjson rep "$rep" \
    --argjson cpu "$((after - before))" \
    '. + {cell: $cell, broker: $broker, rep: $rep, broker_cpu_s: ($cpu / 100)}' \
    <<<"$json" >>"$RUNS"
}

run_cell() { # cell args...
  local cell=$1 rep b order
  shift
  echo "cell $cell: $*" >&2
  for rep in $(seq "$REPS"); do
    order=("${BROKERS[@]}")
    if [ $((rep % 2)) = 0 ]; then # reverse the order on even repetitions
      order=(); for b in "${BROKERS[@]}"; do order=("$b" "${order[@]}"); done
    fi
    for b in "${order[@]}"; do run_one "$cell" "$rep" "$b" "$@"; done
  done
}

# Throughput, as fast as possible. Counts are bounded so that QoS 0 runs measure moving
# messages rather than filling buffers: about 1.3 MB (64 B) and 5 MB (1 KiB) per run.
for qos in 1 0; do
  for size in 64 1024; do
    for subs in 1 4; do
      if [ "$qos" = 1 ]; then
        n=$([ "$subs" = 1 ] && echo 40000 || echo 20000)
      else
        n=$([ "$size" = 64 ] && echo 20000 || echo 5000)
      fi
      run_cell "tput-q$qos-s$size-f$subs" --qos "$qos" --size "$size" --subscribers "$subs" --messages "$n"
    done
  done
done
# Latency at a fixed rate.
run_cell "rate-1000" --qos 0 --size 64 --rate 1000 --duration 5s
run_cell "rate-50000" --qos 0 --size 64 --rate 50000 --duration 3s

ELAPSED=$(($(date +%s) - START))

# ------------------------------------------------------------------ report
report() {
  jq -rs '
    def median: map(select(. != null)) | sort | if length == 0 then null
      elif length % 2 == 1 then .[length / 2 | floor]
      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    def k: if . == null then "–" elif . >= 1000 then "\((. / 100 | round) / 10) K" else "\(round)" end;
    def lat: if . == null then "–" elif . >= 1000 then "\((. / 10 | round) / 100) ms" else "\(round) µs" end;
    def pct: if . == null then "–" elif . == 0 then "0" elif . < 0.01 then "<0.01 %" else "\((. * 100 | round) / 100) %" end;
    def ratio($a; $b): if $a == null or $b == null or $b == 0 then "–" else "\(($a / $b * 100 | round) / 100)×" end;
    def us1: if . == null then "–" else "\((. * 10 | round) / 10)" end;
    def names: {"mosquitto": "mosquitto", "mosq-nagle": "mosquitto (Nagle)", "node": "node", "node-rumqttd": "node (via rumqttd)"};
    map(select(.failed | not)) as $runs
    | ($runs | map(.broker) | unique) as $present
    | [("mosquitto", "mosq-nagle", "node", "node-rumqttd") as $b | select($present | index($b)) | $b] as $B
    | ($runs | group_by(.cell, .broker) | map({
        key: "\(.[0].cell)|\(.[0].broker)",
        value: {
          goodput: (map(.unique / .elapsed_s) | median),
          p50: (map(.latency_us.p50) | median),
          p99: (map(.latency_us.p99) | median),
          p999: (map(.latency_us.p999) | median),
          max: (map(.latency_us.max) | median),
          wmax: (map(.latency_from_write_us.max // null) | median),
          lagmax: (map(.send_lag_us.max // null) | median),
          loss: (map(.loss_pct) | median),
          lossmax: (map(.loss_pct) | max),
          bcpu: (map(.broker_cpu_s * 1e6 / ([.unique, 1] | max)) | median),
          butil: (map(.broker_cpu_s * 100 / .elapsed_s) | median),
          gcpu: (map(.generator_cpu_s * 1e6 / ([.unique, 1] | max)) | median)
        }}) | from_entries) as $m
    | def g($c; $b): $m["\($c)|\($b)"] // {};
      def tput_cells: ["1", "0"][] as $q | ["64", "1024"][] as $s | ["1", "4"][] as $f
        | {c: "tput-q\($q)-s\($s)-f\($f)", q: $q, s: (if $s == "64" then "64 B" else "1 KiB" end), f: $f};
      def hdr($first; $cols): ("| \($first) | " + ($cols | join(" | ")) + " |"),
        ("| --- | " + ($cols | map("---:") | join(" | ")) + " |");
    "### Throughput, as fast as possible: delivered msg/s (all subscribers), median of \($runs | map(.rep) | max)",
    "",
    hdr("QoS, size, 1 → N, msgs"; [$B[] | names[.]] + ["node / mosquitto", "node / mosquitto (Nagle)", "node loss: median (worst)"]),
    ( tput_cells as $t
      | "| QoS \($t.q), \($t.s), 1 → \($t.f), \($runs | map(select(.cell == $t.c)) | .[0].sent | k) | "
        + ([$B[] as $b | g($t.c; $b).goodput | k] | join(" | "))
        + " | \(ratio(g($t.c; "node").goodput; g($t.c; "mosquitto").goodput)) | \(ratio(g($t.c; "node").goodput; g($t.c; "mosq-nagle").goodput)) | \(g($t.c; "node").loss | pct) (\(g($t.c; "node").lossmax | pct)) |"
    ),
    "",
    "### The same runs: latency p50 / p99 and loss (median)",
    "",
    hdr("QoS, size, 1 → N"; [$B[] | names[.]]),
    ( tput_cells as $t
      | "| QoS \($t.q), \($t.s), 1 → \($t.f) | "
        + ([$B[] as $b | g($t.c; $b) | "\(.p50 | lat) / \(.p99 | lat), loss \(.loss | pct)"] | join(" | ")) + " |"
    ),
    "",
    "### Latency at a fixed rate, QoS 0, 64 B, 1 → 1: p50 / p99 / p99.9 / max from the scheduled send time (median)",
    "",
    hdr("rate"; [$B[] | names[.]] + ["node / mosquitto p99", "node / mosquitto max"]),
    ( ["1000", "50000"][] as $r | "rate-\($r)" as $c
      | "| \($r | tonumber | k) msg/s | "
        + ([$B[] as $b | g($c; $b) | "\(.p50 | lat) / \(.p99 | lat) / \(.p999 | lat) / \(.max | lat)"] | join(" | "))
        + " | \(ratio(g($c; "node").p99; g($c; "mosquitto").p99)) | \(ratio(g($c; "node").max; g($c; "mosquitto").max)) |"
    ),
    "",
    "The same runs: max latency measured from the actual write (without the generator lateness) / the largest generator lateness (median):",
    "",
    hdr("rate"; [$B[] | names[.]]),
    ( ["1000", "50000"][] as $r | "rate-\($r)" as $c
      | "| \($r | tonumber | k) msg/s | " + ([$B[] as $b | g($c; $b) | "\(.wmax | lat) / \(.lagmax | lat)"] | join(" | ")) + " |"
    ),
    "",
    "### CPU: broker µs per delivered message (broker CPU, % of one core) / generator µs per message (median)",
    "",
    hdr("cell"; [$B[] | names[.]]),
    ( ([tput_cells | .c] + ["rate-1000", "rate-50000"])[] as $c
      | "| \($c) | " + ([$B[] as $b | g($c; $b) | "\(.bcpu | us1) (\(.butil | if . == null then "–" else round end) %) / \(.gcpu | us1)"] | join(" | ")) + " |"
    ),
    "",
    "### Goals",
    "",
    ( [tput_cells | .c as $c | g($c; "node") as $n
        | {c: $c, a: (g($c; "mosquitto").goodput != null and $n.goodput >= g($c; "mosquitto").goodput),
           b: (g($c; "mosq-nagle").goodput != null and $n.goodput >= g($c; "mosq-nagle").goodput),
           lossless: ($n.lossmax == 0), mlossless: (g($c; "mosquitto").lossmax == 0)}] as $g
      | "- #3 node throughput ≥ mosquitto: \($g | map(select(.a)) | length) of 8 cells (≥ mosquitto with Nagle: \($g | map(select(.b)) | length) of 8); node without loss in every run: \($g | map(select(.lossless)) | length) of 8 cells (mosquitto: \($g | map(select(.mlossless)) | length) of 8)"
    ),
    ( g("rate-1000"; "node") as $n
      | "- #6 max ≤ 2 ms at 1 K msg/s: node \($n.max | lat) (mosquitto \(g("rate-1000"; "mosquitto").max | lat)): " + (if $n.max != null and $n.max <= 2000 then "MET" else "NOT MET" end) ),
    ( g("rate-50000"; "node") as $n | g("rate-50000"; "mosquitto") as $a
      | "- #6 p99 ≤ 1.5 × mosquitto-with-nodelay at 50 K msg/s: node \($n.p99 | lat) vs \($a.p99 | lat) (\(ratio($n.p99; $a.p99))): "
        + (if $n.p99 != null and $a.p99 != null and $n.p99 <= 1.5 * $a.p99 then "MET" else "NOT MET" end) )
  ' "$RUNS"
}

{
  echo "## Run"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) cores, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "- mosquitto: $("$MOSQUITTO" -h 2>/dev/null | head -1); node: $("$NODE" --version 2>/dev/null); $(rustc --version 2>/dev/null || true)"
  echo "- repetitions: $REPS per cell and broker, interleaved; wall time $((ELAPSED / 60)) min $((ELAPSED % 60)) s"
  echo
  report
} | tee "$OUT/results.md"
