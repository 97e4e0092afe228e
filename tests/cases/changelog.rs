//! The change log under a running `walcast serve`: every committed change lands
//! in the log exactly once, in commit order — across SIGKILLs, with writes while
//! walcast is down — and the slot is never confirmed past what the log holds.

use std::time::Duration;

use walcast::changelog::codec::Logged;
use walcast::changelog::{ChangeLog, Entry, LogIdentity, LogOptions, Start};
use walcast::decode::event::Cell;
use walcast::lsn::Lsn;

use crate::support::walcast::serve;
use crate::support::{cluster, wait_for};

const T: Duration = Duration::from_secs(30);

async fn insert(c: &tokio_postgres::Client, ids: std::ops::Range<i32>) {
    // One transaction per row, so kills land between and inside streams of them.
    for id in ids {
        c.execute("insert into items values ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn every_committed_change_is_logged_once_across_sigkills() {
    let db = "log_kills";
    let slot = "slot_log_kills";
    let publication = "pub_log_kills";
    let c = cluster().new_db(db).await;
    c.batch_execute(&format!(
        "create table items (id int primary key, note text);
         create publication {publication} for table items;"
    ))
    .await
    .unwrap();
    crate::support::create_slot(&c, slot).await;
    let (_dir, log_dir, config) = crate::support::log_dir_config();
    let url = cluster().url(db);
    let args = ["--config", config.to_str().unwrap()];
    let mut next = 1;
    for _ in 0..3 {
        let server = serve(&url, slot, publication, &args).await;
        insert(&c, next..next + 40).await;
        next += 40;
        // Killed while it may still be reading, logging or confirming.
        server.proc.signal(9);
        let mut child = server.proc.child;
        let _ = tokio::time::timeout(T, child.wait()).await;
        // Written while walcast is down: the slot keeps it for the next start.
        insert(&c, next..next + 20).await;
        next += 20;
    }
    let mut server = serve(&url, slot, publication, &args).await;
    // The slot is confirmed only as far as the log is durable, so once it passes
    // the last write, the log holds everything.
    let end: String = c
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let end: Lsn = end.parse().unwrap();
    wait_for(
        "the slot to be confirmed past the last write",
        T,
        || async {
            let row = c
            .query_one(
                "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
            let at: Lsn = row.get::<_, String>(0).parse().unwrap();
            (at >= end).then_some(())
        },
    )
    .await;
    server.proc.signal(15);
    let _ = tokio::time::timeout(T, server.proc.child.wait()).await;

    let system_id: String = c
        .query_one(
            "select system_identifier::text from pg_control_system()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (log, recovery) = ChangeLog::open(
        LogOptions::new(&log_dir, 1 << 30, Duration::from_secs(86_400)),
        LogIdentity {
            system_id,
            slot: slot.into(),
        },
        Lsn::ZERO,
    )
    .unwrap();
    assert!(recovery.reset.is_none(), "the log was kept: {recovery:?}");
    let reader = log.reader();
    let horizon = reader.stats().horizon.lsn;
    let mut cursor = reader.cursor(Start::AfterLsn(horizon)).unwrap();
    let mut ids = Vec::new();
    let mut txn = None;
    let mut last_commit = Lsn::ZERO;
    while let Some(e) = cursor.next_entry().unwrap() {
        match e {
            Entry::Begin {
                commit_lsn,
                commit_ts,
                xid,
            } => {
                assert!(commit_lsn > last_commit, "commit order");
                last_commit = commit_lsn;
                txn = Some(walcast::changelog::codec::txn_info(
                    commit_lsn, commit_ts, xid,
                ));
            }
            Entry::Change(payload) => match reader.decode(&payload, txn.unwrap()).unwrap() {
                Logged::Change(ch) => match &ch.new.as_ref().unwrap()[0] {
                    Cell::Text(b) => {
                        ids.push(std::str::from_utf8(b).unwrap().parse::<i32>().unwrap())
                    }
                    other => panic!("id cell {other:?}"),
                },
                Logged::Message(m) => panic!("unexpected message {m:?}"),
            },
            Entry::Commit { .. } => {}
        }
    }
    assert_eq!(
        ids,
        (1..next).collect::<Vec<_>>(),
        "every row once, in order"
    );
}
