//! The testnet: the docker-compose file's structure (no Docker engine runs here) and the same
//! topology as real processes through testnet/testnet.sh.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use fedmesh_tests::{fedmesh_bin, free_port, http_get};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn compose_file_is_a_three_node_federation_bootstrapping_from_the_first() {
    let text =
        std::fs::read_to_string(repo().join("testnet/docker-compose.yml")).expect("compose file");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
    doc.apply_merge().expect("merge keys");
    let services = doc["services"].as_mapping().expect("services");
    assert_eq!(services.len(), 3);
    for (name, svc) in services {
        let name = name.as_str().expect("name");
        let dockerfile = svc["build"]["dockerfile"]
            .as_str()
            .expect("build.dockerfile");
        assert!(
            repo().join(dockerfile).exists(),
            "{name}: {dockerfile} missing"
        );
        let env: BTreeMap<String, String> =
            serde_yaml::from_value(svc["environment"].clone()).expect("environment map");
        // Every FEDMESH_ variable must be a real config key with a valid value.
        let fedmesh_env: Vec<(String, String)> = env
            .iter()
            .filter(|(k, _)| k.starts_with("FEDMESH_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert!(
            fedmesh_env.iter().any(|(k, _)| k == "FEDMESH_P2P__LISTEN"),
            "{name}"
        );
        let out = Command::new(fedmesh_bin())
            .args(["config", "check"])
            .env_remove("FEDMESH_CONFIG")
            .envs(fedmesh_env)
            .output()
            .expect("config check");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if name != "node0" {
            assert_eq!(
                env.get("BOOTSTRAP_HTTP").map(String::as_str),
                Some("http://node0:8080"),
                "{name}"
            );
            assert_eq!(
                env.get("BOOTSTRAP_HOST").map(String::as_str),
                Some("node0"),
                "{name}"
            );
            let deps = svc["depends_on"].as_sequence().expect("depends_on");
            assert!(deps.iter().any(|d| d.as_str() == Some("node0")), "{name}");
        }
    }
    let dockerfile =
        std::fs::read_to_string(repo().join("testnet/Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.contains("docker-entrypoint.sh"));
    assert!(repo().join("testnet/docker-entrypoint.sh").exists());
}

#[test]
fn testnet_script_starts_three_nodes_and_stops_them() {
    let run = tempfile::tempdir().expect("tempdir");
    // Find 4 consecutive free ports per node: probe the base.
    let base = free_port().saturating_sub(100).max(20000);
    let script = repo().join("testnet/testnet.sh");
    let env = [
        ("RUN_DIR", run.path().display().to_string()),
        ("BASE_PORT", base.to_string()),
        ("FEDMESH_BIN", fedmesh_bin().display().to_string()),
    ];
    let up = Command::new(&script)
        .args(["up", "3"])
        .envs(env.clone())
        .output()
        .expect("testnet up");
    let stdout = String::from_utf8_lossy(&up.stdout).to_string();
    let ok = up.status.success();
    let mut ids = Vec::new();
    if ok {
        for i in 0..3u16 {
            let (code, body) = http_get(base + 10 * i + 2, "/status").expect("status");
            assert_eq!(code, 200);
            let v: serde_json::Value = serde_json::from_str(&body).expect("json");
            ids.push(v["node_id"].as_str().unwrap_or_default().to_string());
        }
    }
    let down = Command::new(&script)
        .arg("down")
        .envs(env)
        .output()
        .expect("testnet down");
    assert!(
        ok,
        "up failed: {stdout}\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(down.status.success());
    assert!(stdout.contains("node-2"), "{stdout}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three distinct node ids");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        http_get(base + 2, "/healthz").is_err(),
        "node 0 still running after down"
    );
}
