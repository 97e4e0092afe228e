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

use std::collections::{BTreeMap, HashMap, HashSet};

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

/// A presence as it crosses to the other gateways of a cluster: its key, the
/// role of the channel that tracked it (a private channel's `presence_sees`
/// judges it by that) and its meta as clients see it (`phx_ref` included).
#[derive(Clone, Debug, PartialEq)]
pub struct SharedMeta {
    pub key: String,
    pub role: Option<String>,
    pub meta: Value,
}

impl SharedMeta {
    fn phx_ref(&self) -> Option<&str> {
        self.meta.get("phx_ref").and_then(Value::as_str)
    }
}

/// What one local [`Diff`] tells the other gateways: metas that joined, and
/// the `(key, phx_ref)` of metas that left.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SharedDiff {
    pub joins: Vec<SharedMeta>,
    pub leaves: Vec<(String, String)>,
}

impl SharedDiff {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }
}

impl Diff {
    /// The diff as the other gateways get it; `role` names each channel's role.
    pub fn shared(&self, role: impl Fn(ChannelId) -> Option<String>) -> SharedDiff {
        let mut out = SharedDiff::default();
        for (key, metas) in &self.joins {
            for (c, meta) in metas {
                out.joins.push(SharedMeta {
                    key: key.clone(),
                    role: role(*c),
                    meta: meta.clone(),
                });
            }
        }
        for (key, metas) in &self.leaves {
            for (_, meta) in metas {
                if let Some(r) = meta.get("phx_ref").and_then(Value::as_str) {
                    out.leaves.push((key.clone(), r.to_string()));
                }
            }
        }
        out
    }
}

impl PresenceState {
    /// Every presence of the topic, as the other gateways get it.
    pub fn shared(&self, role: impl Fn(ChannelId) -> Option<String>) -> Vec<SharedMeta> {
        self.keys
            .iter()
            .flat_map(|(key, metas)| {
                metas.iter().map(|m| SharedMeta {
                    key: key.clone(),
                    role: role(m.channel),
                    meta: m.to_json(),
                })
            })
            .collect()
    }
}

impl PresenceState {
    /// The presences `channel` tracks, as the other gateways get them, with `role`.
    pub fn shared_of(&self, channel: ChannelId, role: Option<String>) -> Vec<SharedMeta> {
        self.keys
            .iter()
            .flat_map(|(key, metas)| {
                metas
                    .iter()
                    .filter(|m| m.channel == channel)
                    .map(|m| SharedMeta {
                        key: key.clone(),
                        role: role.clone(),
                        meta: m.to_json(),
                    })
            })
            .collect()
    }
}

/// A topic as the registry names it: `(realtime:<name>, private)`.
pub type TopicKey = (String, bool);

/// The presences other gateways hold, at most (all nodes and topics together);
/// past it a gateway keeps what it has and counts the rest as refused.
pub const MAX_REMOTE_PRESENCES: usize = 100_000;

/// A `presence_diff` made of other gateways' presences: like [`Diff`], with
/// each meta's role instead of a local channel.
#[derive(Debug, Default, PartialEq)]
pub struct RemoteDiff {
    joins: BTreeMap<String, Vec<(Option<String>, Value)>>,
    leaves: BTreeMap<String, Vec<(Option<String>, Value)>>,
}

