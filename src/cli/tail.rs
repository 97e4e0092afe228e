//! `walcast tail`: print every change of the publication as one JSON object per line.
//!
//! The first thing a user runs to see walcast work, and a debugging tool. On a
//! terminal each transaction's lines are flushed as it commits. Into a pipe or a
//! file, lines are buffered and flushed whenever tail catches up with the stream
//! (nothing more waiting), or after [`FLUSH_EVERY`] transactions — so a reader
//! still sees each change promptly, and a drain writes in large blocks. A
//! transaction is confirmed to the server only once its lines were flushed, so
//! Ctrl-C or SIGTERM confirms exactly what was printed.
//!
//! A closed stdout (`walcast tail | head -n 10`) stops tail quietly with exit 0 at
//! the next line it would write. A database restart is routine: tail reconnects with
//! backoff, as `serve` does, and logs a warning.

use std::io::Write;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::decode::event::Item;
use crate::decode::value::RenderOptions;
use crate::lsn::Lsn;
use crate::source::session::{self, Progress, ReplicationError, ReplicationOptions, StreamState};

/// Items buffered between the slot and the printer.
const TAIL_CHANNEL_CAPACITY: usize = 1024;

/// Transactions printed between flushes at most, when the stream never pauses
/// (stdout not a terminal).
pub const FLUSH_EVERY: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

/// Prints `rx`'s changes to `out` as JSON lines until the channel closes. Each
/// transaction is flushed as it commits when `tty`; otherwise output is flushed
/// whenever the printer has caught up with the stream (nothing waiting in `rx`)
/// and a transaction was printed since the last flush — also when what came
/// after the commit was not a change (a non-transactional message) — or after
/// [`FLUSH_EVERY`] transactions. A commit is confirmed once its lines are flushed.
fn print_items(
    rx: &mut mpsc::Receiver<Item>,
    out: impl Write,
    tty: bool,
    render: RenderOptions,
    progress: &Progress,
) -> Result<(), std::io::Error> {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    // The end LSN of the last transaction printed but not yet flushed.
    let mut unflushed = None;
    let mut since_flush = 0;
    // Flushes, then confirms the last transaction printed.
    let flush =
        |out: &mut std::io::BufWriter<_>, unflushed: &mut Option<Lsn>, since: &mut usize| {
            out.flush()?;
            if let Some(end_lsn) = unflushed.take() {
                progress.confirm(end_lsn);
            }
            *since = 0;
            Ok::<(), std::io::Error>(())
        };
    loop {
        let item = match rx.try_recv() {
            Ok(item) => item,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Caught up: what was printed goes out before waiting for more.
                if unflushed.is_some() {
                    flush(&mut out, &mut unflushed, &mut since_flush)?;
                }
                match rx.blocking_recv() {
                    Some(item) => item,
                    None => break,
                }
            }
        };
        match item {
            Item::Change(c) => writeln!(out, "{}", c.to_tail_json(render))?,
            Item::Truncate(cs) => {
                for c in cs {
                    writeln!(out, "{}", c.to_tail_json(render))?;
                }
            }
            Item::Commit { end_lsn, .. } => {
                unflushed = Some(end_lsn);
                since_flush += 1;
                if tty || since_flush >= FLUSH_EVERY {
                    flush(&mut out, &mut unflushed, &mut since_flush)?;
                }
            }
            Item::Begin(_) | Item::Message(_) | Item::Stream(_) => {}
        }
    }
    flush(&mut out, &mut unflushed, &mut since_flush)
}

/// Streams until `shutdown` fires or an error stops the stream.
pub async fn run(
    opts: ReplicationOptions,
    render: RenderOptions,
    shutdown: CancellationToken,
) -> Result<(), TailError> {
    let (tx, mut rx) = mpsc::channel::<Item>(TAIL_CHANNEL_CAPACITY);
    let progress = Arc::new(Progress::default());
    let state = Arc::new(StreamState::default());
    let printer_progress = progress.clone();
    let printer_stop = shutdown.clone();
    let printer = tokio::task::spawn_blocking(move || -> Result<(), std::io::Error> {
        use std::io::IsTerminal;
        let stdout = std::io::stdout();
        let tty = stdout.is_terminal();
        let printed = print_items(&mut rx, stdout.lock(), tty, render, &printer_progress);
        let _ = printer_stop;
        printed
    });
    let res = session::run(opts, tx, progress, state, shutdown.clone()).await;
    let printed = printer
        .await
        .map_err(|e| TailError::Stdout(std::io::Error::other(e)))?;
    match (res, printed) {
        // The reader went away (`walcast tail | head`): a normal way to stop.
        (_, Err(pe)) if pe.kind() == std::io::ErrorKind::BrokenPipe => {
            tracing::debug!("stdout closed; stopping");
            Ok(())
        }
        (Err(ReplicationError::Io(e)), Err(pe)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Err(TailError::Stdout(pe))
        }
        (Err(e), _) => Err(e.into()),
        (Ok(()), Err(pe)) => Err(TailError::Stdout(pe)),
        (Ok(()), Ok(())) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::decode::event::{Cell, Change, ChangeKind, DbMessage, TxnInfo};
    use crate::decode::pgoutput::{PgTimestamp, RelId, ReplicaIdentity, Xid};
    use crate::decode::relation::{Column, Table};
    use crate::decode::value::{PgType, TypeKind};

    /// A pipe's write end: what was written, shared with the test.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_pipe_gets_the_last_transaction_when_a_message_follows_its_commit() {
        let txn = TxnInfo {
            commit_lsn: Lsn(90),
            commit_time: PgTimestamp(0),
            xid: Xid(7),
        };
        let table = Arc::new(Table {
            id: RelId(1),
            schema: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            json: Default::default(),
            columns: vec![Column {
                name: "id".into(),
                ty: Arc::new(PgType::new(23, "int4", TypeKind::Int)),
                key: true,
            }],
        });
        let change = Change {
            txn,
            table,
            kind: ChangeKind::Insert,
            new: Some(vec![Cell::Text(bytes::Bytes::from_static(b"1"))]),
            old: None,
        };
        let (tx, mut rx) = mpsc::channel(8);
        // Queued together, as when the stream's last commit and a non-transactional
        // message arrive in one read: the printer sees the commit with more waiting.
        for item in [
            Item::Begin(txn),
            Item::Change(Arc::new(change)),
            Item::Commit {
                info: txn,
                end_lsn: Lsn(100),
            },
            Item::Message(Arc::new(DbMessage {
                txn: None,
                lsn: Lsn(110),
                prefix: "p".into(),
                content: bytes::Bytes::from_static(b"c"),
            })),
        ] {
            tx.try_send(item).unwrap();
        }
        let sink = Sink::default();
        let progress = Arc::new(Progress::default());
        let printer = {
            let (sink, progress) = (sink.clone(), progress.clone());
            std::thread::spawn(move || {
                print_items(&mut rx, sink, false, RenderOptions::default(), &progress)
            })
        };
        // The stream stays open (no more items): the line must still go out.
        let deadline = Instant::now() + Duration::from_secs(10);
        while progress.confirmed() < Lsn(100) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let written = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            progress.confirmed(),
            Lsn(100),
            "the commit was not confirmed"
        );
        assert_eq!(written.lines().count(), 1, "{written}");
        assert!(written.contains(r#""record":{"id":1}"#), "{written}");
        drop(tx);
        printer.join().unwrap().unwrap();
    }
}
