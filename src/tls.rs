//! Transport to PostgreSQL: TCP or a Unix socket, with TLS as `sslmode` asks.
//!
//! Both connections walcast opens go through here: the replication connection
//! ([`connect_stream`], a raw byte stream for the replication protocol) and the
//! ordinary SQL connection ([`connect_sql`], a tokio-postgres client for catalog
//! queries and setup).

use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::{PgConnInfo, PgHost, SslMode};
use crate::replication::conn::PgIo;
use crate::replication::ReplicationError;

/// Opens the byte stream for the replication connection.
pub async fn connect_stream(
    info: &PgConnInfo,
    timeout: Duration,
) -> Result<Box<dyn PgIo>, ReplicationError> {
    if matches!(
        info.ssl_mode,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
    ) {
        return Err(ReplicationError::Setup(format!(
            "sslmode={:?} is not supported by this build; use sslmode=disable or prefer",
            info.ssl_mode
        )));
    }
    let mut last_err = None;
    for host in &info.hosts {
        let res = match host {
            PgHost::Tcp { host, port } => {
                match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), *port)))
                    .await
                {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        Ok(Box::new(s) as Box<dyn PgIo>)
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
    let (host, e) = last_err.expect("at least one host");
    Err(ReplicationError::Connect {
        target: match host {
            PgHost::Tcp { host, port } => format!("{host}:{port}"),
            PgHost::Unix { path } => path.display().to_string(),
        },
        source: e,
    })
}

/// Opens an ordinary SQL connection and drives it on a background task that ends
/// when the client is dropped.
pub async fn connect_sql(info: &PgConnInfo) -> Result<tokio_postgres::Client, ReplicationError> {
    if matches!(
        info.ssl_mode,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
    ) {
        return Err(ReplicationError::Setup(format!(
            "sslmode={:?} is not supported by this build; use sslmode=disable or prefer",
            info.ssl_mode
        )));
    }
    let mut cfg = info.sql_config.clone();
    cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
    cfg.connect_timeout(Duration::from_secs(10));
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(ReplicationError::from_sql)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "sql connection ended");
        }
    });
    Ok(client)
}
