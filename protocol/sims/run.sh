#!/bin/sh
# Runs every registry gossip simulation, including the 1000-node one (release only), and prints
# the reports with their baselines. Usage: protocol/sims/run.sh [seed]
set -eu
seed="${1:-1}"
cargo test --release -p fedmesh-protocol --test sim
for n in 20 100 1000; do
    cargo run --release -q -p fedmesh-protocol --example sim -- --nodes "$n" --agents 5 --seed "$seed"
    echo
done
