#!/usr/bin/env bash
# MQTT over TLS: the fedmesh node's TLS listener (mqtt.listen_tls) vs Debian's mosquitto with
# a TLS listener, each beside its own plain listener, so that the cost of TLS is measured on
# the same process.
#
# Runs the load generator (target/release/mqtt-load --tls-ca, crate bench/) against
#   node-tls     target/release/fedmesh run, defaults otherwise (proxy + embedded rumqttd,
#                direct delivery), mqtt.listen_tls with the certificate below;
#   mosq-tls     Debian's mosquitto 2.0.11 with the settings of bench-mqtt.sh
#                (scripts/bench-lib.sh, mosquitto_conf: set_tcp_nodelay true, ...) and a
#                second listener with cafile/certfile/keyfile;
#   node, mosquitto   the plain listeners of the same two processes.
# The certificate is self-signed, EC P-256, CN and SAN DNS:localhost, made by openssl in a
# temporary directory; clients connect to 127.0.0.1 and check the name localhost. It says
# basicConstraints CA:FALSE: openssl req -x509 marks it CA:TRUE by default (its v3_ca
# section), and rustls (webpki) refuses a CA certificate as the server's own
# ("invalid peer certificate: ... CaUsedAsEndEntity"), where OpenSSL clients accept it.
# Both brokers negotiate TLS 1.3 with rustls' client (the suite is in each run's JSON).
# Matrix (each cell REPS times, brokers interleaved, order reversed on even repetitions;
# medians), all 64 B, 1 -> 1:
#   QoS 0 as fast as possible (100 K messages), QoS 1 as fast as possible (50 K messages),
#   QoS 0 at a fixed 1 K msg/s for 5 s (latency from the scheduled send time).
# Prints markdown tables (also written to $OUT/results.md; every run's JSON, with the
# broker's CPU and the host's steal during the run, is in $OUT/runs.jsonl). About 2 minutes.
#
# Environment: REPS (3), OUT (target/bench-tls), BENCH_NO_BUILD (unset), NODE
# (target/release/fedmesh; e.g. a node built from another commit), LOAD
# (target/release/mqtt-load).
#
# mosquitto.conf: mosquitto_conf's lines (listener, global settings), then
#   listener TLSPORT 127.0.0.1
#   cafile / certfile / keyfile
# Settings after a listener line apply to it; set_tcp_nodelay, max_inflight_messages,
# max_queued_* and (without per_listener_settings) allow_anonymous are global, so both
# listeners share them. Run as root, mosquitto drops to the mosquitto user before it opens
# the certificate files: the temporary directory is made readable for it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

REPS=${REPS:-3}
OUT=${OUT:-$ROOT/target/bench-tls}
DRAIN=0.5s
LOAD=${LOAD:-$ROOT/target/release/mqtt-load}
NODE=${NODE:-$ROOT/target/release/fedmesh}

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (Debian)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

if [ -z "${BENCH_NO_BUILD:-}" ]; then
  cargo build --release -p fedmesh-node --bin fedmesh -p fedmesh-bench
fi
[ -x "$NODE" ] || { echo "missing $NODE (cargo build --release -p fedmesh-node --bin fedmesh)" >&2; exit 1; }
[ -x "$LOAD" ] || { echo "missing $LOAD (cargo build --release -p fedmesh-bench)" >&2; exit 1; }
"$LOAD" --help | grep -q -- --tls-ca || { echo "$LOAD has no --tls-ca: rebuild fedmesh-bench" >&2; exit 1; }

# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
bench_work # $WORK, and $PIDS to stop on exit

