//! Serving the API on a Unix socket from one thread.

use std::fmt;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use brisk_vmm::Vm;

use crate::{Api, Reply, MAX_BODY};

/// The socket could not be set up.
#[derive(Debug)]
pub enum SocketError {
    /// Another process is serving on this path.
    InUse(PathBuf),
    Io(PathBuf, std::io::Error),
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketError::InUse(p) => write!(
                f,
                "{} is in use by a running server; choose another --api-socket",
                p.display()
            ),
            SocketError::Io(p, e) => write!(f, "API socket {}: {e}", p.display()),
        }
    }
}

impl std::error::Error for SocketError {}

/// The API server. Dropping it stops its thread and removes the socket.
pub struct ApiServer {
    server: Option<Arc<tiny_http::Server>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    /// Serve `vm` on a new socket at `path` (mode 0600). A stale socket
    /// file (nobody listening) is replaced; a live one is refused.
    pub fn start(path: &Path, vm: Arc<Vm>) -> Result<ApiServer, SocketError> {
        let io = |e| SocketError::Io(path.to_path_buf(), e);
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        // SAFETY: umask only swaps the process's file-creation mask; it is
        // restored right after the bind so the socket is born 0600.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener.map_err(io)?;
        let server = tiny_http::Server::from_listener(listener, None).map_err(|e| {
            SocketError::Io(path.to_path_buf(), std::io::Error::other(e.to_string()))
        })?;
        let server = Arc::new(server);
        let api = Api::new(vm);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // recv fails once `unblock` is called: the server is closing.
                while let Ok(request) = s.recv() {
                    serve(&api, request);
                }
            })
            .map_err(io)?;
        Ok(ApiServer {
            server: Some(server),
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.unblock();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            // tiny_http's own drop connects to the path to wake its accept
            // thread, so the file goes only after the server.
            drop(server);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(api: &Api, mut request: tiny_http::Request) {
    let method = request.method().as_str().to_string();
    let url = request.url().to_string();
    let accept = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Accept"))
        .map(|h| h.value.as_str().to_string());
    let reply = if request.body_length().is_some_and(|n| n > MAX_BODY) {
        Reply::error(413, format!("body larger than {MAX_BODY} bytes"))
    } else {
        let mut body = Vec::new();
        match request
            .as_reader()
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut body)
        {
            Err(e) => Reply::error(400, format!("could not read the body: {e}")),
            Ok(_) if body.len() > MAX_BODY => {
                Reply::error(413, format!("body larger than {MAX_BODY} bytes"))
            }
            Ok(_) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                api.handle(&method, &url, &body, accept.as_deref())
            }))
            .unwrap_or_else(|_| Reply::error(500, "internal error handling the request")),
        }
    };
    log::debug!("API {method} {url} -> {}", reply.status);
    let content_type = tiny_http::Header::from_bytes("Content-Type", reply.content_type)
        .expect("static header is valid");
    let response = tiny_http::Response::from_string(reply.body)
        .with_status_code(reply.status)
        .with_header(content_type);
    // The client may have gone; nothing to do about it.
    let _ = request.respond(response);
}
