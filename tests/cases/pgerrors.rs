//! PostgreSQL errors are classified by SQLSTATE, never by message text: the same
//! failures against a server that speaks German (`lc_messages`) give the same
//! explanation and exit code as against one that speaks English.
//!
//! The translated locale is one `locale -a` lists, or one generated with
//! `localedef` into a directory the server reads through `LOCPATH`. Without
//! either (or without PostgreSQL's translations), the test says so and passes:
//! then the unit tests in `source::error` and `source::explain` are the proof.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::support::walcast::{spawn, BIN};
use crate::support::{cluster, Cluster};

const T: Duration = Duration::from_secs(30);

/// A locale with PostgreSQL's message translations, and the `LOCPATH` it needs
/// (None when it is installed system-wide).
struct Translated {
    name: String,
    locpath: Option<PathBuf>,
}

/// Languages to try, with the glibc locale that carries them.
const CANDIDATES: [(&str, &str); 3] = [("de", "de_DE"), ("fr", "fr_FR"), ("es", "es_ES")];

fn has_postgres_translation(lang: &str) -> bool {
    std::fs::read_dir(format!("/usr/share/locale/{lang}/LC_MESSAGES"))
        .map(|d| {
            d.flatten().any(|f| {
                let n = f.file_name().to_string_lossy().into_owned();
                n.starts_with("postgres") && n.ends_with(".mo")
            })
        })
        .unwrap_or(false)
}

fn translated_locale() -> Option<&'static Translated> {
    static FOUND: OnceLock<Option<Translated>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let installed = std::process::Command::new("locale")
                .arg("-a")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let usable = CANDIDATES
                .iter()
                .filter(|(lang, _)| has_postgres_translation(lang));
            for (_, locale) in usable.clone() {
                if let Some(l) = installed.lines().find(|l| {
                    l.starts_with(&format!("{locale}.")) && l.to_lowercase().contains("utf")
                }) {
                    return Some(Translated {
                        name: l.to_string(),
                        locpath: None,
                    });
                }
            }
            // Not installed: generate one where only this test looks (a few MB,
            // kept for the next run).
            let (_, locale) = usable
                .clone()
                .find(|(_, l)| Path::new("/usr/share/i18n/locales").join(l).is_file())?;
            let name = format!("{locale}.UTF-8");
            let dir = std::env::temp_dir().join("walcast-test-locales");
            if !dir.join(&name).join("LC_MESSAGES").exists() {
                let tmp = std::env::temp_dir()
                    .join(format!("walcast-test-locales-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&tmp);
                std::fs::create_dir_all(&tmp).ok()?;
                let ok = std::process::Command::new("localedef")
                    .args(["-i", locale, "-f", "UTF-8"])
                    .arg(tmp.join(&name))
                    .output()
                    .map(|o| tmp.join(&name).join("LC_MESSAGES").exists() || o.status.success())
                    .unwrap_or(false);
                if !ok {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return None;
                }
                // Readable by the server's user; renamed into place whole, so a
                // concurrent run sees all of it or nothing.
                let _ = std::process::Command::new("chmod")
                    .args(["-R", "a+rX"])
                    .arg(&tmp)
                    .status();
                if std::fs::rename(&tmp, &dir).is_err() {
                    let _ = std::fs::remove_dir_all(&tmp);
                }
            }
            let ready = dir.join(&name).join("LC_MESSAGES").exists();
            ready.then_some(Translated {
                name,
                locpath: Some(dir),
            })
        })
        .as_ref()
}

/// A cluster whose server messages are in `t`'s language.
fn translated_cluster(t: &Translated, extra: &[(&str, &str)]) -> Cluster {
    let lc = format!("'{}'", t.name);
    let mut settings = vec![("lc_messages", lc.as_str())];
    settings.extend_from_slice(extra);
    let locpath = t.locpath.as_ref().map(|p| p.display().to_string());
    let env: Vec<(&str, &str)> = locpath.iter().map(|p| ("LOCPATH", p.as_str())).collect();
    Cluster::start_with_env(&settings, &env)
}

