//! brisk's API: HTTP/1.1 with JSON bodies on a Unix socket, paths as
//! cloud-hypervisor's (`/api/v1/vm.info`, `/api/v1/vm.pause`, ...), described
//! by `openapi.yaml` at the repository root.
//!
//! [`routes`] is the whole API as a pure function of (method, path, body)
//! over a running VM; [`ApiServer`] serves it on a socket from its own
//! thread (which never blocks a vCPU thread: pause and resume go through
//! the control plane, which only ever waits on the API's side);
//! [`client`] is what `brisk ctl` speaks.

pub mod client;
mod prometheus;
pub mod routes;
mod server;

pub use routes::{Api, Reply};
pub use server::{ApiServer, SocketError};

/// Largest request body accepted; larger ones get 413.
pub const MAX_BODY: usize = 64 * 1024;
