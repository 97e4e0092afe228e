use super::*;

fn ident(sys: &str) -> LogIdentity {
    LogIdentity {
        system_id: sys.into(),
        slot: "walcast".into(),
    }
}

fn opts(dir: &Path, segment_bytes: u64) -> LogOptions {
    LogOptions {
        dir: dir.to_path_buf(),
        max_bytes: u64::MAX,
        max_age: Duration::from_secs(365 * 24 * 3600),
        segment_bytes,
        index_every: 256,
    }
}

/// Transaction `i` commits at LSN 1000·i, time 1_000_000·i µs, with `i % 4` changes.
fn lsn(i: u64) -> Lsn {
    Lsn(1000 * i)
}

fn ts(i: u64) -> i64 {
    1_000_000 * i as i64
}

fn payload(i: u64, k: u64) -> Vec<u8> {
    format!("txn {i} change {k} {}", "x".repeat((i * 7 % 50) as usize)).into_bytes()
}

fn write_txn(log: &mut ChangeLog, i: u64) -> bool {
    let fresh = log.begin(lsn(i), ts(i), i as u32).unwrap();
    for k in 0..i % 4 {
        log.append(&payload(i, k)).unwrap();
    }
    log.commit(Lsn(lsn(i).0 + 8)).unwrap();
    fresh
}

/// A sync made on another thread counts once it ran, and only for the log as
/// it was: after a reset its result moves nothing.
#[test]
fn a_sync_job_counts_for_the_log_it_was_made_of_only() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ChangeLog::open(opts(dir.path(), 1 << 20), ident("a"), lsn(1)).unwrap();
    let before = log.durable_lsn();
    assert!(before < lsn(2));
    write_txn(&mut log, 2);
    let job = log.sync_job().unwrap().expect("something to sync");
    write_txn(&mut log, 3);
    assert_eq!(log.durable_lsn(), before, "not before the job ran");
    assert_eq!(
        job.run().unwrap(),
        Some(lsn(2)),
        "what was appended when it was made"
    );
    assert_eq!(log.durable_lsn(), lsn(2));
    assert_eq!(log.sync().unwrap(), lsn(3));
    assert!(log.sync_job().unwrap().is_none(), "nothing new");
    // Made before a reset, run after it: no proof of anything.
    write_txn(&mut log, 4);
    let stale = log.sync_job().unwrap().expect("something to sync");
    // (Another source's positions may be lower: the job's LSN would be news.)
    log.reset(lsn(3)).unwrap();
    let horizon = log.durable_lsn();
    assert!(horizon < lsn(4));
    assert_eq!(stale.run().unwrap(), None);
    assert_eq!(log.durable_lsn(), horizon, "the reset's horizon, untouched");
}

/// Every transaction a cursor yields, as (index, payloads), checking framing.
fn drain(c: &mut Cursor) -> Vec<(u64, Vec<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut cur: Option<(u64, Vec<Vec<u8>>)> = None;
    while let Some(e) = c.next_entry().unwrap() {
        match e {
            Entry::Begin {
                commit_lsn,
                commit_ts,
                xid,
            } => {
                assert!(cur.is_none(), "nested begin");
                let i = commit_lsn.0 / 1000;
                assert_eq!(commit_ts, ts(i));
                assert_eq!(u64::from(xid), i);
                cur = Some((i, Vec::new()));
            }
            Entry::Change(b) => cur.as_mut().expect("change in txn").1.push(b.to_vec()),
            Entry::Commit {
                commit_lsn,
                end_lsn,
            } => {
                let t = cur.take().expect("commit in txn");
                assert_eq!(commit_lsn, lsn(t.0));
                assert_eq!(end_lsn.0, commit_lsn.0 + 8);
                out.push(t);
            }
        }
    }
    assert!(cur.is_none(), "cursor stopped inside a transaction");
    out
}

fn expect_range(got: &[(u64, Vec<Vec<u8>>)], from: u64, to: u64) {
    let ids: Vec<u64> = got.iter().map(|t| t.0).collect();
    assert_eq!(ids, (from..=to).collect::<Vec<_>>());
    for (i, ps) in got {
        let want: Vec<Vec<u8>> = (0..i % 4).map(|k| payload(*i, k)).collect();
        assert_eq!(ps, &want, "payloads of txn {i}");
    }
}

