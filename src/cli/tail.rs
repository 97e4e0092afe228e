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
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
        // The end LSN of the last transaction printed but not yet flushed.
        let mut unflushed = None;
        let mut since_flush = 0;
        while let Some(item) = rx.blocking_recv() {
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
                    if tty || rx.is_empty() || since_flush >= FLUSH_EVERY {
                        out.flush()?;
                        printer_progress.confirm(end_lsn);
                        (unflushed, since_flush) = (None, 0);
                    }
                }
                Item::Begin(_) | Item::Message(_) | Item::Stream(_) => {}
            }
        }
        out.flush()?;
        if let Some(end_lsn) = unflushed {
            printer_progress.confirm(end_lsn);
        }
        let _ = printer_stop;
        Ok(())
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
