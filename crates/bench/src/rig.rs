//! A VM set up as brisk sets one up, with its vCPUs handed to the benchmark
//! instead of to brisk's threads, plus the loops the benchmark compares.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use brisk_control::{Guest, Interrupt};
use brisk_devices::DeviceManager;
use brisk_kvm::{Exit, Irqchip, KvmVcpu};
use brisk_vmm::{Machine, Output, VmConfig};

/// A VM built exactly as brisk builds one ([`Machine::build`]), with its
/// vCPUs handed to the benchmark instead of to brisk's threads.
pub struct Rig {
    /// Owns the VM and its memory; must outlive the vCPUs.
    pub _machine: Machine,
    pub bus: Arc<DeviceManager>,
    pub vcpus: Vec<KvmVcpu>,
}

impl Rig {
    pub fn new(guest: &str, cpus: usize, irqchip: Irqchip) -> Rig {
        let config = VmConfig {
            payload: brisk_vmm::Payload::builtin(guest),
            cpus,
            irqchip,
            ..VmConfig::default()
        };
        let mut machine = Machine::build(&config, Output::Null).expect("benchmark VM");
        let vcpus = std::mem::take(&mut machine.vcpus);
        Rig {
            bus: machine.devices.clone(),
            _machine: machine,
            vcpus,
        }
    }
}

/// Records when each KVM_RUN returns: the interval between returns (one
/// exit round trip, for the exit benchmark) and, when armed, the instant an
/// interrupted entry came back (for kick latency).
pub struct Timed {
    pub inner: KvmVcpu,
    epoch: Instant,
    last: Instant,
    intervals: Vec<u64>,
    want: usize,
    done: Option<Sender<Vec<u64>>>,
    /// Interrupted returns are reported here (ns since `epoch`).
    kicked: Option<Sender<u64>>,
    /// Report when the loop is back at its entry point (clearing
    /// immediate_exit) instead of at interrupted returns.
    at_entry: bool,
}

impl Timed {
    /// Collect `want` exit-to-exit intervals, then send them on `done`.
    pub fn intervals(inner: KvmVcpu, want: usize, done: Sender<Vec<u64>>) -> Timed {
        let now = Instant::now();
        Timed {
            inner,
            epoch: now,
            last: now,
            intervals: Vec::with_capacity(want),
            want,
            done: Some(done),
            kicked: None,
            at_entry: false,
        }
    }

    /// Report every interrupted return on `kicked`, in ns since `epoch`.
    pub fn kicks(inner: KvmVcpu, epoch: Instant, kicked: Sender<u64>) -> Timed {
        Timed {
            inner,
            epoch,
            last: epoch,
            intervals: Vec::new(),
            want: 0,
            done: None,
            kicked: Some(kicked),
            at_entry: false,
        }
    }

    /// Report every time the run loop is back at its entry point: the
    /// moment a woken vCPU thread is ready to enter the guest again, the
    /// same point whether it was halted in user space or in KVM.
    pub fn entries(inner: KvmVcpu, epoch: Instant, reached: Sender<u64>) -> Timed {
        Timed {
            at_entry: true,
            ..Timed::kicks(inner, epoch, reached)
        }
    }

    /// Record one KVM_RUN return.
    pub fn returned(&mut self, interrupted: bool) {
        let now = Instant::now();
        if self.intervals.len() < self.want {
            self.intervals.push((now - self.last).as_nanos() as u64);
            if self.intervals.len() == self.want {
                if let Some(done) = self.done.take() {
                    let _ = done.send(std::mem::take(&mut self.intervals));
                }
            }
        }
        self.last = now;
        if interrupted && !self.at_entry {
            if let Some(k) = &self.kicked {
                let _ = k.send((now - self.epoch).as_nanos() as u64);
            }
        }
    }
}

impl Guest for Timed {
    type Exit = Exit;
    type Error = brisk_kvm::Error;

    fn bind_thread(&mut self) -> Box<dyn Interrupt> {
        self.inner.bind_thread()
    }

    fn unbind_thread(&mut self) {
        self.inner.unbind_thread()
    }

    fn set_immediate_exit(&mut self, on: bool) {
        if self.at_entry && !on {
            if let Some(k) = &self.kicked {
                let _ = k.send((Instant::now() - self.epoch).as_nanos() as u64);
            }
        }
        self.inner.set_immediate_exit(on)
    }

    fn enter(&mut self) -> Result<Option<Exit>, Self::Error> {
        let r = self.inner.enter();
        self.returned(matches!(r, Ok(None)));
        r
    }

    fn settle(&mut self) -> Result<Option<Exit>, Self::Error> {
        self.inner.settle()
    }

    fn interrupt_deliverable(&self) -> bool {
        self.inner.interrupt_deliverable()
    }

    fn parking(&mut self) {
        self.inner.parking()
    }
}

/// Answer the exits of the benchmark guests (`pio`, `spin`, `halt`) with
/// brisk's own dispatcher: the same `Flow` brisk's vCPU threads act on
/// (HLT -> `Flow::Halt`: block in user space).
pub fn answer(v: &mut KvmVcpu, exit: Exit, devices: &DeviceManager) -> brisk_control::Flow {
    let fatal = |e| panic!("benchmark guest failed: {e}");
    // A crash panics here; the report needs no instruction bytes.
    brisk_vmm::exits::handle(v, exit, devices.bus(), None, None, &fatal)
}

/// A stop flag polled by the hand-written loops.
#[derive(Default)]
pub struct Flag(AtomicBool);

impl Flag {
    pub fn set(&self) {
        self.0.store(true, SeqCst)
    }
    pub fn take(&self) -> bool {
        self.0.swap(false, SeqCst)
    }
    pub fn get(&self) -> bool {
        self.0.load(SeqCst)
    }
}
