//! Transport to PostgreSQL: TCP or a Unix socket, with TLS as `sslmode` asks.
//!
//! Both connections walcast opens go through here: the replication connection
//! ([`connect_stream`], a raw byte stream for the replication protocol) and the
//! ordinary SQL connection ([`connect_sql`], a tokio-postgres client for catalog
//! queries and setup). Both build their TLS settings with [`client_config`], so they
//! always agree.
//!
//! `sslmode` has libpq's meanings ("SSL Support" in the libpq chapter of the
//! PostgreSQL documentation):
//!
//! | sslmode       | TLS                               | certificate checks                     |
//! |---------------|-----------------------------------|----------------------------------------|
//! | `disable`     | never                             | —                                      |
//! | `prefer`      | if the server accepts it          | none                                   |
//! | `require`     | always                            | none (chain, if `sslrootcert` is given) |
//! | `verify-ca`   | always                            | chain against `sslrootcert`            |
//! | `verify-full` | always                            | chain, and the host name               |
//!
//! The session starts in plain text with an `SSLRequest`; the server answers `S`
//! (go ahead with the TLS handshake) or `N` (no TLS here). Unix-domain sockets never
//! use TLS, as in libpq. The root certificate comes from `sslrootcert`, else from
//! `~/.postgresql/root.crt` if it exists (libpq's default); `verify-*` without either
//! is an error that says so. Cryptography is rustls with the `ring` provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{PgConnInfo, PgHost, SslMode};
use crate::source::error::{PgError, CONNECT_TIMEOUT};
use tokio::io::{AsyncRead, AsyncWrite};

/// The `SSLRequest` message: length 8, then the magic request code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Anything that carries the session: TCP, a Unix socket, or TLS over TCP.
pub trait PgIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> PgIo for T {}

/// Opens the byte stream for the replication connection.
pub async fn connect_stream(
    info: &PgConnInfo,
    timeout: Duration,
) -> Result<Box<dyn PgIo>, PgError> {
    let tls = client_config(info)?;
    let mut last_err = None;
    for host in &info.hosts {
        let res = match host {
            PgHost::Tcp { host, port } => {
                match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), *port)))
                    .await
                {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        match &tls {
                            None => Ok(Box::new(s) as Box<dyn PgIo>),
                            Some(cfg) => {
                                let target = format!("{host}:{port}");
                                return tokio::time::timeout(
                                    timeout,
                                    negotiate(s, host, &target, cfg.clone(), info.ssl_mode),
                                )
                                .await
                                .map_err(|_| PgError::Connect {
                                    target,
                                    source: std::io::Error::new(
                                        std::io::ErrorKind::TimedOut,
                                        "TLS negotiation timed out",
                                    ),
                                })?;
                            }
                        }
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    )),
                }
            }
            #[cfg(unix)]
            PgHost::Unix { path } => tokio::net::UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as Box<dyn PgIo>),
            #[cfg(not(unix))]
            PgHost::Unix { .. } => Err(std::io::Error::other("unix sockets are not supported")),
        };
        match res {
            Ok(s) => return Ok(s),
            Err(e) => last_err = Some((host.clone(), e)),
        }
    }
    let Some((host, e)) = last_err else {
        return Err(PgError::Setup(
            "the database URL names no host: add one (postgres://user@host:port/db)".into(),
        ));
    };
    Err(PgError::Connect {
        target: match host {
            PgHost::Tcp { host, port } => format!("{host}:{port}"),
            PgHost::Unix { path } => path.display().to_string(),
        },
        source: e,
    })
}

/// Sends `SSLRequest` on a fresh TCP connection and, if the server agrees, runs the
/// TLS handshake. With `prefer`, a server that says no gets the plain connection.
async fn negotiate(
    mut tcp: TcpStream,
    host: &str,
    target: &str,
    cfg: Arc<ClientConfig>,
    mode: SslMode,
) -> Result<Box<dyn PgIo>, PgError> {
    let io_err = |source| PgError::Connect {
        target: target.to_string(),
        source,
    };
    tcp.write_all(&SSL_REQUEST).await.map_err(io_err)?;
    let answer = tcp.read_u8().await.map_err(io_err)?;
    match answer {
        b'S' => {
            let name = server_name(host)?;
            let stream = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| handshake_error(e, target, mode))?;
            Ok(Box::new(stream))
        }
        b'N' if mode == SslMode::Prefer => Ok(Box::new(tcp)),
        b'N' => Err(PgError::tls(no_tls_help(target, mode))),
        other => Err(PgError::Protocol(format!(
            "unexpected answer {:?} to SSLRequest from {target}",
            char::from(other)
        ))),
    }
}

