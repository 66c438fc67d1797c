//! TLS for the HTTP server (`--tls-cert`, `--tls-key`): rustls on ring, ALPN `h2` then
//! `http/1.1`, and a certificate that can be replaced while the service runs.
//!
//! Why a reloading resolver: certificates are rotated by tools (cert-manager, an ACME client)
//! that rewrite the two files in place, and a restart to pick them up would end every open
//! stream. The [`Resolver`] hands each new handshake the pair it holds now, behind an `ArcSwap`
//! (a handshake never waits on a lock); [`watch`] re-reads the files every few seconds and swaps
//! in a new pair once it loads. Connections already open keep the certificate they were made
//! with, which is how TLS works anyway: nothing open is touched.
//!
//! A new pair that does not load (one file rewritten before the other, a key that does not match
//! the certificate, a truncated file) is logged and the old pair kept; the next look tries again
//! once either file has changed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// The protocols offered in ALPN, in the server's order of preference.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Where the certificate chain and its private key are read from (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a certificate pair could not be used; one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a PEM certificate chain: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: no certificate in it (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no usable private key (expected a PEM PKCS#8, RSA or EC key): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{key} does not belong to the certificate in {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Config(String),
}

/// The bytes of both files as last read, to tell whether they changed.
#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl Contents {
    fn read(files: &TlsFiles) -> Result<Contents, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Ok(Contents {
            cert: read(&files.cert)?,
            key: read(&files.key)?,
        })
    }

    /// The pair these bytes describe, checked: a chain, a key the provider can sign with, and
    /// the key matching the chain's first certificate.
    fn certified_key(
        &self,
        files: &TlsFiles,
        provider: &CryptoProvider,
    ) -> Result<CertifiedKey, TlsError> {
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| TlsError::BadCertificate {
                path: files.cert.clone(),
                reason: error.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: files.cert.clone(),
            });
        }
        let bad_key = |reason: String| TlsError::BadKey {
            path: files.key.clone(),
            reason,
        };
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| bad_key(e.to_string()))?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| bad_key(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|error| TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: error.to_string(),
        })?;
        Ok(certified)
    }
}

/// The certificate every new handshake gets: the last pair of the files that loaded.
pub struct Resolver {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl Resolver {
    /// Loads the pair now: a service whose files are wrong fails at start, with the reason.
    pub fn load(files: TlsFiles) -> Result<Resolver, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = Contents::read(&files)?.certified_key(&files, &provider)?;
        Ok(Resolver {
            files,
            provider,
            current: ArcSwap::from_pointee(certified),
        })
    }

    /// The end-entity certificate new handshakes are given (DER).
    pub fn current_certificate(&self) -> CertificateDer<'static> {
        self.current.load().cert[0].clone()
    }

    /// The acceptor for the TLS listener: this resolver's certificate, ALPN `h2` and
    /// `http/1.1`.
    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Config(error.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// Re-reads the files every `every` until `stop`, swapping in a new pair once it loads.
pub async fn watch(resolver: Arc<Resolver>, every: Duration, stop: CancellationToken) {
    // What was last tried, loaded or not: a bad pair is reported once, not every look.
    let mut tried = Contents::read(&resolver.files).ok();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate: the pair was just loaded
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        // Small files, read off the blocking pool so that a slow disk never stalls the runtime.
        let files = resolver.files.clone();
        let read = tokio::task::spawn_blocking(move || Contents::read(&files)).await;
        let contents = match read {
            Ok(Ok(contents)) => contents,
            Ok(Err(error)) => {
                // Mid-rotation a file may be missing for a moment; say so only once.
                if tried.take().is_some() {
                    tracing::warn!(%error, "TLS certificate files unreadable; keeping the current certificate");
                }
                continue;
            }
            Err(_) => continue,
        };
        if tried.as_ref() == Some(&contents) {
            continue;
        }
        match contents.certified_key(&resolver.files, &resolver.provider) {
            Ok(certified) => {
                resolver.current.store(Arc::new(certified));
                tracing::info!(cert = %resolver.files.cert.display(), "TLS certificate reloaded");
            }
            Err(error) => {
                tracing::warn!(%error, "new TLS certificate not loaded; keeping the current one");
            }
        }
        tried = Some(contents);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed pair, as (certificate PEM, key PEM).
    fn pair() -> (String, String) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (made.cert.pem(), made.signing_key.serialize_pem())
    }

    fn files(name: &str, cert: &str, key: &str) -> (TlsFiles, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "event-piper-tls-unit-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        (files, dir)
    }

    fn refusal(name: &str, cert: &str, key: &str) -> String {
        let (files, dir) = files(name, cert, key);
        let error = Resolver::load(files).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(dir);
        assert!(!error.contains('\n'), "one line: {error}");
        error
    }

    #[test]
    fn a_good_pair_loads_and_is_presented() {
        let (cert, key) = pair();
        let (files, dir) = files("good", &cert, &key);
        let resolver = Arc::new(Resolver::load(files).unwrap());
        let expected = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(resolver.current_certificate(), expected);
        resolver.acceptor().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let (cert, key) = pair();
        let (_, other_key) = pair();
        let missing = TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        };
        let error = Resolver::load(missing).unwrap_err().to_string();
        assert!(
            error.starts_with("reading /nonexistent/cert.pem"),
            "{error}"
        );

        let error = refusal("nocert", "not a certificate", &key);
        assert!(error.contains("no certificate in it"), "{error}");
        let error = refusal("nokey", &cert, "not a key");
        assert!(error.contains("no usable private key"), "{error}");
        // The key of another certificate: cert-manager mid-rotation, or a wrong file.
        let error = refusal("mismatch", &cert, &other_key);
        assert!(
            error.contains("does not belong to the certificate"),
            "{error}"
        );
        // The certificate given as the key.
        let error = refusal("swapped", &cert, &cert);
        assert!(error.contains("no usable private key"), "{error}");
    }
}
