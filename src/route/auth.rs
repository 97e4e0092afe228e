//! Authentication (JWT) and per-table row rules, evaluated in memory.
//!
//! # Tokens
//!
//! A token arrives as the `apikey` query parameter (or `x-api-key` header) when a
//! socket connects, as `access_token` in `phx_join` (falling back to the connect
//! token, since supabase-js often joins before it knows the user's token), and in
//! later `access_token` messages. [`Verifier::verify`] accepts HS256/384/512 with
//! the configured secret, and RS256/384/512, ES256/384 and EdDSA with keys from a
//! JWKS (a file or a URL; cached, re-read when a token names an unknown `kid`, at
//! most once per `jwks_refresh_min_secs`). `exp` is required; `nbf`/`iat` are
//! honoured with `leeway_secs`; `iss` and `aud` are checked when configured. The
//! algorithm must match the key: an HS token is never checked against a public key
//! or the reverse, and `alg: none` is refused.
//!
//! # Row rules
//!
//! Per table, who may subscribe and which rows and columns they may see:
//!
//! ```toml
//! [[auth.tables]]
//! name = "public.invoices"
//! roles = ["authenticated"]
//! row_filter = "customer_id=eq.{claims.sub}"
//! columns = ["id", "customer_id", "status", "amount", "due_at"]
//! ```
//!
//! The row filter uses the client filter grammar; `{claims.X}` placeholders take
//! claim values (strings and numbers quoted, arrays turn `eq` into `in`). A
//! missing claim makes the rule match nothing, never everything. The rule is ANDed
//! with the subscriber's own filter; INSERT/UPDATE are judged on the new row and
//! DELETE on the old row, so an UPDATE that moves a row out of a subscriber's rule
//! is not delivered with its new values. Columns outside `columns` are removed
//! from `record`, `old_record` and `columns`. Tables without a rule are not
//! subscribable unless marked `public = true`, or the token's role is in
//! `bypass_roles`.
//!
//! A table may have several rules for different roles (managers see every sale,
//! reps only theirs); the one whose `roles` name the token's role applies.
//! [`AuthConfig::validate`] refuses two rules of a table that can match the same
//! role (a shared role, or a rule without `roles` or with `public` beside
//! another), naming both, so the answer never depends on rule order.
//!
//! # Refusals
//!
//! Access is judged before anything is looked up in the catalog, and a token
//! without rights to a table gets one message, [`refusal`], whether the table does
//! not exist, is not published, or has no rule for its role: otherwise any token
//! could map the schema. The precise reason goes to the debug log only.
//!
//! # HTTP requests
//!
//! [`request_token`] is the one place a token is taken from an HTTP request (the
//! WebSocket upgrade and `POST /api/broadcast`): `Authorization: Bearer`, whose
//! scheme is case-insensitive, then the `apikey` and `x-api-key` headers, then
//! the `apikey` query parameter.
//!
//! # Secure by default
//!
//! With no `[auth]` mode set, `serve` refuses to listen on anything but loopback;
//! `mode = "none"` must be said explicitly to serve other addresses without auth.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

pub use crate::config::{
    AuthConfig, AuthMode, TableRule, DEFAULT_JWKS_REFRESH_MIN_SECS, DEFAULT_LEEWAY_SECS,
};
use crate::route::filter::Filter;

/// JWT claims.
pub type Claims = Map<String, Value>;

/// Why a token was refused; `reason()` is the bounded label for metrics.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("a token is required (apikey parameter, or access_token)")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token algorithm {0} is not accepted for the configured keys")]
    Algorithm(String),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    Issuer,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token names an unknown key id {0:?}")]
    UnknownKid(String),
    #[error("token is missing the required claim {0}")]
    MissingClaim(String),
    #[error("cannot load the JWKS: {0}")]
    Jwks(String),
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Malformed(_) => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Issuer => "issuer",
            AuthError::Audience => "audience",
            AuthError::UnknownKid(_) => "unknown_kid",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::Jwks(_) => "jwks",
        }
    }
}

