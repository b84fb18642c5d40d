//! KVM's dirty ring (KVM_CAP_DIRTY_LOG_RING), the other way to learn
//! which pages the guest wrote.
//!
//! With the bitmap (KVM_GET_DIRTY_LOG), KVM keeps one bit per page of
//! every slot and each read copies out, and write-protects again, the
//! whole slot's bitmap: the cost grows with RAM, however few pages were
//! written. With the ring, each vCPU pushes the page it dirties onto a
//! ring of `kvm_dirty_gfn` entries shared with brisk; brisk collects what
//! was pushed, marks each entry collected, and KVM_RESET_DIRTY_RINGS
//! write-protects just those pages again: the cost grows with the pages
//! written. A vCPU whose ring fills exits (KVM_EXIT_DIRTY_RING_FULL) and
//! collects before it runs again, so nothing is dropped, on a host that
//! stops it in time. One that does not (PVM pushes an entry per emulated
//! write, and outruns that exit) can overflow a ring; brisk notices and
//! then counts every page as dirty (`Collected::overflowed`).
//!
//! A VM uses one or the other from its creation: KVM refuses the bitmap
//! once the ring is on.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::{Error, Result};

/// The fewest entries per vCPU ring (QEMU's default).
const MIN_ENTRIES: u32 = 4096;

/// `kvm_dirty_gfn.flags`: KVM pushed it; brisk collected it.
const DIRTY: u32 = 1;
const RESET: u32 = 2;

vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

/// Every vCPU's ring, and the pages collected from them not yet taken.
pub(crate) struct DirtyRings {
    /// A copy of the VM fd for KVM_RESET_DIRTY_RINGS (the vCPUs collect
    /// too, and may outlive the `Vm`'s borrow).
    vm: File,
    inner: Mutex<Collected>,
}

struct Collected {
    /// Entries in each ring (a power of two).
    entries: u32,
    /// A ring was found fuller than KVM lets it get: pushes may have
    /// overwritten entries not yet collected, and KVM's count of the
    /// ring no longer matches its entries (it may never push where brisk
    /// looks again). From then on every take reports every page.
    overflowed: bool,
    rings: Vec<Ring>,
    /// One bitmap per slot (slot i = region i), one bit per page.
    bits: Vec<Vec<u64>>,
    /// Pages in each slot.
    pages: Vec<u64>,
}

/// One vCPU's ring: its mapping and the next entry to collect.
struct Ring {
    entries: *mut kvm_dirty_gfn,
    next: u32,
}

// SAFETY: the mapping lives until `DirtyRings` drops (it unmaps it), and
// every access goes through the `Mutex` around the rings.
unsafe impl Send for Ring {}

impl Ring {
    /// Entry `index`'s flags. Read with Acquire (KVM publishes an entry's
    /// slot and offset before its DIRTY flag), written with Release (KVM
    /// reads them back in the reset ioctl).
    fn flags(&self, index: u32, entries: u32) -> &AtomicU32 {
        // SAFETY: the index is reduced into the mapping, which outlives
        // `self`; the flags are a naturally aligned u32 KVM also accesses
        // atomically.
        unsafe {
            let e = self.entries.add((index % entries) as usize);
            &*(std::ptr::addr_of_mut!((*e).flags) as *const AtomicU32)
        }
    }

    /// After an overflow KVM counts entries past the ones it reset that
    /// hold nothing (their content was collected in the lap that
    /// overflowed), and pushes after them: mark those collected, so that
    /// KVM's reset and brisk's walk meet the new entries again. Only up
    /// to the first pushed entry (so only entries KVM counts as used).
    /// Whether any were marked.
    fn skip_stale(&mut self, entries: u32) -> bool {
        let Some(k) = (0..entries).find(|&k| {
            self.flags(self.next.wrapping_add(k), entries)
                .load(Ordering::Acquire)
                & DIRTY
                != 0
        }) else {
            return false;
        };
        for k in 0..k {
            self.flags(self.next.wrapping_add(k), entries)
                .store(RESET, Ordering::Release);
        }
        self.next = self.next.wrapping_add(k);
        k > 0
    }
}

