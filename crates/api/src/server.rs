//! Serving the API on a Unix socket: hyper 1.x (HTTP/1.1) on a tokio
//! current-thread runtime inside brisk's one API thread.
//!
//! Why hyper: it is the most widely used and best kept HTTP implementation
//! in Rust, it never allocates for a length a client merely claims, and it
//! has the limits a VMM's attack surface needs (header bytes and count, a
//! header read timeout); its connections are tasks, so a stalled client
//! costs a task and a slot, never the thread. axum adds routing this API
//! does not need (seven fixed paths, already a pure function in
//! `routes.rs`), so it is not used.
//!
//! Limits: request head <= 16 KiB and <= 64 headers; body <= 64 KiB,
//! enforced while reading (a Content-Length over 1 MiB is refused before
//! a byte is read; a smaller too-large body is read and dropped, so the
//! client gets its 413); every read and write of a connection fails after
//! waiting 10 s (a stalled or idle client is disconnected); at most 128
//! connections at once (when all are taken, the one idle longest is
//! closed to make room: `evict.rs`; only if every one is handling a
//! request is the newcomer answered 503 and closed); accept errors
//! (EMFILE...) back off and retry, never end the accept loop. Shutdown
//! stops accepting, lets requests in flight finish and reply (bounded),
//! then closes what is left.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use brisk_vmm::seccomp::ThreadKind;
use brisk_vmm::Vm;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixStream;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::deadline_io::DeadlineIo;
use crate::evict::Connections;
use crate::socket::{SocketError, SocketFile};
use crate::{Api, Reply, MAX_BODY};

/// Largest request line plus headers.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 64;
/// How long one read or write of a connection may wait (also the idle
/// keep-alive bound and the time a client has to send its headers).
pub const IO_BOUND: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 128;
/// How long shutdown waits for requests in flight to be answered.
const GRACE: Duration = Duration::from_millis(500);
/// A too-large body up to this size is read and dropped before the 413
/// (so the client reads its answer, not a reset); a larger claim is
/// refused unread and the connection closed.
const DRAIN_LIMIT: usize = 1 << 20;
/// How long a newcomer waits for the slot of the idle connection it had
/// closed.
const EVICT_WAIT: Duration = Duration::from_secs(1);
/// After an accept error (EMFILE: out of fds), wait before the next try.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The API server. Dropping it stops its thread (bounded) and removes the
/// socket.
pub struct ApiServer {
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    socket: SocketFile,
}

impl ApiServer {
    /// Serve `vm` on a new socket at `path` (mode 0600). A stale socket of
    /// a brisk that is gone is replaced; a live one, or anything that is not
    /// a socket, is refused.
    pub fn start(path: &Path, vm: Arc<Vm>) -> Result<ApiServer, SocketError> {
        let policy = vm.seccomp();
        Self::start_with(path, crate::VmSlot::with(vm), policy)
    }

    /// Serve whatever VM `slot` holds (none yet: `--wait-for-vm`), the
    /// API thread filtered by `policy`.
    pub fn start_with(
        path: &Path,
        slot: Arc<crate::VmSlot>,
        policy: brisk_vmm::seccomp::Seccomp,
    ) -> Result<ApiServer, SocketError> {
        Self::serve(path, Api::with_slot(slot), policy)
    }

    /// Serve `api` (brisk's and Firecracker's paths: `brisk firecracker`).
    pub fn serve(
        path: &Path,
        api: Api,
        policy: brisk_vmm::seccomp::Seccomp,
    ) -> Result<ApiServer, SocketError> {
        let io = |err| SocketError::Io {
            path: path.to_path_buf(),
            err,
        };
        let (socket, listener) = SocketFile::claim(path)?;
        listener.set_nonblocking(true).map_err(io)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(io)?;
        let (shutdown, stop) = watch::channel(false);
        let api = Arc::new(api);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Err(e) = brisk_vmm::seccomp::install(ThreadKind::Api, policy) {
                    log::error!("API thread: cannot install its seccomp filter: {e}; not serving");
                    return;
                }
                runtime.block_on(async move {
                    match tokio::net::UnixListener::from_std(listener) {
                        Ok(l) => serve(l, api, stop).await,
                        Err(e) => log::error!("API socket: {e}"),
                    }
                })
            })
            .map_err(io)?;
        Ok(ApiServer {
            shutdown,
            thread: Some(thread),
            socket,
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        self.socket.path()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            // Bounded: the loop ends GRACE after the signal, or once the
            // requests still being handled (a snapshot's write; a
            // migration is cancelled before the API stops) are answered.
            let _ = t.join();
        }
        // `socket` (a field) then removes the file, if it is still ours.
    }
}

