mod replication;
mod ws;
