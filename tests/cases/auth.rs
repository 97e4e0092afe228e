//! Auth: JWT at connect and join, JWKS, expiry and refresh, and row rules that leak nothing.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::support::cluster;
use crate::support::js::{is, is_on, JsClient};
use crate::support::setup_db;
use crate::support::walcast::{serve_db_with_config as start_with, Server};

const T: Duration = Duration::from_secs(20);
const SECRET: &str = "walcast-test-secret-with-enough-bytes";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn hs(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// An Ed25519 key pair made with openssl: (private PEM, public JWK with `kid`).
fn ed25519(dir: &Path, kid: &str) -> (Vec<u8>, Value) {
    let key = dir.join(format!("{kid}.pem"));
    let ok = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .status()
        .expect("openssl is needed to make test keys");
    assert!(ok.success());
    let der = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .unwrap()
        .stdout;
    let raw = &der[der.len() - 32..];
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "kid": kid, "alg": "EdDSA", "use": "sig"});
    (std::fs::read(&key).unwrap(), jwk)
}

fn eddsa(pem: &[u8], kid: &str, claims: Value) -> String {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(kid.into());
    encode(&h, &claims, &EncodingKey::from_ed_pem(pem).unwrap()).unwrap()
}

/// The HTTP status of a WebSocket upgrade with `apikey`, and the body's `reason`.
async fn connect_status(server: &Server, apikey: &str) -> (u16, String) {
    let url = format!(
        "ws://127.0.0.1:{}/realtime/v1/websocket?apikey={}&vsn=2.0.0",
        server.port, apikey
    );
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => (101, String::new()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let reason = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["reason"].as_str().map(str::to_string))
                .unwrap_or(body);
            (resp.status().as_u16(), reason)
        }
        Err(e) => panic!("connect: {e}"),
    }
}

#[tokio::test]
async fn token_matrix_at_connect() {
    let db = "auth_matrix";
    setup_db(db, "create table t (id int primary key);").await;
    let dir = std::env::temp_dir().join(format!("walcast-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (k1, jwk1) = ed25519(&dir, "k1");
    let (k2, jwk2) = ed25519(&dir, "k2");
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk1]}).to_string()).unwrap();
    let config = format!(
        "[auth]\nmode = \"jwt\"\njwt_secret = \"{SECRET}\"\njwks_file = \"{}\"\njwks_refresh_min_secs = 0\nleeway_secs = 0\nissuer = \"walcast-test\"\naudience = \"authenticated\"\n",
        jwks.display()
    );
    let server = start_with(db, &config).await;
    let good = json!({"role": "authenticated", "sub": "u1", "exp": now() + 600, "iss": "walcast-test", "aud": "authenticated"});
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let none_token = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(good.to_string().as_bytes())
    );
    // HS256 signed with the public key material: the algorithm-confusion attack.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &good,
        &EncodingKey::from_secret(jwk1["x"].as_str().unwrap().as_bytes()),
    )
    .unwrap();
    let bad_sig = {
        let t = hs(good.clone());
        let (head, _) = t.rsplit_once('.').unwrap();
        format!("{head}.{}", b64url(b"not the signature at all"))
    };
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("none", String::new(), 401, "missing_token"),
        ("malformed", "abc.def".into(), 401, "malformed"),
        ("bad signature", bad_sig, 401, "bad_signature"),
        ("alg none", none_token, 401, "algorithm"),
        (
            "expired",
            hs(with("exp", json!(now() - 60))),
            401,
            "expired",
        ),
        (
            "not yet valid",
            hs(with("nbf", json!(now() + 600))),
            401,
            "not_yet_valid",
        ),
        (
            "wrong issuer",
            hs(with("iss", json!("someone-else"))),
            401,
            "issuer",
        ),
        (
            "wrong audience",
            hs(with("aud", json!("other"))),
            401,
            "audience",
        ),
        (
            "no exp",
            hs(json!({"role": "anon", "iss": "walcast-test", "aud": "authenticated"})),
            401,
            "missing_claim",
        ),
        (
            "unknown kid",
            eddsa(&k2, "k2", good.clone()),
            401,
            "unknown_kid",
        ),
        ("valid HS256", hs(good.clone()), 101, ""),
        (
            "valid EdDSA from the JWKS",
            eddsa(&k1, "k1", good.clone()),
            101,
            "",
        ),
    ];
    for (name, token, want, reason) in cases {
        let (status, got) = connect_status(&server, &token).await;
        assert_eq!(status, want, "{name}: {got}");
        if want == 401 {
            assert_eq!(got, reason, "{name}");
        }
    }
    let _ = confused;
    // JWKS rotation: a new key appears; its kid triggers a re-read and is accepted.
    std::fs::write(&jwks, json!({"keys": [jwk1, jwk2]}).to_string()).unwrap();
    let (status, got) = connect_status(&server, &eddsa(&k2, "k2", good.clone())).await;
    assert_eq!(status, 101, "rotated key: {got}");
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    let db = "auth_confusion";
    setup_db(db, "create table t (id int primary key);").await;
    let dir = std::env::temp_dir().join(format!("walcast-keys2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_k1, jwk1) = ed25519(&dir, "k1");
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk1.clone()]}).to_string()).unwrap();
    // Only public keys configured: an HS256 token (signed with the public key) is refused.
    let server = start_with(
        db,
        &format!(
            "[auth]\nmode = \"jwt\"\njwks_file = \"{}\"\n",
            jwks.display()
        ),
    )
    .await;
    let claims = json!({"role": "authenticated", "exp": now() + 600});
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(jwk1["x"].as_str().unwrap().as_bytes()),
    )
    .unwrap();
    assert_eq!(
        connect_status(&server, &confused).await,
        (401, "algorithm".into())
    );
}

