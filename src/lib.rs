//! # walcast
//!
//! walcast turns PostgreSQL's write-ahead log into live updates for browsers and
//! apps. It consumes a persistent logical replication slot through the built-in
//! `pgoutput` plugin, decodes every committed row change, decides per subscriber
//! what that subscriber may and wants to see, and streams it over WebSocket in the
//! Supabase Realtime protocol, so the official Supabase client libraries work
//! against it unchanged.
//!
//! ```text
//!  PostgreSQL walsender (pgoutput)
//!         │  CopyBoth: XLogData / keepalive          ▲ standby status updates (flush LSN)
//!         ▼                                          │
//!  replication::run ── pgoutput::decode ── relation::Assembler ── value → JSON
//!         │                                  (pure, total, never panics)
//!         ▼  bounded channel (backpressure: stop reading the slot, keep sending status updates)
//!  hub: routing index  (schema.table → event kind → filter index → subscribers)
//!         │  encode each change once; share the bytes
//!         ▼  one bounded queue per connection (slow client: closed with a reason, counted)
//!  ws: Phoenix-protocol sessions (vsn 1.0.0 objects / 2.0.0 arrays) ── clients
//! ```
//!
//! The stages, each in its own module:
//!
//! - [`replication`]: the replication connection (startup, authentication,
//!   CopyBoth), status updates, and the flush-LSN rules that make delivery
//!   at-least-once without pinning WAL.
//! - [`pgoutput`]: a pure, total decoder of pgoutput messages.
//! - [`relation`]: the relation and type caches and the transaction assembler that
//!   turns messages into [`event::Item`]s.
//! - [`value`]: pgoutput text → JSON identical to PostgreSQL's `to_jsonb()`.
//! - [`event`]: change events and their encodings.
//! - [`filter`]: Supabase/PostgREST row filters, bound to column types and
//!   evaluated in memory with PostgreSQL's comparison semantics.
//! - [`catalog`]: the publication's tables and their columns, read over SQL, so
//!   a join's bindings and filters are checked before anything is subscribed.
//! - [`hub`]: the routing index; encodes each change once and hands the shared
//!   bytes to every matching connection's bounded queue; confirms a
//!   transaction's flush LSN once all of it was routed.
//! - [`ws`]: the HTTP routes, the WebSocket upgrade and the Phoenix-protocol
//!   sessions (vsn 1.0.0 and 2.0.0) that realtime-js speaks.
//!
//! Beside the pipeline:
//!
//! - [`auth`]: JWT verification and per-table row rules (roles, a row filter
//!   with claims, a column allow-list), evaluated in memory.
//! - [`broadcast`] and [`presence`]: Supabase Broadcast (client to client, REST,
//!   and from the database through logical decoding messages) and Presence.
//! - [`metrics`]: Prometheus metrics read from the pipeline's counters, health
//!   levels, `/metrics`, `/health` and `/ready`; [`notice`]: `system` messages
//!   to channels when replication is down, back, or skipped changes.
//! - [`status`]: the live status page (`/status`, server-sent events), `walcast
//!   status --url`'s summary, and catch-up progress logging.
//! - [`serve`]: `walcast serve`, wiring the stages together with an explicit
//!   shutdown order; [`shutdown`] turns SIGINT/SIGTERM into a cancellation token.
//! - [`setup`]: `walcast setup`, `status` and `teardown`: publication, replica
//!   identity and slot, each checked before anything changes.
//! - [`tail`]: `walcast tail`, every change as a JSON line on stdout.
//! - [`demo`]: what `walcast demo` is made of: a throwaway PostgreSQL cluster, a
//!   bakery schema with business triggers, a traffic generator, and
//!   [`demo::run_demo`], which runs them with `serve`.
//! - [`config`] and [`tls`]: the config file, connection strings and `sslmode`;
//!   [`cli`]: the command line; [`lsn`]: log sequence numbers.
//!
//! Only committed data leaves walcast: pgoutput without `streaming` sends a
//! transaction after it commits. A transaction's end LSN is confirmed to the
//! server only after every change of it has been handed downstream.

pub mod auth;
pub mod broadcast;
pub mod catalog;
pub mod changelog;
pub mod cli;
pub mod config;
pub mod demo;
pub mod event;
pub mod filter;
pub mod hub;
pub mod lsn;
pub mod metrics;
pub mod notice;
pub mod pgoutput;
pub mod presence;
pub mod relation;
pub mod replication;
pub mod serve;
pub mod setup;
pub mod shutdown;
pub mod status;
pub mod tail;
pub mod testing;
pub mod tls;
pub mod value;
pub mod ws;
