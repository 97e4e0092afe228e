//! TLS to PostgreSQL: every `sslmode` against a cluster with `ssl = on` and a
//! certificate for `localhost` signed by a CA made here with rcgen, on both the
//! SQL connection and the replication connection, and `walcast tail` end to end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use walcast::config::PgConnInfo;
use walcast::source::conn::ReplicationConnection;

use crate::support::walcast::{self as bin, spawn};
use crate::support::{cluster, wait_for, Cluster};

const T: Duration = Duration::from_secs(30);

/// A cluster with `ssl = on`, its CA, and an unrelated CA.
struct TlsServer {
    pg: Cluster,
    ca: PathBuf,
    wrong_ca: PathBuf,
}

fn tls_server() -> &'static TlsServer {
    static SERVER: OnceLock<TlsServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("walcast-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, issuer) = make_ca("walcast test CA");
        let (wrong_ca, _) = make_ca("some other CA");
        let server_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_cert = params.signed_by(&server_key, &issuer).unwrap();

        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca_path = write("ca.pem", &ca);
        let wrong_path = write("wrong-ca.pem", &wrong_ca);
        let cert_path = write("server.crt", &server_cert.pem());
        let key_path = write("server.key", &server_key.serialize_pem());
        // PostgreSQL insists the key belongs to the server's user, mode 0600.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        if running_as_root() {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(&key_path)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown postgres {}", key_path.display());
        }
        let quoted = |p: &Path| format!("'{}'", p.display());
        let pg = Cluster::start(&[
            ("ssl", "on"),
            ("ssl_cert_file", &quoted(&cert_path)),
            ("ssl_key_file", &quoted(&key_path)),
        ]);
        TlsServer {
            pg,
            ca: ca_path,
            wrong_ca: wrong_path,
        }
    })
}

/// A self-signed CA: its PEM and the issuer to sign with.
fn make_ca(name: &str) -> (String, CertifiedIssuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    (issuer.pem(), issuer)
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl TlsServer {
    /// A URL with `host`, `sslmode` and optionally `sslrootcert`, tagged with `app`
    /// as application_name so the test can find its own sessions.
    fn url(&self, host: &str, mode: &str, root: Option<&Path>, app: &str) -> String {
        let mut u = format!(
            "postgres://postgres@{host}:{}/postgres?sslmode={mode}&application_name={app}",
            self.pg.port()
        );
        if let Some(r) = root {
            u.push_str(&format!("&sslrootcert={}", r.display()));
        }
        u
    }
}

/// Opens both connections walcast uses; returns whether each runs over TLS, as
/// the server sees it (pg_stat_ssl), or the first error's text.
async fn connect_both(url: &str, app: &str, server: &Cluster) -> Result<(bool, bool), String> {
    let info = PgConnInfo::parse(url).map_err(|e| e.to_string())?;
    let sql = walcast::source::tls::connect_sql(&info)
        .await
        .map_err(|e| e.to_string())?;
    let sql_ssl: bool = sql
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let mut repl = ReplicationConnection::connect(&info)
        .await
        .map_err(|e| e.to_string())?;
    let ident = repl
        .simple_query("IDENTIFY_SYSTEM")
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(ident.len(), 1, "IDENTIFY_SYSTEM answers one row");
    let admin = server.client("postgres").await;
    let repl_ssl: bool = admin
        .query_one(
            "select s.ssl from pg_stat_ssl s join pg_stat_activity a using (pid) \
             where a.application_name = $1 and a.backend_type = 'walsender'",
            &[&app],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    repl.close().await;
    Ok((sql_ssl, repl_ssl))
}

#[tokio::test]
async fn verify_full_succeeds_with_the_right_root_over_localhost() {
    let s = tls_server();
    let app = "tls_verify_full";
    let url = s.url("localhost", "verify-full", Some(&s.ca), app);
    assert_eq!(connect_both(&url, app, &s.pg).await, Ok((true, true)));
}

#[tokio::test]
async fn verify_full_rejects_a_host_name_the_certificate_does_not_name() {
    let s = tls_server();
    let url = s.url("127.0.0.1", "verify-full", Some(&s.ca), "tls_wrong_host");
    let info = PgConnInfo::parse(&url).unwrap();
    let err = walcast::source::tls::connect_sql(&info).await.unwrap_err();
    assert!(
        err.to_string().contains("not valid for the host name"),
        "{err}"
    );
    assert!(
        !err.is_transient(),
        "a certificate error must not be retried"
    );
    let Err(err) = ReplicationConnection::connect(&info).await else {
        panic!("replication connection accepted a certificate for another host");
    };
    let text = err.to_string();
    assert!(
        text.contains("not valid for the host name") && text.contains("verify-ca"),
        "{text}"
    );
    assert!(!err.is_transient());

    // verify-ca checks only the chain, so the same host is fine.
    let app = "tls_verify_ca";
    let url = s.url("127.0.0.1", "verify-ca", Some(&s.ca), app);
    assert_eq!(connect_both(&url, app, &s.pg).await, Ok((true, true)));
}

#[tokio::test]
async fn verify_rejects_the_wrong_root() {
    let s = tls_server();
    for mode in ["verify-full", "verify-ca"] {
        let url = s.url("localhost", mode, Some(&s.wrong_ca), "tls_wrong_root");
        let info = PgConnInfo::parse(&url).unwrap();
        let err = walcast::source::tls::connect_sql(&info).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("not signed by the root certificate given in sslrootcert"),
            "{mode}: {err}"
        );
        let Err(err) = ReplicationConnection::connect(&info).await else {
            panic!("{mode}: replication connection accepted a certificate from another CA");
        };
        assert!(
            err.to_string()
                .contains("not signed by the root certificate given in sslrootcert"),
            "{mode}: {err}"
        );
    }
    // No root at all: say where to put it.
    let url = s.url("localhost", "verify-full", None, "tls_no_root");
    let err = connect_both(&url, "tls_no_root", &s.pg).await.unwrap_err();
    assert!(err.contains("sslrootcert="), "{err}");
}

#[tokio::test]
async fn require_prefer_and_disable() {
    let s = tls_server();
    // require: encrypted, nothing verified (no root given, IP host).
    let app = "tls_require";
    let url = s.url("127.0.0.1", "require", None, app);
    assert_eq!(connect_both(&url, app, &s.pg).await, Ok((true, true)));
    // prefer: TLS when the server offers it.
    let app = "tls_prefer";
    let url = s.url("127.0.0.1", "prefer", None, app);
    assert_eq!(connect_both(&url, app, &s.pg).await, Ok((true, true)));
    // disable: plain text even though the server has ssl on.
    let app = "tls_disable";
    let url = s.url("127.0.0.1", "disable", None, app);
    assert_eq!(connect_both(&url, app, &s.pg).await, Ok((false, false)));

    // Against a server without TLS: prefer falls back, require refuses clearly.
    let plain = cluster();
    let app = "tls_prefer_plain";
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=prefer&application_name={app}",
        plain.port()
    );
    assert_eq!(connect_both(&url, app, plain).await, Ok((false, false)));
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
        plain.port()
    );
    let info = PgConnInfo::parse(&url).unwrap();
    let Err(err) = ReplicationConnection::connect(&info).await else {
        panic!("require connected without TLS");
    };
    assert!(
        err.to_string().contains("does not accept TLS connections"),
        "{err}"
    );
    let err = walcast::source::tls::connect_sql(&info).await.unwrap_err();
    assert!(
        err.to_string().contains("does not accept TLS connections"),
        "{err}"
    );
}