/// Runs `walcast args…` to the end: (exit code, stderr with the port blanked).
async fn run(args: &[&str], port: u16) -> (i32, String) {
    let out = tokio::time::timeout(
        T,
        tokio::process::Command::new(BIN)
            .current_dir(crate::support::scratch_dir())
            .args(args)
            .env("WALCAST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("walcast did not finish in time")
    .expect("run walcast");
    let err = String::from_utf8_lossy(&out.stderr).replace(&port.to_string(), "PORT");
    (out.status.code().unwrap_or(-1), err)
}

async fn prepare(c: &tokio_postgres::Client, db: &str) {
    c.batch_execute(&format!(
        "create table t (id int primary key); create publication pub_{db} for table t"
    ))
    .await
    .unwrap();
    c.batch_execute(&format!(
        "select pg_create_logical_replication_slot('slot_{db}', 'pgoutput')"
    ))
    .await
    .unwrap();
}

/// The failures whose explanation does not depend on the server's language:
/// (what, exit code, stderr) for each.
async fn failures(pg: &Cluster, db: &str) -> Vec<(&'static str, i32, String)> {
    let url = pg.url(db);
    let slot = format!("slot_{db}");
    let publication = format!("pub_{db}");
    let tail = |slot: String, publication: String| {
        let url = url.clone();
        async move {
            run(
                &[
                    "tail",
                    "--database-url",
                    &url,
                    "--slot",
                    &slot,
                    "--publication",
                    &publication,
                ],
                pg.port(),
            )
            .await
        }
    };
    let mut out = Vec::new();
    let (code, err) = tail("no_such_slot".into(), publication.clone()).await;
    out.push(("missing slot", code, err));
    let (code, err) = tail(slot.clone(), "no_such_pub".into()).await;
    out.push(("missing publication", code, err));
    // A server error that arrives while streaming (SQLSTATE 42704 from the
    // walsender, in the server's language).
    let c = pg.client(db).await;
    let mut p = spawn(&[
        "tail",
        "--database-url",
        &url,
        "--slot",
        &slot,
        "--publication",
        &publication,
    ]);
    c.batch_execute("insert into t values (1)").await.unwrap();
    p.next_json(T).await;
    c.batch_execute(&format!(
        "drop publication {publication}; insert into t values (2)"
    ))
    .await
    .unwrap();
    let mut child = p.child;
    let status = tokio::time::timeout(T, child.wait())
        .await
        .expect("tail did not stop")
        .unwrap();
    let mut err = String::new();
    if let Some(mut e) = p.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut err).await;
    }
    // Keep walcast's words; the server's quoted error is in its own language.
    let ours = err
        .lines()
        .filter(|l| l.starts_with("walcast: "))
        .map(|l| l.split(" (PostgreSQL: ").next().unwrap_or(l).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    out.push((
        "publication dropped while streaming",
        status.code().unwrap_or(-1),
        ours,
    ));
    out
}

async fn wal_level_failures(pg: &Cluster) -> Vec<(&'static str, i32, String)> {
    let url = pg.url("postgres");
    pg.client("postgres")
        .await
        .batch_execute("create table t (id int primary key)")
        .await
        .unwrap();
    let (code, err) = run(
        &[
            "tail",
            "--database-url",
            &url,
            "--slot",
            "s",
            "--publication",
            "p",
        ],
        pg.port(),
    )
    .await;
    let (scode, serr) = run(
        &[
            "setup",
            "--database-url",
            &url,
            "--publication",
            "p",
            "--tables",
            "t",
            "--create-slot",
            "--slot",
            "s",
        ],
        pg.port(),
    )
    .await;
    vec![
        ("tail on wal_level=replica", code, err),
        ("setup on wal_level=replica", scode, serr),
    ]
}

#[tokio::test]
async fn errors_are_explained_the_same_in_another_language() {
    let Some(t) = translated_locale() else {
        eprintln!(
            "no translated locale available (none in `locale -a` with PostgreSQL's translations, and localedef cannot make one): the unit tests in source::error and source::explain prove classification is by SQLSTATE"
        );
        return;
    };
    let locale = t.name.clone();
    // Three servers, started side by side.
    let a = tokio::task::spawn_blocking(move || translated_cluster(t, &[]));
    let b = tokio::task::spawn_blocking(move || translated_cluster(t, &[("wal_level", "replica")]));
    let c = tokio::task::spawn_blocking(|| Cluster::start(&[("wal_level", "replica")]));
    let (translated, replica_translated, replica_english) =
        (a.await.unwrap(), b.await.unwrap(), c.await.unwrap());

    // The server really speaks another language.
    let probe = translated.client("postgres").await;
    let e = probe
        .batch_execute("select * from no_such_table")
        .await
        .unwrap_err();
    let db = e.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "42P01");
    assert!(
        !db.message().contains("does not exist"),
        "lc_messages={locale} should translate: {}",
        db.message()
    );

    let db = "pgerr_lang";
    prepare(&cluster().new_db(db).await, db).await;
    prepare(&translated.new_db(db).await, db).await;
    let english = failures(cluster(), db).await;
    let other = failures(&translated, db).await;
    let english_replica = wal_level_failures(&replica_english).await;
    let other_replica = wal_level_failures(&replica_translated).await;
    for ((what, code, err), (_, code2, err2)) in english
        .iter()
        .zip(&other)
        .chain(english_replica.iter().zip(&other_replica))
    {
        assert_eq!((code, err), (code2, err2), "{what}: English vs {locale}");
    }
    // And they are the explanations (and exit codes) walcast gives in English.
    let find = |what: &str| {
        english
            .iter()
            .chain(&english_replica)
            .find(|(w, _, _)| *w == what)
            .cloned()
            .unwrap()
    };
    let (code, err) = (find("missing slot").1, find("missing slot").2);
    assert!(
        code == 2 && err.contains("does not exist") && err.contains("--create-slot"),
        "{code} {err}"
    );
    let (code, err) = (find("missing publication").1, find("missing publication").2);
    assert!(
        code == 2 && err.contains("publication") && err.contains("walcast setup"),
        "{code} {err}"
    );
    let (code, err) = (
        find("publication dropped while streaming").1,
        find("publication dropped while streaming").2,
    );
    assert!(
        code == 2 && err.contains("publication") && err.contains("does not exist"),
        "{code} {err}"
    );
    for what in ["tail on wal_level=replica", "setup on wal_level=replica"] {
        let (_, code, err) = find(what);
        assert!(
            code == 2 && err.contains("wal_level") && err.contains("restart"),
            "{what}: {code} {err}"
        );
    }
    translated.stop();
    replica_translated.stop();
    replica_english.stop();
}
