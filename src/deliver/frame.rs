//! Phoenix Channels frames as the Supabase Realtime clients speak them.
//!
//! - vsn 1.0.0: text frames holding a JSON object
//!   `{"topic","event","payload","ref","join_ref"}`.
//! - vsn 2.0.0: text frames holding a JSON array
//!   `[join_ref, ref, topic, event, payload]`; clients also send binary frames of
//!   kind 3 ("user broadcast push") for broadcasts; the server sends only text or
//!   binary kind 4 ("user broadcast").
//!
//! Refs are echoed as the exact JSON strings the client sent. Decoding never
//! panics; a malformed frame is a [`FrameError`] naming what is wrong.

/// Close code when a client sends nothing (not even heartbeats) for too long.
pub const CLOSE_HEARTBEAT_TIMEOUT: u16 = 4000;

/// Close code for a frame over `server.max_frame_bytes` (RFC 6455 "Message Too Big").
pub const CLOSE_FRAME_TOO_LARGE: u16 = 1009;

use serde_json::{Map, Value};

/// Protocol version negotiated by the `vsn` query parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vsn {
    V1,
    V2,
}

impl Vsn {
    pub fn parse(s: Option<&str>) -> Result<Vsn, String> {
        match s {
            None | Some("1.0.0") => Ok(Vsn::V1),
            Some("2.0.0") => Ok(Vsn::V2),
            Some(other) => Err(format!(
                "unsupported vsn {other:?}: walcast speaks 1.0.0 and 2.0.0"
            )),
        }
    }
}

/// One client → server message.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub join_ref: Option<String>,
    pub ref_: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Value,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame is not valid JSON: {0}")]
    Json(String),
    #[error("frame has the wrong shape: {0}")]
    Shape(&'static str),
    #[error("binary frame: {0}")]
    Binary(&'static str),
}

fn opt_string(v: &Value, what: &'static str) -> Result<Option<String>, FrameError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        // Phoenix clients send strings; tolerate numbers by echoing their text.
        Value::Number(n) => Ok(Some(n.to_string())),
        _ => Err(FrameError::Shape(what)),
    }
}

/// Decodes a text frame.
pub fn decode_text(text: &str, vsn: Vsn) -> Result<Frame, FrameError> {
    let v: Value = serde_json::from_str(text).map_err(|e| FrameError::Json(e.to_string()))?;
    match (vsn, v) {
        (Vsn::V2, Value::Array(mut a)) => {
            if a.len() != 5 {
                return Err(FrameError::Shape(
                    "expected [join_ref, ref, topic, event, payload]",
                ));
            }
            let payload = a.pop().unwrap_or(Value::Null);
            let event = a.pop().unwrap_or(Value::Null);
            let topic = a.pop().unwrap_or(Value::Null);
            let ref_ = opt_string(&a[1], "ref must be a string or null")?;
            let join_ref = opt_string(&a[0], "join_ref must be a string or null")?;
            Ok(Frame {
                join_ref,
                ref_,
                topic: string(topic, "topic must be a string")?,
                event: string(event, "event must be a string")?,
                payload,
            })
        }
        (_, Value::Object(mut o)) => Ok(Frame {
            join_ref: opt_string(o.get("join_ref").unwrap_or(&Value::Null), "join_ref")?,
            ref_: opt_string(o.get("ref").unwrap_or(&Value::Null), "ref")?,
            topic: string(
                o.remove("topic").unwrap_or(Value::Null),
                "topic must be a string",
            )?,
            event: string(
                o.remove("event").unwrap_or(Value::Null),
                "event must be a string",
            )?,
            payload: o.remove("payload").unwrap_or(Value::Object(Map::new())),
        }),
        (Vsn::V1, _) => Err(FrameError::Shape("expected a JSON object")),
        (Vsn::V2, _) => Err(FrameError::Shape("expected a JSON array")),
    }
}

fn string(v: Value, what: &'static str) -> Result<String, FrameError> {
    match v {
        Value::String(s) => Ok(s),
        _ => Err(FrameError::Shape(what)),
    }
}

