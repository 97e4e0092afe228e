//! Micro benchmarks (criterion, no live server): the per-change costs of the
//! pipeline stages, so a regression shows up in the stage that caused it.
//!
//! - `decode`: `pgoutput::decode` over a corpus captured from a real slot
//!   (`benches/fixtures/pgoutput.bin`, made by `walcast-bench capture`), in bytes/s.
//! - `value_json`: `value::write_json` per type family, in input bytes/s.
//! - `filter`: `BoundFilter::matches` for the filter shapes clients use.
//! - `route`: `Hub::route` of one change with 100 / 10,000 / 100,000 `eq`
//!   subscriptions on one column plus a few range filters (encoding included).
//! - `route_fanout`: `Hub::route` of one change to 10,000 whole-table
//!   subscriptions on 10,000 connections (per delivery: match, queue, shared data).
//! - `leave`: those 10,000 subscribers all disconnecting.
//! - `fanout_encode`: one change's `data` encoded once, then one frame per channel
//!   as the connection writer assembles it, for 1 / 100 / 10,000 channels.
//! - `changelog`: appending transactions of 10 changes of 250 bytes to the change
//!   log (written, not synced: syncing is batched off the path), and reading them
//!   back with a cursor as a replay does, in changes/s.
//!
//! The stages a drain crosses, each over the changes of the captured corpus (its
//! tables typed as the catalog would type them), in changes/s: `decode` (above),
//! `assemble` (decoded messages → transactions and changes, `Assembler::apply`),
//! `log_append` (a change encoded for the change log, then whole transactions
//! encoded and appended as the log stage does, not synced), `route` (above),
//! `row_json` (a change's `data` as the hub encodes it once per change, and its
//! `walcast tail` line), `frame` (the `postgres_changes` frame the connection
//! writer assembles around that `data`).
//!
//! Run: `cargo bench --bench micro` (add `-- <group>` to pick one).
//!
//! `WALCAST_COUNT=<case>` runs a fixed number of routes of one case instead (for
//! callgrind: see `count`).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use tokio::sync::oneshot;

use walcast::decode::assembler::Assembler;
use walcast::decode::event::{AllColumns, Cell, Change, ChangeKind, Item, Row, TxnInfo};
use walcast::decode::pgoutput::{self, PgTimestamp, RelId, ReplicaIdentity, Xid};
use walcast::decode::relation::{Column, Table, TypeCatalog};
use walcast::decode::value::{self, PgType, RenderOptions, TypeKind};
use walcast::deliver::frame::Vsn;
use walcast::lsn::Lsn;
use walcast::route::filter::Filter;
use walcast::route::hub::{
    Binding, BindingOptions, ConnHandle, EventMask, Hub, HubCommand, HubStats, Target,
};

const CORPUS: &[u8] = include_bytes!("fixtures/pgoutput.bin");

fn scalar(oid: u32, name: &str) -> Arc<PgType> {
    Arc::new(PgType::new(oid, name, PgType::kind_for_base_name(name)))
}

fn array_of(oid: u32, name: &str, element: Arc<PgType>) -> Arc<PgType> {
    Arc::new(PgType::new(
        oid,
        name,
        TypeKind::Array {
            element,
            delimiter: b',',
        },
    ))
}

fn bench_decode(c: &mut Criterion) {
    let msgs = walcast::testing::read_capture(CORPUS).expect("benches/fixtures/pgoutput.bin");
    assert!(
        !msgs.is_empty(),
        "empty corpus: run `walcast-bench capture`"
    );
    let bytes: usize = msgs.iter().map(Bytes::len).sum();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("pgoutput_corpus", |b| {
        b.iter(|| {
            for m in &msgs {
                let _ = black_box(pgoutput::decode(black_box(m)));
            }
        })
    });
    g.finish();
}

