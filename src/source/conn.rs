//! The replication connection: a raw PostgreSQL frontend/backend protocol session
//! with `replication=database`, framed on top of `postgres-protocol`.
//!
//! Implements the startup and authentication flow of "Frontend/Backend Protocol:
//! Message Flow" (trust, cleartext, MD5, SCRAM-SHA-256), the simple query protocol
//! for replication commands, and CopyBoth framing for the stream that follows
//! `START_REPLICATION`.

use std::io;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio_util::codec::{Decoder, Encoder, Framed};

use crate::config::PgConnInfo;
use crate::source::error::{PgError, ServerError};
use crate::source::tls::PgIo;

/// Largest backend message accepted (PostgreSQL's own limit for a field is 1 GB).
const MAX_MESSAGE_LEN: usize = 1 << 30;

/// One backend message: its type byte and body.
#[derive(Debug)]
pub struct BackendMessage {
    pub tag: u8,
    pub body: Bytes,
}

/// Splits the byte stream into backend messages without interpreting them.
pub struct BackendCodec;

impl Decoder for BackendCodec {
    type Item = BackendMessage;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BackendMessage>, io::Error> {
        if src.len() < 5 {
            return Ok(None);
        }
        let tag = src[0];
        let len = i32::from_be_bytes([src[1], src[2], src[3], src[4]]);
        if len < 4 || len as usize > MAX_MESSAGE_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "invalid backend message length {len} for tag {:?}",
                    char::from(tag)
                ),
            ));
        }
        let total = 1 + len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total);
        frame.advance(5);
        Ok(Some(BackendMessage {
            tag,
            body: frame.freeze(),
        }))
    }
}

impl Encoder<Bytes> for BackendCodec {
    type Error = io::Error;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), io::Error> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

/// The result of a simple query: rows of text columns.
pub type Rows = Vec<Vec<Option<String>>>;

/// An authenticated replication session.
pub struct ReplicationConnection {
    framed: Framed<Box<dyn PgIo>, BackendCodec>,
    pub server_version: String,
}

impl ReplicationConnection {
    /// Connects, negotiates TLS as the connection info asks, authenticates and waits for
    /// `ReadyForQuery`.
    pub async fn connect(info: &PgConnInfo) -> Result<Self, PgError> {
        let io = crate::source::tls::connect_stream(info, Duration::from_secs(10)).await?;
        let mut framed = Framed::new(io, BackendCodec);

        let mut params: Vec<(&str, &str)> = vec![
            ("user", info.user.as_str()),
            ("database", info.dbname.as_str()),
            ("replication", "database"),
            ("application_name", info.application_name.as_str()),
            ("client_encoding", "UTF8"),
            // Text output of values must not depend on the server's or role's settings:
            // pin every setting that changes how a type prints (see the value module).
            ("DateStyle", "ISO, MDY"),
            ("IntervalStyle", "postgres"),
            ("TimeZone", "UTC"),
            ("extra_float_digits", "1"),
            ("bytea_output", "hex"),
        ];
        if let Some(opts) = info.options.as_deref() {
            params.push(("options", opts));
        }
        let mut buf = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut buf)?;
        framed.send(buf.split().freeze()).await?;

