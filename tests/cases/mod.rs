mod replication;
mod setup;
