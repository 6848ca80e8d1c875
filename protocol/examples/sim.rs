//! Runs the registry gossip simulator and prints its report beside a baseline run with eager
//! push off (anti-entropy alone), on the same mesh, seed and churn.
//!
//! ```sh
//! cargo run --release -p fedmesh-protocol --example sim -- --nodes 1000 --agents 5 --seed 1
//! ```
//!
//! `--nodes 20|100` run the eventful scenarios (churn, loss, withdrawals, a forger, 150 s);
//! any other count runs the 1000-node shape (20 s). `--baseline-ae-ms N` sets the baseline's
//! anti-entropy period (default 1000); `--no-baseline` skips it.

use std::time::Instant;

use fedmesh_protocol::sim::{self, Scenario};

fn main() {
    let mut nodes = 1000usize;
    let mut agents = 5usize;
    let mut seed = 1u64;
    let mut baseline_ae_ms = 1000u64;
    let mut baseline = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u64 {
            match args.next().map(|v| v.parse::<u64>()) {
                Some(Ok(v)) => v,
                _ => {
                    eprintln!("{name} needs a number");
                    std::process::exit(2);
                }
            }
        };
        match a.as_str() {
            "--nodes" => nodes = num("--nodes") as usize,
            "--agents" => agents = num("--agents") as usize,
            "--seed" => seed = num("--seed"),
            "--baseline-ae-ms" => baseline_ae_ms = num("--baseline-ae-ms"),
            "--no-baseline" => baseline = false,
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let scenario = match nodes {
        20 | 100 => Scenario::eventful(&format!("{nodes} nodes"), nodes, agents, seed),
        n => {
            let mut s = Scenario::large(agents, seed);
            s.nodes = n;
            s.name = format!("{n} nodes");
            s.config.max_agents = (n * agents * 2).max(16);
            s.churn.retain(|c| c.node < n);
            s
        }
    };
    let t = Instant::now();
    let eager = sim::run(scenario.clone());
    let eager_s = t.elapsed().as_secs_f64();
    println!("{eager}\n  wall: {eager_s:.1} s\n");
    if !baseline {
        return;
    }
    let t = Instant::now();
    let base = sim::run(scenario.anti_entropy_only(baseline_ae_ms));
    let base_s = t.elapsed().as_secs_f64();
    println!("{base}\n  wall: {base_s:.1} s\n");
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "baseline / eager: convergence p50 {:.1}x, p99 {:.1}x; messages per node {:.2}x; bytes per node {:.2}x",
        ratio(
            base.convergence_p50_ms as f64,
            eager.convergence_p50_ms as f64
        ),
        ratio(
            base.convergence_p99_ms as f64,
            eager.convergence_p99_ms as f64
        ),
        ratio(base.messages_per_node, eager.messages_per_node),
        ratio(base.bytes_per_node, eager.bytes_per_node),
    );
}
