mod replication;