fn bench_values(c: &mut Criterion) {
    let int4 = scalar(23, "int4");
    let text = scalar(25, "text");
    let cases: Vec<(&str, Arc<PgType>, &str)> = vec![
        ("bool", scalar(16, "bool"), "t"),
        ("int4", int4.clone(), "1234567"),
        ("int8", scalar(20, "int8"), "9007199254740993"),
        ("numeric", scalar(1700, "numeric"), "123456789.123456789"),
        ("float8", scalar(701, "float8"), "3.141592653589793"),
        ("float8_exp", scalar(701, "float8"), "1.5e+100"),
        (
            "text_plain",
            text.clone(),
            "the quick brown fox jumps over the lazy dog",
        ),
        (
            "text_escapes",
            text.clone(),
            "line one\nline \"two\"\tand \\ three",
        ),
        (
            "uuid",
            scalar(2950, "uuid"),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ),
        (
            "timestamptz",
            scalar(1184, "timestamptz"),
            "2024-05-06 07:08:09.123456+00",
        ),
        (
            "timestamp",
            scalar(1114, "timestamp"),
            "2024-05-06 07:08:09.123456",
        ),
        ("date", scalar(1082, "date"), "2024-05-06"),
        (
            "jsonb",
            scalar(3802, "jsonb"),
            r#"{"a": 1, "b": [true, null, "x"], "c": {"d": 2.5}}"#,
        ),
        (
            "int4_array",
            array_of(1007, "_int4", int4),
            "{1,2,3,4,5,6,7,8,9,10}",
        ),
        (
            "text_array",
            array_of(1009, "_text", text),
            r#"{alpha,"beta gamma",NULL,delta}"#,
        ),
    ];
    let mut g = c.benchmark_group("value_json");
    let opts = RenderOptions::default();
    for (name, ty, input) in &cases {
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(*name, |b| {
            let mut out = String::with_capacity(256);
            b.iter(|| {
                out.clear();
                value::write_json(&mut out, black_box(ty), black_box(input), opts);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

/// `orders(id int8, owner int4, status text, amount numeric, note text, created timestamptz, payload jsonb)`.
fn orders_table() -> Arc<Table> {
    let col = |name: &str, ty: Arc<PgType>, key: bool| Column {
        name: name.into(),
        ty,
        key,
    };
    Arc::new(Table {
        id: RelId(16_384),
        schema: "public".into(),
        name: "orders".into(),
        replica_identity: ReplicaIdentity::Full,
        json: Default::default(),
        columns: vec![
            col("id", scalar(20, "int8"), true),
            col("owner", scalar(23, "int4"), true),
            col("status", scalar(25, "text"), true),
            col("amount", scalar(1700, "numeric"), true),
            col("note", scalar(25, "text"), true),
            col("created", scalar(1184, "timestamptz"), true),
            col("payload", scalar(3802, "jsonb"), true),
        ],
    })
}

fn text_cell(s: &str) -> Cell {
    Cell::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn order_row(id: u64, owner: u64) -> Row {
    vec![
        text_cell(&id.to_string()),
        text_cell(&owner.to_string()),
        text_cell(if id.is_multiple_of(3) { "paid" } else { "open" }),
        text_cell(&format!("{}.{:02}", id % 1000, id % 100)),
        text_cell("deliver to the back door, ring twice"),
        text_cell("2024-05-06 07:08:09.123456+00"),
        Cell::Null,
    ]
}

fn order_change(table: &Arc<Table>, id: u64, owner: u64) -> Arc<Change> {
    Arc::new(Change {
        txn: TxnInfo {
            commit_lsn: Lsn(0x1_6B37_4D48),
            commit_time: PgTimestamp(768_000_000_000_000),
            xid: Xid(1234),
        },
        table: table.clone(),
        kind: ChangeKind::Insert,
        new: Some(order_row(id, owner)),
        old: None,
    })
}

fn bench_filter(c: &mut Criterion) {
    let table = orders_table();
    let row = order_row(42, 7);
    let mut g = c.benchmark_group("filter");
    for (name, text) in [
        ("eq_hit", "owner=eq.7"),
        ("eq_miss", "owner=eq.8"),
        ("eq_two_columns", "owner=eq.7,status=eq.paid"),
        ("range_numeric", "amount=gt.10.5"),
        ("in_list", "owner=in.(1,2,3,7)"),
    ] {
        // A shape the filter cannot parse is reported and skipped, not benchmarked.
        let Ok(bound) = Filter::parse(text).and_then(|f| f.bind(&table)) else {
            eprintln!("filter/{name}: {text:?} not supported by this filter build; skipped");
            continue;
        };
        g.bench_function(name, |b| {
            b.iter(|| black_box(&bound).matches(black_box(&row)))
        });
    }
    g.finish();
}

/// A hub with `n` `eq` subscriptions on `owner` (one channel each, spread over
/// up to 256 connections) plus range subscriptions on `amount`.
struct HubFixture {
    hub: Hub,
    receivers: Vec<walcast::route::queue::OutRx>,
    handles: Vec<ConnHandle>,
}

impl HubFixture {
    /// Connections closed (as slow clients: nothing else closes them here).
    fn closed(&self) -> usize {
        self.handles
            .iter()
            .filter(|h| h.kill.is_cancelled())
            .count()
    }
}

fn hub_with(table: &Arc<Table>, n: usize, ranges: usize) -> HubFixture {
    let filters: Vec<Filter> = (0..n)
        .map(|i| Filter::parse(&format!("owner=eq.{i}")).expect("eq filter"))
        .collect();
    hub_of(table, filters, ranges, n.clamp(1, 256))
}

/// A hub with one subscription per filter (plus `ranges` range filters), spread
/// over `conns` connections.
fn hub_of(table: &Arc<Table>, filters: Vec<Filter>, ranges: usize, conns: usize) -> HubFixture {
    let subs = filters
        .into_iter()
        .map(|f| (f, BindingOptions::default()))
        .collect();
    hub_of_options(table, subs, ranges, conns)
}

/// [`hub_of`] with each subscription's binding options (`moves`, `select`).
fn hub_of_options(
    table: &Arc<Table>,
    mut subs: Vec<(Filter, BindingOptions)>,
    ranges: usize,
    conns: usize,
) -> HubFixture {
    let stats = Arc::new(HubStats::default());
    let mut hub = Hub::new(RenderOptions::default(), stats.clone());
    let mut handles = Vec::with_capacity(conns);
    let mut receivers = Vec::with_capacity(conns);
    for id in 0..conns {
        let (tx, rx) = walcast::route::queue::channel(if conns > 256 { 512 } else { 1 << 16 });
        handles.push(ConnHandle::new(id as u64 + 1, tx, usize::MAX));
        receivers.push(rx);
    }
    let mut skipped = 0;
    for r in 0..ranges {
        match Filter::parse(&format!("amount=gt.{}", 900 + r * 10)) {
            Ok(f) => subs.push((f, BindingOptions::default())),
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        eprintln!("route: {skipped} range filters not supported by this filter build; skipped");
    }
    for (i, (filter, options)) in subs.into_iter().enumerate() {
        let (done, _) = oneshot::channel();
        hub.command(HubCommand::Subscribe {
            conn: handles[i % conns].clone(),
            channel: i as u64 + 1,
            topic: Arc::from(format!("realtime:sub{i}")),
            bindings: vec![Binding {
                id: (i as u32 % 0x07ff_ffff) + 1,
                events: EventMask::ALL,
                target: Target::Table(table.clone()),
                filter,
                access: Default::default(),
                options,
            }],
            hold: false,
            done,
        });
    }
    HubFixture {
        hub,
        receivers,
        handles,
    }
}

fn bench_route(c: &mut Criterion) {
    let table = orders_table();
    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(1));
    // `or/10000`: each subscriber's filter is an OR of two owners (served from
    // the index like an `eq`); the others are plain `eq` filters.
    for (or, n) in [
        (false, 100usize),
        (false, 10_000),
        (false, 100_000),
        (true, 10_000),
    ] {
        let mut fx = if or {
            let filters = (0..n)
                .map(|i| Filter::parse(&format!("or=(owner.eq.{i},owner.eq.{})", i + 2 * n)))
                .collect::<Result<Vec<_>, _>>();
            match filters {
                Ok(f) => hub_of(&table, f, 10, n.clamp(1, 256)),
                Err(_) => {
                    eprintln!("route: or filters not supported by this filter build; skipped");
                    continue;
                }
            }
        } else {
            hub_with(&table, n, 10)
        };
        // Changes whose owners spread over the subscribed keys, plus 1 in 8 that match no `eq`.
        let changes: Vec<Arc<Change>> = (0..1024u64)
            .map(|i| {
                let owner = if i % 8 == 7 {
                    n as u64 + i
                } else {
                    (i * 7919) % n as u64
                };
                order_change(&table, i, owner)
            })
            .collect();
        let id = if or {
            BenchmarkId::new("or", n)
        } else {
            BenchmarkId::from_parameter(n)
        };
        g.bench_with_input(id, &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0u64;
                while done < iters {
                    let chunk = (iters - done).min(256);
                    let start = Instant::now();
                    for k in 0..chunk {
                        fx.hub
                            .route(&changes[((done + k) % changes.len() as u64) as usize]);
                    }
                    total += start.elapsed();
                    done += chunk;
                    // Drain the connection queues outside the timed part.
                    for rx in &mut fx.receivers {
                        while rx.try_recv().is_ok() {}
                    }
                }
                total
            })
        });
        assert_eq!(
            fx.closed(),
            0,
            "a subscription was dropped as a slow client during the bench"
        );
    }
    g.finish();
}

/// Routing one change to 10,000 whole-table subscriptions, each on a connection of
/// its own (the end-to-end `fanout` case's hub side): per-delivery cost of matching,
/// queueing and the shared encoding.
fn bench_route_fanout(c: &mut Criterion) {
    let table = orders_table();
    let n = 10_000;
    let mut fx = hub_of(&table, vec![Filter::default(); n], 0, n);
    let change = order_change(&table, 42, 7);
    let mut g = c.benchmark_group("route_fanout");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                fx.hub.route(&change);
                total += start.elapsed();
                for rx in &mut fx.receivers {
                    while rx.try_recv().is_ok() {}
                }
            }
            total
        })
    });
    g.finish();
    assert_eq!(
        fx.closed(),
        0,
        "a subscription was dropped as a slow client during the bench"
    );
}

