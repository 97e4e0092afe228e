mod realtime_js;
mod replication;
mod ws;
