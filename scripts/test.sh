#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests need when it is
# missing (Debian's mosquitto clients and iproute2, paho-mqtt from PyPI, the WordLlama weights from PyPI),
# then runs the tests with cargo-nextest (or cargo test when nextest is absent).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2) # the mDNS test's network namespaces
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (Debian)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if ! python3 -c 'import paho.mqtt' >/dev/null 2>&1; then
  echo "installing paho-mqtt (PyPI)" >&2
  python3 -m pip install -q 'paho-mqtt==2.2.0'
fi
if [ -x scripts/fetch-wordllama.sh ]; then
  scripts/fetch-wordllama.sh >/dev/null || echo "warning: WordLlama weights unavailable; neural-embedder tests will skip" >&2
  export FEDMESH_WORDLLAMA_DIR="${FEDMESH_WORDLLAMA_DIR:-$PWD/third_party/wordllama}"
fi

# The workspace integration tests (tests/) run the real `fedmesh` binary.
cargo build -p fedmesh-node --bin fedmesh

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
  cargo test --workspace --doc -q
else
  cargo test --workspace "$@"
fi

# The 1000-node registry-gossip simulation (issue #4.5) takes minutes and gigabytes in the debug
# profile, so it runs here in release, alone, after the rest. FEDMESH_SKIP_LARGE_SIM=1 skips it
# for quick local iterations; CI never sets it.
if [ "${FEDMESH_SKIP_LARGE_SIM:-0}" != 1 ]; then
  cargo test --release -q -p fedmesh-protocol --test sim thousand_nodes -- --nocapture
fi