        let mut scram: Option<sasl::ScramSha256> = None;
        let mut server_version = String::new();
        loop {
            let msg = next(&mut framed).await?;
            match msg.tag {
                b'R' => {
                    let mut body = msg.body.clone();
                    if body.len() < 4 {
                        return Err(protocol("short authentication message"));
                    }
                    let code = body.get_i32();
                    match code {
                        0 => {}
                        3 => {
                            let pw = password(info)?;
                            frontend::password_message(pw, &mut buf)?;
                            framed.send(buf.split().freeze()).await?;
                        }
                        5 => {
                            if body.len() < 4 {
                                return Err(protocol("short MD5 salt"));
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = md5_hash(info.user.as_bytes(), password(info)?, salt);
                            frontend::password_message(hash.as_bytes(), &mut buf)?;
                            framed.send(buf.split().freeze()).await?;
                        }
                        10 => {
                            let mechanisms: Vec<&[u8]> = body
                                .split(|&b| b == 0)
                                .filter(|m| !m.is_empty())
                                .collect();
                            if !mechanisms.iter().any(|m| *m == sasl::SCRAM_SHA_256.as_bytes()) {
                                return Err(PgError::Auth(format!(
                                    "the server offers only SASL mechanisms {:?}; walcast supports SCRAM-SHA-256",
                                    mechanisms
                                        .iter()
                                        .map(|m| String::from_utf8_lossy(m))
                                        .collect::<Vec<_>>()
                                )));
                            }
                            let s = sasl::ScramSha256::new(
                                password(info)?,
                                sasl::ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                s.message(),
                                &mut buf,
                            )?;
                            framed.send(buf.split().freeze()).await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol("SASLContinue before SASL"))?;
                            s.update(&body).map_err(|e| {
                                PgError::Auth(format!("SCRAM exchange failed: {e}"))
                            })?;
                            frontend::sasl_response(s.message(), &mut buf)?;
                            framed.send(buf.split().freeze()).await?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol("SASLFinal before SASL"))?;
                            s.finish(&body).map_err(|e| {
                                PgError::Auth(format!(
                                    "SCRAM server signature did not verify: {e}"
                                ))
                            })?;
                        }
                        other => {
                            return Err(PgError::Auth(format!(
                                "unsupported authentication request {other} (walcast supports trust, password, md5 and SCRAM-SHA-256)"
                            )))
                        }
                    }
                }
                b'S' => {
                    let mut parts = msg.body.split(|&b| b == 0);
                    if parts.next() == Some(b"server_version") {
                        server_version =
                            String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                    }
                }
                b'K' | b'N' => {}
                b'Z' => break,
                b'E' => return Err(startup_error(ServerError::parse(&msg.body), info)),
                other => {
                    return Err(protocol(&format!(
                        "unexpected message {:?} during startup",
                        char::from(other)
                    )))
                }
            }
        }
        Ok(ReplicationConnection {
            framed,
            server_version,
        })
    }

    /// Runs one command with the simple query protocol and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, PgError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)?;
        self.framed.send(buf.freeze()).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let msg = next(&mut self.framed).await?;
            match msg.tag {
                b'D' => rows.push(parse_data_row(&msg.body)?),
                b'T' | b'C' | b'N' | b'S' | b'I' => {}
                b'E' => error = Some(ServerError::parse(&msg.body)),
                b'Z' => break,
                other => {
                    return Err(protocol(&format!(
                        "unexpected message {:?} in reply to a query",
                        char::from(other)
                    )))
                }
            }
        }
        match error {
            Some(e) => Err(PgError::Server(e)),
            None => Ok(rows),
        }
    }

    /// Sends `START_REPLICATION …` and waits for `CopyBothResponse`.
    pub async fn start_replication(&mut self, sql: &str) -> Result<(), PgError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf)?;
        self.framed.send(buf.freeze()).await?;
        loop {
            let msg = next(&mut self.framed).await?;
            match msg.tag {
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                b'E' => {
                    let e = ServerError::parse(&msg.body);
                    // Drain to ReadyForQuery so the error is the whole story.
                    return Err(PgError::Server(e));
                }
                other => {
                    return Err(protocol(&format!(
                        "unexpected message {:?} in reply to START_REPLICATION",
                        char::from(other)
                    )))
                }
            }
        }
    }

    /// Reads the next message of the CopyBoth stream. Cancel-safe.
    pub async fn recv(&mut self) -> Result<BackendMessage, PgError> {
        next(&mut self.framed).await
    }

    /// Sends one `CopyData` message carrying `payload`.
    pub async fn send_copy_data(&mut self, payload: &[u8]) -> Result<(), PgError> {
        let mut buf = BytesMut::with_capacity(payload.len() + 5);
        buf.put_u8(b'd');
        buf.put_i32(payload.len() as i32 + 4);
        buf.put_slice(payload);
        self.framed.send(buf.freeze()).await?;
        Ok(())
    }

    /// Ends the stream politely: CopyDone; then reads (and drops) what the server
    /// still sends until it ends its side of the copy and is ready, so that
    /// everything sent before — the final status update — was processed; then
    /// Terminate. Closing a socket with unread data resets the connection, and a
    /// reset can make the server drop what it had not read yet: the last flush
    /// position would be lost. Bounded by 2 s.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut buf = BytesMut::new();
            frontend::copy_done(&mut buf);
            self.framed.send(buf.freeze()).await?;
            loop {
                match next(&mut self.framed).await?.tag {
                    // ReadyForQuery: the stream is over and the server idle.
                    b'Z' => break,
                    // ErrorResponse: nothing more will come.
                    b'E' => break,
                    // XLogData, keepalives, CopyDone, CommandComplete: drop.
                    _ => {}
                }
            }
            let mut buf = BytesMut::new();
            frontend::terminate(&mut buf);
            self.framed.send(buf.freeze()).await?;
            Ok::<(), PgError>(())
        })
        .await;
    }
}