#[test]
fn transactions_read_back_in_order_across_segments_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, rec) = ChangeLog::open(opts(dir.path(), 600), ident("a"), lsn(1)).unwrap();
    assert_eq!(rec.reset, Some(ResetReason::New));
    for i in 1..=60 {
        assert!(write_txn(&mut log, i));
    }
    log.sync().unwrap();
    let r = log.reader();
    assert!(r.stats().segments > 5, "{:?}", r.stats());
    expect_range(
        &drain(&mut r.cursor(Start::AfterLsn(sub(lsn(1), 1))).unwrap()),
        1,
        60,
    );
    for after in [1, 17, 33, 59, 60] {
        expect_range(
            &drain(&mut r.cursor(Start::AfterLsn(lsn(after))).unwrap()),
            after + 1,
            60,
        );
        // Between two commits: the next one.
        expect_range(
            &drain(&mut r.cursor(Start::AfterLsn(Lsn(lsn(after).0 + 500))).unwrap()),
            after + 1,
            60,
        );
    }
    let mut bounded = r.cursor(Start::AfterLsn(lsn(10))).unwrap().until(lsn(20));
    expect_range(&drain(&mut bounded), 11, 20);
    assert_eq!(bounded.position(), lsn(20));
    drop((log, r));

    // Reopened: sealed segments come from their index files; the slot re-sends
    // from an older position and nothing is logged twice.
    let (mut log, rec) = ChangeLog::open(opts(dir.path(), 600), ident("a"), lsn(30)).unwrap();
    assert_eq!(rec.reset, None);
    assert_eq!(rec.cut_bytes, 0);
    assert_eq!(log.last_lsn(), lsn(60));
    for i in 40..=70 {
        assert_eq!(write_txn(&mut log, i), i > 60, "txn {i}");
    }
    expect_range(
        &drain(
            &mut log
                .reader()
                .cursor(Start::AfterLsn(sub(lsn(1), 1)))
                .unwrap(),
        ),
        1,
        70,
    );
}

fn sub(l: Lsn, n: u64) -> Lsn {
    Lsn(l.0 - n)
}

#[test]
fn a_cursor_follows_the_log_as_it_grows() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ChangeLog::open(opts(dir.path(), 700), ident("a"), lsn(1)).unwrap();
    write_txn(&mut log, 1);
    let mut c = log
        .reader()
        .cursor(Start::AfterLsn(sub(lsn(1), 1)))
        .unwrap();
    expect_range(&drain(&mut c), 1, 1);
    // An open transaction is invisible until it commits.
    log.begin(lsn(2), ts(2), 2).unwrap();
    log.append(&payload(2, 0)).unwrap();
    log.append(&payload(2, 1)).unwrap();
    assert_eq!(c.next_entry().unwrap(), None);
    log.commit(Lsn(lsn(2).0 + 8)).unwrap();
    for i in 3..=40 {
        write_txn(&mut log, i);
    }
    expect_range(&drain(&mut c), 2, 40);
    assert_eq!(c.position(), lsn(40));
}

#[test]
fn a_torn_tail_is_cut_at_every_byte_and_the_rest_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ChangeLog::open(opts(dir.path(), 1 << 20), ident("a"), lsn(1)).unwrap();
    let mut ends = Vec::new();
    for i in 1..=6 {
        write_txn(&mut log, i);
        ends.push(log.inner.state().segs.back().unwrap().end);
    }
    drop(log);
    let seg = list_segments(dir.path()).unwrap().pop().unwrap().1;
    let full = fs::read(&seg).unwrap();
    let meta = fs::read(dir.path().join(META)).unwrap();
    for cut in segment::HEADER_LEN as usize..full.len() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(META), &meta).unwrap();
        fs::write(d.path().join(seg.file_name().unwrap()), &full[..cut]).unwrap();
        let (log, rec) = ChangeLog::open(opts(d.path(), 1 << 20), ident("a"), lsn(1)).unwrap();
        let whole = ends.iter().filter(|&&e| e <= cut as u64).count() as u64;
        assert_eq!(rec.reset, None);
        let valid = if whole == 0 {
            segment::HEADER_LEN
        } else {
            ends[whole as usize - 1]
        };
        assert_eq!(rec.cut_bytes, cut as u64 - valid);
        let got = drain(
            &mut log
                .reader()
                .cursor(Start::AfterLsn(sub(lsn(1), 1)))
                .unwrap(),
        );
        if whole == 0 {
            assert!(got.is_empty());
            assert_eq!(log.last_lsn(), sub(lsn(1), 1));
        } else {
            expect_range(&got, 1, whole);
            assert_eq!(log.last_lsn(), lsn(whole));
        }
    }
}

