//! Presence: who is on a topic, kept the way Phoenix Presence keeps it.
//!
//! A topic's state maps a presence key to its metas:
//! `{"<key>": {"metas": [{"phx_ref": "<unique>", …tracked payload}]}}`. Each
//! channel join has one key (from `config.presence.key`, or generated) and at most
//! one meta per key: tracking again replaces it, which Phoenix announces as a leave
//! of the old meta plus a join of the new one (`phx_ref_prev` names the old ref).
//! Untrack, `phx_leave` and disconnect remove the channel's metas.
//!
//! This module is pure state: it does no I/O and never panics. The broadcast
//! registry ([`crate::deliver::broadcast`]) owns one [`PresenceState`] per topic, sends
//! `presence_state` after joins and fans each [`Diff`] out as `presence_diff`.
//! Everything is bounded: keys per topic, metas per key, payload size (here) and
//! the track rate (per connection, in the registry), each with a clear error.
//!
//! Client side: `@supabase/phoenix` `Presence.syncState` / `syncDiff`, which
//! identify metas by `phx_ref` (reference/realtime-js-protocol.md §7).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::config::PresenceConfig;
use crate::route::hub::ChannelId;

/// Longest presence key (it is repeated in every state and diff).
pub const MAX_KEY_BYTES: usize = 256;

/// Why a track was refused; the message names the limit and its config key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PresenceError {
    #[error("presence payload must be a JSON object")]
    NotAnObject,
    #[error("presence key is {size} bytes; the limit is {MAX_KEY_BYTES}")]
    KeyTooLong { size: usize },
    #[error("presence payload is {size} bytes; the limit is {limit} (presence.max_payload_bytes)")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("this topic already has {limit} presence keys (presence.max_keys_per_topic)")]
    TooManyKeys { limit: usize },
    #[error("presence key {key:?} already has {limit} metas (presence.max_metas_per_key)")]
    TooManyMetas { key: String, limit: usize },
}

#[derive(Clone, Debug)]
struct Meta {
    phx_ref: String,
    prev_ref: Option<String>,
    channel: ChannelId,
    payload: Map<String, Value>,
}

impl Meta {
    /// `{"phx_ref": …, ["phx_ref_prev": …,] …payload}`; the refs win over payload keys.
    fn to_json(&self) -> Value {
        let mut m = self.payload.clone();
        m.insert("phx_ref".into(), Value::String(self.phx_ref.clone()));
        if let Some(p) = &self.prev_ref {
            m.insert("phx_ref_prev".into(), Value::String(p.clone()));
        }
        Value::Object(m)
    }
}

/// A `presence_diff`: metas that joined and left, by key, each with the channel
/// that tracked it (so a recipient can be shown only the presences it may see).
#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    joins: BTreeMap<String, Vec<(ChannelId, Value)>>,
    leaves: BTreeMap<String, Vec<(ChannelId, Value)>>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// The payload: `{"joins": {key: {"metas": […]}}, "leaves": {…}}`.
    pub fn to_json(&self) -> Value {
        self.to_json_where(|_| true)
            .unwrap_or_else(|| json!({"joins": {}, "leaves": {}}))
    }

    /// The payload with only the metas of channels `keep` accepts; `None` when
    /// nothing is left.
    pub fn to_json_where(&self, keep: impl Fn(ChannelId) -> bool) -> Option<Value> {
        let mut any = false;
        let mut side = |m: &BTreeMap<String, Vec<(ChannelId, Value)>>| {
            let mut out = Map::new();
            for (k, metas) in m {
                let metas: Vec<&Value> = metas
                    .iter()
                    .filter(|(c, _)| keep(*c))
                    .map(|(_, v)| v)
                    .collect();
                if !metas.is_empty() {
                    any = true;
                    out.insert(k.clone(), json!({ "metas": metas }));
                }
            }
            Value::Object(out)
        };
        let v = json!({"joins": side(&self.joins), "leaves": side(&self.leaves)});
        any.then_some(v)
    }
}

/// The presences of one topic.
#[derive(Debug, Default)]
pub struct PresenceState {
    keys: BTreeMap<String, Vec<Meta>>,
}

