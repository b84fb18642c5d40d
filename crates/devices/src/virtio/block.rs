//! virtio-blk (virtio 1.2, section 5.2) backed by a raw image file:
//! read, write, flush (fdatasync) and get-id, read-write or read-only.
//! Requests are served by the VM's I/O engine (or inline on the vCPU
//! thread that notified, the benchmarks' baseline), a bounce buffer of
//! [`BOUNCE`] bytes at a time between guest memory and the file (by
//! offset, pread/pwrite), at most a [`Budget`] of requests per call. A request the guest gets wrong (a sector
//! past the end, a length that is not whole sectors, a write to a
//! read-only disk, a chain too short) completes with VIRTIO_BLK_S_IOERR
//! or UNSUPP; a chain whose buffers are outside guest memory is returned
//! unused and logged. Nothing the guest sends can make brisk fail.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

use crate::io_engine::{Budget, Served};
use crate::rate_limiter::RateLimiter;

/// The dirty-bitmap slice of guest RAM: what the device writes is marked
/// for a live migration.
type Dirty<'a> = vm_memory::bitmap::BS<'a, AtomicBitmap>;

use super::mmio::VirtioDevice;

const SECTOR: u64 = 512;
/// The bounce buffer between guest memory and the file.
pub const BOUNCE: usize = 64 << 10;

/// A raw disk image.
pub struct DiskImage {
    file: File,
    sectors: u64,
    readonly: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    bounce: Vec<u8>,
    limiter: RateLimiter,
}

impl DiskImage {
    /// `file` (opened read-write unless `readonly`) as a disk; its size is
    /// rounded down to whole sectors. `id` is what GET_ID answers (at most
    /// 20 bytes are kept).
    pub fn new(file: File, readonly: bool, id: &str) -> std::io::Result<DiskImage> {
        let sectors = file.metadata()?.len() / SECTOR;
        let mut ident = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(ident.len());
        ident[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(DiskImage {
            file,
            sectors,
            readonly,
            id: ident,
            bounce: vec![0; BOUNCE],
            limiter: RateLimiter::default(),
        })
    }

    /// Limit its requests (bytes and operations per second).
    pub fn with_limiter(mut self, limiter: RateLimiter) -> DiskImage {
        self.limiter = limiter;
        self
    }

    /// Change its limits on a running VM.
    pub fn set_limiter(&mut self, limiter: RateLimiter) {
        self.limiter = limiter;
    }

    /// Serve `other`'s image from now on (Firecracker's `PATCH /drives`:
    /// a placeholder's file swapped), keeping this disk's limits.
    pub fn replace_image(&mut self, other: DiskImage) {
        self.file = other.file;
        self.sectors = other.sectors;
        self.readonly = other.readonly;
    }

    /// Serve one request; returns the bytes written into the chain.
    fn serve(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap<AtomicBitmap>>,
        mem: &GuestMemoryMmap<AtomicBitmap>,
    ) -> Option<u32> {
        let mut reader = chain.clone().reader(mem).ok()?;
        let mut writer = chain.writer(mem).ok()?;
        // The status byte is the last writable byte.
        let room = writer.available_bytes().checked_sub(1)?;
        let mut status_w = writer.split_at(room).ok()?;
        let mut header = [0u8; 16];
        let status = if reader.read_exact(&mut header).is_err() {
            VIRTIO_BLK_S_IOERR
        } else {
            let kind = u32::from_le_bytes(header[0..4].try_into().ok()?);
            let sector = u64::from_le_bytes(header[8..16].try_into().ok()?);
            match self.request(kind, sector, &mut reader, &mut writer) {
                Ok(()) => VIRTIO_BLK_S_OK,
                Err(s) => s,
            }
        };
        status_w.write_all(&[status as u8]).ok()?;
        Some(writer.bytes_written() as u32 + 1)
    }

    /// The byte range of `len` bytes from `sector`, if whole sectors
    /// inside the disk.
    fn range(&self, sector: u64, len: usize) -> Result<u64, u32> {
        let len = len as u64;
        let end = sector
            .checked_mul(SECTOR)
            .and_then(|start| start.checked_add(len));
        match end {
            Some(end) if len % SECTOR == 0 && end <= self.sectors * SECTOR => Ok(sector * SECTOR),
            _ => Err(VIRTIO_BLK_S_IOERR),
        }
    }

    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_, Dirty<'_>>,
        writer: &mut virtio_queue::Writer<'_, Dirty<'_>>,
    ) -> Result<(), u32> {
        let io = |_| VIRTIO_BLK_S_IOERR;
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                let mut at = self.range(sector, len)?;
                let mut left = len;
                while left > 0 {
                    let n = left.min(BOUNCE);
                    self.file
                        .read_exact_at(&mut self.bounce[..n], at)
                        .map_err(io)?;
                    writer.write_all(&self.bounce[..n]).map_err(io)?;
                    (at, left) = (at + n as u64, left - n);
                }
                Ok(())
            }
            VIRTIO_BLK_T_OUT if self.readonly => Err(VIRTIO_BLK_S_IOERR),
            VIRTIO_BLK_T_OUT => {
                let len = reader.available_bytes();
                let mut at = self.range(sector, len)?;
                let mut left = len;
                while left > 0 {
                    let n = left.min(BOUNCE);
                    reader.read_exact(&mut self.bounce[..n]).map_err(io)?;
                    self.file.write_all_at(&self.bounce[..n], at).map_err(io)?;
                    (at, left) = (at + n as u64, left - n);
                }
                Ok(())
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.readonly {
                    return Ok(());
                }
                self.file.sync_data().map_err(io)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(self.id.len());
                writer.write_all(&self.id[..n]).map_err(io)
            }
            _ => Err(VIRTIO_BLK_S_UNSUPP),
        }
    }
}

impl VirtioDevice for DiskImage {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.readonly {
            1 << VIRTIO_BLK_F_RO
        } else {
            0
        };
        (1 << VIRTIO_BLK_F_FLUSH) | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (sectors) first; the rest of
        // its fields belong to features this device does not offer.
        let capacity = self.sectors.to_le_bytes();
        super::read_config_bytes(&capacity, offset, data);
    }

    fn process(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap<AtomicBitmap>,
        budget: &mut Budget,
    ) -> Served {
        let queue = &mut queues[0];
        // avail.idx is read once: what the guest adds meanwhile waits for
        // the next call, however fast it adds.
        let Some(pending) = super::pending(queue, mem) else {
            return Served::Done;
        };
        for _ in 0..pending {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                crate::guest_warn!(
                    "virtio-blk: the available ring is corrupt; the queue is no longer served"
                );
                return Served::Done;
            };
            if !self.limiter.is_unlimited() {
                // The request's size: every buffer of the chain (the data
                // with its header and status byte).
                let bytes: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
                if let Err(wait) = self.limiter.consume(bytes, std::time::Instant::now()) {
                    // Left in the ring for when the tokens are there.
                    queue.go_to_previous_position();
                    return Served::After(wait);
                }
            }
            let head = chain.head_index();
            let len = match self.serve(chain, mem) {
                Some(len) => len,
                None => {
                    crate::guest_warn!("virtio-blk: descriptor chain {head} is malformed or outside guest memory; returned unused");
                    0
                }
            };
            budget.spend(u64::from(len));
            if queue.add_used(mem, head, len).is_err() {
                crate::guest_warn!("virtio-blk: the used ring is outside guest memory");
                return Served::Done;
            }
            if budget.spent() {
                break;
            }
        }
        super::more(queue, mem)
    }
}