commit() {
  local c
  c=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    c+=" (working tree with uncommitted changes: $(git status --porcelain --untracked-files=no | awk '{print $2}' | tr '\n' ' '| sed 's/ $//'))"
  fi
  echo "$c"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
steal() { awk '/^cpu /{print $9}' /proc/stat; }

# ------------------------------------------------------------------ certificate
TLS=$WORK/tls
mkdir -p "$TLS"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost \
  -addext basicConstraints=critical,CA:FALSE \
  -keyout "$TLS/key.pem" -out "$TLS/cert.pem" 2>"$WORK/openssl.log" \
  || { cat "$WORK/openssl.log" >&2; exit 1; }
chmod 755 "$WORK" "$TLS"
chmod 644 "$TLS/cert.pem" "$TLS/key.pem"

# ------------------------------------------------------------------ brokers
declare -A PORT PID TLSARGS
BROKERS=(node-tls mosq-tls node mosquitto)

MP=$(free_port); MTP=$(free_port)
{
  mosquitto_conf "$MP" true
  echo "listener $MTP 127.0.0.1"
  echo "cafile $TLS/cert.pem"
  echo "certfile $TLS/cert.pem"
  echo "keyfile $TLS/key.pem"
} >"$WORK/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
MPID=$!
PIDS+=("$MPID")

NP=$(free_port); NTP=$(free_port); V5=$(free_port); HTTP=$(free_port)
env FEDMESH_DATA_DIR="$WORK/node-data" \
  FEDMESH_MQTT__LISTEN_V4="127.0.0.1:$NP" \
  FEDMESH_MQTT__LISTEN_V5="127.0.0.1:$V5" \
  FEDMESH_MQTT__LISTEN_TLS="127.0.0.1:$NTP" \
  FEDMESH_MQTT__TLS_CERT="$TLS/cert.pem" \
  FEDMESH_MQTT__TLS_KEY="$TLS/key.pem" \
  FEDMESH_HTTP__LISTEN="127.0.0.1:$HTTP" \
  FEDMESH_NODE__LOG=warn \
  "$NODE" run >"$WORK/node.log" 2>&1 &
NPID=$!
PIDS+=("$NPID")

for p in "$MP" "$MTP"; do
  wait_port "$p" "$MPID" || { cat "$WORK/mosquitto.log" >&2; exit 1; }
done
for p in "$NP" "$NTP"; do
  wait_port "$p" "$NPID" || { cat "$WORK/node.log" >&2; exit 1; }
done
PORT[mosquitto]=$MP; PORT[mosq-tls]=$MTP; PID[mosquitto]=$MPID; PID[mosq-tls]=$MPID
PORT[node]=$NP; PORT[node-tls]=$NTP; PID[node]=$NPID; PID[node-tls]=$NPID
TLSARGS[mosquitto]=""; TLSARGS[node]=""
TLSARGS[mosq-tls]="--tls-ca $TLS/cert.pem --tls-server-name localhost"
TLSARGS[node-tls]=${TLSARGS[mosq-tls]}
sleep 1 # let the node finish starting (p2p, store)

COMMIT=$(commit) # now: another commit may land while this runs
mkdir -p "$OUT"
RUNS=$OUT/runs.jsonl
: >"$RUNS"
START=$(date +%s)
STEAL0=$(steal)

run_one() { # cell rep broker args...
  local cell=$1 rep=$2 broker=$3 before after s0 s1 out tls
  shift 3
  read -r -a tls <<<"${TLSARGS[$broker]}"
  before=$(cpu_ticks "${PID[$broker]}")
  s0=$(steal)
  # Capture first, parse after the run: a jq started while the generator runs perturbs it.
  if ! out=$("$LOAD" --port "${PORT[$broker]}" --drain "$DRAIN" --json \
      --client-prefix "t$rep.$RANDOM" "${tls[@]}" "$@" 2>"$WORK/load.err"); then
    echo "  $cell rep $rep $broker: FAILED: $(tail -n 3 "$WORK/load.err")" >&2
    out='{"failed":true}'
  fi
  s1=$(steal)
  after=$(cpu_ticks "${PID[$broker]}")
  jq -c --arg cell "$cell" --arg broker "$broker" --argjson rep "$rep" \
    --argjson cpu "$((after - before))" --argjson steal "$((s1 - s0))" \
    '. + {cell: $cell, broker: $broker, rep: $rep, broker_cpu_s: ($cpu / 100), steal_ticks: $steal}' \
    <<<"$(tail -n 1 <<<"$out")" >>"$RUNS"
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

run_cell tput-q0 --qos 0 --size 64 --messages 100000
run_cell tput-q1 --qos 1 --size 64 --messages 50000
run_cell rate-1000 --qos 0 --size 64 --rate 1000 --duration 5s

STEAL1=$(steal)
ELAPSED=$(($(date +%s) - START))

# ------------------------------------------------------------------ report
report() {
  jq -rs '
    def median: map(select(. != null)) | sort | if length == 0 then null
      elif length % 2 == 1 then .[length / 2 | floor]
      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    def k: if . == null then "–" elif . >= 1000 then "\((. / 100 | round) / 10) K" else "\(round)" end;
    def lat: if . == null then "–" elif . >= 1000 then "\((. / 10 | round) / 100) ms" else "\(round) µs" end;
    def ratio($a; $b): if $a == null or $b == null or $b == 0 then "–" else "\(($a / $b * 100 | round) / 100)×" end;
    def us1: if . == null then "–" else "\((. * 10 | round) / 10)" end;
    def pct: if . == null then "–" elif . == 0 then "0" elif . < 0.01 then "<0.01 %" else "\((. * 100 | round) / 100) %" end;
    map(select(.failed | not)) as $runs
    | ($runs | group_by(.cell, .broker) | map({
        key: "\(.[0].cell)|\(.[0].broker)",
        value: {
          goodput: (map(.unique / .elapsed_s) | median),
          p50: (map(.latency_us.p50) | median),
          p99: (map(.latency_us.p99) | median),
          max: (map(.latency_us.max) | median),
          loss: (map(.loss_pct) | median),
          lossmax: (map(.loss_pct) | max),
          bcpu: (map(.broker_cpu_s * 1e6 / ([.unique, 1] | max)) | median),
          gcpu: (map(.generator_cpu_s * 1e6 / ([.unique, 1] | max)) | median)
        }}) | from_entries) as $m
    | def g($c; $b): $m["\($c)|\($b)"] // {};
      def cells: {c: "tput-q0", t: "QoS 0, as fast as possible, 100 K msgs"},
                 {c: "tput-q1", t: "QoS 1, as fast as possible, 50 K msgs"},
                 {c: "rate-1000", t: "QoS 0, 1 K msg/s for 5 s"};
      def hdr($first): "| \($first) | node TLS | mosquitto TLS | node plain | mosquitto plain | node TLS / plain | mosquitto TLS / plain | node TLS / mosquitto TLS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";
      def fmt($x; $kind): if $kind == "rate" then ($x | k) elif $kind == "cpu" then ($x | us1)
        elif $kind == "pct" then ($x | pct) else ($x | lat) end;
      def frow($title; $c; $key; $kind):
        [g($c; "node-tls")[$key], g($c; "mosq-tls")[$key], g($c; "node")[$key], g($c; "mosquitto")[$key]] as [$nt, $mt, $n, $mq]
        | "| \($title) | \(fmt($nt; $kind)) | \(fmt($mt; $kind)) | \(fmt($n; $kind)) | \(fmt($mq; $kind)) | "
          + if $kind == "pct" then "| | |"
            else "\(ratio($nt; $n)) | \(ratio($mt; $mq)) | \(ratio($nt; $mt)) |" end;
    "### MQTT over TLS, 64 B, 1 → 1: medians of \($runs | map(.rep) | max) runs per cell and broker",
    "",
    "TLS: \($runs | map(select(.tls)) | map(.tls_cipher_suite) | unique | join(", ")) (rustls client, self-signed P-256 certificate). Ratios are of the medians.",
    "",
    hdr("cell, metric"),
    frow("QoS 0 as fast as possible: msg/s"; "tput-q0"; "goodput"; "rate"),
    frow("QoS 0 as fast as possible: p50"; "tput-q0"; "p50"; "lat"),
    frow("QoS 0 as fast as possible: p99"; "tput-q0"; "p99"; "lat"),
    frow("QoS 0 as fast as possible: max"; "tput-q0"; "max"; "lat"),
    frow("QoS 0 as fast as possible: loss"; "tput-q0"; "loss"; "pct"),
    frow("QoS 1 as fast as possible: msg/s"; "tput-q1"; "goodput"; "rate"),
    frow("QoS 1 as fast as possible: p50"; "tput-q1"; "p50"; "lat"),
    frow("QoS 1 as fast as possible: p99"; "tput-q1"; "p99"; "lat"),
    frow("QoS 1 as fast as possible: max"; "tput-q1"; "max"; "lat"),
    frow("QoS 1 as fast as possible: loss"; "tput-q1"; "loss"; "pct"),
    frow("QoS 0 at 1 K msg/s: p50"; "rate-1000"; "p50"; "lat"),
    frow("QoS 0 at 1 K msg/s: p99"; "rate-1000"; "p99"; "lat"),
    frow("QoS 0 at 1 K msg/s: max"; "rate-1000"; "max"; "lat"),
    frow("QoS 0 at 1 K msg/s: loss"; "rate-1000"; "loss"; "pct"),
    "",
    "Throughput is delivered msg/s (all distinct deliveries / first publish to last delivery); latency is publish → delivery, from the scheduled send time at the fixed rate; loss is the median over the runs. QoS 0 is best effort: a broker may drop what a subscriber cannot take.",
    "",
    "### CPU: broker µs per delivered message (median)",
    "",
    hdr("cell"),
    (cells | frow(.t; .c; "bcpu"; "cpu")),
    "",
    "Generator µs per message (median), node TLS / mosquitto TLS / node plain / mosquitto plain: "
      + ([cells | .c as $c | "\($c) " + ([("node-tls", "mosq-tls", "node", "mosquitto") as $b | g($c; $b).gcpu | us1] | join(" / "))] | join("; ")),
    "",
    ( [$runs[] | select(.cell != "tput-q0") | select(.loss_pct > 0 or .duplicates > 0)] as $bad
      | if ($bad | length) == 0 then "QoS 1 and fixed-rate runs: no loss, no duplicates in any run."
        else "Loss or duplicates outside QoS 0 as fast as possible: " + ([$bad[] | "\(.cell) \(.broker) rep \(.rep): loss \(.loss_pct | pct), \(.duplicates) dup"] | join("; ")) end ),
    "Host steal during each run (ticks, median): " + ([("node-tls", "mosq-tls", "node", "mosquitto") as $b | "\($b) \([$runs[] | select(.broker == $b) | .steal_ticks] | median)"] | join(", ")) + ".",
    ( ($runs | map(select(.tls) | .tls_cipher_suite) | unique) as $s
      | if ($s | length) > 1 then "Warning: the brokers negotiated different suites: \($s | join(", "))" else empty end ),
    ( [.[] | select(.failed)] | length | if . > 0 then "Failed runs: \(.) (not in the medians)." else empty end )
  ' "$RUNS"
}


{
  echo "## Run"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) cores, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "- commit: $COMMIT"
  echo "- node: $NODE ($("$NODE" --version 2>/dev/null)); mosquitto: $("$MOSQUITTO" -h 2>/dev/null | head -1); $(openssl version 2>/dev/null)"
  echo "- repetitions: $REPS per cell and broker, interleaved; wall time $((ELAPSED / 60)) min $((ELAPSED % 60)) s; host steal during the runs: $((STEAL1 - STEAL0)) ticks ($(awk -v t=$((STEAL1 - STEAL0)) -v s="$ELAPSED" -v n="$(nproc)" 'BEGIN { if (s > 0) printf "%.1f", t / (s * n); else print "–" }') % of the CPUs)"
  echo
  report
} | tee "$OUT/results.md"