/// A verified token.
#[derive(Clone, Debug)]
pub struct Verified {
    pub claims: Claims,
    /// Unix seconds until which the token is accepted: its `exp` plus the leeway.
    pub exp: i64,
}

impl Verified {
    pub fn role(&self) -> Option<&str> {
        self.claims.get("role").and_then(Value::as_str)
    }
}

struct Jwks {
    keys: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    /// Keys without a `kid`.
    anonymous: Vec<(DecodingKey, Option<Algorithm>)>,
    loaded_at: Option<Instant>,
}

/// Verifies tokens and evaluates table rules.
pub struct Verifier {
    cfg: AuthConfig,
    secret: Option<DecodingKey>,
    jwks: Mutex<Jwks>,
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const HS: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

impl Verifier {
    pub fn new(cfg: AuthConfig) -> Self {
        let secret = cfg
            .jwt_secret
            .as_deref()
            .map(|s| DecodingKey::from_secret(s.as_bytes()));
        Verifier {
            cfg,
            secret,
            jwks: Mutex::new(Jwks {
                keys: HashMap::new(),
                anonymous: Vec::new(),
                loaded_at: None,
            }),
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled()
    }

    /// Loads the JWKS (if configured) so configuration errors show at startup.
    pub async fn preload(&self) -> Result<(), AuthError> {
        if self.cfg.jwks_file.is_some() || self.cfg.jwks_url.is_some() {
            self.refresh_jwks(true).await?;
        }
        Ok(())
    }

    async fn refresh_jwks(&self, force: bool) -> Result<bool, AuthError> {
        let min = Duration::from_secs(self.cfg.jwks_refresh_min_secs);
        if !force {
            let recent = self
                .jwks
                .lock()
                .map(|j| j.loaded_at.is_some_and(|t| t.elapsed() < min))
                .unwrap_or(true);
            if recent {
                return Ok(false);
            }
        }
        let text = if let Some(path) = &self.cfg.jwks_file {
            tokio::fs::read_to_string(path)
                .await
                .map_err(|e| AuthError::Jwks(format!("{}: {e}", path.display())))?
        } else if let Some(url) = self.cfg.jwks_url.clone() {
            tokio::task::spawn_blocking(move || fetch(&url))
                .await
                .map_err(|e| AuthError::Jwks(e.to_string()))??
        } else {
            return Ok(false);
        };
        let set: JwkSet =
            serde_json::from_str(&text).map_err(|e| AuthError::Jwks(format!("not a JWKS: {e}")))?;
        let mut keys = HashMap::new();
        let mut anonymous = Vec::new();
        for jwk in &set.keys {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                tracing::warn!(kid = ?jwk.common.key_id, "skipping a JWKS key walcast cannot use");
                continue;
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.insert(kid.clone(), (key, alg));
                }
                None => anonymous.push((key, alg)),
            }
        }
        if let Ok(mut j) = self.jwks.lock() {
            j.keys = keys;
            j.anonymous = anonymous;
            j.loaded_at = Some(Instant::now());
        }
        Ok(true)
    }

