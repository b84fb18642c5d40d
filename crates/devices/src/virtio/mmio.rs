//! The virtio-mmio transport (virtio 1.2, section 4.2.2): a 0x200-byte
//! register window per device, one or more virtqueues. The driver
//! notifies by writing a queue's index to QueueNotify. With
//! [`Notify::Engine`] that write is an ioeventfd KVM completes by itself,
//! and the VM's I/O engine serves the queue on its own thread
//! ([`crate::IoEngine`]); with [`Notify::Inline`] the vCPU thread that
//! took the exit serves it before it returns to the guest (the old way,
//! kept as the benchmarks' baseline). Either way the device pulls its
//! interrupt line (an irqfd with KVM's irqchip, so no second exit) when a
//! queue has new used buffers and the driver did not suppress interrupts.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::DeviceMmio;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::io_engine::{Budget, IoWork, Served, Source, Trigger};
use crate::IrqLine;

/// The register window's size (Linux: `virtio_mmio.device=512@BASE:IRQ`).
pub const MMIO_SIZE: u64 = 0x200;
/// The QueueNotify register's offset in the window.
pub const QUEUE_NOTIFY: u64 = 0x50;
/// The most descriptors a queue offers.
pub const QUEUE_MAX: u16 = 256;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4b53_5242; // "BRSK"
/// VIRTIO_F_VERSION_1: the modern interface (required for version 2).
pub const F_VERSION_1: u64 = 1 << 32;

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const FAILED: u32 = 0x80;
/// InterruptStatus bit 0: used buffers.
const INT_VRING: u32 = 1;
/// InterruptStatus bit 1: the configuration changed.
const INT_CONFIG: u32 = 2;
/// The engine token of a device's backend (queues are 0, 1, ...).
const BACKEND: u32 = u32::MAX;

/// Guest RAM as the devices see it (writes are marked dirty for a live
/// migration).
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// What a virtio device behind the transport provides.
pub trait VirtioDevice: Send {
    /// The virtio device type (1: network, 2: block).
    fn device_type(&self) -> u32;
    /// The feature bits offered (with [`F_VERSION_1`]).
    fn features(&self) -> u64;
    /// How many virtqueues it has.
    fn queue_count(&self) -> usize {
        1
    }
    /// Read the device-specific configuration at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK having accepted `features` (also called
    /// after a restore of a driven device).
    fn activate(&mut self, _features: u64) {}
    /// The transport was restored from a snapshot (the device's own
    /// state, if any, is gone: a vsock tells its driver so).
    fn restored(&mut self) {}
    /// The driver reset the device (status 0): what it holds for the old
    /// driver goes.
    fn reset(&mut self) {}
    /// Serve queue `index`: pop available chains, complete them, add them
    /// to the used ring, while `budget` (and the device's rate limiter)
    /// lasts, and say what is left.
    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestRam,
        budget: &mut Budget,
    ) -> Served;
    /// An fd whose readiness brings work (a TAP's received frames),
    /// watched edge-triggered by the I/O engine.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The backend fd became ready: as [`VirtioDevice::process`].
    fn backend_ready(
        &mut self,
        _queues: &mut [Queue],
        _mem: &GuestRam,
        _budget: &mut Budget,
    ) -> Served {
        Served::Done
    }
}

/// Who serves a queue when the driver notifies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notify {
    /// The VM's I/O engine, woken by an ioeventfd (no vCPU exit).
    #[default]
    Engine,
    /// The notifying vCPU, inline in its exit (to the queue's end).
    Inline,
}

struct Transport<D> {
    device: D,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
}

/// One virtio device on the MMIO bus.
pub struct VirtioMmio<D> {
    t: Mutex<Transport<D>>,
    mem: GuestRam,
    irq: Arc<dyn IrqLine>,
    /// One per queue with [`Notify::Engine`]; none inline.
    notifiers: Vec<EventFd>,
}

