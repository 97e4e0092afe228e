//! `config/walcast.toml` documents every key walcast knows, `walcast
//! check-config` names bad fields, and the README's CLI reference names every
//! flag. No database needed.
//!
//! The keys walcast knows are read from the config types themselves: a probing
//! `serde::Deserializer` hands `ServeConfig::deserialize` a value for every field
//! it asks for and records the path of each. A field added to a config struct
//! and not documented in the example file fails [`example_config_names_every_key`].

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::de::value::{Error as DeError, StrDeserializer};
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use walcast::config::ServeConfig;

use crate::support::walcast::BIN;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn example_config() -> String {
    std::fs::read_to_string(repo_file("config/walcast.toml")).expect("read config/walcast.toml")
}

/// The example file with every commented-out key and table header switched on:
/// lines `# key = value`, `# [section]` and `# [[array]]`.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_key_line(rest) || is_header(rest) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_key_line(s: &str) -> bool {
    match s.split_once(" = ") {
        Some((key, _)) => {
            !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        }
        None => false,
    }
}

fn is_header(s: &str) -> bool {
    let inner = s.trim_start_matches('[').trim_end_matches(']');
    s.starts_with('[')
        && s.ends_with(']')
        && !inner.is_empty()
        && inner
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
}

/// The leaf key paths of a TOML document: `server.listen`, `channels[].topic`,
/// `auth.bypass_roles` (arrays of plain values are leaves).
/// `maps`: keys whose value is a map walcast reads whole (its keys are data, e.g.
/// role names), so they count as one key.
fn toml_keys(value: &toml::Value, path: &str, maps: &BTreeSet<String>, out: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(_) if maps.contains(path) => {
            out.insert(path.to_string());
        }
        toml::Value::Table(t) => {
            for (k, v) in t {
                toml_keys(v, &join(path, k), maps, out);
            }
        }
        toml::Value::Array(items) if items.iter().any(toml::Value::is_table) => {
            for item in items {
                toml_keys(item, &format!("{path}[]"), maps, out);
            }
        }
        _ => {
            out.insert(path.to_string());
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

// ---------------------------------------------------------------------------
// The probe: a Deserializer that offers every field a struct asks for.

struct Probe<'a> {
    path: String,
    leaves: &'a RefCell<BTreeSet<String>>,
}

impl Probe<'_> {
    fn leaf(&self) {
        // A sequence of plain values is one key: `roles`, not `roles[]`.
        let path = self.path.trim_end_matches("[]").to_string();
        self.leaves.borrow_mut().insert(path);
    }
    fn child(&self, path: String) -> Probe<'_> {
        Probe {
            path,
            leaves: self.leaves,
        }
    }
}

macro_rules! leaf_with {
    ($($method:ident => |$v:ident| $body:expr;)*) => {
        $(fn $method<V: Visitor<'de>>(self, $v: V) -> Result<V::Value, DeError> {
            self.leaf();
            $body
        })*
    };
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, DeError> {
        Err(de::Error::custom(format!(
            "{}: the probe cannot tell this field's type; teach tests/cases/config.rs",
            self.path
        )))
    }

    leaf_with! {
        deserialize_bool => |v| v.visit_bool(false);
        deserialize_i8 => |v| v.visit_i64(1);
        deserialize_i16 => |v| v.visit_i64(1);
        deserialize_i32 => |v| v.visit_i64(1);
        deserialize_i64 => |v| v.visit_i64(1);
        deserialize_u8 => |v| v.visit_u64(1);
        deserialize_u16 => |v| v.visit_u64(1);
        deserialize_u32 => |v| v.visit_u64(1);
        deserialize_u64 => |v| v.visit_u64(1);
        deserialize_f32 => |v| v.visit_f64(1.0);
        deserialize_f64 => |v| v.visit_f64(1.0);
        deserialize_char => |v| v.visit_char('x');
        deserialize_str => |v| v.visit_str("x");
        deserialize_string => |v| v.visit_str("x");
        deserialize_bytes => |v| v.visit_bytes(b"x");
        deserialize_byte_buf => |v| v.visit_bytes(b"x");
        deserialize_unit => |v| v.visit_unit();
        deserialize_map => |v| v.visit_map(de::value::MapDeserializer::new(std::iter::empty::<(&str, &str)>()));
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_some(self)
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        self.leaf();
        v.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        v.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        let element = self.child(format!("{}[]", self.path));
        v.visit_seq(One(Some(element)))
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, v: V) -> Result<V::Value, DeError> {
        self.deserialize_any(v)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        v: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_any(v)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        v.visit_map(Fields {
            probe: self,
            fields,
            next: 0,
        })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        self.leaf();
        let first: StrDeserializer<'static, DeError> = variants
            .first()
            .copied()
            .unwrap_or_default()
            .into_deserializer();
        v.visit_enum(first)
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_str("x")
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_unit()
    }
}

