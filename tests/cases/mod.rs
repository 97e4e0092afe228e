mod filter;
mod replication;