fn no_tls_help(target: &str, mode: SslMode) -> String {
    format!(
        "the server at {target} does not accept TLS connections, but sslmode={} requires TLS: turn on ssl in postgresql.conf (ssl = on, ssl_cert_file, ssl_key_file), or use sslmode=prefer or disable",
        mode_name(mode)
    )
}

fn mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

fn server_name(host: &str) -> Result<ServerName<'static>, PgError> {
    ServerName::try_from(host.to_string()).map_err(|e| {
        PgError::tls(format!(
            "host {host:?} is not a valid DNS name or IP address for TLS: {e}"
        ))
    })
}

/// Explains a failed handshake; certificate problems say what to change.
fn handshake_error(e: std::io::Error, target: &str, mode: SslMode) -> PgError {
    let rustls_err = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_err {
        Some(err) => PgError::tls_caused(explain_rustls(err, target, mode), err.clone()),
        None => PgError::Connect {
            target: target.to_string(),
            source: e,
        },
    }
}

fn explain_rustls(err: &rustls::Error, target: &str, mode: SslMode) -> String {
    let mode = mode_name(mode);
    match err {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server certificate of {target} is not valid for the host name in the database URL ({err}); sslmode={mode} checks it: connect with a host name the certificate names (its CN/SAN), or use sslmode=verify-ca to check only the chain"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "the server certificate of {target} is not signed by the root certificate given in sslrootcert ({err}); sslmode={mode} verifies the chain: point sslrootcert at the CA that issued the server certificate"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => format!(
            "the server certificate of {target} is outside its validity period ({err}): renew it on the server, or check this machine's clock"
        ),
        other => format!("TLS handshake with {target} failed (sslmode={mode}): {other}"),
    }
}

/// The rustls settings `sslmode` asks for, or `None` when TLS is off.
pub fn client_config(info: &PgConnInfo) -> Result<Option<Arc<ClientConfig>>, PgError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::tls(format!("cannot set up TLS: {e}")))?;
    let root_file = root_cert_path(info);
    let verifier: Arc<dyn ServerCertVerifier> = match (info.ssl_mode, root_file) {
        (SslMode::Disable, _) => return Ok(None),
        (SslMode::Prefer, _) | (SslMode::Require, None) => {
            Arc::new(AcceptAnyCertificate { provider })
        }
        // libpq: with a root certificate, `require` verifies the chain like `verify-ca`.
        (SslMode::Require | SslMode::VerifyCa, Some(path)) => Arc::new(ChainOnly {
            inner: webpki_verifier(&path, provider)?,
        }),
        (SslMode::VerifyFull, Some(path)) => webpki_verifier(&path, provider)?,
        (mode @ (SslMode::VerifyCa | SslMode::VerifyFull), None) => {
            return Err(PgError::tls(format!(
                "sslmode={} needs the CA certificate that signed the server's certificate: add sslrootcert=/path/to/ca.pem to the database URL (or put it in ~/.postgresql/root.crt)",
                mode_name(mode)
            )))
        }
    };
    let cfg = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(cfg)))
}

/// `sslrootcert`, or libpq's default `~/.postgresql/root.crt` when that file exists.
fn root_cert_path(info: &PgConnInfo) -> Option<PathBuf> {
    if let Some(p) = &info.ssl_root_cert {
        return Some(p.clone());
    }
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".postgresql").join("root.crt");
    p.is_file().then_some(p)
}