struct Fields<'a> {
    probe: Probe<'a>,
    fields: &'static [&'static str],
    next: usize,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        match self.fields.get(self.next) {
            Some(f) => seed
                .deserialize(IntoDeserializer::<DeError>::into_deserializer(*f))
                .map(Some),
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let field = self.fields[self.next];
        self.next += 1;
        seed.deserialize(self.probe.child(join(&self.probe.path, field)))
    }
}

/// A sequence of one element.
struct One<'a>(Option<Probe<'a>>);

impl<'de> SeqAccess<'de> for One<'_> {
    type Error = DeError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.0.take() {
            Some(p) => seed.deserialize(p).map(Some),
            None => Ok(None),
        }
    }
}

/// Every key path `ServeConfig` accepts.
fn known_keys() -> BTreeSet<String> {
    let leaves = RefCell::new(BTreeSet::new());
    ServeConfig::deserialize(Probe {
        path: String::new(),
        leaves: &leaves,
    })
    .unwrap_or_else(|e| panic!("probing ServeConfig: {e}"));
    leaves.into_inner()
}

// ---------------------------------------------------------------------------

#[test]
fn probe_sees_nested_and_repeated_keys() {
    let keys = known_keys();
    for k in [
        "postgres.slot",
        "server.listen",
        "health.lag_bytes_critical",
        "channels[].topic",
        "auth.mode",
        "auth.bypass_roles",
        "auth.tables[].row_filter",
        "auth.tables[].columns",
    ] {
        assert!(keys.contains(k), "{k} missing from {keys:?}");
    }
}

#[test]
fn example_config_parses_as_is_and_with_every_example_on() {
    let text = example_config();
    let c = ServeConfig::from_toml(&text)
        .unwrap_or_else(|e| panic!("config/walcast.toml does not parse: {e}"));
    // The keys set in the file are the defaults.
    let d = ServeConfig::default();
    assert_eq!(format!("{c:?}"), format!("{d:?}"));

    let on = uncommented(&text);
    let c = ServeConfig::from_toml(&on).unwrap_or_else(|e| {
        panic!("config/walcast.toml with its commented-out keys switched on does not parse: {e}")
    });
    assert!(c.postgres.database_url.is_some());
    assert!(c.auth.enabled());
    assert!(!c.auth.tables.is_empty() && !c.channels.is_empty());
}

#[test]
fn example_config_names_every_key() {
    let on = uncommented(&example_config());
    let doc: toml::Value = toml::from_str(&on).expect("the switched-on example parses as TOML");
    let mut documented = BTreeSet::new();
    let known = known_keys();
    toml_keys(&doc, "", &known, &mut documented);
    let undocumented: Vec<_> = known.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&known).collect();
    assert!(
        undocumented.is_empty(),
        "keys walcast knows but config/walcast.toml does not document (add them, commented, with their default): {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "keys in config/walcast.toml that walcast does not know: {unknown:?}"
    );
}