async fn next(framed: &mut Framed<Box<dyn PgIo>, BackendCodec>) -> Result<BackendMessage, PgError> {
    match framed.next().await {
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => Err(PgError::Io(e)),
        None => Err(PgError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the replication connection",
        ))),
    }
}

fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, PgError> {
    let mut b = body;
    if b.len() < 2 {
        return Err(protocol("short DataRow"));
    }
    let n = i16::from_be_bytes([b[0], b[1]]);
    b = &b[2..];
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if b.len() < 4 {
            return Err(protocol("short DataRow column"));
        }
        let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        b = &b[4..];
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = len as usize;
        if b.len() < len {
            return Err(protocol("short DataRow value"));
        }
        out.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
        b = &b[len..];
    }
    Ok(out)
}

fn password(info: &PgConnInfo) -> Result<&[u8], PgError> {
    info.password.as_deref().map(str::as_bytes).ok_or_else(|| {
        PgError::Auth(format!(
            "the server asks a password for role {:?} and none was given: put it in the database URL (postgres://user:password@host/db) or in PGPASSWORD",
            info.user
        ))
    })
}

fn protocol(what: &str) -> PgError {
    PgError::Protocol(what.to_string())
}

fn startup_error(e: ServerError, info: &PgConnInfo) -> PgError {
    match e.code.as_str() {
        "28P01" => PgError::Auth(format!(
            "password authentication failed for role {:?}: check the password in the database URL",
            info.user
        )),
        "28000" => PgError::Auth(format!(
            "{}: the role needs the REPLICATION attribute (ALTER ROLE {} REPLICATION) and pg_hba.conf needs a line allowing replication connections to database {:?}",
            e.message, info.user, info.dbname
        )),
        "3D000" => PgError::Setup(format!(
            "database {:?} does not exist: check the database URL",
            info.dbname
        )),
        "53300" => PgError::Setup(format!(
            "{}: raise max_wal_senders / max_connections or stop another consumer",
            e.message
        )),
        _ => PgError::Server(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_rejects_bad_lengths() {
        let mut b = BytesMut::from(&[b'd', 0, 0, 0, 2][..]);
        assert!(BackendCodec.decode(&mut b).is_err());
        let mut b = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(BackendCodec.decode(&mut b).is_err());
    }

    #[test]
    fn codec_waits_for_whole_messages() {
        let mut b = BytesMut::from(&[b'Z', 0, 0, 0, 5][..]);
        assert!(BackendCodec.decode(&mut b).unwrap().is_none());
        b.put_u8(b'I');
        let m = BackendCodec.decode(&mut b).unwrap().unwrap();
        assert_eq!((m.tag, &m.body[..]), (b'Z', &b"I"[..]));
    }

    #[test]
    fn parses_error_fields() {
        let body = b"SERROR\0C42704\0Mreplication slot \"x\" does not exist\0\0";
        let e = ServerError::parse(body);
        assert_eq!(e.code, "42704");
        assert!(e.message.contains("does not exist"));
    }
}
