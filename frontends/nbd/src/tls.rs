//! TLS credentials for a listener, from a directory laid out like QEMU's `tls-creds-x509`
//! (endpoint=server): `server-cert.pem` (the server's certificate, then its chain),
//! `server-key.pem` (its private key, PKCS#8, PKCS#1 or SEC1) and, to verify clients,
//! `ca-cert.pem` (the authorities whose client certificates are accepted).
//!
//! With `verify_peer` (the default, as in QEMU) a client must present a certificate signed
//! by one of those authorities; without it, any client that completes TLS is served.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a listener's credentials are and whether clients must prove who they are.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TlsOptions {
    pub dir: PathBuf,
    pub verify_peer: bool,
}

/// The rustls configuration `options` describes, or what is wrong with its files.
pub fn server_config(options: &TlsOptions) -> Result<Arc<ServerConfig>, String> {
    // ring, not aws-lc-rs: it builds with a C compiler alone, in seconds. rustls deprecates
    // it for lacking post-quantum key exchange (X25519MLKEM768), which QEMU's GnuTLS does
    // not offer either.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = if options.verify_peer {
        let mut roots = RootCertStore::empty();
        for cert in certificates(&options.dir.join("ca-cert.pem"))? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", options.dir.join("ca-cert.pem").display()))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("TLS client verification: {e}"))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let chain = certificates(&options.dir.join("server-cert.pem"))?;
    let key_path = options.dir.join("server-key.pem");
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("{}: no private key: {e}", key_path.display()))?;
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    Ok(Arc::new(config))
}

/// Every certificate in a PEM file (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|all| all.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_files_are_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("pollblk-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = TlsOptions {
            dir: dir.clone(),
            verify_peer: true,
        };
        let e = server_config(&options).unwrap_err();
        assert!(e.contains("ca-cert.pem"), "{e}");
        std::fs::write(dir.join("server-cert.pem"), "not pem\n").unwrap();
        let e = server_config(&TlsOptions {
            verify_peer: false,
            ..options
        })
        .unwrap_err();
        assert!(e.contains("server-cert.pem: no certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