/// `walcast check-config FILE`: (exit code, stdout, stderr).
fn check_config(text: &str, name: &str) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!("walcast-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .env("WALCAST_LOG", "warn")
        .output()
        .expect("run walcast check-config");
    let _ = std::fs::remove_file(&path);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_good_files_and_names_bad_fields() {
    let (code, out, err) = check_config(&example_config(), "example.toml");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.trim_end().ends_with("ok"), "{out}");
    let (code, out, err) = check_config(&uncommented(&example_config()), "all-on.toml");
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = check_config("", "empty.toml");
    assert_eq!(code, 0, "an empty file is all defaults: {out}{err}");

    for (text, names) in [
        // A typo: an unknown key.
        (
            "[server]\nlisten_addr = \"127.0.0.1:4000\"\n",
            "listen_addr",
        ),
        ("[postgress]\nslot = \"a\"\n", "postgress"),
        // A value of the wrong type.
        (
            "[server]\nheartbeat_timeout_secs = \"soon\"\n",
            "heartbeat_timeout_secs",
        ),
        // Values that parse but make no sense.
        ("[limits]\nclient_queue = 0\n", "limits.client_queue"),
        ("[server]\nlisten = \"0.0.0.0:4000\"\n", "server.listen"),
        ("[postgres]\nslot = \"Bad-Slot\"\n", "postgres.slot"),
        (
            "[health]\nlag_seconds_warning = 300\nlag_seconds_critical = 30\n",
            "health.lag_seconds_warning",
        ),
        ("[auth]\nmode = \"jwt\"\n", "auth.jwt_secret"),
        ("[auth]\nmode = \"sometimes\"\n", "sometimes"),
        (
            "[[auth.tables]]\nname = \"orders\"\n",
            "auth.tables[0].name",
        ),
        ("not toml at all = = =\n", "walcast.toml"),
    ] {
        let (code, out, err) = check_config(text, "walcast.toml");
        assert_eq!(code, 2, "{text:?} should be refused: {out}{err}");
        assert!(
            err.contains(names),
            "{text:?}: the error should name {names:?}: {err}"
        );
        assert!(!out.contains("ok"), "{out}");
    }

    let missing = Command::new(BIN)
        .args(["check-config", "/nonexistent/walcast.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

// ---------------------------------------------------------------------------
// The README's CLI reference

fn help(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--help")
        .output()
        .expect("run walcast --help");
    assert!(out.status.success(), "walcast {args:?} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommands listed by `walcast --help`.
fn subcommands() -> Vec<String> {
    let top = help(&[]);
    top.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// The long flags in a help text.
fn flags(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .filter(|w| w.len() > 2)
        .collect()
}

/// The README's "Command line" section.
fn readme_cli_section(readme: &str) -> &str {
    let start = readme
        .find("\n## Command line")
        .expect("README.md has a \"## Command line\" section");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    &rest[..end]
}

/// The synopsis of `walcast <cmd>` in the CLI section: from its line starting
/// `walcast <cmd>` to the next line starting `walcast `.
fn synopsis<'a>(section: &'a str, cmd: &str) -> Option<String> {
    let lines: Vec<&'a str> = section.lines().collect();
    let head = format!("walcast {cmd}");
    let start = lines
        .iter()
        .position(|l| *l == head || l.starts_with(&format!("{head} ")))?;
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("walcast "))
        .map_or(lines.len(), |i| start + 1 + i);
    Some(lines[start..end].join("\n"))
}

#[test]
fn readme_documents_every_subcommand_and_flag() {
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("read README.md");
    let section = readme_cli_section(&readme);
    let commands = subcommands();
    assert!(commands.len() >= 7, "{commands:?}");
    let global = flags(&help(&[]));
    let mut missing = Vec::new();
    for flag in &global {
        if !section.contains(flag.as_str()) {
            missing.push(format!("walcast {flag}"));
        }
    }
    for cmd in &commands {
        let Some(text) = synopsis(section, cmd) else {
            missing.push(format!("walcast {cmd} (no synopsis line)"));
            continue;
        };
        for flag in flags(&help(&[cmd])).difference(&global) {
            let word = |c: char| c.is_ascii_alphanumeric() || c == '-';
            let named = text
                .match_indices(flag.as_str())
                .any(|(i, _)| !text[i + flag.len()..].starts_with(word));
            if !named {
                missing.push(format!("walcast {cmd} {flag}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "README.md's \"Command line\" section lacks: {missing:?}"
    );
}

#[test]
fn readme_architecture_names_every_source_file() {
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("read README.md");
    let mut missing = Vec::new();
    let mut dirs = vec![repo_file("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                .unwrap()
                .to_string_lossy()
                .into_owned();
            // Unit tests beside a module need no row of their own.
            if rel.ends_with(".rs")
                && !rel.ends_with("/tests.rs")
                && !readme.contains(&format!("`{rel}`"))
            {
                missing.push(rel);
            }
        }
    }
    missing.sort();
    assert!(
        missing.is_empty(),
        "README.md's Architecture table does not name: {missing:?}"
    );
}

#[test]
fn version_and_usage_errors() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let v = String::from_utf8_lossy(&out.stdout);
    assert_eq!(v.trim(), format!("walcast {}", env!("CARGO_PKG_VERSION")));
    let out = Command::new(BIN).arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .args(["demo", "--rate", "0"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad demo rate is a usage error"
    );
    let out = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:4000"])
        .env("DATABASE_URL", "postgres://u@127.0.0.1:1/d")
        .env_remove("WALCAST_CONFIG")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn readme_test_command_is_what_ci_runs() {
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("read README.md");
    let quick = readme
        .split("## Quick start")
        .nth(1)
        .expect("README.md has a Quick start section");
    let block = quick
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the quick start has a sh block");
    let commands: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        commands,
        [
            "cargo run --release -- demo",
            "npm ci --prefix tests/js && cargo test"
        ],
        "the quick start is two commands"
    );
    let ci = std::fs::read_to_string(repo_file(".ci/run")).expect("read .ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == commands[1]),
        ".ci/run must run the README's test command `{}` as is",
        commands[1]
    );
}
