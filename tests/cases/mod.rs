mod demo;
mod replication;
