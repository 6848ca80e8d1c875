#!/usr/bin/env bash
# Context switches per cross-node task, by thread class, summed over the nodes' processes, and
# the nodes' CPU time per task (BENCHMARKS.md, "Wake-ups per task"). Runs `federation_hops`
# (one task at a time, A → C) with target/release/fedmesh, reads every node thread's voluntary
# + involuntary switch counts and the processes' user + system time from /proc twice, 3 s
# apart, and divides by the tasks submitted at A in between.
#
#   cargo build --release -p fedmesh-node --bin fedmesh -p fedmesh-tests --example federation_hops
#   tests/examples/ctx_per_task.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
FEDMESH_TEST_LOG=warn,fedmesh_hop=debug timeout 300 \
    ./target/release/examples/federation_hops 8000 "$out/hops" >/dev/null 2>&1 &
run=$!
sleep 9
snap() {
    for p in $(pgrep -x fedmesh); do
        for t in /proc/"$p"/task/*; do
            n=$(cat "$t/comm" 2>/dev/null) || continue
            c=$(awk '/ctxt_switches/ {s += $2} END {print s}' "$t/status" 2>/dev/null) || continue
            echo "$n $c"
        done
    done | awk '{sub(/-[0-9]+$/, "", $1); a[$1] += $2} END {for (k in a) print k, a[k]}' | sort
}
cpu() { for p in $(pgrep -x fedmesh); do awk '{print $14 + $15}' /proc/"$p"/stat; done | awk '{s += $1} END {print s}'; }
s1=$(snap); c1=$(cpu); t1=$(date +%s.%N)
sleep 3
s2=$(snap); c2=$(cpu); t2=$(date +%s.%N)
hz=$(getconf CLK_TCK)
wait "$run" || true
python3 - "$s1" "$s2" "$t1" "$t2" "$out/hops/a.log" "$c1" "$c2" "$hz" <<'PY'
import datetime, re, sys
s1 = dict(l.rsplit(" ", 1) for l in sys.argv[1].splitlines())
s2 = dict(l.rsplit(" ", 1) for l in sys.argv[2].splitlines())
t1, t2 = float(sys.argv[3]), float(sys.argv[4])
n = 0
for line in open(sys.argv[5]):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if "op=submit" not in line:
        continue
    ts = re.search(r"(\d{4}-\d\d-\d\dT[\d:.]+)Z", line).group(1)
    at = datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp()
    n += t1 <= at < t2
if n == 0:
    sys.exit("no task submitted in the window (did the run start?)")
print(f"tasks in the window: {n}")
total = 0
for k in sorted(s2):
    d = int(s2[k]) - int(s1.get(k, 0))
    total += d
    print(f"{k:20} {d / n:6.1f} per task")
print(f"{'all':20} {total / n:6.1f} per task")
cpu_ms = (int(sys.argv[7]) - int(sys.argv[6])) / int(sys.argv[8]) * 1000
print(f"{'CPU (both nodes)':20} {cpu_ms / n:6.3f} ms per task")
PY
