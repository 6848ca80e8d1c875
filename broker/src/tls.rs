//! MQTT over TLS (`mqtt.listen_tls`): the proxy terminates TLS and relays the decrypted MQTT
//! stream exactly as it relays a plain connection, so every defence, limit and the direct
//! delivery paths are the same on both. rustls with the *ring* provider (already in the
//! build through libp2p's QUIC), TLS 1.2 and 1.3, no client certificates.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

use crate::error::BrokerError;

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

/// A TLS acceptor for the certificate chain in `cert` and the private key in `key` (both
/// PEM). Every failure names the file and what is wrong with it.
pub(crate) fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, BrokerError> {
    let chain = pem_certificates(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| err(key, format!("no usable PEM private key: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| err(cert, e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key_der)
    .map_err(|e| err(key, format!("does not fit the certificate: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
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
}
