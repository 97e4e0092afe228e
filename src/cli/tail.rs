//! `walcast tail`: print every change of the publication as one JSON object per line.
//!
//! The first thing a user runs to see walcast work, and a debugging tool. Lines are
//! written to stdout as they arrive (stdout is line-buffered, so each line is
//! flushed); a transaction is confirmed to the server once all its lines were
//! written, so Ctrl-C or SIGTERM confirms exactly what was printed.
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
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        while let Some(item) = rx.blocking_recv() {
            match item {
                Item::Change(c) => writeln!(out, "{}", c.to_tail_json(render))?,
                Item::Truncate(cs) => {
                    for c in cs {
                        writeln!(out, "{}", c.to_tail_json(render))?;
                    }
                }
                Item::Commit { end_lsn, .. } => {
                    out.flush()?;
                    printer_progress.confirm(end_lsn);
                }
                Item::Begin(_) | Item::Message(_) | Item::Stream(_) => {}
            }
        }
        out.flush()?;
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
