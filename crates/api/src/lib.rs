//! brisk's API: HTTP/1.1 with JSON bodies on a Unix socket, paths as
//! cloud-hypervisor's (`/api/v1/vm.info`, `/api/v1/vm.pause`, ...), described
//! by `openapi.yaml` at the repository root.
//!
//! [`routes`] is the whole API as a pure function of (method, path, body)
//! over a running VM; [`ApiServer`] serves it on a socket from its own
//! thread (hyper on a current-thread tokio runtime, with limits on every
//! size and wait; it never blocks a vCPU thread: pause and resume go
//! through the control plane, which only ever waits on the API's side);
//! [`client`] is what `brisk ctl` speaks. [`firecracker`] serves
//! Firecracker's API on the same socket.

pub mod client;
mod deadline_io;
mod evict;
pub mod firecracker;
pub mod model;
mod prometheus;
pub mod routes;
mod server;
pub mod slot;
mod socket;

pub use model::Endpoint;
pub use routes::{Api, Reply};
pub use server::{http1, ApiServer, IO_BOUND, MAX_CONNECTIONS, MAX_HEAD, MAX_HEADERS};
pub use slot::{Bring, BringError, BringRequest, VmSlot};
pub use socket::SocketError;

/// Largest request body accepted; larger ones get 413.
pub const MAX_BODY: usize = 64 * 1024;
