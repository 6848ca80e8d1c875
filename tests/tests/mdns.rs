//! mDNS discovery between two real nodes (issue #4.1, `p2p.mdns`), each in a network namespace
//! of its own joined by a veth pair: the LAN that libp2p-mdns needs (it skips loopback, and
//! tests may talk only to loopback or to namespaces they create). Neither node has a bootstrap
//! peer; an agent on node B serves a task submitted at node A once they found each other.
//!
//! Needs `ip` (iproute2) and CAP_NET_ADMIN (root), as `.ci/run` has; without them the test
//! says so and passes without running (`FEDMESH_REQUIRE_NETNS=1` makes that a failure).

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fedmesh_tests::fedmesh_bin;

/// Two namespaces and the veth pair between them, removed on drop.
struct Lan {
    ns: [String; 2],
}

fn ip(args: &[&str]) -> std::io::Result<Output> {
    Command::new("ip").args(args).output()
}

fn ok(args: &[&str]) -> Result<(), String> {
    match ip(args) {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("ip {}: {e}", args.join(" "))),
    }
}

impl Lan {
    /// `10.231.X.1/24` in the first namespace, `10.231.X.2/24` in the second.
    fn create(subnet: u8) -> Result<Self, String> {
        let tag = std::process::id();
        let lan = Self {
            ns: [format!("fmmdns{tag}a"), format!("fmmdns{tag}b")],
        };
        for n in &lan.ns {
            ok(&["netns", "add", n])?;
        }
        let (va, vb) = (format!("fmv{tag}a"), format!("fmv{tag}b"));
        ok(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        for (i, (n, v)) in lan.ns.iter().zip([&va, &vb]).enumerate() {
            ok(&["link", "set", v, "netns", n])?;
            let addr = format!("10.231.{subnet}.{}/24", i + 1);
            ok(&["-n", n, "addr", "add", &addr, "dev", v])?;
            ok(&["-n", n, "link", "set", v, "multicast", "on", "up"])?;
            ok(&["-n", n, "link", "set", "lo", "up"])?;
        }
        Ok(lan)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// A `fedmesh` command run inside namespace `ns`, with a node's environment.
fn in_ns(ns: &str, data: &std::path::Path, p2p_ip: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(fedmesh_bin())
        .env("FEDMESH_DATA_DIR", data)
        .env("FEDMESH_MQTT__LISTEN_V4", "127.0.0.1:1883")
        .env("FEDMESH_MQTT__LISTEN_V5", "127.0.0.1:1884")
        .env("FEDMESH_HTTP__LISTEN", "127.0.0.1:8080")
        .env("FEDMESH_P2P__LISTEN", format!("/ip4/{p2p_ip}/tcp/4001"))
        .env("FEDMESH_P2P__MDNS", "true")
        .env_remove("FEDMESH_P2P__BOOTSTRAP")
        .env_remove("FEDMESH_CONFIG");
    c
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn nodes_on_a_lan_find_each_other_by_mdns_and_route_a_task() {
    let lan = match Lan::create(7) {
        Ok(l) => l,
        Err(why) => {
            assert!(
                std::env::var("FEDMESH_REQUIRE_NETNS").is_err(),
                "network namespaces unavailable: {why}"
            );
            eprintln!("skipped: network namespaces unavailable ({why})");
            return;
        }
    };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let ips = ["10.231.7.1", "10.231.7.2"];
    let mut procs = Killed(Vec::new());
    for i in 0..2 {
        let log = std::fs::File::create(dirs[i].path().join("node.log")).unwrap();
        let child = in_ns(&lan.ns[i], dirs[i].path(), ips[i])
            .arg("run")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ip netns exec fedmesh run");
        procs.0.push(child);
    }
    let logs = || {
        dirs.iter()
            .map(|d| std::fs::read_to_string(d.path().join("node.log")).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---- next node ----\n")
    };
    // The agent on B: upper-cases its input.
    std::thread::sleep(Duration::from_secs(1));
    let agent = in_ns(&lan.ns[1], dirs[1].path(), ips[1])
        .args(["agent", "exec", "--name", "shouter"])
        .args([
            "--describe",
            "Converts text to upper case",
            "--",
            "tr",
            "a-z",
            "A-Z",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent exec");
    procs.0.push(agent);

    // A has no bootstrap peer: only mDNS can make B's agent reachable from it.
    let start = Instant::now();
    loop {
        let out = in_ns(&lan.ns[0], dirs[0].path(), ips[0])
            .args(["task", "submit", "make this text upper case"])
            .args(["--input", "hello lan", "--deadline-s", "5"])
            .env("RUST_LOG", "warn")
            .output()
            .expect("task submit");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && stdout == "HELLO LAN" {
            break;
        }
        let last = format!(
            "status {:?}, stdout {stdout:?}, stderr {:?}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no result through mDNS within 60 s; last attempt: {last}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let a_log = std::fs::read_to_string(dirs[0].path().join("node.log")).unwrap();
    assert!(
        a_log.contains("found by mDNS"),
        "node A should log its mDNS discovery:\n{a_log}"
    );
    drop(procs);
    drop(lan);
}