/// A user broadcast pushed by a 2.0.0 client as a binary kind-3 frame.
#[derive(Clone, Debug, PartialEq)]
pub struct BinaryBroadcast {
    pub join_ref: String,
    pub ref_: String,
    pub topic: String,
    pub event: String,
    /// 1 = JSON, 0 = raw binary.
    pub json: bool,
    pub metadata: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Kind byte of the client → server user broadcast push.
pub const KIND_USER_BROADCAST_PUSH: u8 = 3;
/// Kind byte of the server → client user broadcast.
pub const KIND_USER_BROADCAST: u8 = 4;

/// Decodes a binary frame (only kind 3 is defined client → server).
pub fn decode_binary(b: &[u8]) -> Result<BinaryBroadcast, FrameError> {
    let kind = *b.first().ok_or(FrameError::Binary("empty frame"))?;
    if kind != KIND_USER_BROADCAST_PUSH {
        return Err(FrameError::Binary(
            "only kind 3 (user broadcast push) is accepted",
        ));
    }
    if b.len() < 7 {
        return Err(FrameError::Binary("header shorter than 7 bytes"));
    }
    let lens = [b[1], b[2], b[3], b[4], b[5]].map(usize::from);
    let encoding = b[6];
    let mut pos = 7;
    let mut take = |n: usize| -> Result<&[u8], FrameError> {
        let s = b
            .get(pos..pos + n)
            .ok_or(FrameError::Binary("field runs past the end"))?;
        pos += n;
        Ok(s)
    };
    let utf8 = |s: &[u8]| {
        String::from_utf8(s.to_vec()).map_err(|_| FrameError::Binary("field is not UTF-8"))
    };
    let join_ref = utf8(take(lens[0])?)?;
    let ref_ = utf8(take(lens[1])?)?;
    let topic = utf8(take(lens[2])?)?;
    let event = utf8(take(lens[3])?)?;
    let metadata = take(lens[4])?.to_vec();
    let payload = b[pos..].to_vec();
    Ok(BinaryBroadcast {
        join_ref,
        ref_,
        topic,
        event,
        json: encoding == 1,
        metadata,
        payload,
    })
}

/// Encodes a server → client kind-4 user broadcast; `None` if a field exceeds 255 bytes.
pub fn encode_binary_broadcast(
    topic: &str,
    event: &str,
    metadata: &[u8],
    json: bool,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let (t, e, m) = (
        u8::try_from(topic.len()).ok()?,
        u8::try_from(event.len()).ok()?,
        u8::try_from(metadata.len()).ok()?,
    );
    let mut out =
        Vec::with_capacity(5 + topic.len() + event.len() + metadata.len() + payload.len());
    out.extend_from_slice(&[KIND_USER_BROADCAST, t, e, m, u8::from(json)]);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(metadata);
    out.extend_from_slice(payload);
    Some(out)
}

/// Appends a JSON string or `null`.
fn push_opt(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => crate::decode::value::write_str(out, s),
        None => out.push_str("null"),
    }
}

/// Encodes a server → client text frame whose payload is already JSON text.
pub fn encode(
    vsn: Vsn,
    join_ref: Option<&str>,
    ref_: Option<&str>,
    topic: &str,
    event: &str,
    payload_json: &str,
) -> String {
    encode_with(
        vsn,
        join_ref,
        ref_,
        topic,
        event,
        payload_json.len(),
        |out| out.push_str(payload_json),
    )
}