    /// Verifies a token and returns its claims.
    pub async fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match header_alg(token) {
            // A readable header naming an algorithm walcast does not accept (e.g. `none`).
            Some(alg) => AuthError::Algorithm(alg),
            None => AuthError::Malformed(e.to_string()),
        })?;
        let alg = header.alg;
        let key = if HS.contains(&alg) {
            self.secret
                .clone()
                .ok_or_else(|| AuthError::Algorithm(format!("{alg:?}")))?
        } else {
            if self.cfg.jwks_file.is_none() && self.cfg.jwks_url.is_none() {
                return Err(AuthError::Algorithm(format!("{alg:?}")));
            }
            match self.lookup(header.kid.as_deref(), alg) {
                Some(k) => k,
                None => {
                    // Unknown kid: re-read the JWKS (rate-limited), then try again.
                    self.refresh_jwks(false).await?;
                    self.lookup(header.kid.as_deref(), alg).ok_or_else(|| {
                        AuthError::UnknownKid(header.kid.clone().unwrap_or_default())
                    })?
                }
            }
        };
        let mut v = Validation::new(alg);
        v.leeway = self.cfg.leeway_secs;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        match &self.cfg.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        if let Some(i) = &self.cfg.issuer {
            v.set_issuer(&[i]);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => AuthError::BadSignature,
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidIssuer => AuthError::Issuer,
                K::InvalidAudience => AuthError::Audience,
                K::InvalidAlgorithm | K::MissingAlgorithm => {
                    AuthError::Algorithm(format!("{alg:?}"))
                }
                K::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
                _ => AuthError::Malformed(e.to_string()),
            }
        })?;
        let claims = data.claims;
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
        if let Some(iat) = claims.get("iat").and_then(Value::as_i64) {
            if iat > now_unix() + self.cfg.leeway_secs as i64 {
                return Err(AuthError::NotYetValid);
            }
        }
        Ok(Verified {
            claims,
            exp: exp.saturating_add(self.cfg.leeway_secs as i64),
        })
    }

    fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let j = self.jwks.lock().ok()?;
        let fits = |a: &Option<Algorithm>| a.is_none_or(|a| a == alg);
        match kid {
            Some(k) => j
                .keys
                .get(k)
                .filter(|(_, a)| fits(a))
                .map(|(k, _)| k.clone()),
            None => j
                .anonymous
                .iter()
                .chain(j.keys.values())
                .find(|(_, a)| fits(a))
                .map(|(k, _)| k.clone()),
        }
    }

    /// What a subscriber with `token` may see of `schema.table`.
    pub fn table_access(&self, schema: &str, table: &str, token: Option<&Verified>) -> Access {
        if !self.enabled() {
            return Access::all();
        }
        let Some(token) = token else {
            return Access::Denied("a token is required".into());
        };
        if token
            .role()
            .is_some_and(|r| self.cfg.bypass_roles.iter().any(|b| b == r))
        {
            return Access::all();
        }
        let name = format!("{schema}.{table}");
        let mut rules = self.cfg.tables.iter().filter(|t| t.name == name).peekable();
        if rules.peek().is_none() && self.cfg.rls_covers(schema, table) {
            // RLS mode alone judges it (`route::rls`).
            return Access::all();
        }
        if rules.peek().is_none() {
            return Access::Denied(format!(
                "table {name} has no access rule: add an [[auth.tables]] rule for it (or public = true)"
            ));
        }
        // Validation guarantees at most one rule of a table matches a role.
        let Some(rule) = rules.find(|r| r.matches_role(token.role())) else {
            return Access::Denied(format!(
                "no [[auth.tables]] rule of {name} names role {:?}",
                token.role().unwrap_or("")
            ));
        };
        if rule.public {
            return Access::all();
        }
        let row_filter = match &rule.row_filter {
            None => RowRule::All,
            Some(t) => match substitute(t, &token.claims, false) {
                Ok(s) => match Filter::parse(&s) {
                    Ok(f) => RowRule::Filter(f),
                    Err(_) => RowRule::Nothing,
                },
                Err(_) => RowRule::Nothing,
            },
        };
        Access::Allowed {
            rows: row_filter,
            columns: rule.columns.clone(),
        }
    }

    /// Whether the token's role is one of `bypass_roles` (no rules, no RLS).
    pub fn bypasses(&self, token: Option<&Verified>) -> bool {
        token
            .and_then(Verified::role)
            .is_some_and(|r| self.cfg.bypass_roles.iter().any(|b| b == r))
    }

    /// Whether wildcard (`*`) subscriptions are allowed for this token.
    pub fn may_use_wildcards(&self, token: Option<&Verified>) -> bool {
        !self.enabled()
            || token
                .and_then(Verified::role)
                .is_some_and(|r| self.cfg.bypass_roles.iter().any(|b| b == r))
    }
}

/// Parses every `[[auth.tables]]` row filter (with placeholder claims), so a bad
/// one is refused when the config is loaded, naming its rule.
pub fn check_row_filters(cfg: &AuthConfig) -> Result<(), String> {
    for (i, t) in cfg.tables.iter().enumerate() {
        if let Some(f) = &t.row_filter {
            let probe = substitute(f, &Claims::new(), true)
                .map_err(|e| format!("auth.tables[{i}].row_filter: {e}"))?;
            Filter::parse(&probe).map_err(|e| format!("auth.tables[{i}].row_filter {f:?}: {e}"))?;
        }
    }
    Ok(())
}