fn new_queue() -> Queue {
    Queue::new(QUEUE_MAX).expect("QUEUE_MAX is a power of two")
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// `device`, reading and writing guest memory `mem`, pulling `irq`,
    /// its queues served as `notify` says.
    pub fn new(
        device: D,
        mem: GuestRam,
        irq: Arc<dyn IrqLine>,
        notify: Notify,
    ) -> std::io::Result<Self> {
        let count = device.queue_count();
        let notifiers = match notify {
            Notify::Inline => Vec::new(),
            Notify::Engine => (0..count)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<std::io::Result<_>>()?,
        };
        Ok(VirtioMmio {
            t: Mutex::new(Transport {
                device,
                queues: (0..count).map(|_| new_queue()).collect(),
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                interrupt_status: 0,
                config_generation: 0,
            }),
            mem,
            irq,
            notifiers,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Transport<D>> {
        self.t.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change the device behind the transport (between two requests: the
    /// I/O engine serves under the same lock).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut self.lock().device)
    }

    /// Tell the driver its configuration space changed (a disk's new
    /// capacity): ConfigGeneration moves, the configuration-change
    /// interrupt is raised.
    pub fn config_changed(&self) {
        let mut t = self.lock();
        t.config_generation = t.config_generation.wrapping_add(1);
        t.interrupt_status |= INT_CONFIG;
        drop(t);
        self.irq.trigger();
    }

    /// The queues' notifiers (engine mode), for KVM_IOEVENTFD at
    /// `base + QUEUE_NOTIFY` with the queue's index as the data match.
    pub fn notifiers(&self) -> &[EventFd] {
        &self.notifiers
    }

    /// What the I/O engine waits on for this device: each queue's
    /// notifier, and the backend's fd if it has one.
    pub fn engine_sources(self: &Arc<Self>) -> Vec<Source>
    where
        D: 'static,
    {
        let work = || self.clone() as Arc<dyn IoWork>;
        let mut sources: Vec<Source> = self
            .notifiers
            .iter()
            .enumerate()
            .map(|(i, n)| Source {
                fd: n.as_raw_fd(),
                trigger: Trigger::Counter,
                token: i as u32,
                work: work(),
            })
            .collect();
        if !self.notifiers.is_empty() {
            if let Some(fd) = self.lock().device.backend_fd() {
                sources.push(Source {
                    fd,
                    trigger: Trigger::Edge,
                    token: BACKEND,
                    work: work(),
                });
            }
        }
        sources
    }

    /// Serve queue `index` (or the backend, [`BACKEND`]) if the driver
    /// has the device running, and interrupt if a queue got used buffers.
    fn serve_locked(
        &self,
        mut t: std::sync::MutexGuard<'_, Transport<D>>,
        token: u32,
        budget: &mut Budget,
    ) -> Served {
        if t.status & DRIVER_OK == 0 || t.status & FAILED != 0 {
            return Served::Done;
        }
        let before: Vec<u16> = t.queues.iter().map(|q| q.next_used()).collect();
        let Transport { device, queues, .. } = &mut *t;
        let more = match token {
            BACKEND => device.backend_ready(queues, &self.mem, budget),
            i => match queues.get(i as usize) {
                Some(q) if q.ready() => device.process(i as usize, queues, &self.mem, budget),
                _ => Served::Done,
            },
        };
        let mut notify = false;
        for (q, before) in t.queues.iter_mut().zip(before) {
            if q.next_used() != before {
                notify |= q.needs_notification(&self.mem).unwrap_or(true);
            }
        }
        if notify {
            t.interrupt_status |= INT_VRING;
            drop(t);
            self.irq.trigger();
        }
        more
    }
}

impl<D: VirtioDevice> IoWork for VirtioMmio<D> {
    fn serve(&self, token: u32, budget: &mut Budget) -> Served {
        self.serve_locked(self.lock(), token, budget)
    }
}

impl<D: VirtioDevice> Transport<D> {
    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
    }

    /// The selected queue, if it exists.
    fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }
}

fn half(v: u64, sel: u32) -> u32 {
    match sel {
        0 => v as u32,
        1 => (v >> 32) as u32,
        _ => 0,
    }
}

impl<D: VirtioDevice> DeviceMmio for VirtioMmio<D> {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let t = self.lock();
        if offset >= 0x100 {
            data.fill(0);
            t.device.read_config(offset - 0x100, data);
            return;
        }
        let v = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => t.device.device_type(),
            0x0c => VENDOR,
            0x10 => half(t.device.features() | F_VERSION_1, t.device_features_sel),
            0x34 => t.selected().map_or(0, |q| u32::from(q.max_size())),
            0x44 => t.selected().map_or(0, |q| u32::from(q.ready())),
            0x60 => t.interrupt_status,
            0x70 => t.status,
            0xfc => t.config_generation,
            _ => 0,
        };
        // Registers are 32-bit; a narrower read gets the low bytes.
        crate::put_port_value(data, v);
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let mut t = self.lock();
        let v = crate::port_value(data);
        // A queue's registers may change only before DRIVER_OK.
        let sel = t.queue_sel as usize;
        let queue_writable = sel < t.queues.len() && t.status & DRIVER_OK == 0;
        match offset {
            0x14 => t.device_features_sel = v,
            0x20 => {
                let offered = t.device.features() | F_VERSION_1;
                let set = match t.driver_features_sel {
                    0 => u64::from(v),
                    1 => u64::from(v) << 32,
                    _ => 0,
                };
                let keep = match t.driver_features_sel {
                    0 => t.driver_features & !0xffff_ffff,
                    1 => t.driver_features & 0xffff_ffff,
                    _ => t.driver_features,
                };
                // A driver cannot accept what was not offered.
                t.driver_features = keep | (set & offered);
            }
            0x24 => t.driver_features_sel = v,
            0x30 => t.queue_sel = v,
            0x38 if queue_writable => t.queues[sel].set_size(v as u16),
            0x44 if queue_writable => {
                // is_valid checks a ready queue: mark it, then take it
                // back if its rings do not fit guest memory.
                let q = &mut t.queues[sel];
                q.set_ready(v == 1);
                if v == 1 && !q.is_valid(&self.mem) {
                    crate::guest_warn!(
                        "virtio: the driver's queue does not fit guest memory; not ready"
                    );
                    q.set_ready(false);
                }
            }
            QUEUE_NOTIFY if (v as usize) < t.queues.len() => match self.notifiers.get(v as usize) {
                // An access KVM's ioeventfd did not match (a narrower
                // write): hand it to the engine all the same.
                Some(n) => {
                    let _ = n.write(1);
                }
                // Inline: to the queue's end, as before the engine.
                None => {
                    let mut t = Some(t);
                    while self.serve_locked(
                        t.take().unwrap_or_else(|| self.lock()),
                        v,
                        &mut Budget::unlimited(),
                    ) == Served::More
                    {}
                }
            },
            0x64 => t.interrupt_status &= !v,
            0x70 if v == 0 => t.reset(),
            0x70 => {
                let mut v = v;
                // FEATURES_OK only for a feature set this device accepts:
                // the modern interface.
                if v & FEATURES_OK != 0
                    && t.status & FEATURES_OK == 0
                    && t.driver_features & F_VERSION_1 == 0
                {
                    v &= !FEATURES_OK;
                }
                let was_ok = t.status & DRIVER_OK != 0;
                t.status = v & (ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | FAILED);
                if !was_ok && t.status & DRIVER_OK != 0 {
                    let features = t.driver_features;
                    t.device.activate(features);
                    // Buffers the driver made available before DRIVER_OK
                    // (a network driver fills its receive queue first).
                    if let Some(n) = self.notifiers.first() {
                        let _ = n.write(1);
                    }
                }
            }
            0x80 if queue_writable => t.queues[sel].set_desc_table_address(Some(v), None),
            0x84 if queue_writable => t.queues[sel].set_desc_table_address(None, Some(v)),
            0x90 if queue_writable => t.queues[sel].set_avail_ring_address(Some(v), None),
            0x94 if queue_writable => t.queues[sel].set_avail_ring_address(None, Some(v)),
            0xa0 if queue_writable => t.queues[sel].set_used_ring_address(Some(v), None),
            0xa4 if queue_writable => t.queues[sel].set_used_ring_address(None, Some(v)),
            // The configuration space is read-only here.
            _ => {}
        }
    }
}