fn portal_config() -> String {
    format!(
        r#"[auth]
mode = "jwt"
jwt_secret = "{SECRET}"
leeway_secs = 0

[[auth.tables]]
name = "public.invoices"
roles = ["authenticated"]
row_filter = "customer_id=eq.{{claims.sub}}"
columns = ["id", "customer_id", "amount", "status"]
"#
    )
}

async fn js_connect(js: &mut JsClient, client: &str, server: &Server, apikey: &str, trace: bool) {
    js.call(
        json!({"cmd": "connect", "client": client, "url": format!("ws://127.0.0.1:{}/realtime/v1", server.port),
               "apikey": apikey, "vsn": "2.0.0", "trace_frames": trace}),
        T,
    )
    .await;
}

async fn js_subscribe(js: &mut JsClient, client: &str, channel: &str, bindings: Value) -> Value {
    js.call(
        json!({"cmd": "subscribe", "client": client, "channel": channel, "postgres_changes": bindings}),
        T,
    )
    .await;
    js.wait_for("a status", T, |v| {
        v["client"] == client && is_on(v, "status", channel)
    })
    .await
}

#[tokio::test]
async fn row_rules_never_leak_rows_or_columns() {
    let db = "auth_leak";
    let c = setup_db(
        db,
        "create table invoices (id int primary key, customer_id text not null, amount numeric, status text, secret_note text);
         alter table invoices replica identity full;
         create table unruled (id int primary key);",
    )
    .await;
    let server = start_with(db, &portal_config()).await;
    let customers: Vec<String> = (1..=6).map(|i| format!("cust{i}")).collect();
    let mut js = JsClient::spawn().await;
    for cu in &customers {
        let token = hs(json!({"role": "authenticated", "sub": cu, "exp": now() + 3600}));
        js_connect(&mut js, cu, &server, &token, true).await;
        let st = js_subscribe(
            &mut js,
            cu,
            "inv",
            json!([{"event": "*", "schema": "public", "table": "invoices"}]),
        )
        .await;
        assert_eq!(st["status"], "SUBSCRIBED", "{st}");
    }
    // A table without a rule is not subscribable; nor is a filter on a hidden column.
    let st = js_subscribe(
        &mut js,
        "cust1",
        "unruled",
        json!([{"event": "*", "schema": "public", "table": "unruled"}]),
    )
    .await;
    assert_eq!(st["status"], "CHANNEL_ERROR", "{st}");
    let st = js_subscribe(&mut js, "cust1", "probe", json!([{"event": "*", "schema": "public", "table": "invoices", "filter": "secret_note=eq.x"}])).await;
    assert_eq!(st["status"], "CHANNEL_ERROR", "{st}");

    // Random operations; the oracle is the owner read from the database around each.
    let mut seed: u64 = 0x5eed_1234;
    let mut rnd = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let mut expected: HashMap<String, Vec<(String, i32)>> = HashMap::new();
    let mut next_id = 1;
    let mut live: Vec<i32> = Vec::new();
    for _ in 0..160 {
        let op = if live.is_empty() { 0 } else { rnd(4) };
        match op {
            0 => {
                let owner = &customers[rnd(6) as usize];
                let id = next_id;
                next_id += 1;
                c.execute(
                    "insert into invoices values ($1, $2, $3::int4::numeric, 'open', $4)",
                    &[&id, owner, &(rnd(1000) as i32), &format!("secret-{id}")],
                )
                .await
                .unwrap();
                live.push(id);
                expected
                    .entry(owner.clone())
                    .or_default()
                    .push(("INSERT".into(), id));
            }
            1 | 2 => {
                let id = live[rnd(live.len() as u64) as usize];
                // 2: move the invoice to another customer.
                let new_owner = if op == 2 {
                    Some(customers[rnd(6) as usize].clone())
                } else {
                    None
                };
                let row = c
                    .query_one(
                        "update invoices set amount = amount + 1, customer_id = coalesce($2, customer_id) where id = $1 returning customer_id",
                        &[&id, &new_owner],
                    )
                    .await
                    .unwrap();
                let owner: String = row.get(0);
                expected
                    .entry(owner)
                    .or_default()
                    .push(("UPDATE".into(), id));
            }
            _ => {
                let i = rnd(live.len() as u64) as usize;
                let id = live.swap_remove(i);
                let row = c
                    .query_one(
                        "delete from invoices where id = $1 returning customer_id",
                        &[&id],
                    )
                    .await
                    .unwrap();
                let owner: String = row.get(0);
                expected
                    .entry(owner)
                    .or_default()
                    .push(("DELETE".into(), id));
            }
        }
    }
    let allowed: HashSet<&str> = ["id", "customer_id", "amount", "status"]
        .into_iter()
        .collect();
    let mut total = 0;
    for cu in &customers {
        let want = expected.remove(cu).unwrap_or_default();
        for (kind, id) in &want {
            let v = js
                .wait_for(&format!("{kind} {id} for {cu}"), T, |v| {
                    v["client"] == cu.as_str() && is_on(v, "postgres_changes", "inv")
                })
                .await;
            let p = &v["payload"];
            assert_eq!(
                (
                    p["eventType"].as_str().unwrap(),
                    p["new"]["id"].as_i64().or(p["old"]["id"].as_i64()).unwrap() as i32
                ),
                (kind.as_str(), *id),
                "{cu} got {p}"
            );
            for side in ["new", "old"] {
                for (k, val) in p[side].as_object().unwrap() {
                    assert!(allowed.contains(k.as_str()), "{cu} saw column {k}");
                    if k == "customer_id" {
                        assert_eq!(
                            val,
                            cu.as_str(),
                            "{cu} saw another customer's row image: {p}"
                        );
                    }
                }
            }
            total += 1;
        }
    }
    js.expect_none(
        "any change beyond the oracle's",
        Duration::from_millis(800),
        |v| is(v, "postgres_changes"),
    )
    .await;
    // Nothing secret ever crossed the wire.
    for v in js.drain() {
        if is(&v, "frame") && v["dir"] == "in" {
            let text = v["text"].as_str().unwrap_or_default();
            assert!(
                !text.contains("secret-") && !text.contains("\"secret_note\":"),
                "secret column on the wire: {text}"
            );
        }
    }
    assert!(total > 100, "the workload produced {total} deliveries");
    eprintln!("leak test: {total} deliveries checked against the oracle, 0 leaked, 0 missing");
}

