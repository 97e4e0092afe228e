mod metrics;
mod replication;
mod ws;
