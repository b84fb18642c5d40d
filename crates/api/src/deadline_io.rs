//! A stream whose reads and writes each fail once they have waited longer
//! than a bound: a client that stalls mid-request or never reads its reply
//! loses its connection instead of holding a task (and a connection slot)
//! for ever. An idle keep-alive connection is a read that waits, so it is
//! closed after the same bound. While the connection's request is being
//! handled (a snapshot, a migration: minutes), the read that hyper keeps
//! pending to notice a client going away does not time out: the client
//! is waiting for its reply, not stalling.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep, Sleep};

use crate::evict::{Connections, Tracked};

pub(crate) struct DeadlineIo<S> {
    inner: S,
    bound: Duration,
    /// Started when a read (or write) first returns Pending, cleared when
    /// it makes progress.
    read_timer: Option<Pin<Box<Sleep>>>,
    write_timer: Option<Pin<Box<Sleep>>>,
    /// The connection as the accept loop tracks it: its requests being
    /// handled now, and when it last read.
    tracked: Arc<Tracked>,
    connections: Arc<Connections>,
}

impl<S> DeadlineIo<S> {
    /// `tracked.busy` counts the connection's requests in their handlers.
    pub(crate) fn new(
        inner: S,
        bound: Duration,
        tracked: Arc<Tracked>,
        connections: Arc<Connections>,
    ) -> Self {
        DeadlineIo {
            inner,
            bound,
            read_timer: None,
            write_timer: None,
            tracked,
            connections,
        }
    }
}

/// Poll `timer` (starting it if needed) after the I/O said Pending.
fn expired(timer: &mut Option<Pin<Box<Sleep>>>, bound: Duration, cx: &mut Context<'_>) -> bool {
    let t = timer.get_or_insert_with(|| Box::pin(sleep(bound)));
    t.as_mut().poll(cx).is_ready()
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("client {what} stalled"))
}

/// `r` from an I/O poll, failing it once `timer` (started at the first
/// Pending) has run out; progress clears the timer.
fn timed<T>(
    r: Poll<io::Result<T>>,
    timer: &mut Option<Pin<Box<Sleep>>>,
    bound: Duration,
    cx: &mut Context<'_>,
    what: &str,
) -> Poll<io::Result<T>> {
    match r {
        Poll::Pending if expired(timer, bound, cx) => Poll::Ready(Err(timed_out(what))),
        Poll::Pending => Poll::Pending,
        ready => {
            *timer = None;
            ready
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DeadlineIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = this.connections.tick();
            this.tracked.last_read.store(now, Ordering::SeqCst);
        }
        if r.is_pending() && this.tracked.busy.load(Ordering::SeqCst) > 0 {
            // Waiting for our own reply, not for the client: no deadline
            // (the handler wakes the connection when it answers).
            this.read_timer = None;
            return Poll::Pending;
        }
        timed(r, &mut this.read_timer, this.bound, cx, "read")
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DeadlineIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        timed(r, &mut this.write_timer, this.bound, cx, "write")
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        timed(r, &mut this.write_timer, this.bound, cx, "write")
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
