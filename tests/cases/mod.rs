mod broadcast;
mod replication;
mod ws;
