mod replication;
mod setup;
mod tls;
