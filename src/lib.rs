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
//!  source::session ── decode::pgoutput ── decode::assembler ── decode::value → JSON
//!         │                                  (pure, total, never panics)
//!         ▼  bounded channel (backpressure: stop reading the slot, keep sending status updates)
//!  route::hub: routing index  (schema.table → event kind → filter index → subscribers)
//!         │  match → encode each payload once → deliver the shared bytes
//!         │  ── then each item, batched ──▶ changelog::stage (its own thread; confirms what is durable)
//!         ▼  route::queue: one bounded queue per connection (slow client: closed with a reason, counted)
//!  deliver: Phoenix-protocol sessions (vsn 1.0.0 objects / 2.0.0 arrays) ── clients
//! ```
//!
//! ## Layers
//!
//! `src/` is laid out by pipeline stage, and the stages are layers: a module may
//! use modules of its own layer or a lower one, never a higher one, and no two
//! modules import each other, directly or through others. `tests/cases/layers.rs`
//! reads the source and fails on an upward `use` or a cycle.
//!
//! ```text
//!  7  cli        args, setup, tail, demo               the command line
//!  6  daemon     serve (the Pipeline: start, serve, shutdown order), relay, peers, notice
//!  5  server     router, rest, http (CORS), listener, metrics      HTTP
//!  4  deliver    session, socket (writer), frame, broadcast, presence, stats
//!  3  route      hub (match/encode/deliver), queue, filter, auth
//!     cluster    NATS JetStream between `walcast relay` and gateways
//!  2  source     conn, tls, error, protocol, flush, session, slot, catalog
//!     changelog  the on-disk change log (segments, index, codec)
//!  1  decode     pgoutput, assembler, relation, value, event   (pure, no IO)
//!  0  lsn, config (every [section] as plain data), shutdown, testing
//! ```
//!
//! What this means in practice:
//!
//! - **config is a leaf.** Each `[section]` is a plain struct in [`config`];
//!   behaviour stays with its feature (`impl` blocks may live there). Checks that
//!   need a feature's grammar (row filters) run where the config is loaded
//!   ([`cli::args::check_feature_rules`]).
//! - **Each stage owns its counters** (`StreamState`, `HubStats`, `WsStats`,
//!   `BroadcastStats`); [`server::metrics`] only reads and exposes them.
//! - **HTTP handlers live in [`server`]**; the layers below know nothing of
//!   axum routes (the WebSocket session itself is `deliver`).
//! - **The source owns its IO and its errors**: [`source::error`] is the one
//!   error of the PostgreSQL side.
//! - **Data flows up, handles flow down.** The hub (route) reads the flush
//!   `Progress` of the source; the source never calls into routing. The daemon
//!   wires stages together with channels.
//!
//! The stages:
//!
//! - [`source`]: the replication connection (startup, authentication, TLS,
//!   CopyBoth), the protocol's messages and status updates, the flush-LSN rules
//!   that make delivery at-least-once without pinning WAL, pre-flight checks and
//!   the slot, and the catalog of published tables read over SQL.
//! - [`decode`]: a pure, total decoder of pgoutput messages; the relation and
//!   type caches; the transaction assembler that turns messages into
//!   [`decode::event::Item`]s; pgoutput text → JSON identical to PostgreSQL's
//!   `to_jsonb()`.
//! - [`changelog`]: the on-disk change log for resume.
//! - [`route`]: the routing index ([`route::hub`]); Supabase/PostgREST row
//!   filters bound to column types ([`route::filter`]); JWT verification and
//!   per-table row rules ([`route::auth`]); each connection's bounded queue and
//!   the one way a slow client is closed ([`route::queue`]).
//! - [`cluster`]: several nodes through NATS JetStream — the relay's publishing
//!   stage and a gateway's stream reader ([`cluster::publish`],
//!   [`cluster::consume`]).
//! - [`deliver`]: the Phoenix-protocol sessions that realtime-js speaks, each
//!   connection's writer, Broadcast and Presence.
//! - [`server`]: the HTTP routes, the accept loop with connection limits,
//!   Prometheus metrics, health levels, `/ready`, and the live status page
//!   ([`server::status`]: `/status` over server-sent events, `walcast status
//!   --url`'s summary, catch-up progress logging).
//! - [`daemon`]: `walcast serve` as a [`daemon::serve`] pipeline with an explicit
//!   start and shutdown order; `walcast relay` ([`daemon::relay`]); `system` notices when replication is down, back,
//!   or skipped changes.
//! - [`cli`]: the command line, `setup`/`status`/`teardown`, `tail`, and the
//!   demo (a throwaway cluster, a bakery schema, traffic).
//!
//! Only committed data leaves walcast: pgoutput without `streaming` sends a
//! transaction after it commits. A transaction's end LSN is confirmed to the
//! server only after every change of it has been handed downstream.

pub mod changelog;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod decode;
pub mod deliver;
pub mod lsn;
pub mod route;
pub mod server;
pub mod shutdown;
pub mod source;
pub mod testing;