#[test]
fn garbage_after_the_last_commit_is_cut_and_appending_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ChangeLog::open(opts(dir.path(), 1 << 20), ident("a"), lsn(1)).unwrap();
    for i in 1..=3 {
        write_txn(&mut log, i);
    }
    // A transaction larger than the write buffer reaches the file before its
    // commit; the process dies there.
    log.begin(lsn(4), ts(4), 4).unwrap();
    for _ in 0..40 {
        log.append(&[7u8; 10_000]).unwrap();
    }
    drop(log);
    let seg = list_segments(dir.path()).unwrap().pop().unwrap().1;
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(b"\xff\xff\x00\x00garbage").unwrap();
    drop(f);
    let (mut log, rec) = ChangeLog::open(opts(dir.path(), 1 << 20), ident("a"), lsn(1)).unwrap();
    assert!(rec.cut_bytes > 200_000, "{rec:?}");
    assert_eq!(log.last_lsn(), lsn(3));
    for i in 4..=5 {
        assert!(write_txn(&mut log, i));
    }
    expect_range(
        &drain(
            &mut log
                .reader()
                .cursor(Start::AfterLsn(sub(lsn(1), 1)))
                .unwrap(),
        ),
        1,
        5,
    );
}

#[test]
fn an_abandoned_transaction_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ChangeLog::open(opts(dir.path(), 1 << 20), ident("a"), lsn(1)).unwrap();
    write_txn(&mut log, 1);
    log.begin(lsn(2), ts(2), 2).unwrap();
    for _ in 0..40 {
        log.append(&[1u8; 10_000]).unwrap();
    }
    log.abandon();
    // The source re-sends it after reconnecting.
    for i in 2..=3 {
        assert!(write_txn(&mut log, i));
    }
    let c = &mut log
        .reader()
        .cursor(Start::AfterLsn(sub(lsn(1), 1)))
        .unwrap();
    expect_range(&drain(c), 1, 3);
    drop(log);
    let (log, rec) = ChangeLog::open(opts(dir.path(), 1 << 20), ident("a"), lsn(1)).unwrap();
    assert_eq!(rec.cut_bytes, 0);
    expect_range(
        &drain(
            &mut log
                .reader()
                .cursor(Start::AfterLsn(sub(lsn(1), 1)))
                .unwrap(),
        ),
        1,
        3,
    );
}

#[test]
fn retention_by_size_removes_old_segments_only_and_moves_the_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 800);
    o.max_bytes = 3000;
    let (mut log, _) = ChangeLog::open(o.clone(), ident("a"), lsn(1)).unwrap();
    for i in 1..=80 {
        write_txn(&mut log, i);
    }
    let r = log.reader();
    let before = r.stats();
    let removed = log.retain(ts(80)).unwrap();
    let after = r.stats();
    assert!(removed > 0);
    assert_eq!(after.bytes, before.bytes - removed);
    assert!(after.bytes <= 3000 + 900, "{after:?}");
    let oldest = after.oldest.unwrap();
    assert_eq!(after.horizon.lsn, sub(oldest.commit_lsn, 1000));
    assert_eq!(after.newest.unwrap().commit_lsn, lsn(80));
    let first = oldest.commit_lsn.0 / 1000;
    // From the horizon on, everything; before it, a gap.
    expect_range(
        &drain(&mut r.cursor(Start::AfterLsn(after.horizon.lsn)).unwrap()),
        first,
        80,
    );
    assert!(matches!(
        r.cursor(Start::AfterLsn(sub(after.horizon.lsn, 1))),
        Err(ReplayError::Gap { .. })
    ));
    assert!(matches!(
        r.cursor(Start::AfterTimestamp {
            ts: after.horizon.ts - 1,
            slack: 0
        }),
        Err(ReplayError::Gap { .. })
    ));
    // The horizon survives a reopen, and so does the gap.
    drop((log, r));
    let (log, _) = ChangeLog::open(o, ident("a"), lsn(1)).unwrap();
    let r = log.reader();
    assert_eq!(r.stats().horizon, after.horizon);
    assert!(matches!(
        r.cursor(Start::AfterLsn(lsn(1))),
        Err(ReplayError::Gap { .. })
    ));
}

