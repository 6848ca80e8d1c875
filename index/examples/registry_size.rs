//! What a node holds per agent besides the index: the sealed VCV envelope and the registry
//! entry (decoded VCV + envelope bytes + map slot), measured by RSS delta.
//!
//! ```sh
//! cargo run --release -p fedmesh-index --example registry_size -- --n 100000
//! ```

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use fedmesh_protocol::registry::{Entry, Registry};
use fedmesh_protocol::{AgentId, AgentName, Message, content_id, sample, seal};

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--n")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(100_000);
    let now = 1_790_000_000_000u64;
    let key = sample::key(7);
    for (label, examples, vectors) in [
        ("sample VCV (2 examples)", 2usize, false),
        ("16 examples of ~48 B", 16, false),
        (
            "32 examples of ~48 B with their 32 example vectors (256-d)",
            32,
            true,
        ),
    ] {
        let mut v = sample::vcv(&key, "agent-0", 1, now);
        v.examples = (0..examples)
            .map(|i| format!("example request number {i:02} for this agent ok"))
            .collect();
        if vectors {
            // What the node fills from the examples' text (same space and dimension).
            let ex = fedmesh_protocol::vcv::ExampleVector {
                scale: v.capability.scale,
                q: v.capability.q.clone(),
            };
            v.example_vectors = vec![ex; examples];
        }
        v.normalise();
        let env = seal(&key, now, &Message::Advertise(v.clone())).unwrap();
        let id = content_id(&env).unwrap();
        let rss0 = rss_bytes();
        let mut reg = Registry::new(n + 1);
        for i in 0..n {
            let mut vi = v.clone();
            vi.agent = AgentId::new(key.node_id(), AgentName::new(format!("agent-{i}")).unwrap());
            reg.insert(
                Entry {
                    vcv: vi,
                    id,
                    envelope: env.clone(),
                },
                now,
            )
            .unwrap();
        }
        let rss1 = rss_bytes();
        println!(
            "{label}: envelope {} B, registry entry {:.0} B/agent (RSS Δ over {n})",
            env.len(),
            rss1.saturating_sub(rss0) as f64 / n as f64
        );
        drop(reg);
    }
}