/// The one refusal a subscriber gets for a table it may not see, whatever the
/// reason (no such table, not published, no rule for its role): telling them apart
/// would let any token map the schema. The precise reason goes to the debug log.
pub fn refusal(schema: &str, table: &str) -> String {
    format!(
        "Unauthorized: you may not subscribe to {schema}.{table} (it does not exist, is not published, or no [[auth.tables]] rule grants your token's role access)"
    )
}

/// The token of an HTTP request (the WebSocket upgrade, `POST /api/broadcast`),
/// first found of: `Authorization: Bearer <jwt>` (scheme case-insensitive), the
/// `apikey` header, the `x-api-key` header, the `apikey` query parameter.
pub fn request_token<'a>(
    headers: &'a axum::http::HeaderMap,
    query: &'a HashMap<String, String>,
) -> Option<&'a str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("authorization")
        .and_then(bearer)
        .or_else(|| header("apikey"))
        .or_else(|| header("x-api-key"))
        .or_else(|| query.get("apikey").map(String::as_str))
}

/// The credentials of an `Authorization: Bearer …` value; the scheme is
/// case-insensitive (RFC 9110 §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// The `alg` of a token's header when the header is readable JSON.
fn header_alg(token: &str) -> Option<String> {
    let head = token.split('.').next()?;
    let bytes = base64url_decode(head)?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("alg")?.as_str().map(str::to_string)
}

fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        match chunk.len() {
            4 => out.extend_from_slice(&bytes),
            3 => out.extend_from_slice(&bytes[..2]),
            2 => out.push(bytes[0]),
            _ => return None,
        }
    }
    Some(out)
}

fn fetch(url: &str) -> Result<String, AuthError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut resp = agent
        .get(url)
        .call()
        .map_err(|e| AuthError::Jwks(format!("{url}: {e}")))?;
    resp.body_mut()
        .with_config()
        .limit(1 << 20)
        .read_to_string()
        .map_err(|e| AuthError::Jwks(format!("{url}: {e}")))
}

/// Which rows of a table a subscriber may see.
#[derive(Clone, Debug)]
pub enum RowRule {
    All,
    /// Rows matching this filter.
    Filter(Filter),
    /// No rows (a claim the rule needs is missing).
    Nothing,
}

#[derive(Clone, Debug)]
pub enum Access {
    Denied(String),
    Allowed {
        rows: RowRule,
        columns: Option<Vec<String>>,
    },
}

impl Access {
    fn all() -> Access {
        Access::Allowed {
            rows: RowRule::All,
            columns: None,
        }
    }
}

