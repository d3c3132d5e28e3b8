//! TLS on the public listener (SPEC §7b): the certificate chain and key from two PEM files,
//! served through a resolver whose pair is an atomically swapped snapshot, so a replaced
//! certificate is used by the next handshake while connections made with the old one carry
//! on (a TLS session never looks at the certificate again once established).
//!
//! [`CertReloader`] reloads on SIGHUP and when a file in the certificate's or the key's
//! directory changes (renamed into place, rewritten, or a Kubernetes secret's symlink
//! swapped). A pair that does not load — a missing file, no certificate, no key, a key that
//! does not match the certificate, a half-written file — keeps the pair in use and logs why;
//! the next change tries again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::ALPN;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::signal::unix::{SignalKind, signal};

/// Where the pair comes from (`tls.cert_file`, `tls.key_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Why a pair did not load, by the file at fault, so configuration errors name the setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsError {
    Cert(String),
    Key(String),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Cert(e) | TlsError::Key(e) => f.write_str(e),
        }
    }
}

/// Reads and checks a pair: a chain of at least one certificate, a private key (PKCS#8,
/// PKCS#1 or SEC1), and the key belonging to the first certificate.
pub fn load_pair(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let cert_file = files.cert_file.display();
    let key_file = files.key_file.display();
    let chain = read(&files.cert_file)
        .map_err(TlsError::Cert)
        .and_then(|pem| {
            CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Cert(format!("{cert_file}: not PEM ({e})")))
        })?;
    if chain.is_empty() {
        return Err(TlsError::Cert(format!(
            "{cert_file}: no CERTIFICATE in it (a PEM certificate chain is expected)"
        )));
    }
    let key = read(&files.key_file).map_err(TlsError::Key)?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
        TlsError::Key(format!(
            "{key_file}: no private key in it (a PEM PRIVATE KEY is expected): {e}"
        ))
    })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        TlsError::Key(format!(
            "{key_file}: cannot be used with the certificate in {cert_file}: {e}"
        ))
    })
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The pair in use, swapped whole on reload.
pub struct Certificates {
    files: TlsFiles,
    current: ArcSwap<CertifiedKey>,
    pub reloads: prometheus::IntCounterVec,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Certificates {
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let pair = load_pair(&files)?;
        Ok(Arc::new(Self {
            files,
            current: ArcSwap::from_pointee(pair),
            reloads: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "audiolib_tls_certificate_reloads_total",
                    "Certificate reloads by result (ok, unchanged, error: the old pair stays)",
                ),
                &["result"],
            )
            .expect("valid metric"),
        }))
    }

    /// Loads the files again; a pair that does not load leaves the current one in place.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let result = load_pair(&self.files).map(|pair| {
            let changed = pair.cert != self.current.load().cert;
            if changed {
                self.current.store(Arc::new(pair));
            }
            changed
        });
        let label = match &result {
            Ok(true) => "ok",
            Ok(false) => "unchanged",
            Err(_) => "error",
        };
        self.reloads.with_label_values(&[label]).inc();
        result
    }

    /// The listener's settings: this resolver, ALPN `h2` then `http/1.1`.
    pub fn listener_settings(self: &Arc<Self>) -> TlsSettings {
        // The file paths are not read by Pingora once a resolver is set.
        let mut settings = TlsSettings::intermediate("", "").expect("infallible for rustls");
        settings.set_cert_resolver(self.clone());
        settings.set_alpn(ALPN::H2H1);
        settings
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Reloads [`Certificates`] on SIGHUP and on file changes.
pub struct CertReloader {
    pub certificates: Arc<Certificates>,
}

impl CertReloader {
    fn reload(&self, why: &str) {
        match self.certificates.reload() {
            Ok(true) => log::info!(
                "{why}: TLS certificate reloaded from {}",
                self.certificates.files.cert_file.display()
            ),
            Ok(false) => log::debug!("{why}: TLS certificate unchanged"),
            Err(e) => log::error!("{why}: TLS certificate not reloaded, the old one stays: {e}"),
        }
    }

    /// Watches the directories of both files: files are usually replaced by a rename (or a
    /// symlink swap), which a watch on the file itself would miss.
    fn watch(&self, tx: tokio::sync::mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
        let files = &self.certificates.files;
        let dirs: Vec<PathBuf> = [&files.cert_file, &files.key_file]
            .iter()
            .map(|f| match f.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| {
            for dir in &dirs {
                w.watch(dir, RecursiveMode::NonRecursive)?;
            }
            Ok(w)
        });
        match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!("TLS certificate file watching unavailable ({e}); reload with SIGHUP");
                None
            }
        }
    }
}

#[async_trait]
impl BackgroundService for CertReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP: {e}");
                return;
            }
        };
        let (tx, mut changes) = tokio::sync::mpsc::channel::<()>(1);
        let _watcher = self.watch(tx);
        loop {
            tokio::select! {
                _ = hangup.recv() => self.reload("SIGHUP"),
                Some(()) = changes.recv() => {
                    // A certificate and its key are rarely written at once: let both land.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while changes.try_recv().is_ok() {}
                    self.reload("file change");
                }
                _ = shutdown.changed() => break,
            }
        }
    }
}