impl PresenceState {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Tracks `payload` for `channel` under `key`, replacing the channel's earlier
    /// meta under that key. `phx_ref` must be unique.
    pub fn track(
        &mut self,
        channel: ChannelId,
        key: &str,
        payload: Value,
        phx_ref: String,
        limits: &PresenceConfig,
    ) -> Result<Diff, PresenceError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(PresenceError::KeyTooLong { size: key.len() });
        }
        let payload = match payload {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            _ => return Err(PresenceError::NotAnObject),
        };
        let size = Value::Object(payload.clone()).to_string().len();
        if size > limits.max_payload_bytes {
            return Err(PresenceError::PayloadTooLarge {
                size,
                limit: limits.max_payload_bytes,
            });
        }
        let existing = self
            .keys
            .get(key)
            .and_then(|metas| metas.iter().position(|m| m.channel == channel));
        let mut diff = Diff::default();
        match existing {
            Some(i) => {
                let metas = self.keys.entry(key.to_string()).or_default();
                let old = metas.remove(i);
                let new = Meta {
                    phx_ref,
                    prev_ref: Some(old.phx_ref.clone()),
                    channel,
                    payload,
                };
                diff.leaves
                    .insert(key.to_string(), vec![(channel, old.to_json())]);
                diff.joins
                    .insert(key.to_string(), vec![(channel, new.to_json())]);
                metas.push(new);
            }
            None => {
                match self.keys.get(key) {
                    None if self.keys.len() >= limits.max_keys_per_topic => {
                        return Err(PresenceError::TooManyKeys {
                            limit: limits.max_keys_per_topic,
                        })
                    }
                    Some(m) if m.len() >= limits.max_metas_per_key => {
                        return Err(PresenceError::TooManyMetas {
                            key: key.to_string(),
                            limit: limits.max_metas_per_key,
                        })
                    }
                    _ => {}
                }
                let new = Meta {
                    phx_ref,
                    prev_ref: None,
                    channel,
                    payload,
                };
                diff.joins
                    .insert(key.to_string(), vec![(channel, new.to_json())]);
                self.keys.entry(key.to_string()).or_default().push(new);
            }
        }
        Ok(diff)
    }

    /// Removes every meta of `channel` (untrack, leave, disconnect).
    pub fn untrack(&mut self, channel: ChannelId) -> Diff {
        let mut diff = Diff::default();
        self.keys.retain(|key, metas| {
            let mut left = Vec::new();
            metas.retain(|m| {
                if m.channel == channel {
                    left.push((channel, m.to_json()));
                    false
                } else {
                    true
                }
            });
            if !left.is_empty() {
                diff.leaves.insert(key.clone(), left);
            }
            !metas.is_empty()
        });
        diff
    }

    /// The `presence_state` payload.
    pub fn to_json(&self) -> Value {
        self.to_json_where(|_| true)
    }

    /// The `presence_state` payload with only the metas of channels `keep` accepts.
    pub fn to_json_where(&self, keep: impl Fn(ChannelId) -> bool) -> Value {
        Value::Object(
            self.keys
                .iter()
                .filter_map(|(k, metas)| {
                    let metas: Vec<Value> = metas
                        .iter()
                        .filter(|m| keep(m.channel))
                        .map(Meta::to_json)
                        .collect();
                    (!metas.is_empty()).then(|| (k.clone(), json!({ "metas": metas })))
                })
                .collect(),
        )
    }

    /// Whether `channel` tracks anything.
    pub fn tracks(&self, channel: ChannelId) -> bool {
        self.keys
            .values()
            .any(|metas| metas.iter().any(|m| m.channel == channel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PresenceConfig {
        PresenceConfig {
            max_keys_per_topic: 2,
            max_metas_per_key: 2,
            max_payload_bytes: 64,
            ..PresenceConfig::default()
        }
    }

    #[test]
    fn track_retrack_untrack() {
        let mut s = PresenceState::default();
        let l = limits();
        let d = s
            .track(1, "alice", json!({"online": true}), "r1".into(), &l)
            .unwrap();
        assert_eq!(
            d.to_json(),
            json!({"joins": {"alice": {"metas": [{"phx_ref": "r1", "online": true}]}}, "leaves": {}})
        );
        let d = s
            .track(1, "alice", json!({"online": false}), "r2".into(), &l)
            .unwrap();
        assert_eq!(
            d.to_json()["leaves"]["alice"]["metas"][0]["phx_ref"],
            json!("r1")
        );
        assert_eq!(
            d.to_json()["joins"]["alice"]["metas"][0],
            json!({"phx_ref": "r2", "phx_ref_prev": "r1", "online": false})
        );
        s.track(2, "alice", json!({}), "r3".into(), &l).unwrap();
        assert_eq!(s.to_json()["alice"]["metas"].as_array().unwrap().len(), 2);
        let d = s.untrack(1);
        assert_eq!(d.to_json()["leaves"]["alice"]["metas"][0]["phx_ref"], "r2");
        assert!(s.untrack(1).is_empty());
        assert_eq!(s.to_json_where(|c| c != 2), json!({}));
        s.track(3, "bob", json!({}), "r4".into(), &l).unwrap();
        assert_eq!(
            s.to_json_where(|c| c == 3),
            json!({"bob": {"metas": [{"phx_ref": "r4"}]}})
        );
        let d = s.untrack(3);
        assert!(d.to_json_where(|c| c != 3).is_none());
        assert!(d.to_json_where(|c| c == 3).is_some());
        s.untrack(2);
        assert!(s.is_empty());
        assert_eq!(s.to_json(), json!({}));
    }

    #[test]
    fn limits_are_errors() {
        let mut s = PresenceState::default();
        let l = limits();
        assert_eq!(
            s.track(1, "k", json!(5), "a".into(), &l),
            Err(PresenceError::NotAnObject)
        );
        assert!(matches!(
            s.track(1, "k", json!({"x": "y".repeat(100)}), "a".into(), &l),
            Err(PresenceError::PayloadTooLarge { .. })
        ));
        assert_eq!(
            s.track(1, &"k".repeat(300), json!({}), "a".into(), &l),
            Err(PresenceError::KeyTooLong { size: 300 })
        );
        s.track(1, "a", json!({}), "1".into(), &l).unwrap();
        s.track(2, "a", json!({}), "2".into(), &l).unwrap();
        assert!(matches!(
            s.track(3, "a", json!({}), "3".into(), &l),
            Err(PresenceError::TooManyMetas { .. })
        ));
        s.track(3, "b", json!({}), "3".into(), &l).unwrap();
        assert!(matches!(
            s.track(4, "c", json!({}), "4".into(), &l),
            Err(PresenceError::TooManyKeys { .. })
        ));
        // Re-tracking an existing meta is always allowed.
        s.track(1, "a", json!({"n": 1}), "5".into(), &l).unwrap();
    }
}