#[tokio::test]
async fn scram_authentication_over_tls() {
    let s = tls_server();
    let admin = s.pg.client("postgres").await;
    admin
        .batch_execute(
            "drop role if exists walcast_scram;
             create role walcast_scram login replication password 'sekret';",
        )
        .await
        .unwrap();
    let app = "tls_scram";
    let url = format!(
        "postgres://walcast_scram:sekret@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}&application_name={app}",
        s.pg.port(),
        s.ca.display()
    );
    assert_eq!(connect_both(&url, app, &s.pg).await, Ok((true, true)));
}

#[tokio::test]
async fn tail_streams_over_tls() {
    let s = tls_server();
    let db = "tls_tail";
    let c = s.pg.new_db(db).await;
    c.batch_execute("create table t (id int primary key, v text)")
        .await
        .unwrap();
    let app = "tls_tail_app";
    let url = format!(
        "postgres://postgres@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}&application_name={app}",
        s.pg.port(),
        s.ca.display()
    );
    // setup over TLS too.
    let (ok, out, err) = bin::run(
        &[
            "setup",
            "--database-url",
            &url,
            "--publication",
            "pub_tls",
            "--tables",
            "t",
            "--slot",
            "slot_tls_tail",
            "--create-slot",
        ],
        T,
    )
    .await;
    assert!(ok, "setup over TLS failed: {out}\n{err}");
    let mut tail = spawn(&[
        "tail",
        "--database-url",
        &url,
        "--slot",
        "slot_tls_tail",
        "--publication",
        "pub_tls",
    ]);
    let admin = s.pg.client("postgres").await;
    let ssl = wait_for("walcast's walsender", T, || async {
        admin
            .query_opt(
                "select s.ssl from pg_stat_ssl s join pg_stat_activity a using (pid) \
                 where a.application_name = $1 and a.backend_type = 'walsender'",
                &[&app],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, bool>(0))
    })
    .await;
    assert!(ssl, "the replication connection is not encrypted");
    c.batch_execute("insert into t values (1, 'over tls')")
        .await
        .unwrap();
    let ev = tail.next_json(T).await;
    assert_eq!(ev["type"], "INSERT");
    assert_eq!(ev["record"]["v"], "over tls");
    tail.signal(15);
    let (ok, err) = tail.wait(T).await;
    assert!(ok, "{err}");

    // A certificate problem stops tail with the reason instead of retrying forever.
    let bad = format!(
        "postgres://postgres@127.0.0.1:{}/{db}?sslmode=verify-full&sslrootcert={}",
        s.pg.port(),
        s.ca.display()
    );
    let (ok, _, err) = bin::run(
        &[
            "tail",
            "--database-url",
            &bad,
            "--slot",
            "slot_tls_tail",
            "--publication",
            "pub_tls",
        ],
        T,
    )
    .await;
    assert!(!ok && err.contains("not valid for the host name"), "{err}");
}