#[test]
fn retention_by_age_keeps_what_is_young_and_the_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 500);
    o.max_age = Duration::from_secs(30);
    let (mut log, _) = ChangeLog::open(o, ident("a"), lsn(1)).unwrap();
    for i in 1..=60 {
        write_txn(&mut log, i);
    }
    log.retain(ts(70)).unwrap();
    let s = log.reader().stats();
    // Every segment left has a transaction younger than 30 s before "now" (70 s).
    assert!(s.oldest.unwrap().commit_ts >= ts(30) - 10_000_000, "{s:?}");
    assert!(s.horizon.ts < ts(41));
    expect_range(
        &drain(&mut log.reader().cursor(Start::AfterLsn(s.horizon.lsn)).unwrap()),
        s.oldest.unwrap().commit_lsn.0 / 1000,
        60,
    );
    // Everything old: only the active segment stays.
    log.retain(ts(1000)).unwrap();
    let s = log.reader().stats();
    assert_eq!(s.segments, 1);
    assert_eq!(s.newest.unwrap().commit_lsn, lsn(60));
}

#[test]
fn timestamps_resume_after_the_exact_transaction_or_from_the_slack() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ChangeLog::open(opts(dir.path(), 900), ident("a"), lsn(1)).unwrap();
    for i in 1..=50 {
        write_txn(&mut log, i);
    }
    let r = log.reader();
    let at = |ts, slack| drain(&mut r.cursor(Start::AfterTimestamp { ts, slack }).unwrap());
    // Exactly a commit time walcast sent: right after that transaction.
    expect_range(&at(ts(20), 1_000_000), 21, 50);
    expect_range(&at(ts(1), 0), 2, 50);
    expect_range(&at(ts(50), 5), 51, 50);
    // Not a logged commit time: from the first transaction at or after ts − slack.
    expect_range(&at(ts(20) + 300, 0), 21, 50);
    expect_range(&at(ts(20) + 300, 500), 20, 50);
    expect_range(&at(ts(20) + 300, 2_500_000), 18, 50);
    // Newer than everything: nothing yet, then what comes.
    let mut c = r
        .cursor(Start::AfterTimestamp {
            ts: ts(99),
            slack: 1,
        })
        .unwrap();
    assert!(drain(&mut c).is_empty());
    write_txn(&mut log, 51);
    expect_range(&drain(&mut c), 51, 51);
}

#[test]
fn another_source_resets_the_log_and_old_positions_are_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ChangeLog::open(opts(dir.path(), 600), ident("a"), lsn(1)).unwrap();
    for i in 1..=20 {
        write_txn(&mut log, i);
    }
    drop(log);
    let (mut log, rec) = ChangeLog::open(opts(dir.path(), 600), ident("b"), lsn(5)).unwrap();
    assert_eq!(
        rec.reset,
        Some(ResetReason::OtherSource { was: ident("a") })
    );
    let r = log.reader();
    assert_eq!(r.stats().bytes, 0);
    assert!(matches!(
        r.cursor(Start::AfterLsn(lsn(3))),
        Err(ReplayError::Gap { .. })
    ));
    assert!(matches!(
        r.cursor(Start::AfterTimestamp {
            ts: ts(3),
            slack: 0
        }),
        Err(ReplayError::Gap { .. })
    ));
    // The new source's transactions start at its resume position.
    assert!(write_txn(&mut log, 5));
    expect_range(
        &drain(&mut r.cursor(Start::AfterLsn(sub(lsn(5), 1))).unwrap()),
        5,
        5,
    );
    // An explicit reset (a re-created slot) does the same.
    log.reset(lsn(9)).unwrap();
    assert!(matches!(
        r.cursor(Start::AfterLsn(lsn(5))),
        Err(ReplayError::Gap { .. })
    ));
    assert!(write_txn(&mut log, 9));
    assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
}

