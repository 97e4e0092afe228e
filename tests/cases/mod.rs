mod demo;
mod filter;
mod realtime_js;
mod replication;
mod setup;
mod tls;
mod values;
mod ws;