/// 10,000 whole-table subscribers, each on its own connection, all disconnecting
/// (a network blip, a deploy of the client app): the hub's work to forget them.
fn bench_leave(c: &mut Criterion) {
    let table = orders_table();
    let n = 10_000;
    let mut g = c.benchmark_group("leave");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter_batched(
            || hub_of(&table, vec![Filter::default(); n], 0, n),
            |mut fx| {
                for conn in 1..=n as u64 {
                    fx.hub.command(HubCommand::Disconnect { conn });
                }
                assert_eq!(fx.hub.subscription_count(), 0);
                fx
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn bench_fanout_encode(c: &mut Criterion) {
    let table = orders_table();
    let change = order_change(&table, 42, 7);
    let topics: Vec<String> = (0..10_000).map(|i| format!("realtime:room{i}")).collect();
    let mut g = c.benchmark_group("fanout_encode");
    for n in [1usize, 100, 10_000] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let mut data = String::with_capacity(512);
                change.to_supabase_data(&mut data, &AllColumns, RenderOptions::default(), false);
                let data: Arc<str> = Arc::from(data);
                let mut bytes = 0;
                for topic in &topics[..n] {
                    bytes +=
                        walcast::deliver::socket::change_frame(Vsn::V1, topic, &[1_234_567], &data)
                            .len();
                }
                black_box(bytes)
            })
        });
    }
    g.finish();
}