/// Encodes a server → client text frame, `payload` writing the payload's JSON text
/// in place (one allocation for the whole frame); `payload_len` sizes it.
pub fn encode_with(
    vsn: Vsn,
    join_ref: Option<&str>,
    ref_: Option<&str>,
    topic: &str,
    event: &str,
    payload_len: usize,
    payload: impl FnOnce(&mut String),
) -> String {
    let mut out = String::with_capacity(payload_len + topic.len() + event.len() + 48);
    match vsn {
        Vsn::V2 => {
            out.push('[');
            push_opt(&mut out, join_ref);
            out.push(',');
            push_opt(&mut out, ref_);
            out.push(',');
            crate::decode::value::write_str(&mut out, topic);
            out.push(',');
            crate::decode::value::write_str(&mut out, event);
            out.push(',');
            payload(&mut out);
            out.push(']');
        }
        Vsn::V1 => {
            out.push_str("{\"topic\":");
            crate::decode::value::write_str(&mut out, topic);
            out.push_str(",\"event\":");
            crate::decode::value::write_str(&mut out, event);
            out.push_str(",\"payload\":");
            payload(&mut out);
            out.push_str(",\"ref\":");
            push_opt(&mut out, ref_);
            out.push_str(",\"join_ref\":");
            push_opt(&mut out, join_ref);
            out.push('}');
        }
    }
    out
}

/// A `phx_reply` payload.
pub fn reply_payload(ok: bool, response: &Value) -> String {
    let mut s = String::from(if ok {
        "{\"status\":\"ok\",\"response\":"
    } else {
        "{\"status\":\"error\",\"response\":"
    });
    s.push_str(&response.to_string());
    s.push('}');
    s
}

/// The payload of a `system` message.
pub fn system_payload(extension: &str, status: &str, message: &str, topic: &str) -> String {
    serde_json::json!({
        "extension": extension,
        "status": status,
        "message": message,
        "channel": topic.strip_prefix("realtime:").unwrap_or(topic),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_both_versions() {
        let f = decode_text(
            r#"["3","4","realtime:room","phx_join",{"config":{}}]"#,
            Vsn::V2,
        )
        .unwrap();
        assert_eq!(f.join_ref.as_deref(), Some("3"));
        assert_eq!(f.ref_.as_deref(), Some("4"));
        assert_eq!(f.topic, "realtime:room");
        let f = decode_text(
            r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"7"}"#,
            Vsn::V1,
        )
        .unwrap();
        assert_eq!((f.ref_.as_deref(), f.join_ref), (Some("7"), None));
    }

    #[test]
    fn malformed_frames_are_errors() {
        for (t, v) in [
            ("", Vsn::V1),
            ("[1,2]", Vsn::V2),
            ("{\"topic\":1}", Vsn::V1),
            ("[null,null,1,\"e\",{}]", Vsn::V2),
            ("[[],null,\"t\",\"e\",{}]", Vsn::V2),
            ("\"str\"", Vsn::V1),
            ("{}", Vsn::V2),
        ] {
            assert!(decode_text(t, v).is_err(), "{t}");
        }
        for b in [
            &[][..],
            &[3, 1][..],
            &[9, 0, 0, 0, 0, 0, 1][..],
            &[3, 5, 0, 0, 0, 0, 1, b'a'][..],
        ] {
            assert!(decode_binary(b).is_err(), "{b:?}");
        }
    }

    #[test]
    fn encodes_and_round_trips_binary() {
        let mut push = vec![3u8, 1, 1, 4, 2, 0, 1];
        push.extend_from_slice(b"12roomhi{\"a\":1}");
        let b = decode_binary(&push).unwrap();
        assert_eq!((b.topic.as_str(), b.event.as_str()), ("room", "hi"));
        assert_eq!(b.payload, b"{\"a\":1}");
        let out = encode_binary_broadcast("room", "hi", b"", true, b"{}").unwrap();
        assert_eq!(out[0], 4);
        assert!(encode_binary_broadcast(&"x".repeat(300), "e", b"", true, b"").is_none());
    }

    #[test]
    fn encodes_text_frames() {
        let p = reply_payload(true, &json!({}));
        assert_eq!(
            encode(Vsn::V2, None, Some("9"), "phoenix", "phx_reply", &p),
            r#"[null,"9","phoenix","phx_reply",{"status":"ok","response":{}}]"#
        );
        let v: Value =
            serde_json::from_str(&encode(Vsn::V1, Some("1"), None, "t", "e", "{}")).unwrap();
        assert_eq!(
            v,
            json!({"topic":"t","event":"e","payload":{},"ref":null,"join_ref":"1"})
        );
    }
}
