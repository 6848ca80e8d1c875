//! MQTT over TLS (`mqtt.listen_tls`): the proxy terminates TLS and relays the decrypted MQTT
//! stream exactly as it relays a plain connection, so every defence, limit and the direct
//! delivery paths are the same on both. rustls with the *ring* provider (already in the
//! build through libp2p's QUIC), TLS 1.2 and 1.3.
//!
//! **Client certificates** (`TlsSettings::client_ca`, mutual TLS): every client must present a
//! certificate issued by one of the CAs, checked by rustls's WebPKI verifier during the
//! handshake, and the certificate's subject CN is the connection's principal ([`principal`]),
//! as mosquitto's `use_identity_as_username` does. The CA file is read at start.
//!
//! **Certificate rotation.** The acceptor asks a [`CertReloader`] for the certificate at each
//! handshake. The broker checks the two files' modification time and size every
//! [`RELOAD_CHECK`] and loads them again when either changed (certbot, cert-manager and
//! Kubernetes secrets replace the files in place); the node also reloads on SIGHUP, like
//! nginx and mosquitto. A pair that cannot be used (a half-written file, a key that does not
//! fit) is logged naming the file and counted, and the listener keeps the certificate it has:
//! a rotation never takes the listener down. Open connections keep the session they
//! negotiated.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{
    self, RootCertStore,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tracing::{info, warn};

use crate::error::BrokerError;
use crate::metrics::Metrics;

/// How often the broker looks at the certificate and key files for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(10);
/// A certificate that expires sooner than this is warned about at load and once a day.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

fn err(path: &Path, reason: String) -> BrokerError {
    BrokerError::Tls {
        path: path.to_path_buf(),
        reason,
    }
}