#[test]
fn a_damaged_index_file_is_rebuilt_and_a_damaged_sealed_segment_resets() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ChangeLog::open(opts(dir.path(), 600), ident("a"), lsn(1)).unwrap();
    for i in 1..=30 {
        write_txn(&mut log, i);
    }
    drop(log);
    let segs = list_segments(dir.path()).unwrap();
    let idx = segs[1].1.with_extension("idx");
    let mut b = fs::read(&idx).unwrap();
    b[20] ^= 1;
    fs::write(&idx, b).unwrap();
    let (log, rec) = ChangeLog::open(opts(dir.path(), 600), ident("a"), lsn(1)).unwrap();
    assert_eq!(rec.reset, None);
    expect_range(
        &drain(
            &mut log
                .reader()
                .cursor(Start::AfterLsn(sub(lsn(1), 1)))
                .unwrap(),
        ),
        1,
        30,
    );
    drop(log);

    let mut b = fs::read(&segs[1].1).unwrap();
    let n = b.len();
    b[n - 3] ^= 1;
    fs::write(&segs[1].1, b).unwrap();
    fs::remove_file(&idx).unwrap();
    let (log, rec) = ChangeLog::open(opts(dir.path(), 600), ident("a"), lsn(31)).unwrap();
    assert!(
        matches!(rec.reset, Some(ResetReason::Corrupt(_))),
        "{rec:?}"
    );
    assert!(matches!(
        log.reader().cursor(Start::AfterLsn(lsn(1))),
        Err(ReplayError::Gap { .. })
    ));
}

