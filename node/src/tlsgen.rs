//! `fedmesh tls init` / `fedmesh tls issue`: a private CA in the data directory, a server
//! certificate for `mqtt.listen_tls` and client certificates for `mqtt.tls_client_ca`, so
//! TLS needs no openssl recipe. (`openssl req -x509` makes a CA:TRUE certificate by default,
//! which rustls — the node's CLI, rumqttc and many other clients — refuses as a server's.)
//!
//! Files, next to the configured `mqtt.tls_cert` (default `tls/` in the data directory):
//! `ca.pem` (what clients trust: `--tls-ca`, `--cafile`; and `mqtt.tls_client_ca`), `ca.key`,
//! the server's `cert.pem`/`key.pem` at `mqtt.tls_cert`/`mqtt.tls_key`, and
//! `clients/NAME.pem`/`NAME.key`. Keys are ECDSA P-256, written 0600; every file is written
//! to a temporary name and renamed, so a running node's certificate reload never reads half
//! a file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// What `tls init` wrote.
#[derive(Debug)]
pub struct Init {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub names: Vec<String>,
}

/// The CA's files beside the server certificate.
fn ca_paths(cert: &Path) -> (PathBuf, PathBuf) {
    let dir = cert.parent().unwrap_or(Path::new("."));
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Validity: from a day ago (clock skew) for `days` days.
fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(i64::from(days));
}

fn ca_params(cn: &str) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// Writes `body` to `path` through a temporary file and a rename (mode 0600 for keys).
fn write(path: &Path, body: &str, private: bool, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already exists; pass --force to replace it",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(body.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// A new CA and a server certificate for `names` (plus localhost, 127.0.0.1 and ::1), valid
/// for `days`. Refuses to replace existing files unless `force`.
pub fn init(
    cert: &Path,
    key: &Path,
    extra_names: &[String],
    days: u32,
    force: bool,
) -> anyhow::Result<Init> {
    let (ca_pem, ca_key_path) = ca_paths(cert);
    for p in [
        &ca_pem,
        &ca_key_path,
        &cert.to_path_buf(),
        &key.to_path_buf(),
    ] {
        if p.exists() && !force {
            bail!("{} already exists; pass --force to replace it", p.display());
        }
    }
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    for n in extra_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = ca_params(&format!("fedmesh CA {:08x}", rand::random::<u32>()))?;
    validity(&mut ca, days);
    let ca_cert = ca.self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.clone())
        .with_context(|| format!("--name values {extra_names:?}"))?;
    p.distinguished_name = DistinguishedName::new();
    let cn = extra_names.first().map_or("localhost", String::as_str);
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p, days);
    let server = p.signed_by(&server_key, &ca_cert, &ca_key)?;

    write(&ca_key_path, &ca_key.serialize_pem(), true, force)?;
    write(&ca_pem, &ca_cert.pem(), false, force)?;
    write(key, &server_key.serialize_pem(), true, force)?;
    write(cert, &server.pem(), false, force)?;
    Ok(Init {
        ca: ca_pem,
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        names,
    })
}

/// The CA of `tls init`, able to sign: its key, and a certificate with its name and key
/// (what a signature needs; rcgen signs with the issuer's name and key only).
fn load_ca(cert: &Path) -> anyhow::Result<(Certificate, KeyPair)> {
    let (ca_pem, ca_key_path) = ca_paths(cert);
    let pem = std::fs::read_to_string(&ca_key_path).with_context(|| {
        format!(
            "reading {} (run `fedmesh tls init` first)",
            ca_key_path.display()
        )
    })?;
    let key = KeyPair::from_pem(&pem).with_context(|| format!("{}", ca_key_path.display()))?;
    let cn = fedmesh_broker::certificate_cn(&ca_pem)?;
    let ca = ca_params(&cn)?.self_signed(&key)?;
    Ok((ca, key))
}

/// A client certificate with CN `name`, signed by the CA of `tls init`, written to
/// `dir/NAME.pem` and `dir/NAME.key`; returns the two paths.
pub fn issue(
    cert: &Path,
    dir: &Path,
    name: &str,
    days: u32,
    force: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if !fedmesh_broker::acl::valid_name(name) {
        bail!("{name:?} is not a principal name: 1-64 characters from [A-Za-z0-9_.-]");
    }
    let (ca, ca_key) = load_ca(cert)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity(&mut p, days);
    let c = p.signed_by(&key, &ca, &ca_key)?;
    let (cp, kp) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    for p in [&cp, &kp] {
        if p.exists() && !force {
            bail!("{} already exists; pass --force to replace it", p.display());
        }
    }
    write(&kp, &key.serialize_pem(), true, force)?;
    write(&cp, &c.pem(), false, force)?;
    Ok((cp, kp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio_rustls::rustls::{
        self, RootCertStore,
        client::danger::ServerCertVerifier,
        pki_types::{CertificateDer, ServerName, UnixTime},
        server::WebPkiClientVerifier,
    };

    fn der(path: &Path) -> CertificateDer<'static> {
        fedmesh_broker::pem_certificates(path)
            .expect("pem")
            .remove(0)
    }

    #[test]
    fn the_ca_signs_a_server_and_a_client_certificate_that_verify() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (
            dir.path().join("tls/cert.pem"),
            dir.path().join("tls/key.pem"),
        );
        let out = init(&cert, &key, &["node0.example".into()], 30, false).expect("init");
        assert!(out.names.contains(&"node0.example".to_string()));
        assert!(init(&cert, &key, &[], 30, false).is_err(), "no overwrite");
        let mode = std::fs::metadata(&key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(der(&out.ca)).expect("ca");
        let roots = std::sync::Arc::new(roots);
        let now = UnixTime::now();
        // The server certificate, for each name.
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        for name in ["localhost", "node0.example", "127.0.0.1"] {
            verifier
                .verify_server_cert(
                    &der(&cert),
                    &[],
                    &ServerName::try_from(name).expect("name"),
                    &[],
                    now,
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        // A client certificate, whose CN is the principal.
        let (cp, _) =
            issue(&cert, &dir.path().join("tls/clients"), "alice", 30, false).expect("issue");
        assert_eq!(fedmesh_broker::certificate_cn(&cp).expect("cn"), "alice");
        let cv = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .expect("client verifier");
        cv.verify_client_cert(&der(&cp), &[], now).expect("client");
        assert!(issue(&cert, dir.path(), "not a name", 30, false).is_err());
    }
}