impl DirtyRings {
    /// Turn the ring on for `vm` (before any vCPU exists), `slot_pages`
    /// pages in each slot. Each ring gets an entry per page of RAM (up to
    /// the most this KVM allows), so that only a vCPU writing the same
    /// pages over and over fills one.
    pub(crate) fn enable(vm: &VmFd, slot_pages: &[u64]) -> Result<Self> {
        let gfn = std::mem::size_of::<kvm_dirty_gfn>() as u64;
        let pages: u64 = slot_pages.iter().sum();
        // The largest ring this KVM takes, in bytes (0: none).
        let max = vm.check_extension_int(kvm_ioctls::Cap::DirtyLogRing).max(0) as u64;
        if max < u64::from(MIN_ENTRIES) * gfn {
            return Err(Error::MissingCapability("KVM_CAP_DIRTY_LOG_RING"));
        }
        // Both powers of two.
        let entries = pages
            .next_power_of_two()
            .clamp(u64::from(MIN_ENTRIES), max / gfn);
        let bytes = entries * gfn;
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_DIRTY_LOG_RING,
            ..Default::default()
        };
        cap.args[0] = bytes;
        vm.enable_cap(&cap)
            .map_err(Error::sys("KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)"))?;
        // SAFETY: dup of a live fd; the new fd is owned by the File.
        let copy = unsafe { libc::dup(vm.as_raw_fd()) };
        if copy < 0 {
            return Err(Error::Sys {
                what: "duplicating the VM fd",
                err: vmm_sys_util::errno::Error::last(),
            });
        }
        Ok(DirtyRings {
            // SAFETY: `copy` is a fresh fd nobody else owns.
            vm: unsafe { File::from_raw_fd(copy) },
            inner: Mutex::new(Collected {
                entries: entries as u32,
                overflowed: false,
                pages: slot_pages.to_vec(),
                rings: Vec::new(),
                bits: slot_pages
                    .iter()
                    .map(|&p| vec![0; p.div_ceil(64) as usize])
                    .collect(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Collected> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Map a new vCPU's ring.
    pub(crate) fn add_vcpu(&self, vcpu: &VcpuFd) -> Result<()> {
        let page = crate::PAGE_SIZE;
        let mut c = self.lock();
        let len = c.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: maps the ring KVM offers at this offset of the vCPU fd;
        // the result is checked, and unmapped only in `drop`.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                (KVM_DIRTY_LOG_PAGE_OFFSET as usize * page) as libc::off_t,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(Error::Sys {
                what: "mapping a vCPU's dirty ring",
                err: vmm_sys_util::errno::Error::last(),
            });
        }
        c.rings.push(Ring {
            entries: at.cast(),
            next: 0,
        });
        Ok(())
    }

    /// A vCPU's ring is full (KVM_EXIT_DIRTY_RING_FULL): collect.
    /// `empty_before`: this vCPU's full exits in a row that found nothing
    /// to collect. One such exit is a race (another thread collected and
    /// reset first; KVM checks again before the next entry); a second in
    /// a row means KVM's count of the ring went wrong (an overflow): every
    /// page counts as dirty from then on. Returns the new count.
    pub(crate) fn collect_full(&self, empty_before: u32) -> Result<u32> {
        if self.collect()? {
            return Ok(0);
        }
        if empty_before >= 1 {
            let mut c = self.lock();
            if !c.overflowed {
                log::debug!(
                    "a full dirty ring had nothing to collect twice: every page counts as dirty"
                );
                c.overflowed = true;
            }
        }
        Ok(empty_before + 1)
    }

    /// Collect every entry KVM pushed, on every ring, into the bitmaps,
    /// and have KVM write-protect those pages again. Whether there were
    /// any.
    pub(crate) fn collect(&self) -> Result<bool> {
        let mut c = self.lock();
        let Collected {
            entries,
            overflowed,
            rings,
            bits,
            ..
        } = &mut *c;
        let mut any = false;
        for ring in rings.iter_mut() {
            if *overflowed {
                any |= ring.skip_stale(*entries);
            }
            let first = ring.next;
            loop {
                let flags = ring.flags(ring.next, *entries);
                if flags.load(Ordering::Acquire) & DIRTY == 0 {
                    break;
                }
                // SAFETY: an entry of the mapping, published by KVM
                // before its DIRTY flag (read with Acquire above).
                // Volatile: after an overflow KVM may be rewriting it.
                let (slot, offset) = unsafe {
                    let e = ring.entries.add((ring.next % *entries) as usize);
                    (
                        std::ptr::addr_of!((*e).slot).read_volatile(),
                        std::ptr::addr_of!((*e).offset).read_volatile(),
                    )
                };
                // The slot id's low 16 bits name the slot (address space
                // 0 only: x86 without SMM).
                if let Some(word) = bits
                    .get_mut((slot & 0xffff) as usize)
                    .and_then(|b| b.get_mut((offset / 64) as usize))
                {
                    *word |= 1 << (offset % 64);
                }
                flags.store(RESET, Ordering::Release);
                ring.next = ring.next.wrapping_add(1);
                any = true;
            }
            // KVM stops a vCPU while its ring still has entries free (at
            // least 64); a ring found entirely full went round (a host
            // that pushes faster than it stops the vCPU: PVM's
            // instruction emulator, measured) and may have overwritten
            // entries. Then no page can be trusted clean.
            if ring.next.wrapping_sub(first) >= *entries && !*overflowed {
                log::debug!("a dirty ring filled past its reserve: every page counts as dirty");
                *overflowed = true;
            }
        }
        if any {
            // SAFETY: an ioctl with no argument on the VM fd.
            let r = unsafe { vmm_sys_util::ioctl::ioctl(&self.vm, KVM_RESET_DIRTY_RINGS()) };
            if r < 0 {
                return Err(Error::Sys {
                    what: "KVM_RESET_DIRTY_RINGS",
                    err: vmm_sys_util::errno::Error::last(),
                });
            }
        }
        Ok(any)
    }

    /// Collect, then take the pages collected since the last take (one
    /// bitmap per slot), leaving empty ones.
    pub(crate) fn take(&self) -> Result<Vec<Vec<u64>>> {
        self.collect()?;
        let mut c = self.lock();
        let all = c.overflowed;
        let Collected { bits, pages, .. } = &mut *c;
        Ok(bits
            .iter_mut()
            .zip(pages.iter())
            .map(|(b, &pages)| {
                let taken = std::mem::replace(b, vec![0; b.len()]);
                match all {
                    true => every_page(pages),
                    false => taken,
                }
            })
            .collect())
    }
}

/// A bitmap with a bit set for each of `pages` pages.
fn every_page(pages: u64) -> Vec<u64> {
    let mut b = vec![u64::MAX; (pages / 64) as usize];
    if pages % 64 != 0 {
        b.push((1 << (pages % 64)) - 1);
    }
    b
}

impl Drop for DirtyRings {
    fn drop(&mut self) {
        let c = self.lock();
        let len = c.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        for ring in &c.rings {
            // SAFETY: a mapping `add_vcpu` made, unmapped once, when the
            // last holder (the VM, or a vCPU) is gone: nothing reads it
            // after. KVM writes the ring through its own mapping.
            unsafe { libc::munmap(ring.entries.cast(), len) };
        }
    }
}