impl RemoteDiff {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// The payload with only the metas whose role `keep` accepts; `None` when
    /// nothing is left.
    pub fn to_json_where(&self, keep: impl Fn(Option<&str>) -> bool) -> Option<Value> {
        let mut any = false;
        let mut side = |m: &BTreeMap<String, Vec<(Option<String>, Value)>>| {
            let mut out = Map::new();
            for (k, metas) in m {
                let metas: Vec<&Value> = metas
                    .iter()
                    .filter(|(r, _)| keep(r.as_deref()))
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

    fn join(&mut self, m: &SharedMeta) {
        self.joins
            .entry(m.key.clone())
            .or_default()
            .push((m.role.clone(), m.meta.clone()));
    }

    fn leave(&mut self, m: SharedMeta) {
        self.leaves.entry(m.key).or_default().push((m.role, m.meta));
    }
}

/// A node's presences in one topic: by key, by `phx_ref`.
type NodeMetas = BTreeMap<String, BTreeMap<String, SharedMeta>>;

/// One topic's presences from other gateways, by node.
#[derive(Debug, Default)]
pub struct RemoteTopic {
    nodes: BTreeMap<u64, NodeMetas>,
}

impl RemoteTopic {
    /// Adds the metas whose role `keep` accepts to a `presence_state` payload
    /// (an object by key), after the local ones.
    pub fn add_to_state(&self, state: &mut Value, keep: impl Fn(Option<&str>) -> bool) {
        let Value::Object(out) = state else {
            return;
        };
        for m in self
            .nodes
            .values()
            .flat_map(BTreeMap::values)
            .flat_map(BTreeMap::values)
        {
            if !keep(m.role.as_deref()) {
                continue;
            }
            let entry = out
                .entry(m.key.clone())
                .or_insert_with(|| json!({ "metas": [] }));
            if let Some(Value::Array(metas)) = entry.get_mut("metas") {
                metas.push(m.meta.clone());
            }
        }
    }
}

/// Adds `m` to a node's metas if it fits the limits; false if it does not
/// (or is malformed). A ref already there is left as it is (true). The error
/// says whether a per-topic limit refused it (rather than its form).
fn admit(metas: &mut NodeMetas, m: SharedMeta, limits: &PresenceConfig) -> Result<bool, bool> {
    let Some(r) = m.phx_ref().map(str::to_string) else {
        return Err(false);
    };
    if m.key.len() > MAX_KEY_BYTES || !m.meta.is_object() {
        return Err(false);
    }
    if m.role.as_ref().is_some_and(|r| r.len() > MAX_ROLE_BYTES) {
        return Err(false);
    }
    // The payload limit, with room for the refs the meta carries besides.
    if m.meta.to_string().len() > limits.max_payload_bytes + 256 {
        return Err(false);
    }
    let keys = metas.len();
    match metas.get_mut(&m.key) {
        Some(refs) if refs.contains_key(&r) => Ok(false),
        Some(refs) if refs.len() >= limits.max_metas_per_key => Err(true),
        Some(refs) => {
            refs.insert(r, m);
            Ok(true)
        }
        None if keys >= limits.max_keys_per_topic => Err(true),
        None => {
            metas.entry(m.key.clone()).or_default().insert(r, m);
            Ok(true)
        }
    }
}

/// Longest topic name taken from another gateway: the longest a topic can be
/// in a binary (kind 4) broadcast frame, whose topic length is one byte.
pub const MAX_TOPIC_BYTES: usize = u8::MAX as usize;

/// Longest role taken with another gateway's presence.
pub const MAX_ROLE_BYTES: usize = 256;

/// What applying other gateways' presences changed: the diff of each topic
/// that changed, and how many presences were refused.
pub type Applied = (Vec<(TopicKey, RemoteDiff)>, usize);

/// A node's presences a summary has not named yet: by topic, `(key, phx_ref)`.
type Unconfirmed = HashMap<TopicKey, HashSet<(String, String)>>;

/// The presences of the other gateways of a cluster, by topic and node, each
/// node's bounded by the per-topic limits of `[presence]` and all together by
/// [`MAX_REMOTE_PRESENCES`]. Pure state: every change returns the diff the
/// topic's local members get.
#[derive(Debug)]
pub struct RemotePresences {
    topics: HashMap<TopicKey, RemoteTopic>,
    held: usize,
    /// At most this many held ([`MAX_REMOTE_PRESENCES`]).
    cap: usize,
    /// The topics each node has presences in.
    by_node: HashMap<u64, HashSet<TopicKey>>,
    /// A summary being applied, by node: what it held before that the
    /// summary has not named yet (it leaves when the summary ends).
    unconfirmed: HashMap<u64, Unconfirmed>,
    /// Nodes with presences refused at the cap (they are asked again once
    /// there is room).
    capped: HashSet<u64>,
}

impl Default for RemotePresences {
    fn default() -> Self {
        RemotePresences {
            topics: HashMap::new(),
            held: 0,
            cap: MAX_REMOTE_PRESENCES,
            by_node: HashMap::new(),
            unconfirmed: HashMap::new(),
            capped: HashSet::new(),
        }
    }
}

impl RemotePresences {
    /// Presences held.
    pub fn len(&self) -> usize {
        self.held
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    pub fn topic(&self, key: &TopicKey) -> Option<&RemoteTopic> {
        self.topics.get(key)
    }

    /// Changes the cap (tests).
    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    /// The nodes holding presences here.
    pub fn nodes(&self) -> Vec<u64> {
        self.by_node.keys().copied().collect()
    }

    /// The nodes that had presences refused at the cap, if there is room now.
    pub fn capped(&self) -> Vec<u64> {
        if self.held < self.cap {
            self.capped.iter().copied().collect()
        } else {
            Vec::new()
        }
    }

    /// Adds one meta of `node` in `topic` (the cap and the limits allowing);
    /// the join goes to `diff`. Refused: `Err(true)` if by a per-topic limit.
    fn add(
        &mut self,
        node: u64,
        topic: &TopicKey,
        m: SharedMeta,
        limits: &PresenceConfig,
        diff: &mut RemoteDiff,
    ) -> Result<(), bool> {
        if self.held >= self.cap {
            self.capped.insert(node);
            return Err(false);
        }
        let metas = self
            .topics
            .entry(topic.clone())
            .or_default()
            .nodes
            .entry(node)
            .or_default();
        let shown = m.clone();
        let r = admit(metas, m, limits).map(|added| {
            if added {
                self.held += 1;
                diff.join(&shown);
            }
        });
        self.tidy(topic, node);
        r
    }

    /// Removes one meta of `node`; its leave goes to `diff`.
    fn remove(&mut self, node: u64, topic: &TopicKey, key: &str, r: &str, diff: &mut RemoteDiff) {
        let Some(metas) = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.nodes.get_mut(&node))
        else {
            return;
        };
        if let Some(refs) = metas.get_mut(key) {
            if let Some(m) = refs.remove(r) {
                self.held -= 1;
                diff.leave(m);
            }
            if refs.is_empty() {
                metas.remove(key);
            }
        }
        self.tidy(topic, node);
    }

    /// Applies one delta of `node`. Returns the diff and how many joins were
    /// refused (limits, malformed, the cap). A leave of an unknown ref, or a
    /// join of a known one, changes nothing.
    pub fn apply(
        &mut self,
        node: u64,
        topic: TopicKey,
        d: SharedDiff,
        limits: &PresenceConfig,
    ) -> (RemoteDiff, usize) {
        let mut diff = RemoteDiff::default();
        if topic.0.len() > MAX_TOPIC_BYTES {
            return (diff, d.joins.len());
        }
        for (key, r) in &d.leaves {
            self.remove(node, &topic, key, r, &mut diff);
        }
        let mut refused = 0;
        for m in d.joins {
            if self.add(node, &topic, m, limits, &mut diff).is_err() {
                refused += 1;
            }
        }
        (diff, refused)
    }

    /// A summary of `node` starts: what it held leaves at [`Self::summary_end`]
    /// unless a chunk names it.
    pub fn summary_start(&mut self, node: u64) {
        let mut held = Unconfirmed::new();
        for topic in self.by_node.get(&node).into_iter().flatten() {
            let Some(metas) = self.topics.get(topic).and_then(|t| t.nodes.get(&node)) else {
                continue;
            };
            let set = held.entry(topic.clone()).or_default();
            for (key, refs) in metas {
                for r in refs.keys() {
                    set.insert((key.clone(), r.clone()));
                }
            }
        }
        self.unconfirmed.insert(node, held);
        self.capped.remove(&node);
    }

    /// One chunk of `node`'s summary (after [`Self::summary_start`]): its
    /// presences are taken, up to the cap and the limits.
    pub fn summary_chunk(
        &mut self,
        node: u64,
        all: Vec<(TopicKey, SharedMeta)>,
        limits: &PresenceConfig,
    ) -> Applied {
        let mut diffs: HashMap<TopicKey, RemoteDiff> = HashMap::new();
        let mut refused = 0;
        let mut unconfirmed = self.unconfirmed.remove(&node).unwrap_or_default();
        for (topic, m) in all {
            if topic.0.len() > MAX_TOPIC_BYTES {
                refused += 1;
                continue;
            }
            let left = unconfirmed.get_mut(&topic);
            if let (Some(r), Some(left)) = (m.phx_ref(), left) {
                if left.remove(&(m.key.clone(), r.to_string())) {
                    continue;
                }
            }
            let diff = diffs.entry(topic.clone()).or_default();
            let mut r = self.add(node, &topic, m.clone(), limits, diff);
            // Over a per-topic limit with presences the summary has not
            // named yet: those make room (they leave at its end unless named
            // later, and then come back).
            if r == Err(true) {
                let old = unconfirmed.get_mut(&topic).and_then(|left| {
                    let pick = left
                        .iter()
                        .find(|(k, _)| *k == m.key)
                        .or_else(|| left.iter().next())
                        .cloned()?;
                    left.remove(&pick);
                    Some(pick)
                });
                if let Some((k, old_ref)) = old {
                    self.remove(node, &topic, &k, &old_ref, diff);
                    r = self.add(node, &topic, m, limits, diff);
                }
            }
            if r.is_err() {
                refused += 1;
            }
        }
        self.unconfirmed.insert(node, unconfirmed);
        (
            diffs.into_iter().filter(|(_, d)| !d.is_empty()).collect(),
            refused,
        )
    }

    /// `node`'s summary ended: what it did not name leaves.
    pub fn summary_end(&mut self, node: u64) -> Vec<(TopicKey, RemoteDiff)> {
        let mut diffs: HashMap<TopicKey, RemoteDiff> = HashMap::new();
        for (topic, left) in self.unconfirmed.remove(&node).unwrap_or_default() {
            let diff = diffs.entry(topic.clone()).or_default();
            for (key, r) in left {
                self.remove(node, &topic, &key, &r, diff);
            }
        }
        diffs.into_iter().filter(|(_, d)| !d.is_empty()).collect()
    }

    /// `node`'s summary will not end (a chunk lost): what it held stays.
    pub fn summary_abort(&mut self, node: u64) {
        self.unconfirmed.remove(&node);
    }

    /// Replaces everything `node` holds with `all` (its summary in one piece).
    pub fn replace_node(
        &mut self,
        node: u64,
        all: Vec<(TopicKey, SharedMeta)>,
        limits: &PresenceConfig,
    ) -> Applied {
        self.summary_start(node);
        let (joins, refused) = self.summary_chunk(node, all, limits);
        let leaves = self.summary_end(node);
        let mut by: HashMap<TopicKey, RemoteDiff> = HashMap::new();
        for (t, d) in joins.into_iter().chain(leaves) {
            let e = by.entry(t).or_default();
            for (k, v) in d.joins {
                e.joins.entry(k).or_default().extend(v);
            }
            for (k, v) in d.leaves {
                e.leaves.entry(k).or_default().extend(v);
            }
        }
        (by.into_iter().collect(), refused)
    }

    /// Forgets `node` (gone, or timed out): the leaves of everything it held.
    pub fn remove_node(&mut self, node: u64) -> Vec<(TopicKey, RemoteDiff)> {
        self.summary_start(node);
        let out = self.summary_end(node);
        self.capped.remove(&node);
        out
    }

    /// Drops a node's empty entry for `topic`, and the topic once empty.
    fn tidy(&mut self, topic: &TopicKey, node: u64) {
        let mut has = false;
        if let Some(t) = self.topics.get_mut(topic) {
            if t.nodes.get(&node).is_some_and(BTreeMap::is_empty) {
                t.nodes.remove(&node);
            }
            has = t.nodes.contains_key(&node);
            if t.nodes.is_empty() {
                self.topics.remove(topic);
            }
        }
        if has {
            if !self.by_node.get(&node).is_some_and(|s| s.contains(topic)) {
                self.by_node.entry(node).or_default().insert(topic.clone());
            }
        } else if let Some(s) = self.by_node.get_mut(&node) {
            s.remove(topic);
            if s.is_empty() {
                self.by_node.remove(&node);
            }
        }
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

    fn sm(key: &str, r: &str, role: Option<&str>) -> SharedMeta {
        SharedMeta {
            key: key.into(),
            role: role.map(str::to_string),
            meta: json!({"phx_ref": r, "n": r}),
        }
    }

    fn room() -> TopicKey {
        ("realtime:room".into(), false)
    }

    #[test]
    fn local_changes_are_shared_with_roles_and_refs() {
        let mut s = PresenceState::default();
        let l = limits();
        s.track(1, "alice", json!({"a": 1}), "r1".into(), &l)
            .unwrap();
        let role = |c: ChannelId| (c == 1).then(|| "staff".to_string());
        let d = s
            .track(1, "alice", json!({"a": 2}), "r2".into(), &l)
            .unwrap()
            .shared(role);
        assert_eq!(
            d.joins,
            vec![SharedMeta {
                key: "alice".into(),
                role: Some("staff".into()),
                meta: json!({"phx_ref": "r2", "phx_ref_prev": "r1", "a": 2}),
            }]
        );
        assert_eq!(d.leaves, vec![("alice".to_string(), "r1".to_string())]);
        s.track(2, "bob", json!({}), "r3".into(), &l).unwrap();
        let all = s.shared(role);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].role, None);
        let d = s.untrack(2).shared(role);
        assert!(d.joins.is_empty());
        assert_eq!(d.leaves, vec![("bob".to_string(), "r3".to_string())]);
        assert!(Diff::default().shared(role).is_empty());
    }

    #[test]
    fn remote_deltas_merge_into_state_and_diffs() {
        let mut r = RemotePresences::default();
        let l = limits();
        let (d, refused) = r.apply(
            7,
            room(),
            SharedDiff {
                joins: vec![sm("alice", "x1", None), sm("bob", "x2", Some("staff"))],
                leaves: vec![("carol".into(), "nope".into())],
            },
            &l,
        );
        assert_eq!(refused, 0);
        assert_eq!(
            d.to_json_where(|_| true).unwrap(),
            json!({"joins": {"alice": {"metas": [{"phx_ref": "x1", "n": "x1"}]},
                             "bob": {"metas": [{"phx_ref": "x2", "n": "x2"}]}},
                   "leaves": {}})
        );
        // Only staff presences for a viewer who sees staff.
        let staff_only = d.to_json_where(|role| role == Some("staff")).unwrap();
        assert_eq!(staff_only["joins"].as_object().unwrap().len(), 1);
        assert!(d.to_json_where(|_| false).is_none());
        // A join already known, a leave of an unknown ref: nothing.
        let (d, _) = r.apply(
            7,
            room(),
            SharedDiff {
                joins: vec![sm("alice", "x1", None)],
                leaves: vec![("alice".into(), "x9".into())],
            },
            &l,
        );
        assert!(d.is_empty());
        assert_eq!(r.len(), 2);
        // The state: local metas first, then the remote ones under the same key.
        let mut local = PresenceState::default();
        local.track(1, "alice", json!({}), "L1".into(), &l).unwrap();
        let mut state = local.to_json();
        r.topic(&room()).unwrap().add_to_state(&mut state, |_| true);
        assert_eq!(
            state,
            json!({"alice": {"metas": [{"phx_ref": "L1"}, {"phx_ref": "x1", "n": "x1"}]},
                   "bob": {"metas": [{"phx_ref": "x2", "n": "x2"}]}})
        );
        let mut state = json!({});
        r.topic(&room())
            .unwrap()
            .add_to_state(&mut state, |role| role.is_none());
        assert_eq!(
            state,
            json!({"alice": {"metas": [{"phx_ref": "x1", "n": "x1"}]}})
        );
        // A leave carries the meta as it was joined.
        let (d, _) = r.apply(
            7,
            room(),
            SharedDiff {
                joins: vec![],
                leaves: vec![("bob".into(), "x2".into())],
            },
            &l,
        );
        assert_eq!(
            d.to_json_where(|_| true).unwrap(),
            json!({"joins": {}, "leaves": {"bob": {"metas": [{"phx_ref": "x2", "n": "x2"}]}}})
        );
        assert!(r.topic(&("realtime:other".into(), false)).is_none());
    }

    #[test]
    fn a_summary_replaces_a_node_and_a_gone_node_leaves() {
        let mut r = RemotePresences::default();
        let l = limits();
        let other: TopicKey = ("realtime:other".into(), true);
        r.apply(
            7,
            room(),
            SharedDiff {
                joins: vec![sm("alice", "x1", None), sm("bob", "x2", None)],
                leaves: vec![],
            },
            &l,
        );
        // Another node's presences are its own.
        r.apply(
            8,
            room(),
            SharedDiff {
                joins: vec![sm("alice", "y1", None)],
                leaves: vec![],
            },
            &l,
        );
        // Node 7's summary: bob left meanwhile, carol joined, and it is in `other` too.
        let (diffs, refused) = r.replace_node(
            7,
            vec![
                (room(), sm("alice", "x1", None)),
                (room(), sm("carol", "x3", None)),
                (other.clone(), sm("dave", "x4", None)),
            ],
            &l,
        );
        assert_eq!(refused, 0);
        let by: HashMap<TopicKey, Value> = diffs
            .into_iter()
            .map(|(t, d)| (t, d.to_json_where(|_| true).unwrap()))
            .collect();
        assert_eq!(
            by[&room()],
            json!({"joins": {"carol": {"metas": [{"phx_ref": "x3", "n": "x3"}]}},
                   "leaves": {"bob": {"metas": [{"phx_ref": "x2", "n": "x2"}]}}})
        );
        assert_eq!(by[&other]["joins"]["dave"]["metas"][0]["phx_ref"], "x4");
        assert_eq!(r.len(), 4);
        // The same summary again changes nothing.
        let (diffs, _) = r.replace_node(
            7,
            vec![
                (room(), sm("alice", "x1", None)),
                (room(), sm("carol", "x3", None)),
                (other.clone(), sm("dave", "x4", None)),
            ],
            &l,
        );
        assert!(diffs.is_empty());
        // Node 7 is gone: every one of its presences leaves, node 8's stay.
        let diffs = r.remove_node(7);
        assert_eq!(diffs.len(), 2);
        for (_, d) in &diffs {
            assert!(d.joins.is_empty());
        }
        assert_eq!(r.len(), 1);
        assert!(r.topic(&other).is_none());
        let mut state = json!({});
        r.topic(&room()).unwrap().add_to_state(&mut state, |_| true);
        assert_eq!(
            state,
            json!({"alice": {"metas": [{"phx_ref": "y1", "n": "y1"}]}})
        );
        assert!(r.remove_node(7).is_empty());
        r.remove_node(8);
        assert!(r.is_empty() && r.topics.is_empty());
    }

    #[test]
    fn remote_presences_are_bounded_per_node_and_topic() {
        // limits(): 2 keys per topic, 2 metas per key, 64-byte payloads.
        let mut r = RemotePresences::default();
        let l = limits();
        let (_, refused) = r.apply(
            7,
            room(),
            SharedDiff {
                joins: vec![
                    sm("a", "1", None),
                    sm("a", "2", None),
                    sm("a", "3", None),
                    sm("b", "4", None),
                    sm("c", "5", None),
                    SharedMeta {
                        key: "b".into(),
                        role: None,
                        meta: json!({"no": "ref"}),
                    },
                    SharedMeta {
                        key: "b".into(),
                        role: None,
                        meta: json!({"phx_ref": "6", "x": "y".repeat(400)}),
                    },
                    SharedMeta {
                        key: "k".repeat(300),
                        role: None,
                        meta: json!({"phx_ref": "7"}),
                    },
                ],
                leaves: vec![],
            },
            &l,
        );
        assert_eq!(refused, 5);
        assert_eq!(r.len(), 3);
        // The limits are per node: another node has its own.
        let (_, refused) = r.replace_node(
            8,
            vec![
                (room(), sm("c", "8", None)),
                (room(), sm("d", "9", None)),
                (room(), sm("e", "10", None)),
            ],
            &l,
        );
        assert_eq!(refused, 1);
        assert_eq!(r.len(), 5);
    }
}
