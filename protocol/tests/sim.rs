//! Seeded simulations of the registry gossip, asserting its invariants.
//!
//! The 1000-node scenario runs in release only (`protocol/sims/run.sh`); in the debug test
//! profile it would take minutes.

use fedmesh_protocol::sim::{self, Report, Scenario};

fn assert_clean(r: &Report) {
    assert_eq!(r.violations, 0, "{r}");
    assert_eq!(r.forged_accepted, 0, "{r}");
    assert!(r.checks >= 1, "{r}");
    assert_eq!(r.adverts, r.adverts_converged, "{r}");
}

fn assert_forger_refused(r: &Report) {
    assert!(r.forged_sent > 0, "{r}");
    for label in ["bad_signature", "host_mismatch"] {
        assert!(
            r.forger_outcomes.get(label).copied().unwrap_or(0) > 0,
            "no {label} refusal: {r}"
        );
    }
    let replays_refused = ["duplicate", "version_not_newer", "expired"]
        .iter()
        .map(|l| r.forger_outcomes.get(l).copied().unwrap_or(0))
        .sum::<u64>();
    assert!(replays_refused > 0, "replays never refused: {r}");
}

#[test]
fn twenty_nodes_with_churn_loss_withdrawal_and_forger() {
    let r = sim::run(Scenario::small(1));
    assert_clean(&r);
    assert_forger_refused(&r);
    assert!(r.lost_messages > 0 && r.direct_messages > 0, "{r}");
}

#[test]
fn hundred_nodes_with_churn_loss_withdrawal_and_forger() {
    let mut s = Scenario::medium(2);
    s.agents_per_node = 2;
    s.duration_ms = 75_000;
    let r = sim::run(s);
    assert_clean(&r);
    assert_forger_refused(&r);
    assert!(
        r.rmr > 1.0 && r.rmr < 6.0,
        "flooding on D=6 should give RMR ≈ D−2: {r}"
    );
}

#[test]
#[cfg_attr(debug_assertions, ignore = "release only: protocol/sims/run.sh")]
fn thousand_nodes() {
    let r = sim::run(Scenario::large(5, 3));
    // The report (convergence p50/p99, messages per node, RMR) goes to CI's log.
    println!("{r}");
    assert_clean(&r);
    assert_forger_refused(&r);
}

#[test]
fn same_seed_same_report() {
    let small = |seed| {
        let mut s = Scenario::small(seed);
        s.duration_ms = 40_000;
        s
    };
    let a = sim::run(small(7));
    let b = sim::run(small(7));
    assert_eq!(a, b);
    let c = sim::run(small(8));
    assert_ne!(
        a.messages, c.messages,
        "a different seed should change the run"
    );
}

#[test]
fn anti_entropy_alone_still_converges_but_slower() {
    let mut s = Scenario::base("20 nodes", 20, 3, 4);
    s.settle_ms = 20_000;
    let eager = sim::run(s.clone());
    let pull = sim::run(s.anti_entropy_only(1_000));
    assert_clean(&eager);
    assert_eq!(pull.violations, 0, "{pull}");
    assert!(
        pull.convergence_p50_ms > 10 * eager.convergence_p50_ms,
        "{eager}\n{pull}"
    );
}

#[test]
fn convergence_checker_catches_a_registry_that_cannot_spread() {
    // No eager push and no periodic anti-entropy: nothing spreads, the checker must say so.
    let mut s = Scenario::base("broken", 20, 2, 5);
    s.config.eager_push = false;
    s.config.anti_entropy_interval_ms = 0;
    let r = sim::run(s);
    assert!(r.violations > 0, "{r}");
    assert!(
        r.violation_samples.iter().any(|v| v.contains("lacks")),
        "{r}"
    );
}

#[test]
fn expiry_checker_catches_entries_that_outlive_their_ttl() {
    // Nodes that never tick never expire anything: the owner leaves, its VCVs must be flagged.
    let mut s = Scenario::base("no ticks", 10, 1, 6);
    s.tick_ms = 10_000_000;
    s.expiry_grace_ms = 1_000;
    s.settle_ms = 1_000;
    s.duration_ms = 90_000;
    s.churn = vec![sim::Churn {
        at_ms: 5_000,
        node: 0,
        kind: sim::ChurnKind::Leave,
    }];
    let r = sim::run(s);
    assert!(
        r.violation_samples.iter().any(|v| v.contains("expired")),
        "{r}"
    );
}