async fn serve(listener: tokio::net::UnixListener, api: Arc<Api>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = Arc::new(Connections::default());
    let mut tasks = JoinSet::new();
    let mut logged_accept_error = false;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let slot = slots.clone().try_acquire_owned().ok();
                    // All taken: close the connection idle longest, and
                    // take its slot once it has gone.
                    let evicted = slot.is_none() && connections.evict_idlest();
                    let (api, stop, slots, conns) =
                        (api.clone(), stop.clone(), slots.clone(), connections.clone());
                    tasks.spawn(async move {
                        let slot = match (slot, evicted) {
                            (Some(s), _) => Some(s),
                            (None, true) => tokio::time::timeout(EVICT_WAIT, slots.acquire_owned())
                                .await
                                .ok()
                                .and_then(Result::ok),
                            (None, false) => None,
                        };
                        match slot {
                            Some(slot) => {
                                connection(stream, api, stop, conns).await;
                                drop(slot);
                            }
                            None => busy(stream).await,
                        }
                    });
                }
                Err(e) => {
                    // Out of fds (EMFILE/ENFILE) or a connection reset
                    // before we took it: back off, keep accepting.
                    if !logged_accept_error {
                        log::warn!("API: accepting a connection failed: {e} (retrying)");
                        logged_accept_error = true;
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    // Connections saw `stop` too: they finish the request in flight, reply
    // with `Connection: close`, and end. One whose request is still being
    // handled (a snapshot being written, its client waiting for the 200)
    // is waited for: the thread's runtime would wait for that work anyway
    // (tokio's blocking pool), and now its client gets the reply. What is
    // left idle after GRACE is closed.
    loop {
        let all = tokio::time::timeout(GRACE, async { while tasks.join_next().await.is_some() {} });
        if all.await.is_ok() || !connections.any_busy() {
            break;
        }
    }
    tasks.abort_all();
}

/// One connection, until the client closes, a limit ends it, or shutdown.
async fn connection(
    stream: UnixStream,
    api: Arc<Api>,
    mut stop: watch::Receiver<bool>,
    connections: Arc<Connections>,
) {
    let (id, tracked) = connections.add();
    let busy = tracked.busy.clone();
    let io = TokioIo::new(DeadlineIo::new(
        stream,
        IO_BOUND,
        tracked.clone(),
        connections.clone(),
    ));
    let service = hyper::service::service_fn(move |req| {
        let (api, busy) = (api.clone(), busy.clone());
        async move { Ok::<_, Infallible>(respond(api, req, &busy).await) }
    });
    let conn = http1().serve_connection(io, service);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    log::debug!("API connection: {e}");
                }
                break;
            }
            _ = stop.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
                break;
            }
            // Closed to make room for a new client (it was idle longest),
            // unless a request came meanwhile: its client waits for the
            // reply.
            _ = tracked.evict.notified() => {
                if tracked.busy.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    break;
                }
            }
        }
    }
    connections.remove(id);
}

/// The HTTP/1 settings every connection is served with: the head limits
/// and the header read timeout (also what the fuzz target drives).
pub fn http1() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(IO_BOUND)
        // A client that shuts down its writing side after the request
        // (`nc -N`, SHUT_WR) still gets its reply.
        .half_close(true)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS);
    b
}

/// Over the connection cap: a 503, written without waiting on the client.
async fn busy(stream: UnixStream) {
    let body = format!(
        "{{\"error\":\"brisk is serving {MAX_CONNECTIONS} API connections already; retry later\"}}"
    );
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A full socket buffer means the client will not read it: just close.
    let _ = stream.try_write(reply.as_bytes());
}

/// Read and drop up to `limit` bytes of `body`; whether it ended within.
async fn drain(body: &mut Incoming, limit: usize) -> bool {
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return false;
        };
        if let Some(data) = frame.data_ref() {
            seen += data.len();
            if seen > limit {
                return false;
            }
        }
    }
    true
}

async fn respond(
    api: Arc<Api>,
    req: Request<Incoming>,
    busy: &std::sync::atomic::AtomicUsize,
) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let claimed = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let too_big = || Reply::error(413, format!("body larger than {MAX_BODY} bytes"));
    let reply = if claimed.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        // Refused before reading: nothing is allocated for the claim, and
        // the connection closes (its body is never drained).
        too_big().closing()
    } else {
        let mut body = req.into_body();
        // One bound for the whole body too: a client dripping a byte per
        // read keeps no slot for longer than IO_BOUND.
        let collected =
            tokio::time::timeout(IO_BOUND, Limited::new(&mut body, MAX_BODY).collect()).await;
        match collected.unwrap_or_else(|_| Err("the body did not arrive within 10 s".into())) {
            Ok(bytes) => {
                let bytes = bytes.to_bytes();
                let (m, p) = (method.clone(), path.clone());
                let slow = api.is_slow(&path);
                let handle = move || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        api.handle(&m, &p, &bytes, accept.as_deref())
                    }))
                    .unwrap_or_else(|_| Reply::error(500, "internal error handling the request"))
                };
                if slow {
                    // On tokio's blocking pool (threads the API thread
                    // spawns, under its seccomp filter): the event loop
                    // keeps answering meanwhile, and the connection's read
                    // deadline waits for the answer.
                    use std::sync::atomic::Ordering::SeqCst;
                    busy.fetch_add(1, SeqCst);
                    let reply = tokio::task::spawn_blocking(handle)
                        .await
                        .unwrap_or_else(|_| Reply::error(500, "the request's worker failed"));
                    busy.fetch_sub(1, SeqCst);
                    reply
                } else {
                    handle()
                }
            }
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                // Read (and drop) the rest, up to a bound, so the client
                // gets its 413 instead of a reset for unread data.
                let drained = tokio::time::timeout(IO_BOUND, drain(&mut body, DRAIN_LIMIT));
                if drained.await.unwrap_or(false) {
                    too_big()
                } else {
                    too_big().closing()
                }
            }
            Err(e) => Reply::error(400, format!("could not read the body: {e}")).closing(),
        }
    };
    log::debug!(
        "API {method} {} -> {}",
        crate::routes::shorten(&path),
        reply.status
    );
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    if reply.close {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
