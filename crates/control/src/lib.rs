//! brisk's vCPU control plane.
//!
//! Each vCPU has a [`VcpuCtl`]: a published [`Mode`], a word of request bits
//! and a slow path (park, halt, work queue) behind a mutex that the exit path
//! never touches. The vCPU thread runs [`VcpuCtl::run`], which enters the
//! guest through the [`Guest`] trait; controllers call [`VcpuCtl::kick`],
//! [`VcpuCtl::stop`], [`VcpuCtl::resume`], [`VcpuCtl::run_on`],
//! [`pause_all`] and [`resume_all`] from any thread.
//!
//! The ordering is the Dekker pattern of the kernel's vcpu-requests document:
//! the vCPU stores `mode = InGuest` then loads `requests`; a requester stores
//! `requests` then CASes `mode` InGuest -> Exiting. One of the two sees the
//! other, so a kick is never lost, and only the kicker whose CAS succeeds
//! sends a signal. Nothing here knows about KVM: a [`Guest`] is anything that
//! can be entered and interrupted, so the protocol is testable with a stand-in.
//!
//! ```
//! use brisk_control::{Deadline, Guest, Interrupt, Flow, VcpuCtl, ExitKind, Classify};
//! use std::{sync::Arc, time::Duration};
//!
//! /// A guest that exits with a "PIO" exit every time it is entered.
//! struct Ticker(u64);
//! struct Tick;
//! impl Classify for Tick { fn kind(&self) -> ExitKind { ExitKind::Io } }
//! struct NoSignal;
//! impl Interrupt for NoSignal { fn interrupt(&self) {} }
//! impl Guest for Ticker {
//!     type Exit = Tick;
//!     type Error = std::convert::Infallible;
//!     fn bind_thread(&mut self) -> Box<dyn Interrupt> { Box::new(NoSignal) }
//!     fn set_immediate_exit(&mut self, _on: bool) {}
//!     fn enter(&mut self) -> Result<Option<Tick>, Self::Error> { self.0 += 1; Ok(Some(Tick)) }
//!     fn settle(&mut self) -> Result<Option<Tick>, Self::Error> { Ok(None) }
//!     fn interrupt_deliverable(&self) -> bool { false }
//!     fn parking(&mut self) {}
//! }
//!
//! let ctl = Arc::new(VcpuCtl::<Ticker>::new(0));
//! let vcpu = ctl.clone();
//! let thread = std::thread::spawn(move || vcpu.run(Ticker(0), |_, _| Ok(Flow::Continue)));
//! let deadline = Deadline::after(Duration::from_secs(5));
//! ctl.stop(deadline).unwrap();
//! // Runs on the (parked) vCPU thread; a parked guest makes no progress.
//! let frozen = ctl.run_on(|t: &mut Ticker| t.0, deadline).unwrap();
//! assert_eq!(frozen, ctl.run_on(|t: &mut Ticker| t.0, deadline).unwrap());
//! ctl.resume();
//! ctl.request_exit();
//! thread.join().unwrap().unwrap();
//! ```

mod counters;
mod deadline;
mod error;
mod exclusive;
mod group;
mod guest;
mod idle;
mod idle_queue;
mod mode;
mod oneshot;
mod pool;
mod requests;
mod run;
mod state;
mod sync;
mod vcpu;
mod work;

pub use counters::{CounterSnapshot, Counters, ExitKind};
pub use deadline::Deadline;
pub use error::{Error, Op, RunError};
pub use exclusive::ExclusiveGroup;
pub use group::{pause_all, resume_all};
pub use guest::{Classify, Flow, Guest, Interrupt};
pub use idle::IdleGroup;
pub use mode::Mode;
pub use pool::{EndHandler, ExitHandler, Pool, PoolConfig, PoolVcpu, ThreadStart};
pub use requests::Request;
pub use run::RunEnd;
pub use state::VcpuState;
pub use vcpu::VcpuCtl;
pub use work::RunOnTicket;
