//! The `fedmesh` CLI: keygen, init, config check, --help.

use std::process::Command;

use fedmesh_tests::fedmesh_bin;

fn fedmesh() -> Command {
    let mut c = Command::new(fedmesh_bin());
    c.env_remove("FEDMESH_CONFIG").env("RUST_LOG", "warn");
    c
}

#[test]
fn keygen_writes_0600_prints_node_id_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("node.key");
    let out = fedmesh()
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(id.starts_with("12D3KooW"), "{id}");
    assert_eq!(
        std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777,
        0o600
    );
    let again = fedmesh()
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .expect("run");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let forced = fedmesh()
        .args(["keygen", "--force", "--out"])
        .arg(&key)
        .output()
        .expect("run");
    assert!(forced.status.success());
    assert_ne!(String::from_utf8_lossy(&forced.stdout).trim(), id);
}

#[test]
fn init_writes_a_config_that_checks_ok() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("fedmesh.toml");
    assert!(
        fedmesh()
            .arg("init")
            .arg(&file)
            .status()
            .expect("run")
            .success()
    );
    assert!(
        !fedmesh()
            .arg("init")
            .arg(&file)
            .status()
            .expect("run")
            .success(),
        "init must not overwrite"
    );
    let out = fedmesh()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_check_names_a_wrongly_typed_p2p_listen_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[p2p]\nlisten = 4001\n").expect("write");
    let out = fedmesh()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p2p.listen"), "{err}");

    std::fs::write(&file, "[p2p]\nlisten = [\"tcp/4001\"]\n").expect("write");
    let out = fedmesh()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("p2p.listen[0]"));

    std::fs::write(&file, "[mqtt\n").expect("write");
    let out = fedmesh()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success(), "syntax error must fail");
}

#[test]
fn run_refuses_a_broken_config_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[routing]\nthreshold = 7.0\n").expect("write");
    let out = fedmesh()
        .arg("--config")
        .arg(&file)
        .arg("run")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("routing.threshold"));
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["keygen", "--help"],
        &["init", "--help"],
        &["config", "check", "--help"],
        &["agent", "add", "--help"],
        &["agent", "exec", "--help"],
        &["task", "submit", "--help"],
        &["audit", "verify", "--help"],
        &["audit", "tail", "--help"],
    ] {
        let out = fedmesh().args(args).output().expect("run");
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}
