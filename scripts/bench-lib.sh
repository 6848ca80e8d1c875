# Shared by the benchmark scripts (bench-mqtt.sh, bench-tls.sh, soak.sh, bench-max-1k.sh); source it.

USED_PORTS=" "

# A temporary directory, $WORK, and a list, $PIDS, of background processes: on exit the
# processes are stopped and waited for, and the directory is removed.
bench_work() {
  WORK=$(mktemp -d)
  PIDS=()
  trap bench_cleanup EXIT
}
bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}

# A free loopback TCP port, never one this script handed out before.
free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 40000))
    case "$USED_PORTS" in *" $p "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      USED_PORTS+="$p "
      echo "$p"
      return
    fi
  done
  echo "no free port found" >&2
  exit 1
}

wait_port() { # port pid
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    kill -0 "$2" 2>/dev/null || { echo "process $2 exited before listening on $1" >&2; return 1; }
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

# mosquitto's config for the comparisons (why each line: the header of bench-mqtt.sh).
mosquitto_conf() { # port nodelay(true|false)
  cat <<EOC
listener $1 127.0.0.1
allow_anonymous true
set_tcp_nodelay $2
max_inflight_messages 100
max_queued_messages 1000000
max_queued_bytes 1048576
persistence false
log_dest none
EOC
}
