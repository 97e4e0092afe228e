mod replication;
mod values;