fn bench_changelog(c: &mut Criterion) {
    use walcast::changelog::{ChangeLog, LogIdentity, LogOptions, Start};
    const TXN: u64 = 10;
    let dir = std::env::temp_dir().join(format!("walcast-bench-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = LogOptions::new(&dir, 4 << 30, Duration::from_secs(3600));
    let ident = LogIdentity {
        system_id: "bench".into(),
        slot: "bench".into(),
    };
    let (mut log, _) = ChangeLog::open(opts.clone(), ident.clone(), Lsn(1)).expect("open log");
    let payload = vec![b'x'; 250];
    let mut next = 1u64;
    let mut g = c.benchmark_group("changelog");
    g.throughput(Throughput::Elements(TXN));
    g.bench_function("append_txn_of_10", |b| {
        b.iter(|| {
            next += 1;
            log.begin(Lsn(next * 1000), next as i64, 1).expect("begin");
            for _ in 0..TXN {
                log.append(black_box(&payload)).expect("append");
            }
            log.commit(Lsn(next * 1000 + 8)).expect("commit");
        })
    });
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
    // Replay: 10,000 transactions of 10 changes.
    let (mut log, _) = ChangeLog::open(opts.clone(), ident.clone(), Lsn(1)).expect("open log");
    for t in 1..=10_000u64 {
        log.begin(Lsn(t * 1000), t as i64, 1).expect("begin");
        for _ in 0..TXN {
            log.append(&payload).expect("append");
        }
        log.commit(Lsn(t * 1000 + 8)).expect("commit");
    }
    let reader = log.reader();
    g.throughput(Throughput::Elements(10_000 * TXN));
    g.bench_function("replay_100k", |b| {
        b.iter(|| {
            let mut cur = reader.cursor(Start::AfterLsn(Lsn(0))).expect("cursor");
            let mut n = 0u64;
            while let Some(e) = cur.next_entry().expect("read") {
                n += u64::from(matches!(e, walcast::changelog::Entry::Change(_)));
            }
            assert_eq!(n, 10_000 * TXN);
        })
    });
    g.finish();
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The corpus's pgoutput messages, decoded.
fn corpus_messages() -> Vec<pgoutput::Message> {
    walcast::testing::read_capture(CORPUS)
        .expect("benches/fixtures/pgoutput.bin")
        .iter()
        .map(|m| pgoutput::decode(m).expect("the corpus decodes"))
        .collect()
}

/// The type of a built-in OID, as the catalog would give it (the corpus's
/// tables use these; an enum renders as text, as from the catalog).
fn builtin_type(oid: u32) -> Arc<PgType> {
    let base = |name: &str| scalar(oid, name);
    match oid {
        16 => base("bool"),
        17 => base("bytea"),
        20 => base("int8"),
        21 => base("int2"),
        23 => base("int4"),
        25 => base("text"),
        114 => base("json"),
        700 => base("float4"),
        701 => base("float8"),
        1043 => base("varchar"),
        1082 => base("date"),
        1114 => base("timestamp"),
        1184 => base("timestamptz"),
        1700 => base("numeric"),
        2950 => base("uuid"),
        3802 => base("jsonb"),
        1007 => array_of(oid, "_int4", scalar(23, "int4")),
        1009 => array_of(oid, "_text", scalar(25, "text")),
        _ => Arc::new(PgType::new(oid, &format!("oid{oid}"), TypeKind::Text)),
    }
}

/// The corpus as transactions of changes, each table's columns typed with
/// [`builtin_type`] (the assembler alone, without a catalog, types every column
/// as text).
fn corpus_transactions() -> Vec<(TxnInfo, Lsn, Vec<Arc<Change>>)> {
    let mut asm = Assembler::default();
    let mut types = TypeCatalog::default();
    let mut typed: std::collections::HashMap<RelId, Arc<Table>> = Default::default();
    let mut retype = |t: &Arc<Table>| {
        typed
            .entry(t.id)
            .or_insert_with(|| {
                Arc::new(Table {
                    id: t.id,
                    schema: t.schema.clone(),
                    name: t.name.clone(),
                    replica_identity: t.replica_identity,
                    json: Default::default(),
                    columns: t
                        .columns
                        .iter()
                        .map(|c| Column {
                            name: c.name.clone(),
                            ty: builtin_type(c.ty.oid.0),
                            key: c.key,
                        })
                        .collect(),
                })
            })
            .clone()
    };
    let mut txns = Vec::new();
    let mut open: Vec<Arc<Change>> = Vec::new();
    for m in corpus_messages() {
        let Some(item) = asm.apply(m, &mut types).expect("the corpus assembles") else {
            continue;
        };
        let mut push = |c: &Change| {
            open.push(Arc::new(Change {
                txn: c.txn,
                table: retype(&c.table),
                kind: c.kind,
                new: c.new.clone(),
                old: c.old.clone(),
            }))
        };
        match item {
            Item::Change(c) => push(&c),
            Item::Truncate(cs) => cs.iter().for_each(|c| push(c)),
            Item::Commit { info, end_lsn } => txns.push((info, end_lsn, std::mem::take(&mut open))),
            _ => {}
        }
    }
    assert!(!txns.is_empty(), "no transaction in the corpus");
    txns
}

fn corpus_changes() -> Vec<Arc<Change>> {
    corpus_transactions()
        .into_iter()
        .flat_map(|(_, _, cs)| cs)
        .collect()
}

/// Decoded messages → items: framing checks, relation lookup, row building.
fn bench_assemble(c: &mut Criterion) {
    let msgs = corpus_messages();
    let changes = corpus_changes().len() as u64;
    let mut g = c.benchmark_group("assemble");
    g.throughput(Throughput::Elements(changes));
    g.bench_function("corpus", |b| {
        b.iter_batched(
            || msgs.clone(),
            |msgs| {
                let mut asm = Assembler::default();
                let mut types = TypeCatalog::default();
                let mut items = Vec::with_capacity(msgs.len());
                for m in msgs {
                    items.push(asm.apply(m, &mut types).expect("assembles"));
                }
                // Dropped outside the timed part.
                items
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// The change log stage's work per change: the entry encoded, then whole
/// transactions encoded and appended (begin / append / commit; not synced).
fn bench_log_append(c: &mut Criterion) {
    use walcast::changelog::{codec, ChangeLog, LogIdentity, LogOptions};
    let txns = corpus_transactions();
    let changes: Vec<Arc<Change>> = txns.iter().flat_map(|t| t.2.iter().cloned()).collect();
    let mut g = c.benchmark_group("log_append");
    g.throughput(Throughput::Elements(changes.len() as u64));
    g.bench_function("encode", |b| {
        let mut scratch = Vec::with_capacity(4096);
        b.iter(|| {
            let mut bytes = 0;
            for ch in &changes {
                scratch.clear();
                codec::encode_change(&mut scratch, 1, black_box(ch));
                bytes += scratch.len();
            }
            black_box(bytes)
        })
    });
    let dir = std::env::temp_dir().join(format!("walcast-bench-logappend-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // 256 MB kept at most: older segments go between samples (untimed).
    let opts = LogOptions::new(&dir, 256 << 20, Duration::from_secs(3600));
    let ident = LogIdentity {
        system_id: "bench".into(),
        slot: "bench".into(),
    };
    let (mut log, _) = ChangeLog::open(opts, ident, Lsn(1)).expect("open log");
    let mut scratch = Vec::with_capacity(4096);
    let mut next = 1u64;
    g.bench_function("encode_and_append", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                for (info, _, cs) in &txns {
                    next += 1;
                    log.begin(Lsn(next * 1000), info.commit_time.unix_micros(), info.xid.0)
                        .expect("begin");
                    for ch in cs {
                        let id = log.table_id(&ch.table).expect("table id");
                        scratch.clear();
                        codec::encode_change(&mut scratch, id, ch);
                        log.append(&scratch).expect("append");
                    }
                    log.commit(Lsn(next * 1000 + 8)).expect("commit");
                }
                total += start.elapsed();
                log.retain(walcast::changelog::now_micros())
                    .expect("retain");
            }
            total
        })
    });
    g.finish();
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A change's JSON: the `data` the hub encodes once per change for every
/// subscriber (`to_supabase_data`), and the `walcast tail` line.
fn bench_row_json(c: &mut Criterion) {
    let changes = corpus_changes();
    let opts = RenderOptions::default();
    let mut g = c.benchmark_group("row_json");
    g.throughput(Throughput::Elements(changes.len() as u64));
    g.bench_function("supabase_data", |b| {
        let mut out = String::with_capacity(4096);
        b.iter(|| {
            let mut bytes = 0;
            for ch in &changes {
                out.clear();
                black_box(ch).to_supabase_data(&mut out, &AllColumns, opts, false);
                bytes += out.len();
            }
            black_box(bytes)
        })
    });
    g.bench_function("tail_line", |b| {
        b.iter(|| {
            let mut bytes = 0;
            for ch in &changes {
                bytes += black_box(ch).to_tail_json(opts).len();
            }
            black_box(bytes)
        })
    });
    g.finish();
}

/// The frame the connection writer builds per change and channel around the
/// change's shared `data` (one binding id), protocol 1.0.0 and 2.0.0.
fn bench_frame(c: &mut Criterion) {
    let datas: Vec<Arc<str>> = corpus_changes()
        .iter()
        .map(|ch| {
            let mut out = String::new();
            ch.to_supabase_data(&mut out, &AllColumns, RenderOptions::default(), false);
            Arc::from(out)
        })
        .collect();
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(datas.len() as u64));
    for (name, vsn) in [("v1", Vsn::V1), ("v2", Vsn::V2)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut bytes = 0;
                for data in &datas {
                    bytes += walcast::deliver::socket::change_frame(
                        vsn,
                        black_box("realtime:orders"),
                        &[1_234_567],
                        data,
                    )
                    .len();
                }
                black_box(bytes)
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = bench_decode, bench_assemble, bench_log_append, bench_values, bench_row_json, bench_filter, bench_route, bench_route_fanout, bench_leave, bench_fanout_encode, bench_frame, bench_changelog
}

// Counting mode: a fixed number of routes of one case, for callgrind (instruction
// and cache-miss counts per delivery compare builds where timings on a shared
// machine do not). `WALCAST_COUNT=<case> cargo bench --bench micro` runs it instead
// of criterion; see BENCHMARKS.md for the valgrind command line.

/// Marks the end of the warm-up: callgrind's `--zero-before` points here.
#[inline(never)]
fn counted_start() {
    black_box(());
}

/// Drains every connection queue, giving back the bytes as the connection writer
/// does; returns the frames taken.
fn drain(fx: &mut HubFixture) -> u64 {
    let mut frames = 0;
    for (rx, h) in fx.receivers.iter_mut().zip(&fx.handles) {
        while let Ok(out) = rx.try_recv() {
            h.queued.release(out.queued_size());
            frames += 1;
        }
    }
    frames
}

/// An UPDATE of order 42 from owner 7 to owner 8, with the full old image.
fn owner_update(table: &Arc<Table>) -> Arc<Change> {
    Arc::new(Change {
        txn: TxnInfo {
            commit_lsn: Lsn(0x1_6B37_4D48),
            commit_time: PgTimestamp(768_000_000_000_000),
            xid: Xid(1234),
        },
        table: table.clone(),
        kind: ChangeKind::Update,
        new: Some(order_row(42, 8)),
        old: Some(order_row(42, 7)),
    })
}

/// 10,000 whole-table subscriptions and, with `extras`, 1,000 OR and 1,000 moves
/// subscriptions on the same table, interleaved (every sixth channel), each on a
/// connection of its own. With `hit`, the extras match [`owner_update`] (the OR
/// names owner 8; the moves filter `owner=eq.7` sees the row leave: a DELETE);
/// without, their keys match nothing. `plain: false` leaves the 10,000 out.
fn mixed_fixture(table: &Arc<Table>, plain: bool, extras: bool, hit: bool) -> HubFixture {
    let moves = BindingOptions {
        moves: true,
        ..Default::default()
    };
    let mut subs = Vec::new();
    let (mut or_n, mut moves_n) = (0u64, 0u64);
    for i in 0..12_000u64 {
        if i % 6 != 5 {
            if plain {
                subs.push((Filter::default(), BindingOptions::default()));
            }
        } else if extras && i % 12 == 5 {
            let first = if hit { 8 } else { 100_000 + or_n };
            let f = Filter::parse(&format!(
                "or=(owner.eq.{first},owner.eq.{})",
                200_000 + or_n
            ))
            .expect("or filter");
            subs.push((f, BindingOptions::default()));
            or_n += 1;
        } else if extras {
            let owner = if hit { 7 } else { 300_000 + moves_n };
            let f = Filter::parse(&format!("owner=eq.{owner}")).expect("eq filter");
            subs.push((f, moves.clone()));
            moves_n += 1;
        }
    }
    let n = subs.len();
    hub_of_options(table, subs, 0, n)
}

/// 10,000 subscriptions `owner=eq.7` and, with `moves`, 1,000 `owner=eq.<other>`
/// with moves on (matching nothing here), interleaved, each on a connection of
/// its own; routed: an UPDATE of an owner-7 order's status (owner unchanged).
fn keyed_fixture(table: &Arc<Table>, moves: bool) -> (HubFixture, Arc<Change>) {
    let with_moves = BindingOptions {
        moves: true,
        ..Default::default()
    };
    let mut subs = Vec::new();
    for i in 0..11_000u64 {
        if i % 11 != 10 {
            let f = Filter::parse("owner=eq.7").expect("eq filter");
            subs.push((f, BindingOptions::default()));
        } else if moves {
            let f = Filter::parse(&format!("owner=eq.{}", 300_000 + i)).expect("eq filter");
            subs.push((f, with_moves.clone()));
        }
    }
    let n = subs.len();
    let old = order_row(42, 7);
    let mut new = old.clone();
    new[2] = text_cell("baked");
    let change = Arc::new(Change {
        txn: TxnInfo {
            commit_lsn: Lsn(0x1_6B37_4D48),
            commit_time: PgTimestamp(768_000_000_000_000),
            xid: Xid(1234),
        },
        table: table.clone(),
        kind: ChangeKind::Update,
        new: Some(new),
        old: Some(old),
    });
    (hub_of_options(table, subs, 0, n), change)
}

fn count(case: &str) {
    let table = orders_table();
    // (fixture, changes cycled, warm-up routes, counted routes, drain every)
    let (mut fx, changes, warm, counted, every) = match case {
        c if c.starts_with("fanout") => {
            // `fanout` is 10,000 subscriptions; `fanout12000` another number.
            let n = c["fanout".len()..].parse().unwrap_or(10_000);
            let fx = hub_of(&table, vec![Filter::default(); n], 0, n);
            (fx, vec![order_change(&table, 42, 7)], 2, 30, 1)
        }
        "route100" | "route10000" | "route100000" | "or10000" => {
            let n: usize = case
                .trim_start_matches(char::is_alphabetic)
                .parse()
                .unwrap();
            let fx = if case.starts_with("or") {
                let filters = (0..n)
                    .map(|i| {
                        Filter::parse(&format!("or=(owner.eq.{i},owner.eq.{})", i + 2 * n))
                            .expect("or filter")
                    })
                    .collect();
                hub_of(&table, filters, 10, n.clamp(1, 256))
            } else {
                hub_with(&table, n, 10)
            };
            let changes = (0..1024u64)
                .map(|i| {
                    let owner = if i % 8 == 7 {
                        n as u64 + i
                    } else {
                        (i * 7919) % n as u64
                    };
                    order_change(&table, i, owner)
                })
                .collect();
            (fx, changes, 1024, 4096, 256)
        }
        "plain" | "plain_extras" | "plain_extras_hit" | "extras_hit" => {
            let fx = mixed_fixture(
                &table,
                case.starts_with("plain"),
                case.contains("extras"),
                case.ends_with("hit"),
            );
            (fx, vec![owner_update(&table)], 2, 30, 1)
        }
        "keyed" | "keyed_moves" => {
            let (fx, change) = keyed_fixture(&table, case == "keyed_moves");
            (fx, vec![change], 2, 30, 1)
        }
        other => panic!(
            "WALCAST_COUNT={other}: cases are fanout, fanout<N>, route100, route10000, route100000, \
             or10000, plain, plain_extras, plain_extras_hit, extras_hit, keyed, keyed_moves"
        ),
    };
    for k in 0..warm {
        fx.hub.route(&changes[k % changes.len()]);
        if (k + 1) % every == 0 {
            drain(&mut fx);
        }
    }
    drain(&mut fx);
    counted_start();
    let mut frames = 0;
    for k in 0..counted {
        fx.hub.route(&changes[k % changes.len()]);
        if (k + 1) % every == 0 {
            frames += drain(&mut fx);
        }
    }
    frames += drain(&mut fx);
    assert_eq!(
        fx.closed(),
        0,
        "a subscription was dropped as a slow client"
    );
    println!("{case}: {counted} routes counted, {frames} frames delivered");
}

fn main() {
    if let Ok(case) = std::env::var("WALCAST_COUNT") {
        count(&case);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
