//! Configuration: connection info for PostgreSQL and the daemon's settings.
//!
//! Database URLs are accepted in both libpq forms (`postgres://user:pw@host:port/db?…`
//! and `host=… user=… dbname=…`). `sslmode` and `sslrootcert` are read here with
//! libpq's meanings (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`)
//! because tokio-postgres only knows the first three; everything else is parsed by
//! tokio-postgres so both connections (replication and SQL) agree on it.

use std::path::PathBuf;
use std::str::FromStr;

/// libpq `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// Use TLS when the server offers it, without verifying the certificate (libpq's default).
    #[default]
    Prefer,
    /// TLS, certificate not verified.
    Require,
    /// TLS, certificate chain verified against `sslrootcert`.
    VerifyCa,
    /// TLS, chain verified and the host name checked.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConfigError::Invalid {
                    field: "sslmode".into(),
                    reason: format!(
                        "{other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                    ),
                })
            }
        })
    }
}

/// Where and how to reach PostgreSQL. `Debug` never prints the password.
#[derive(Clone)]
pub struct PgConnInfo {
    /// The URL as given, with `sslmode`/`sslrootcert` removed, for tokio-postgres.
    pub sql_config: tokio_postgres::Config,
    pub hosts: Vec<PgHost>,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub options: Option<String>,
    pub application_name: String,
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgHost {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

impl std::fmt::Debug for PgConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnInfo")
            .field("hosts", &self.hosts)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("ssl_mode", &self.ssl_mode)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for PgConnInfo {
    /// A description safe to log: host, port, database and user, never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.hosts.first() {
            Some(PgHost::Tcp { host, port }) => write!(f, "{host}:{port}")?,
            Some(PgHost::Unix { path }) => write!(f, "{}", path.display())?,
            None => write!(f, "?")?,
        }
        write!(f, "/{} as {}", self.dbname, self.user)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl PgConnInfo {
    /// Parses a libpq URL or key/value connection string. A password may also come from
    /// `PGPASSWORD`.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let (rest, tls) = split_tls_params(url);
        let ssl_mode = match tls.mode {
            Some(m) => m.parse()?,
            None => SslMode::default(),
        };
        let mut sql_config =
            tokio_postgres::Config::from_str(&rest).map_err(|e| ConfigError::Invalid {
                field: "database URL".into(),
                reason: format!(
                    "{e} (expected postgres://user:password@host:port/dbname or host=… dbname=…)"
                ),
            })?;
        let user = sql_config
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("PGUSER").ok())
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into());
        sql_config.user(&user);
        let password = sql_config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .or_else(|| std::env::var("PGPASSWORD").ok());
        if let Some(p) = &password {
            sql_config.password(p);
        }
        let dbname = sql_config
            .get_dbname()
            .map(str::to_string)
            .unwrap_or_else(|| user.clone());
        sql_config.dbname(&dbname);
        let application_name = sql_config
            .get_application_name()
            .unwrap_or("walcast")
            .to_string();
        sql_config.application_name(&application_name);
        sql_config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });

        let ports = sql_config.get_ports();
        let mut hosts = Vec::new();
        for (i, h) in sql_config.get_hosts().iter().enumerate() {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            hosts.push(match h {
                tokio_postgres::config::Host::Tcp(host) => PgHost::Tcp {
                    host: host.clone(),
                    port,
                },
                tokio_postgres::config::Host::Unix(dir) => PgHost::Unix {
                    path: dir.join(format!(".s.PGSQL.{port}")),
                },
            });
        }
        if hosts.is_empty() {
            let port = ports.first().copied().unwrap_or(5432);
            hosts.push(PgHost::Tcp {
                host: "localhost".into(),
                port,
            });
            sql_config.host("localhost");
        }
        Ok(PgConnInfo {
            sql_config,
            hosts,
            user,
            password,
            dbname,
            options: None,
            application_name,
            ssl_mode,
            ssl_root_cert: tls.root_cert.map(PathBuf::from),
        })
    }
}

struct TlsParams {
    mode: Option<String>,
    root_cert: Option<String>,
}

/// Removes `sslmode` and `sslrootcert` from a URL's query string or a key/value string.
fn split_tls_params(url: &str) -> (String, TlsParams) {
    let mut tls = TlsParams {
        mode: None,
        root_cert: None,
    };
    let is_tls_key = |k: &str| k == "sslmode" || k == "sslrootcert";
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), tls);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if is_tls_key(k) {
                let v = percent_decode(v);
                if k == "sslmode" {
                    tls.mode = Some(v)
                } else {
                    tls.root_cert = Some(v)
                }
            } else if !pair.is_empty() {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rest, tls)
    } else {
        let mut kept = Vec::new();
        for tok in url.split_whitespace() {
            match tok.split_once('=') {
                Some((k, v)) if is_tls_key(k.trim()) => {
                    let v = v.trim_matches('\'').to_string();
                    if k.trim() == "sslmode" {
                        tls.mode = Some(v)
                    } else {
                        tls.root_cert = Some(v)
                    }
                }
                _ => kept.push(tok),
            }
        }
        (kept.join(" "), tls)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_with_tls_params() {
        let i = PgConnInfo::parse(
            "postgres://app:s3cret@db.example:6543/shop?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(i.user, "app");
        assert_eq!(i.password.as_deref(), Some("s3cret"));
        assert_eq!(i.dbname, "shop");
        assert_eq!(i.ssl_mode, SslMode::VerifyFull);
        assert_eq!(i.ssl_root_cert, Some(PathBuf::from("/tmp/ca.pem")));
        assert_eq!(
            i.hosts,
            vec![PgHost::Tcp {
                host: "db.example".into(),
                port: 6543
            }]
        );
        assert!(!format!("{i:?} {i}").contains("s3cret"));
    }

    #[test]
    fn parses_key_value_form() {
        let i = PgConnInfo::parse("host=/tmp port=5433 user=u dbname=d sslmode=disable").unwrap();
        assert_eq!(i.ssl_mode, SslMode::Disable);
        assert_eq!(
            i.hosts,
            vec![PgHost::Unix {
                path: PathBuf::from("/tmp/.s.PGSQL.5433")
            }]
        );
    }

    #[test]
    fn rejects_unknown_sslmode() {
        let e = PgConnInfo::parse("postgres://u@h/d?sslmode=sometimes").unwrap_err();
        assert!(e.to_string().contains("sslmode"), "{e}");
    }
}