#[tokio::test]
async fn expiry_stops_delivery_and_a_refresh_keeps_it_going() {
    let db = "auth_expiry";
    let c = setup_db(
        db,
        "create table invoices (id int primary key, customer_id text, amount numeric, status text, secret_note text);",
    )
    .await;
    let server = start_with(db, &portal_config()).await;
    let mut js = JsClient::spawn().await;
    let long = hs(json!({"role": "authenticated", "sub": "a", "exp": now() + 3600}));
    js_connect(&mut js, "a", &server, &long, false).await;
    // Join with a short-lived user token; refresh it before it expires.
    js.call(json!({"cmd": "set_auth", "client": "a", "token": hs(json!({"role": "authenticated", "sub": "a", "exp": now() + 3}))}), T).await;
    let st = js_subscribe(
        &mut js,
        "a",
        "inv",
        json!([{"event": "INSERT", "schema": "public", "table": "invoices"}]),
    )
    .await;
    assert_eq!(st["status"], "SUBSCRIBED");
    c.batch_execute("insert into invoices values (1, 'a', 1, 'open', 'x')")
        .await
        .unwrap();
    js.wait_for("row 1", T, |v| is_on(v, "postgres_changes", "inv"))
        .await;
    js.call(json!({"cmd": "set_auth", "client": "a", "token": hs(json!({"role": "authenticated", "sub": "a", "exp": now() + 8}))}), T).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    c.batch_execute("insert into invoices values (2, 'a', 1, 'open', 'x')")
        .await
        .unwrap();
    let v = js
        .wait_for("row 2 after the refresh", T, |v| {
            is_on(v, "postgres_changes", "inv")
        })
        .await;
    assert_eq!(v["payload"]["new"]["id"], 2);
    // Let the refreshed token expire: a system error, the channel closes, no more rows.
    let sys = js
        .wait_for("the expiry system message", T, |v| {
            is_on(v, "system", "inv") && v["payload"]["status"] == "error"
        })
        .await;
    assert!(sys.to_string().contains("expired"), "{sys}");
    c.batch_execute("insert into invoices values (3, 'a', 1, 'open', 'x')")
        .await
        .unwrap();
    js.expect_none("rows after expiry", Duration::from_secs(1), |v| {
        is_on(v, "postgres_changes", "inv")
    })
    .await;
}

#[tokio::test]
async fn without_auth_only_loopback_is_served() {
    let db = "auth_default";
    setup_db(db, "create table t (id int primary key);").await;
    let listen = "0.0.0.0:0";
    let (ok, _, err) = crate::support::walcast::run(
        &[
            "serve",
            "--database-url",
            &cluster().url(db),
            "--slot",
            "s_auth_default",
            "--publication",
            "pub_auth_default",
            "--create-slot",
            "--listen",
            listen,
        ],
        T,
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("server.listen") && err.contains("auth"),
        "{err}"
    );
}
