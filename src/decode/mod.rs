//! Decode (layer 1): pgoutput bytes → committed transactions of typed change
//! events, and values → JSON. Pure and total: no IO, no async, never a panic on
//! any input (the decoder is fuzzed).
//!
//! - [`pgoutput`]: one message from one XLogData payload.
//! - [`assembler`]: transaction framing over the message stream → [`event::Item`]s.
//! - [`relation`]: the relation and type caches the assembler resolves against.
//! - [`value`]: pgoutput's text form → JSON identical to PostgreSQL's `to_jsonb()`.
//! - [`event`]: change events and their Supabase encodings.

pub mod assembler;
pub mod event;
pub mod pgoutput;
pub mod relation;
pub mod value;