#[test]
fn a_cursor_overtaken_by_retention_reports_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 500);
    o.max_bytes = 1500;
    let (mut log, _) = ChangeLog::open(o, ident("a"), lsn(1)).unwrap();
    for i in 1..=10 {
        write_txn(&mut log, i);
    }
    let mut c = log
        .reader()
        .cursor(Start::AfterLsn(sub(lsn(1), 1)))
        .unwrap()
        .until(lsn(2));
    expect_range(&drain(&mut c), 1, 2);
    for i in 11..=60 {
        write_txn(&mut log, i);
    }
    log.retain(ts(60)).unwrap();
    let mut c = c.until(lsn(60));
    let mut err = None;
    loop {
        match c.next_entry() {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert!(matches!(err, Some(ReplayError::Gap { .. })), "{err:?}");
}

fn table(name: &str, columns: &[&str]) -> Arc<Table> {
    use crate::decode::pgoutput::ReplicaIdentity;
    use crate::decode::relation::Column;
    use crate::decode::value::{PgType, TypeKind};
    let text = Arc::new(PgType::new(25, "text", TypeKind::Text));
    Arc::new(Table {
        id: RelId(name.len() as u32),
        schema: "public".into(),
        name: name.into(),
        replica_identity: ReplicaIdentity::Full,
        columns: columns
            .iter()
            .map(|c| Column {
                name: (*c).into(),
                ty: text.clone(),
                key: false,
            })
            .collect(),
        json: Default::default(),
    })
}

#[test]
fn table_shapes_get_stable_ids_that_survive_reopens_and_changes_decode_back() {
    use crate::decode::event::{Cell, Change, ChangeKind};
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ChangeLog::open(opts(dir.path(), 1 << 20), ident("a"), lsn(1)).unwrap();
    let orders = table("orders", &["id", "note"]);
    let altered = table("orders", &["id", "note", "total"]);
    assert_eq!(log.table_id(&orders).unwrap(), 0);
    assert_eq!(log.table_id(&orders).unwrap(), 0);
    // Same shape, another Arc (the relation was re-sent unchanged): same id.
    assert_eq!(log.table_id(&table("orders", &["id", "note"])).unwrap(), 0);
    assert_eq!(log.table_id(&altered).unwrap(), 1);
    log.begin(lsn(1), ts(1), 1).unwrap();
    let c = Change {
        txn: codec::txn_info(lsn(1), ts(1), 1),
        table: altered.clone(),
        kind: ChangeKind::Insert,
        old: None,
        new: Some(vec![
            Cell::Text(Bytes::from_static(b"1")),
            Cell::Null,
            Cell::Absent,
        ]),
    };
    let mut p = Vec::new();
    codec::encode_change(&mut p, 1, &c);
    log.append(&p).unwrap();
    log.commit(Lsn(lsn(1).0 + 8)).unwrap();
    log.sync().unwrap();
    drop(log);
    // A torn record at the end of the table file is cut.
    let tf = dir.path().join(TABLES);
    let mut f = OpenOptions::new().append(true).open(&tf).unwrap();
    f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
    drop(f);
    let (mut log, _) = ChangeLog::open(opts(dir.path(), 1 << 20), ident("a"), lsn(1)).unwrap();
    assert_eq!(
        log.table_id(&table("orders", &["id", "note", "total"]))
            .unwrap(),
        1
    );
    assert_eq!(log.table_id(&table("items", &["sku"])).unwrap(), 2);
    let r = log.reader();
    let mut cur = r.cursor(Start::AfterLsn(sub(lsn(1), 1))).unwrap();
    let Some(Entry::Begin {
        commit_lsn,
        commit_ts,
        xid,
    }) = cur.next_entry().unwrap()
    else {
        panic!("no begin")
    };
    let Some(Entry::Change(b)) = cur.next_entry().unwrap() else {
        panic!("no change")
    };
    let codec::Logged::Change(d) = r
        .decode(&b, codec::txn_info(commit_lsn, commit_ts, xid))
        .unwrap()
    else {
        panic!("not a change")
    };
    assert_eq!(d.table.columns.len(), 3);
    assert_eq!(d.table.name, "orders");
    assert_eq!((d.kind, &d.new, d.txn), (c.kind, &c.new, c.txn));
    // A reset forgets the shapes.
    log.reset(lsn(5)).unwrap();
    assert!(r.table(1).is_none());
    assert_eq!(log.table_id(&altered).unwrap(), 0);
}

/// A one-row transaction `i` of `table`, as the stream hands it over.
fn one_row_txn(table: &Arc<Table>, i: u64) -> Vec<crate::decode::event::Item> {
    use crate::decode::event::{Cell, Change, ChangeKind, Item};
    let info = codec::txn_info(lsn(i), ts(i), i as u32);
    let change = Arc::new(Change {
        txn: info,
        table: table.clone(),
        kind: ChangeKind::Insert,
        old: None,
        new: Some(vec![Cell::Text(Bytes::from(i.to_string()))]),
    });
    vec![
        Item::Begin(info),
        Item::Change(change),
        Item::Commit {
            info,
            end_lsn: Lsn(lsn(i).0 + 8),
        },
    ]
}

/// A stream's start from the slot `walcast`, confirmed at `confirmed`.
fn stream_start(confirmed: u64) -> crate::decode::event::Item {
    crate::decode::event::Item::Stream(crate::decode::event::StreamStart {
        system_id: "sys".into(),
        slot: "walcast".into(),
        slot_confirmed: Lsn(confirmed),
    })
}

/// The log stage logs each transaction of the batches it is handed
/// once, in order (a resend after a reconnect is skipped; one cut by a reconnect
/// is logged whole from its resend), and lets the stream confirm a
/// transaction only once the log made it durable.
#[test]
fn the_stage_logs_each_transaction_once_and_gates_confirmation() {
    use crate::decode::event::{Cell, Change, ChangeKind, Item};
    use crate::source::session::Progress;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let orders = table("orders", &["id"]);
    let txn = |i: u64| one_row_txn(&orders, i);
    let start = stream_start;
    let progress = Arc::new(Progress::gated_by_log());
    let (in_tx, in_rx) = tokio::sync::mpsc::channel(64);
    let (handle, thread) =
        stage::spawn(opts(dir.path(), 1 << 20), in_rx, progress.clone()).unwrap();
    rt.block_on(async {
        // Handled downstream but not yet logged: nothing is confirmed.
        progress.confirm(Lsn(lsn(3).0 + 8));
        assert_eq!(progress.confirmed(), Lsn::ZERO);
        let mut sent = vec![start(500)];
        sent.extend((1..=3).flat_map(txn));
        // A reconnect resends transactions 2 and 3, then 4 follows.
        sent.push(start(1500));
        sent.extend((2..=4).flat_map(txn));
        // A reconnect in the middle of transaction 5 (same source): the part
        // before it is abandoned, the resent whole is logged once.
        sent.extend(txn(5).into_iter().take(2));
        // Past the write buffer: part of it reaches the file before the cut.
        let info = codec::txn_info(lsn(5), ts(5), 5);
        sent.push(Item::Change(Arc::new(Change {
            txn: info,
            table: orders.clone(),
            kind: ChangeKind::Insert,
            old: None,
            new: Some(vec![Cell::Text(Bytes::from("x".repeat(300 << 10)))]),
        })));
        sent.push(start(1500));
        sent.extend(txn(5));
        // In batches of every size the hub may hand over, one item to many.
        for (i, batch) in sent.chunks(5).enumerate() {
            if i % 2 == 0 {
                in_tx.send(batch.to_vec()).await.unwrap();
            } else {
                for item in batch {
                    in_tx.send(vec![item.clone()]).await.unwrap();
                }
            }
        }
        // Once durable, the confirmation reaches what downstream handled.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while progress.confirmed() < Lsn(lsn(3).0 + 8) {
            assert!(std::time::Instant::now() < deadline, "never confirmed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        progress.confirm(Lsn(lsn(5).0 + 8));
        drop(in_tx);
    });
    thread.join().unwrap();
    // Closing synced the last transaction.
    assert_eq!(progress.confirmed(), Lsn(lsn(5).0 + 8));
    assert_eq!(handle.stats.transactions.load(Ordering::Relaxed), 5);
    assert_eq!(handle.stats.skipped.load(Ordering::Relaxed), 2);
    assert_eq!(
        handle.stats.errors.load(Ordering::Relaxed),
        0,
        "no write failed"
    );
    let reader = handle.reader().expect("the log was opened");
    // It holds everything after the slot's position when it was opened.
    assert!(matches!(
        reader.cursor(Start::AfterLsn(Lsn(498))),
        Err(ReplayError::Gap { .. })
    ));
    let mut c = reader.cursor(Start::AfterLsn(Lsn(499))).unwrap();
    let (mut commits, mut changes) = (Vec::new(), 0);
    while let Some(e) = c.next_entry().unwrap() {
        match e {
            Entry::Commit { commit_lsn, .. } => commits.push(commit_lsn),
            Entry::Change(_) => changes += 1,
            Entry::Begin { .. } => {}
        }
    }
    assert_eq!(commits, (1..=5).map(lsn).collect::<Vec<_>>());
    assert_eq!(
        changes, 5,
        "one change per transaction, nothing of the cut-off part"
    );
}

/// Syncs are grouped in time: a stream of one-row transactions, each handed
/// over alone (as at 2,000 commits/s), gets one sync per
/// [`stage::SYNC_INTERVAL`] at most, not one per transaction; and a sync that
/// is due goes ahead with no more input coming, so the last transaction is
/// confirmed while the stream stays open.
#[test]
fn the_stage_syncs_at_most_once_per_interval_and_when_due_with_the_input_idle() {
    use crate::source::session::Progress;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let orders = table("orders", &["id"]);
    let progress = Arc::new(Progress::gated_by_log());
    let (in_tx, in_rx) = tokio::sync::mpsc::channel(64);
    let (handle, thread) =
        stage::spawn(opts(dir.path(), 1 << 20), in_rx, progress.clone()).unwrap();
    const TXNS: u64 = 300;
    let started = std::time::Instant::now();
    rt.block_on(async {
        in_tx.send(vec![stream_start(500)]).await.unwrap();
        for i in 1..=TXNS {
            in_tx.send(one_row_txn(&orders, i)).await.unwrap();
            if i % 3 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let last = Lsn(lsn(TXNS).0 + 8);
        progress.confirm(last);
        // Nothing more comes, and the input stays open: the due sync runs.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while progress.confirmed() < last {
            assert!(
                std::time::Instant::now() < deadline,
                "the last transaction was never confirmed"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let elapsed = started.elapsed();
    let syncs = handle.stats.syncs.load(Ordering::Relaxed);
    let most = elapsed.as_micros() / stage::SYNC_INTERVAL.as_micros() + 1;
    assert!(
        (2..=most as u64).contains(&syncs),
        "{syncs} syncs for {TXNS} transactions in {elapsed:?} (at most {most})"
    );
    assert_eq!(handle.stats.transactions.load(Ordering::Relaxed), TXNS);
    drop(in_tx);
    thread.join().unwrap();
}