/// One virtqueue's set-up and position, for a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// The transport's registers and its queues, for a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    pub status: u32,
    pub driver_features: u64,
    pub interrupt_status: u32,
    /// The selector registers: a driver may be between writing one and
    /// reading what it selects when the VM is saved.
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub config_generation: u32,
    /// Every queue, in order (version 3: virtio-net has two).
    pub queues: Vec<QueueState>,
}

impl<D: VirtioDevice> crate::Stateful for VirtioMmio<D> {
    /// 3: every queue is saved (version 2 had one queue's fields inline,
    /// version 1 lacked the selectors).
    const VERSION: u32 = 3;
    type State = VirtioMmioState;

    fn save(&self) -> VirtioMmioState {
        let t = self.lock();
        VirtioMmioState {
            status: t.status,
            driver_features: t.driver_features,
            interrupt_status: t.interrupt_status,
            device_features_sel: t.device_features_sel,
            driver_features_sel: t.driver_features_sel,
            queue_sel: t.queue_sel,
            config_generation: t.config_generation,
            queues: t
                .queues
                .iter()
                .map(|q| QueueState {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
        }
    }

    fn restore(&self, s: VirtioMmioState) -> Result<(), crate::InvalidState> {
        let mut t = self.lock();
        t.reset();
        if s.queues.len() != t.queues.len() {
            return Err(crate::InvalidState::Count {
                what: "queues",
                saved: s.queues.len(),
                here: t.queues.len(),
            });
        }
        for (i, (q, saved)) in t.queues.iter_mut().zip(&s.queues).enumerate() {
            q.set_size(saved.size);
            // virtio-queue keeps its old size on an invalid one, and says
            // so only in a log line.
            if q.size() != saved.size {
                return Err(crate::InvalidState::Range {
                    what: format!("queue {i}'s size"),
                    value: saved.size.to_string(),
                    allowed: format!("a power of two up to {QUEUE_MAX}"),
                });
            }
            let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (l, h) = split(saved.desc_table);
            q.set_desc_table_address(l, h);
            let (l, h) = split(saved.avail_ring);
            q.set_avail_ring_address(l, h);
            let (l, h) = split(saved.used_ring);
            q.set_used_ring_address(l, h);
            q.set_next_avail(saved.next_avail);
            q.set_next_used(saved.next_used);
            q.set_ready(saved.ready);
            if saved.ready && !q.is_valid(&self.mem) {
                q.set_ready(false);
                return Err(crate::InvalidState::Range {
                    what: format!("queue {i}'s rings"),
                    value: format!("at {:#x}", saved.desc_table),
                    allowed: "they must lie in guest memory".into(),
                });
            }
        }
        t.status = s.status;
        t.driver_features = s.driver_features;
        t.interrupt_status = s.interrupt_status;
        t.device_features_sel = s.device_features_sel;
        t.driver_features_sel = s.driver_features_sel;
        t.queue_sel = s.queue_sel;
        t.config_generation = s.config_generation;
        if t.status & DRIVER_OK != 0 {
            let features = t.driver_features;
            t.device.activate(features);
        }
        t.device.restored();
        Ok(())
    }

    /// Used buffers the driver has not acknowledged: pull the line again.
    fn reassert(&self) {
        if self.lock().interrupt_status != 0 {
            self.irq.trigger();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stateful;
    use vm_memory::GuestAddress;

    struct Nothing;
    impl VirtioDevice for Nothing {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn process(&mut self, _: usize, _: &mut [Queue], _: &GuestRam, _: &mut Budget) -> Served {
            Served::Done
        }
    }

    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicU32);
    impl IrqLine for Count {
        fn trigger(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn device_with(irq: Arc<Count>) -> VirtioMmio<Nothing> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        VirtioMmio::new(Nothing, mem, irq, Notify::Inline).unwrap()
    }

    fn device() -> VirtioMmio<Nothing> {
        device_with(Arc::default())
    }

    /// Used buffers the driver has not acknowledged at the save: the
    /// restored device pulls its line again when asked (wave2 review #1:
    /// nothing re-raised it, and the interrupt could be in neither the
    /// device nor the irqchip saved); acknowledged, it does not.
    #[test]
    fn an_unacknowledged_interrupt_is_pulled_again_after_a_restore() {
        let saved = VirtioMmioState {
            interrupt_status: INT_VRING,
            ..device().save()
        };
        let line = Arc::new(Count::default());
        let d = device_with(line.clone());
        d.restore(saved).unwrap();
        d.reassert();
        assert_eq!(line.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        write(&d, 0x64, INT_VRING); // InterruptACK
        d.reassert();
        assert_eq!(line.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    fn read(d: &VirtioMmio<Nothing>, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        d.mmio_read(MmioAddress(0), offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(d: &VirtioMmio<Nothing>, offset: u64, v: u32) {
        d.mmio_write(MmioAddress(0), offset, &v.to_le_bytes());
    }

    /// A driver saved between DeviceFeaturesSel=1 and its read of
    /// DeviceFeatures reads the high word (VERSION_1) after the restore.
    #[test]
    fn the_selectors_survive_a_snapshot() {
        let d = device();
        write(&d, 0x70, ACKNOWLEDGE | DRIVER);
        write(&d, 0x14, 1);
        write(&d, 0x24, 1);
        let saved = d.save();
        let fresh = device();
        fresh.restore(saved.clone()).unwrap();
        assert_eq!(read(&fresh, 0x10), (F_VERSION_1 >> 32) as u32);
        assert_eq!(fresh.save(), saved);
        let mut bad = saved.clone();
        bad.queues[0].size = 100;
        let e = fresh.restore(bad).unwrap_err().to_string();
        assert!(e.contains("queue 0's size 100"), "{e}");
        let mut two = saved;
        two.queues.push(two.queues[0].clone());
        let e = fresh.restore(two).unwrap_err().to_string();
        assert!(e.contains("queues: 2 saved"), "{e}");
    }
}
