//! virtio-net (virtio 1.2, section 5.1) on a TAP device: queue 0 receives
//! (frames from the TAP into the guest's buffers), queue 1 transmits
//! (the guest's frames to the TAP). The TAP and the guest share the
//! virtio-net header, so checksum and TSO offloads cost brisk nothing:
//! the features the driver accepts are set on the TAP (`TUNSETOFFLOAD`)
//! and the headers pass through. Mergeable receive buffers let a large
//! frame span several small buffers. The MAC is in configuration space,
//! the link is up.
//!
//! A frame the guest has no room for waits in the device (the TAP keeps
//! the rest queued) until the driver adds receive buffers; a frame the
//! guest gets wrong (a chain outside its memory, too short or too long)
//! is dropped with a warning that cannot flood the log.

use std::io::{Read, Write};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::mmio::{GuestRam, VirtioDevice};
use super::tap::{Tap, VNET_HDR_LEN};
use crate::io_engine::{Budget, Served};
use crate::rate_limiter::RateLimiter;

/// The receive queue's index.
pub const RX: usize = 0;
/// The transmit queue's index.
pub const TX: usize = 1;
/// The largest frame with its header: a 64 KiB TSO frame, Ethernet and
/// VLAN headers, and the virtio-net header.
pub const MAX_FRAME: usize = 65_562;

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// brisk's default for NIC `index`: locally administered, unicast,
    /// the same on every run (a restored or migrated guest keeps it).
    pub fn default_for(index: usize) -> Mac {
        Mac([0x06, 0x62, 0x72, 0x6b, 0x00, index as u8])
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    /// Six hexadecimal octets separated by colons; unicast only.
    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || {
            format!(
                "'{}' is not a MAC address (like 06:00:ac:10:00:02)",
                s.escape_debug()
            )
        };
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if m[0] & 1 != 0 {
            return Err(format!(
                "{s} is a multicast address; a NIC needs a unicast one"
            ));
        }
        Ok(Mac(m))
    }
}

/// A virtio-net device on a TAP.
pub struct Net {
    tap: Tap,
    mac: Mac,
    /// What the driver accepted.
    acked: u64,
    /// A frame read from the TAP that the guest had no room for yet.
    rx_frame: Vec<u8>,
    rx_len: usize,
    /// Its receive tokens are taken.
    rx_paid: bool,
    tx_frame: Vec<u8>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
}

fn bit(b: u32) -> u64 {
    1 << b
}

impl Net {
    pub fn new(tap: Tap, mac: Mac) -> Net {
        Net {
            tap,
            mac,
            acked: 0,
            rx_frame: vec![0; MAX_FRAME],
            rx_len: 0,
            rx_paid: false,
            tx_frame: vec![0; MAX_FRAME],
            rx_limiter: RateLimiter::default(),
            tx_limiter: RateLimiter::default(),
        }
    }

    /// Limit what it receives and what it transmits (frame bytes, without
    /// the virtio-net header, and frames per second).
    pub fn with_limiters(mut self, rx: RateLimiter, tx: RateLimiter) -> Net {
        self.set_limiters(rx, tx);
        self
    }

    /// Change its limits on a running VM.
    pub fn set_limiters(&mut self, rx: RateLimiter, tx: RateLimiter) {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
    }

