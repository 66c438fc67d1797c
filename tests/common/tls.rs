//! Certificates made in the test: a CA of its own and a server certificate it signs for
//! `localhost` and 127.0.0.1, written as the PEM files `--tls-cert` and `--tls-key` read, and
//! clients that trust that CA only.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A server certificate and its key, in files, and the CA that signed it.
pub struct TestCert {
    pub dir: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// The CA's certificate (PEM): what a client trusts.
    pub ca_pem: String,
    /// The server certificate the service should present (DER).
    pub leaf_der: Vec<u8>,
}

/// A fresh CA and server pair: (CA PEM, leaf DER, leaf PEM, key PEM).
fn generate() -> (String, Vec<u8>, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "event-piper test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (
        ca.pem(),
        leaf.der().to_vec(),
        leaf.pem(),
        key.serialize_pem(),
    )
}

impl TestCert {
    /// A new pair in a directory of its own under the system's temporary directory.
    pub fn new(name: &str) -> TestCert {
        let dir =
            std::env::temp_dir().join(format!("event-piper-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cert = TestCert {
            cert_path: dir.join("cert.pem"),
            key_path: dir.join("key.pem"),
            dir,
            ca_pem: String::new(),
            leaf_der: Vec::new(),
        };
        cert.rotate();
        cert
    }

    /// Replaces both files with a new pair from a new CA, each by a rename (as rotation tools
    /// do), the key first: for a moment the files hold a new key and the old certificate.
    pub fn rotate(&mut self) {
        let (ca_pem, leaf_der, leaf_pem, key_pem) = generate();
        replace(&self.key_path, key_pem.as_bytes());
        replace(&self.cert_path, leaf_pem.as_bytes());
        self.ca_pem = ca_pem;
        self.leaf_der = leaf_der;
    }

    /// An HTTPS client that trusts this pair's CA and nothing else.
    pub fn client(&self) -> reqwest::ClientBuilder {
        client_trusting(&self.ca_pem)
    }
}

/// An HTTPS client that trusts the CA `ca_pem` and nothing else.
pub fn client_trusting(ca_pem: &str) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
}

fn replace(path: &Path, contents: &[u8]) {
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