/// Replaces `{claims.path}` placeholders with quoted claim values. Arrays become
/// `in.(…)` lists (an `eq.` before the placeholder turns into `in.`). With `probe`,
/// every placeholder becomes a dummy value (to check the template's syntax).
pub fn substitute(template: &str, claims: &Claims, probe: bool) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{claims.") {
        out.push_str(&rest[..start]);
        let after = &rest[start + "{claims.".len()..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed placeholder in {template:?}"))?;
        let path = &after[..end];
        rest = &after[end + 1..];
        if probe {
            out.push_str("\"0\"");
            continue;
        }
        let mut v = Value::Object(claims.clone());
        for part in path.split('.') {
            v = v
                .get(part)
                .cloned()
                .ok_or_else(|| format!("claim {path} is missing"))?;
        }
        match v {
            Value::String(s) => out.push_str(&quote(&s)),
            Value::Number(n) => out.push_str(&quote(&n.to_string())),
            Value::Bool(b) => out.push_str(&quote(&b.to_string())),
            Value::Array(items) => {
                if items.is_empty() {
                    return Err(format!("claim {path} is an empty list"));
                }
                if out.ends_with("eq.") {
                    out.truncate(out.len() - 3);
                    out.push_str("in.");
                }
                let list: Vec<String> = items
                    .iter()
                    .map(|i| match i {
                        Value::String(s) => quote(s),
                        other => quote(&other.to_string()),
                    })
                    .collect();
                out.push('(');
                out.push_str(&list.join(","));
                out.push(')');
            }
            Value::Null | Value::Object(_) => {
                return Err(format!("claim {path} is not a string, number or list"))
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Claims {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
        let mut h = axum::http::HeaderMap::new();
        let mut q = HashMap::new();
        q.insert("apikey".to_string(), "query".to_string());
        assert_eq!(request_token(&h, &q), Some("query"));
        h.insert("x-api-key", "x".parse().unwrap());
        assert_eq!(request_token(&h, &q), Some("x"));
        h.insert("apikey", "header".parse().unwrap());
        assert_eq!(request_token(&h, &q), Some("header"));
        h.insert("authorization", "bearer user".parse().unwrap());
        assert_eq!(request_token(&h, &q), Some("user"));
    }

    fn rule(name: &str, roles: &[&str], public: bool) -> TableRule {
        TableRule {
            name: name.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            row_filter: None,
            columns: None,
            public,
        }
    }

    #[test]
    fn rules_of_one_table_must_not_share_a_role() {
        let cfg = |tables| AuthConfig {
            tables,
            ..AuthConfig::default()
        };
        let ok = cfg(vec![
            rule("public.sales", &["manager"], false),
            rule("public.other", &[], false),
            rule("public.sales", &["rep"], false),
        ]);
        assert!(ok.validate().is_ok());
        for (tables, needle) in [
            (
                vec![
                    rule("public.sales", &["manager", "rep"], false),
                    rule("public.sales", &["rep"], false),
                ],
                "auth.tables[0] and auth.tables[1] (public.sales) can both match role \"rep\"",
            ),
            (
                vec![
                    rule("public.sales", &["rep"], false),
                    rule("public.x", &[], false),
                    rule("public.sales", &[], false),
                ],
                "auth.tables[0] and auth.tables[2]",
            ),
            (
                vec![
                    rule("public.sales", &[], true),
                    rule("public.sales", &[], false),
                ],
                "every role",
            ),
        ] {
            let e = cfg(tables).validate().unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn each_role_gets_its_own_rule() {
        let mut c = AuthConfig {
            mode: Some(AuthMode::Jwt),
            jwt_secret: Some("s".into()),
            ..AuthConfig::default()
        };
        let mut rep = rule("public.sales", &["rep"], false);
        rep.row_filter = Some("rep_id=eq.{claims.sub}".into());
        c.tables = vec![rule("public.sales", &["manager"], false), rep];
        let v = Verifier::new(c);
        let token = |role: &str| Verified {
            claims: claims(json!({"role": role, "sub": "u1"})),
            exp: i64::MAX,
        };
        assert!(matches!(
            v.table_access("public", "sales", Some(&token("manager"))),
            Access::Allowed {
                rows: RowRule::All,
                ..
            }
        ));
        assert!(matches!(
            v.table_access("public", "sales", Some(&token("rep"))),
            Access::Allowed {
                rows: RowRule::Filter(_),
                ..
            }
        ));
        assert!(matches!(
            v.table_access("public", "sales", Some(&token("anon"))),
            Access::Denied(_)
        ));
    }

    #[test]
    fn placeholders_take_claim_values() {
        let c = claims(json!({"sub": "u\"1", "org": {"id": 7}, "teams": ["a", "b"]}));
        assert_eq!(
            substitute("customer_id=eq.{claims.sub}", &c, false).unwrap(),
            r#"customer_id=eq."u\"1""#
        );
        assert_eq!(
            substitute("org_id=eq.{claims.org.id}", &c, false).unwrap(),
            r#"org_id=eq."7""#
        );
        assert_eq!(
            substitute("team=eq.{claims.teams}", &c, false).unwrap(),
            r#"team=in.("a","b")"#
        );
        assert!(substitute("x=eq.{claims.nope}", &c, false).is_err());
        assert!(substitute("x=eq.{claims.sub", &c, false).is_err());
    }
}