    /// Frames from the TAP into the receive queue, while the budget and
    /// the limiter last and the guest has room.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestRam, budget: &mut Budget) -> Served {
        loop {
            if budget.spent() {
                return Served::More;
            }
            if self.rx_len == 0 {
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_len = n,
                    Ok(_) => continue, // nothing but a header: nothing to deliver
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Served::Done,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        crate::guest_warn!(
                            "virtio-net {}: reading the TAP failed: {e}",
                            self.tap.name()
                        );
                        return Served::Done;
                    }
                }
                self.rx_paid = false;
            }
            if !self.rx_paid {
                let bytes = (self.rx_len - VNET_HDR_LEN) as u64;
                if let Err(wait) = self.rx_limiter.consume(bytes, std::time::Instant::now()) {
                    // Kept until the tokens are there; the TAP holds the
                    // frames behind it.
                    return Served::After(wait);
                }
                self.rx_paid = true;
            }
            match self.deliver(queue, mem) {
                Some(bytes) => {
                    self.rx_len = 0;
                    budget.spend(bytes as u64);
                }
                // No room: the driver's next receive notification brings
                // us back.
                None => return Served::Done,
            }
        }
    }

    /// Write the pending frame into the guest's receive buffers. `None`
    /// if they are too few (nothing taken); `Some(bytes)` once the frame
    /// is delivered, or dropped because the guest's buffers are bad.
    fn deliver(&mut self, queue: &mut Queue, mem: &GuestRam) -> Option<usize> {
        let mergeable = self.acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let len = self.rx_len;
        // num_buffers is 1 unless mergeable buffers say otherwise below.
        self.rx_frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut used: Vec<(u16, u32)> = Vec::new();
        let mut first = None;
        let mut written = 0;
        let mut bad = false;
        while written < len {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Not enough buffers yet: put back what was taken.
                for _ in 0..used.len() {
                    queue.go_to_previous_position();
                }
                return None;
            };
            let head = chain.head_index();
            let n = match chain.clone().writer(mem) {
                Ok(mut w) => w.write(&self.rx_frame[written..len]).unwrap_or(0),
                Err(_) => 0,
            };
            if first.is_none() {
                first = Some(chain);
            }
            used.push((head, n as u32));
            written += n;
            if n == 0 || (!mergeable && written < len) {
                bad = true;
                break;
            }
        }
        if bad {
            crate::guest_warn!(
                "virtio-net {}: a receive buffer is unusable (outside guest memory, not writable, or too small for a {len}-byte frame without mergeable buffers); frame dropped",
                self.tap.name()
            );
            used.iter_mut().for_each(|u| u.1 = 0);
        } else if mergeable && used.len() > 1 {
            // The header went out with num_buffers = 1: say how many.
            let count = (used.len() as u16).to_le_bytes();
            self.rx_frame[10..12].copy_from_slice(&count);
            if let Some(Ok(mut w)) = first.map(|c| c.writer(mem)) {
                let _ = w.write_all(&self.rx_frame[..VNET_HDR_LEN]);
            }
        }
        for (head, n) in used {
            if queue.add_used(mem, head, n).is_err() {
                crate::guest_warn!(
                    "virtio-net {}: the used ring is outside guest memory",
                    self.tap.name()
                );
                break;
            }
        }
        Some(len)
    }

    /// The guest's frames to the TAP, while the budget and the limiter
    /// last.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestRam, budget: &mut Budget) -> Served {
        let Some(pending) = super::pending(queue, mem) else {
            return Served::Done;
        };
        for _ in 0..pending {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                crate::guest_warn!(
                    "virtio-net {}: the transmit ring is corrupt; no longer served",
                    self.tap.name()
                );
                return Served::Done;
            };
            if !self.tx_limiter.is_unlimited() {
                let bytes: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
                let bytes = bytes.saturating_sub(VNET_HDR_LEN as u64);
                if let Err(wait) = self.tx_limiter.consume(bytes, std::time::Instant::now()) {
                    // Left in the ring for when the tokens are there.
                    queue.go_to_previous_position();
                    return Served::After(wait);
                }
            }
            let head = chain.head_index();
            let len = match chain.reader(mem) {
                Ok(mut r) => {
                    let len = r.available_bytes();
                    if len <= VNET_HDR_LEN || len > MAX_FRAME {
                        crate::guest_warn!("virtio-net {}: a {len}-byte transmit chain is not a frame (header plus 1 to {} bytes); dropped", self.tap.name(), MAX_FRAME - VNET_HDR_LEN);
                        0
                    } else if r.read_exact(&mut self.tx_frame[..len]).is_err() {
                        0
                    } else {
                        len
                    }
                }
                Err(_) => {
                    crate::guest_warn!(
                        "virtio-net {}: transmit chain {head} is outside guest memory; dropped",
                        self.tap.name()
                    );
                    0
                }
            };
            if len > 0 {
                if let Err(e) = self.tap.write_frame(&self.tx_frame[..len]) {
                    // A full or down interface drops, as a wire would.
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        crate::guest_warn!(
                            "virtio-net {}: writing to the TAP failed: {e}",
                            self.tap.name()
                        );
                    }
                }
            }
            budget.spend(len as u64);
            if queue.add_used(mem, head, 0).is_err() {
                crate::guest_warn!(
                    "virtio-net {}: the used ring is outside guest memory",
                    self.tap.name()
                );
                return Served::Done;
            }
            if budget.spent() {
                break;
            }
        }
        super::more(queue, mem)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
        ]
        .into_iter()
        .fold(0, |f, b| f | bit(b))
    }

    fn queue_count(&self) -> usize {
        2
    }

    /// A frame held for the old driver is not the new one's (it may need
    /// offloads the new one did not accept).
    fn reset(&mut self) {
        self.rx_len = 0;
        self.rx_paid = false;
        self.acked = 0;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status, max_virtqueue_pairs.
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, features: u64) {
        self.acked = features;
        // What the host may send the guest: what its driver can take.
        let mut offload = 0;
        for (feature, flag) in [
            (VIRTIO_NET_F_GUEST_CSUM, libc::TUN_F_CSUM),
            (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
        ] {
            if features & bit(feature) != 0 {
                offload |= flag;
            }
        }
        if let Err(e) = self.tap.set_offload(offload) {
            log::warn!(
                "virtio-net {}: TUNSETOFFLOAD {offload:#x} failed ({e}); the guest may receive frames it did not ask for",
                self.tap.name()
            );
        }
    }

    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestRam,
        budget: &mut Budget,
    ) -> Served {
        match index {
            RX => self.receive(&mut queues[RX], mem, budget),
            TX => self.transmit(&mut queues[TX], mem, budget),
            _ => Served::Done,
        }
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.tap.fd())
    }

    fn backend_ready(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestRam,
        budget: &mut Budget,
    ) -> Served {
        match queues.get_mut(RX) {
            Some(q) if q.ready() => self.receive(q, mem, budget),
            _ => Served::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_print() {
        let m: Mac = "06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(m.to_string(), "06:00:ac:10:00:02");
        for bad in [
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:0:ac:10:0:2",
            "zz:00:00:00:00:00",
        ] {
            assert!(
                bad.parse::<Mac>().unwrap_err().contains("not a MAC"),
                "{bad}"
            );
        }
        assert!("01:00:5e:00:00:01"
            .parse::<Mac>()
            .unwrap_err()
            .contains("multicast"));
        assert_eq!(Mac::default_for(3).0[5], 3);
        assert_eq!(
            Mac::default_for(0).0[0] & 3,
            2,
            "locally administered unicast"
        );
    }
}