/// The certificates in the PEM file `path` (at least one): the listener's chain here, the
/// CA a client trusts in the node's CLI.
pub fn pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, BrokerError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(path, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(path, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(err(path, "no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// The certificate chain in `cert` and the private key in `key` (both PEM), checked to
/// belong together. Every failure names the file and what is wrong with it.
fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, BrokerError> {
    let chain = pem_certificates(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| err(key, format!("no usable PEM private key: {e}")))?;
    CertifiedKey::from_der(chain, key_der, provider)
        .map_err(|e| err(key, format!("does not fit the certificate: {e}")))
}

/// What identifies one version of the two files: modification time and length of each.
type Version = [Option<(SystemTime, u64)>; 2];

fn version(cert: &Path, key: &Path) -> Version {
    [cert, key].map(|p| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    })
}

/// What a reload did.
#[derive(Debug)]
pub enum Reload {
    /// The files are the version already loaded (or already refused).
    Unchanged,
    /// A new certificate is served from the next handshake on.
    Reloaded,
    /// The files cannot be used; the previous certificate stays.
    Failed(BrokerError),
}

/// The listener's certificate, replaceable while it serves (rustls asks for it at every
/// handshake).
#[derive(Debug)]
pub(crate) struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' version last tried, loaded or not: a broken pair is reported once, not
    /// at every check.
    tried: Mutex<Version>,
    /// When the served leaf certificate expires, Unix seconds (0: unknown).
    not_after: AtomicI64,
}

impl CertReloader {
    /// Loads the pair; fails, naming the file, if it cannot be used.
    pub(crate) fn new(cert: &Path, key: &Path) -> Result<Arc<Self>, BrokerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tried = version(cert, key);
        let ck = load(cert, key, &provider)?;
        let r = Arc::new(CertReloader {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            not_after: AtomicI64::new(leaf_not_after(&ck)),
            current: RwLock::new(Arc::new(ck)),
            tried: Mutex::new(tried),
        });
        r.warn_if_expiring();
        Ok(r)
    }

    /// When the served certificate expires, Unix seconds (`None`: unknown).
    pub(crate) fn not_after(&self) -> Option<i64> {
        Some(self.not_after.load(Ordering::Relaxed)).filter(|t| *t != 0)
    }

    /// Logs a warning if the served certificate expires within [`EXPIRY_WARNING`] (or has).
    pub(crate) fn warn_if_expiring(&self) {
        let Some(not_after) = self.not_after() else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let left = not_after.saturating_sub(now);
        if left < 0 {
            warn!(cert = %self.cert.display(), expired_s_ago = -left, "the TLS certificate has expired; clients will refuse it");
        } else if left < EXPIRY_WARNING.as_secs() as i64 {
            warn!(cert = %self.cert.display(), days_left = left / 86_400, "the TLS certificate expires soon; replace the file (it is reloaded within 10 s)");
        }
    }

    /// Loads the files again if they changed since the last attempt (`force`: in any case).
    pub(crate) fn reload(&self, force: bool) -> Reload {
        let now = version(&self.cert, &self.key);
        {
            let mut tried = self.tried.lock().unwrap_or_else(PoisonError::into_inner);
            if !force && *tried == now {
                return Reload::Unchanged;
            }
            *tried = now;
        }
        match load(&self.cert, &self.key, &self.provider) {
            Ok(ck) => {
                self.not_after.store(leaf_not_after(&ck), Ordering::Relaxed);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ck);
                Reload::Reloaded
            }
            Err(e) => Reload::Failed(e),
        }
    }

    /// [`reload`](Self::reload), logged and counted.
    pub(crate) fn reload_logged(&self, force: bool, metrics: &Metrics) -> Reload {
        let r = self.reload(force);
        match &r {
            Reload::Unchanged => {}
            Reload::Reloaded => {
                Metrics::inc(&metrics.tls_reloads);
                info!(cert = %self.cert.display(), "TLS certificate reloaded");
                self.warn_if_expiring();
            }
            Reload::Failed(e) => {
                Metrics::inc(&metrics.tls_reload_failures);
                warn!(error = %e, "TLS certificate not reloaded; the listener keeps the previous one");
            }
        }
        r
    }

    /// The certificate served now.
    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A TLS acceptor that serves whatever certificate this holds at each handshake and,
    /// with `client_ca`, requires a client certificate issued by one of its CAs.
    pub(crate) fn acceptor(
        self: &Arc<Self>,
        client_ca: Option<&Path>,
    ) -> Result<TlsAcceptor, BrokerError> {
        let builder = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(&self.cert, e.to_string()))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in pem_certificates(ca)? {
                    roots
                        .add(c)
                        .map_err(|e| err(ca, format!("not a usable CA certificate: {e}")))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    self.provider.clone(),
                )
                .build()
                .map_err(|e| err(ca, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        Ok(TlsAcceptor::from(Arc::new(
            builder.with_cert_resolver(self.clone()),
        )))
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Checks the files every [`RELOAD_CHECK`] until shutdown.
pub(crate) async fn watch_files(
    reloader: Arc<CertReloader>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(RELOAD_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let per_day = (24 * 3600 / RELOAD_CHECK.as_secs()).max(1);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let r = reloader.clone();
                let m = metrics.clone();
                // Reading two small files: off the runtime's workers all the same.
                let _ = tokio::task::spawn_blocking(move || r.reload_logged(false, &m)).await;
                ticks += 1;
                if ticks.is_multiple_of(per_day) {
                    reloader.warn_if_expiring();
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// When the leaf certificate of `ck` expires, Unix seconds (0 if it cannot be read).
fn leaf_not_after(ck: &CertifiedKey) -> i64 {
    ck.cert
        .first()
        .and_then(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
        .map_or(0, |(_, p)| p.validity().not_after.timestamp())
}

/// The principal a verified client certificate names: its subject's common name (CN). The
/// verifier has checked the chain during the handshake; this only reads the name. `Err` says
/// why the certificate names no usable principal.
pub(crate) fn principal(cert: &CertificateDer<'_>) -> Result<String, &'static str> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| "the client certificate cannot be parsed")?;
    let mut names = parsed.subject().iter_common_name();
    let cn = names
        .next()
        .ok_or("the client certificate has no subject CN")?
        .as_str()
        .map_err(|_| "the client certificate's CN is not a string")?;
    if names.next().is_some() {
        return Err("the client certificate has more than one CN");
    }
    Ok(cn.to_string())
}

/// The CN of the first certificate in the PEM file `path`: the principal a node that
/// requires client certificates takes a client presenting it for.
pub fn certificate_cn(path: &Path) -> Result<String, BrokerError> {
    let certs = pem_certificates(path)?;
    let first = certs
        .first()
        .ok_or_else(|| err(path, "no CERTIFICATE block found".into()))?;
    principal(first).map_err(|why| err(path, why.to_string()))
}

/// A TLS acceptor for the pair (for tests).
#[cfg(test)]
fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, BrokerError> {
    CertReloader::new(cert, key)?.acceptor(None)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn fails(cert: &Path, key: &Path) -> String {
        match acceptor(cert, key) {
            Ok(_) => panic!("{} / {} accepted", cert.display(), key.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn loads_a_certificate_and_names_the_file_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = write(dir.path(), "cert.pem", &ck.cert.pem());
        let key = write(dir.path(), "key.pem", &ck.key_pair.serialize_pem());
        assert!(acceptor(&cert, &key).is_ok());

        let missing = dir.path().join("missing.pem");
        let e = fails(&missing, &key);
        assert!(e.contains("missing.pem"), "{e}");
        let garbage = write(dir.path(), "garbage.pem", "not pem at all");
        let e = fails(&garbage, &key);
        assert!(
            e.contains("garbage.pem") && e.contains("no CERTIFICATE"),
            "{e}"
        );
        let e = fails(&cert, &garbage);
        assert!(
            e.contains("garbage.pem") && e.contains("private key"),
            "{e}"
        );
        // A key that is not the certificate's.
        let wrong = write(dir.path(), "wrong.pem", &other.key_pair.serialize_pem());
        let e = fails(&cert, &wrong);
        assert!(e.contains("wrong.pem"), "{e}");
    }

    #[test]
    fn the_principal_is_the_subject_cn() {
        use rcgen::{CertificateParams, DnType, KeyPair};
        // (rcgen keeps one value per attribute type, so a second CN cannot be made here.)
        let cert = |cns: &[&str]| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name = rcgen::DistinguishedName::new();
            for cn in cns {
                p.distinguished_name.push(DnType::CommonName, *cn);
            }
            let der = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
            CertificateDer::from(der.der().to_vec())
        };
        assert_eq!(principal(&cert(&["alice"])).unwrap(), "alice");
        assert!(principal(&cert(&[])).unwrap_err().contains("no subject CN"));
        assert!(principal(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }

    /// Moves a file's modification time on, so that a rewrite is seen whatever the file
    /// system's timestamp granularity.
    fn touch(path: &Path, secs: u64) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn reloads_changed_files_and_keeps_the_old_pair_when_the_new_one_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = write(dir.path(), "cert.pem", &a.cert.pem());
        let key = write(dir.path(), "key.pem", &a.key_pair.serialize_pem());
        let r = CertReloader::new(&cert, &key).unwrap();
        let served = |r: &CertReloader| r.current().cert[0].as_ref().to_vec();
        // rcgen's default validity ends in 4096.
        assert_eq!(r.not_after(), Some(67_090_118_400));
        assert_eq!(served(&r), a.cert.der().to_vec());
        assert!(matches!(r.reload(false), Reload::Unchanged));

        // Rotated in place: picked up by the periodic check.
        write(dir.path(), "cert.pem", &b.cert.pem());
        write(dir.path(), "key.pem", &b.key_pair.serialize_pem());
        touch(&cert, 1);
        touch(&key, 1);
        assert!(matches!(r.reload(false), Reload::Reloaded));
        assert_eq!(served(&r), b.cert.der().to_vec());
        assert!(matches!(r.reload(false), Reload::Unchanged));

        // Half-written (new certificate, old key): refused once, naming the key, and the
        // previous pair stays; not reported again until the files change.
        write(dir.path(), "cert.pem", &a.cert.pem());
        touch(&cert, 2);
        match r.reload(false) {
            Reload::Failed(e) => assert!(e.to_string().contains("key.pem"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(served(&r), b.cert.der().to_vec());
        assert!(matches!(r.reload(false), Reload::Unchanged));
        // Forced (SIGHUP): tried again, refused again.
        assert!(matches!(r.reload(true), Reload::Failed(_)));
        // The key arrives: the pair is whole.
        write(dir.path(), "key.pem", &a.key_pair.serialize_pem());
        touch(&key, 3);
        assert!(matches!(r.reload(false), Reload::Reloaded));
        assert_eq!(served(&r), a.cert.der().to_vec());
    }
}
