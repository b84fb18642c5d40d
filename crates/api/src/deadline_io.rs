//! A stream whose reads and writes each fail once they have waited longer
//! than a bound: a client that stalls mid-request or never reads its reply
//! loses its connection instead of holding a task (and a connection slot)
//! for ever. An idle keep-alive connection is a read that waits, so it is
//! closed after the same bound.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep, Sleep};

pub(crate) struct DeadlineIo<S> {
    inner: S,
    bound: Duration,
    /// Started when a read (or write) first returns Pending, cleared when
    /// it makes progress.
    read_timer: Option<Pin<Box<Sleep>>>,
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl<S> DeadlineIo<S> {
    pub(crate) fn new(inner: S, bound: Duration) -> Self {
        DeadlineIo {
            inner,
            bound,
            read_timer: None,
            write_timer: None,
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

impl<S: AsyncRead + Unpin> AsyncRead for DeadlineIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {
                if expired(&mut this.read_timer, this.bound, cx) {
                    return Poll::Ready(Err(timed_out("read")));
                }
                Poll::Pending
            }
            ready => {
                this.read_timer = None;
                ready
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DeadlineIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => {
                if expired(&mut this.write_timer, this.bound, cx) {
                    return Poll::Ready(Err(timed_out("write")));
                }
                Poll::Pending
            }
            ready => {
                this.write_timer = None;
                ready
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => {
                if expired(&mut this.write_timer, this.bound, cx) {
                    return Poll::Ready(Err(timed_out("write")));
                }
                Poll::Pending
            }
            ready => {
                this.write_timer = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