fn webpki_verifier(
    path: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, PgError> {
    if path.as_os_str() == "system" {
        return Err(PgError::tls(
            "sslrootcert=system is not supported: point sslrootcert at a PEM file with the CA certificate",
        ));
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            PgError::tls(format!(
                "cannot read the root certificate file sslrootcert={} ({e}): it must be a readable PEM file with the CA certificate",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(PgError::tls(format!(
            "sslrootcert={} holds no PEM certificate (-----BEGIN CERTIFICATE-----): point it at the CA certificate",
            path.display()
        )));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| {
            PgError::tls(format!(
                "sslrootcert={} holds a certificate that cannot be used as a root ({e})",
                path.display()
            ))
        })?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| PgError::tls(format!("cannot set up certificate checks: {e}")))
}

/// `sslmode=require`/`prefer` without a root: encrypt, check nothing about the
/// certificate (libpq does the same), but still check the handshake signatures so
/// the session keys are the server's.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to the root, the host name is not
/// checked. webpki checks the chain before the name, so a name mismatch means the
/// chain was good.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Opens an ordinary SQL connection and drives it on a background task that ends
/// when the client is dropped.
pub async fn connect_sql(info: &PgConnInfo) -> Result<tokio_postgres::Client, PgError> {
    connect_sql_task(info).await.map(|(client, _)| client)
}

/// Asks the server to cancel what `token`'s connection is running (a new
/// connection of the same kind as [`connect_sql`]'s, within the connect
/// timeout).
pub async fn cancel_sql(
    info: &PgConnInfo,
    token: &tokio_postgres::CancelToken,
) -> Result<(), PgError> {
    let only_unix = info.hosts.iter().all(|h| matches!(h, PgHost::Unix { .. }));
    let tls = if only_unix {
        None
    } else {
        client_config(info)?
    };
    let cancelling = async {
        match tls {
            None => token.cancel_query(tokio_postgres::NoTls).await,
            Some(tls_cfg) => {
                let make = tokio_postgres_rustls::MakeRustlsConnect::new((*tls_cfg).clone());
                token.cancel_query(make).await
            }
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, cancelling).await {
        Ok(r) => r.map_err(PgError::from_sql),
        Err(_) => Ok(()),
    }
}

/// [`connect_sql`], with the task driving the connection (aborting it closes
/// the connection at once).
pub async fn connect_sql_task(
    info: &PgConnInfo,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), PgError> {
    let mut cfg = info.sql_config.clone();
    cfg.connect_timeout(Duration::from_secs(10));
    // Like libpq, never TLS over Unix-domain sockets (the server would say 'N').
    let only_unix = info.hosts.iter().all(|h| matches!(h, PgHost::Unix { .. }));
    let tls = if only_unix {
        None
    } else {
        client_config(info)?
    };
    let target = info.to_string();
    // tokio-postgres's connect timeout covers only the TCP connect: a server that
    // accepts and never answers would hold the startup handshake for ever.
    let connecting = async {
        let client = match tls {
            None => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let (client, conn) = cfg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(PgError::from_sql)?;
                let task = tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "sql connection ended");
                    }
                });
                (client, task)
            }
            Some(tls_cfg) => {
                let make = tokio_postgres_rustls::MakeRustlsConnect::new((*tls_cfg).clone());
                let (client, conn) = cfg
                    .connect(make)
                    .await
                    .map_err(|e| sql_tls_error(e, &target, info.ssl_mode))?;
                let task = tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "sql connection ended");
                    }
                });
                (client, task)
            }
        };
        Ok(client)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(r) => r,
        Err(_) => Err(PgError::Connect {
            target: target.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within {}s (the server accepted the connection but did not complete the PostgreSQL handshake)",
                    CONNECT_TIMEOUT.as_secs()
                ),
            ),
        }),
    }
}

/// TLS failures of the SQL connection are definite (retrying will not fix a
/// certificate); everything else keeps its usual classification.
fn sql_tls_error(e: tokio_postgres::Error, target: &str, mode: SslMode) -> PgError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<rustls::Error>() {
            return PgError::tls_caused(explain_rustls(r, target, mode), r.clone());
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return PgError::tls_caused(explain_rustls(r, target, mode), r.clone());
            }
        }
        if s.to_string().contains("server does not support TLS") {
            return PgError::tls(no_tls_help(target, mode));
        }
        src = s.source();
    }
    PgError::from_sql(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(query: &str) -> PgConnInfo {
        PgConnInfo::parse(&format!("postgres://u@localhost/db?{query}")).unwrap()
    }

    #[test]
    fn disable_means_no_tls_and_the_rest_build_a_config() {
        assert!(client_config(&info("sslmode=disable")).unwrap().is_none());
        assert!(client_config(&info("sslmode=prefer")).unwrap().is_some());
        assert!(client_config(&info("sslmode=require")).unwrap().is_some());
    }

    #[test]
    fn unreadable_or_empty_roots_are_explained() {
        let e = client_config(&info(
            "sslmode=verify-full&sslrootcert=/nonexistent/walcast-ca.pem",
        ))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot read the root certificate file"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("walcast-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client_config(&info(&format!(
            "sslmode=verify-ca&sslrootcert={}",
            empty.display()
        )))
        .unwrap_err();
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
