//! virtio-vsock (virtio 1.2, section 5.10) with Firecracker's hybrid
//! host side: the guest's stream sockets meet Unix sockets on the host.
//!
//! - A host process connects to the Unix socket at `uds_path` and writes
//!   `CONNECT <port>\n`; brisk asks the guest to accept on that port and,
//!   once it does, answers `OK <host_port>\n`; then bytes flow both ways.
//! - A guest connection to host port P is connected to the Unix socket
//!   `<uds_path>_P` (someone on the host listens there), or reset.
//!
//! Flow control is the spec's credit: brisk forwards to the guest no more
//! than the guest's advertised buffer has room for, and advertises
//! [`BUF_ALLOC`] bytes of its own, buffered until the host side takes
//! them; a guest that sends more is reset. Every host socket is
//! non-blocking and watched by the device's own epoll, whose fd the I/O
//! engine watches: a client that never reads, never says CONNECT, or
//! writes garbage costs its own connection and nothing else. Connections
//! do not survive a snapshot: a restored device tells the guest
//! (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET), as Firecracker does.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::mmio::{GuestRam, VirtioDevice};
use crate::io_engine::{Budget, Served};
use packet::{Header, Op, HDR_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// virtio device type 19.
pub const VIRTIO_ID_VSOCK: u32 = 19;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// Bytes brisk buffers per connection for the host side (its credit to
/// the guest).
pub const BUF_ALLOC: u32 = 256 << 10;
/// The largest payload of one packet brisk takes from the guest.
const MAX_PAYLOAD: usize = 64 << 10;
/// Connections at once; more are refused (host) or reset (guest).
const MAX_CONNS: usize = 256;
/// Control packets waiting for the guest's receive buffers; past this the
/// guest's transmit queue waits (a guest that never gives receive
/// buffers cannot make brisk queue without end).
const MAX_TO_GUEST: usize = 1024;
/// Rounds of the device's epoll per call (64 events each): more is left
/// for the next call.
const POLL_ROUNDS: usize = 8;
/// Host clients that have not said CONNECT yet; the oldest is dropped
/// for a newer one.
const MAX_PENDING: usize = 16;
/// The longest `CONNECT <port>\n` line.
const MAX_LINE: usize = 32;
/// The listener's token in the device's epoll.
const LISTENER: u64 = 0;
/// The first port brisk gives a host-initiated connection.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// Why the device cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock socket {0} already exists (brisk does not remove what is not its own)")]
    Exists(PathBuf),
    #[error("vsock socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest CID {0} is reserved (it must be 3 or more)")]
    Cid(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: the guest has been asked (REQUEST), no answer yet.
    Connecting,
    Established,
    /// The host side ended (EOF): the guest was told (SHUTDOWN), its RST
    /// ends it.
    Closing,
}

/// (host port, guest port).
type Key = (u32, u32);

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes of the guest's written to the host side.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_told: u32,
    /// The guest's bytes the host side has not taken yet.
    out: Vec<u8>,
    /// The stream reported readable since the last read came up empty.
    readable: bool,
    /// The guest's SHUTDOWN flags so far: it sends (SEND) or takes (RCV)
    /// no more. What it sent before is still written to the host side.
    guest_shut: u32,
    /// The host side's write half is shut (after the guest's SEND).
    write_shut: bool,
}

impl Conn {
    /// What the device's epoll watches on its stream: reads until the
    /// host side ended, writes while the guest's bytes wait.
    fn interest(&self) -> EventSet {
        let mut e = if self.state == State::Closing {
            EventSet::empty()
        } else {
            EventSet::IN
        };
        if !self.out.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }
}

impl Conn {
    /// Bytes the guest has room for.
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host client that has not said `CONNECT <port>` yet.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    pending: HashMap<u64, Pending>,
    conns: HashMap<Key, Conn>,
    /// Stream tokens to their connection.
    tokens: HashMap<u64, Key>,
    next_token: u64,
    next_port: u32,
    /// Control packets for the guest, waiting for receive buffers.
    to_guest: VecDeque<Header>,
    /// A restore happened: the guest is to be told its connections are
    /// gone.
    reset_event: bool,
    /// Scratch for a packet from the guest, and for data to it: allocated
    /// once, not per call.
    packet: Vec<u8>,
    data: Vec<u8>,
}

impl Vsock {
    /// A device for guest `cid`, listening on `uds` (which must not exist;
    /// it is removed when the device goes).
    pub fn new(cid: u64, uds: &Path) -> Result<Vsock, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::Cid(cid));
        }
        if uds.symlink_metadata().is_ok() {
            return Err(VsockError::Exists(uds.into()));
        }
        let io = |source| VsockError::Io {
            path: uds.into(),
            source,
        };
        let listener = UnixListener::bind(uds).map_err(io)?;
        let remove = |e| {
            let _ = std::fs::remove_file(uds);
            io(e)
        };
        listener.set_nonblocking(true).map_err(remove)?;
        let epoll = Epoll::new().map_err(remove)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(remove)?;
        Ok(Vsock {
            cid,
            uds: uds.into(),
            listener,
            epoll,
            pending: HashMap::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 1,
            next_port: FIRST_HOST_PORT,
            to_guest: VecDeque::new(),
            reset_event: false,
            packet: vec![0; HDR_LEN + MAX_PAYLOAD],
            data: vec![0; MAX_PAYLOAD],
        })
    }

    fn header(&self, key: Key, op: Op, flags: u32, len: u32) -> Header {
        let (fwd_cnt, buf_alloc) = match self.conns.get(&key) {
            Some(c) => (c.fwd_cnt, BUF_ALLOC),
            None => (0, 0),
        };
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn send(&mut self, key: Key, op: Op, flags: u32) {
        let h = self.header(key, op, flags, 0);
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_told = c.fwd_cnt;
        }
        self.to_guest.push_back(h);
    }

    /// Reset a connection the guest named that brisk does not have.
    fn reset(&mut self, key: Key) {
        let h = self.header(key, Op::Rst, 0, 0);
        self.to_guest.push_back(h);
    }

    fn watch(&mut self, fd: std::os::fd::RawFd, events: EventSet) -> Option<u64> {
        let token = self.next_token;
        self.next_token += 1;
        let added = self
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token));
        added.ok().map(|_| token)
    }

    fn close(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            // Closing the stream removes it from the epoll.
        }
    }

    /// Add an established (or connecting) connection on `stream`.
    fn open(&mut self, key: Key, stream: UnixStream, state: State, peer: &Header) -> bool {
        if self.conns.len() >= MAX_CONNS {
            return false;
        }
        let Some(token) = self.watch(stream.as_raw_fd(), EventSet::IN) else {
            return false;
        };
        self.tokens.insert(token, key);
        self.conns.insert(
            key,
            Conn {
                stream,
                token,
                state,
                peer_buf_alloc: peer.buf_alloc,
                peer_fwd_cnt: peer.fwd_cnt,
                tx_cnt: 0,
                fwd_cnt: 0,
                fwd_told: 0,
                out: Vec::new(),
                readable: false,
                guest_shut: 0,
                write_shut: false,
            },
        );
        true
    }

    /// A packet the guest sent, with its payload.
    fn take_packet(&mut self, h: Header, payload: &[u8]) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            crate::guest_warn!(
                "vsock: a packet from CID {} to CID {}: this guest is CID {} and only the host (2) is reachable; dropped",
                h.src_cid,
                h.dst_cid,
                self.cid
            );
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.kind != TYPE_STREAM {
            return self.reset(key);
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        let state = self.conns.get(&key).map(|c| c.state);
        match (h.op, state) {
            (Op::Request, None) => {
                let path = format!("{}_{}", self.uds.display(), h.dst_port);
                let opened = match connect(Path::new(&path)) {
                    Ok(stream) => self.open(key, stream, State::Established, &h),
                    Err(_) => false,
                };
                if opened {
                    self.send(key, Op::Response, 0);
                } else {
                    self.reset(key);
                }
            }
            (Op::Request, Some(_)) => {
                self.close(key);
                self.reset(key);
            }
            (Op::Response, Some(State::Connecting)) => {
                let c = self.conns.get_mut(&key).expect("state came from it");
                c.state = State::Established;
                let _ = c.stream.write_all(format!("OK {}\n", key.0).as_bytes());
            }
            (Op::Rw, Some(State::Established | State::Closing)) => {
                let c = self.conns.get_mut(&key).expect("state came from it");
                if c.out.len() + payload.len() > BUF_ALLOC as usize {
                    crate::guest_warn!(
                        "vsock: guest port {} sent past the credit brisk gave it; connection reset",
                        key.1
                    );
                    self.close(key);
                    return self.reset(key);
                }
                c.out.extend_from_slice(payload);
                self.flush(key);
            }
            (Op::CreditRequest, Some(_)) => self.send(key, Op::CreditUpdate, 0),
            (Op::CreditUpdate, Some(_)) => {}
            (Op::Shutdown, Some(_)) => {
                // What the guest sent before still goes to the host side;
                // `flush` finishes the half-close, or the connection.
                let c = self.conns.get_mut(&key).expect("state came from it");
                c.guest_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.flush(key);
            }
            (Op::Rst, _) => self.close(key),
            // Anything else for a connection brisk does not have.
            (_, None) | (Op::Response, Some(_)) | (Op::Rw, Some(State::Connecting)) => {
                self.close(key);
                self.reset(key);
            }
        }
    }

    /// Write what the guest sent to the host side, as far as it takes.
    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.close(key);
                    return self.reset(key);
                }
            }
        }
        if c.out.is_empty() && c.guest_shut & SHUTDOWN_SEND != 0 && !c.write_shut {
            // The guest sends no more: the host side reads EOF.
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            c.write_shut = true;
        }
        let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
        let guest_done = c.guest_shut == both;
        let all_done = c.write_shut && c.state == State::Closing;
        if c.out.is_empty() && (guest_done || all_done) {
            self.close(key);
            return self.reset(key);
        }
        let events = c.interest();
        let token = c.token;
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            c.stream.as_raw_fd(),
            EpollEvent::new(events, token),
        );
        let told = c.fwd_cnt.wrapping_sub(c.fwd_told);
        if told >= BUF_ALLOC / 2 {
            self.send(key, Op::CreditUpdate, 0);
        }
    }

    /// Take the host side's news: new clients, CONNECT lines, readable
    /// and writable streams. Returns true if there may be more than one
    /// call takes.
    fn poll_host(&mut self) -> bool {
        let mut events = [EpollEvent::default(); 64];
        for _ in 0..POLL_ROUNDS {
            let n = self.epoll.wait(0, &mut events).unwrap_or(0);
            self.host_events(&events[..n]);
            if n < events.len() {
                return false;
            }
        }
        true
    }

    fn host_events(&mut self, events: &[EpollEvent]) {
        for ev in events {
            let token = ev.data();
            if token == LISTENER {
                self.accept();
            } else if self.pending.contains_key(&token) {
                self.read_line(token);
            } else if let Some(&key) = self.tokens.get(&token) {
                let set = ev.event_set();
                if set.contains(EventSet::OUT) {
                    self.flush(key);
                }
                if let Some(c) = self.conns.get_mut(&key) {
                    if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                        c.readable = true;
                    }
                }
            }
        }
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() || self.conns.len() >= MAX_CONNS {
                continue; // dropped: closed
            }
            if self.pending.len() >= MAX_PENDING {
                // The oldest silent client makes room.
                if let Some(&oldest) = self.pending.keys().min() {
                    self.pending.remove(&oldest);
                }
            }
            if let Some(token) = self.watch(stream.as_raw_fd(), EventSet::IN) {
                self.pending.insert(
                    token,
                    Pending {
                        stream,
                        line: Vec::new(),
                    },
                );
            }
        }
    }

    /// A pending client's `CONNECT <port>\n`, as far as it came; anything
    /// else closes it.
    fn read_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_LINE];
        // One byte at a time up to the newline: what follows it is the
        // connection's data, left in the socket for the guest.
        loop {
            match p.stream.read(&mut buf[..1]) {
                Ok(1) if buf[0] == b'\n' => break,
                Ok(1) if p.line.len() < MAX_LINE => p.line.push(buf[0]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // EOF, an overlong line, an error.
                _ => {
                    self.pending.remove(&token);
                    return;
                }
            }
        }
        let p = self.pending.remove(&token).expect("just looked");
        let port = std::str::from_utf8(&p.line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|n| n.trim().parse::<u32>().ok());
        let Some(port) = port else {
            return; // garbage: closed
        };
        let local = self.free_port(port);
        let key = (local, port);
        // The stream moves from the pending set to a connection: its
        // registration is replaced by the connection's token.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            p.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let offer = Header {
            buf_alloc: 0,
            fwd_cnt: 0,
            ..self.header(key, Op::Request, 0, 0)
        };
        if self.open(key, p.stream, State::Connecting, &offer) {
            self.send(key, Op::Request, 0);
        }
    }

    fn free_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.contains_key(&(p, peer)) {
                return p;
            }
        }
    }

    /// The guest's transmit queue, within the budget and while the
    /// control packets it makes have room.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestRam, budget: &mut Budget) -> Tx {
        let Some(pending) = super::pending(queue, mem) else {
            return Tx::Done;
        };
        let mut buf = std::mem::take(&mut self.packet);
        let more = self.transmit_with(queue, mem, budget, pending, &mut buf);
        self.packet = buf;
        more
    }

    fn transmit_with(
        &mut self,
        queue: &mut Queue,
        mem: &GuestRam,
        budget: &mut Budget,
        pending: u16,
        buf: &mut [u8],
    ) -> Tx {
        for _ in 0..pending {
            if self.to_guest.len() >= MAX_TO_GUEST {
                return Tx::Full;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                crate::guest_warn!("vsock: the transmit ring is corrupt; no longer served");
                return Tx::Done;
            };
            let head = chain.head_index();
            let n = match chain.reader(mem) {
                Ok(mut r) => {
                    let n = r.available_bytes().min(buf.len());
                    r.read_exact(&mut buf[..n]).map(|_| n).unwrap_or(0)
                }
                Err(_) => 0,
            };
            match Header::parse(&buf[..n]) {
                Ok(h) if h.len as usize <= n - HDR_LEN => {
                    self.take_packet(h, &buf[HDR_LEN..HDR_LEN + h.len as usize]);
                }
                Ok(h) => crate::guest_warn!(
                    "vsock: a packet says {} bytes and carries {}; dropped",
                    h.len,
                    n - HDR_LEN
                ),
                Err(e) => crate::guest_warn!("vsock: {e}; dropped"),
            }
            budget.spend(n as u64);
            if queue.add_used(mem, head, 0).is_err() {
                return Tx::Done;
            }
            if budget.spent() {
                return Tx::Budget;
            }
        }
        Tx::Done
    }

    /// Control packets, then the host sides' data, into the guest's
    /// receive buffers while they last.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestRam, budget: &mut Budget) -> bool {
        while let Some(h) = self.to_guest.front().copied() {
            if !put(queue, mem, &h, &[]) {
                return false;
            }
            self.to_guest.pop_front();
            budget.spend(HDR_LEN as u64);
        }
        let ready: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.readable && c.state == State::Established && c.credit() > 0)
            .map(|(k, _)| *k)
            .collect();
        for key in ready {
            loop {
                if budget.spent() {
                    return true;
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    return false;
                };
                let head = chain.head_index();
                let room = chain
                    .clone()
                    .writer(mem)
                    .map(|w| w.available_bytes())
                    .unwrap_or(0);
                if room < HDR_LEN {
                    crate::guest_warn!(
                        "vsock: a receive buffer smaller than a header; returned unused"
                    );
                    let _ = queue.add_used(mem, head, 0);
                    continue;
                }
                // Given back: `put` takes it again once the data is read.
                queue.go_to_previous_position();
                let c = self.conns.get_mut(&key).expect("listed above");
                let max = (room - HDR_LEN).min(c.credit() as usize).min(MAX_PAYLOAD);
                let data = &mut self.data[..max];
                match c.stream.read(data) {
                    Ok(0) => {
                        // The host side is done sending: tell the guest;
                        // the guest's bytes still go to the host side.
                        c.state = State::Closing;
                        c.readable = false;
                        let events = c.interest();
                        let _ = self.epoll.ctl(
                            ControlOperation::Modify,
                            c.stream.as_raw_fd(),
                            EpollEvent::new(events, c.token),
                        );
                        self.send(key, Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND);
                        break;
                    }
                    Ok(n) => {
                        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                        c.fwd_told = c.fwd_cnt;
                        let h = self.header(key, Op::Rw, 0, n as u32);
                        put(queue, mem, &h, &self.data[..n]);
                        budget.spend(n as u64);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if e.kind() == std::io::ErrorKind::WouldBlock {
                            c.readable = false;
                        } else {
                            self.close(key);
                            self.reset(key);
                        }
                        break;
                    }
                }
                if self.conns.get(&key).is_none_or(|c| c.credit() == 0) {
                    break;
                }
            }
        }
        // A SHUTDOWN or RST queued above goes out now if there is room.
        while let Some(h) = self.to_guest.front().copied() {
            if !put(queue, mem, &h, &[]) {
                return false;
            }
            self.to_guest.pop_front();
        }
        false
    }

    /// Everything: the guest's packets, the host's news, the guest's
    /// receive and event queues.
    fn pump(&mut self, queues: &mut [Queue], mem: &GuestRam, budget: &mut Budget) -> Served {
        let tx = match queues[TX].ready() {
            true => self.transmit(&mut queues[TX], mem, budget),
            false => Tx::Done,
        };
        let mut more = self.poll_host();
        if queues[RX].ready() {
            more |= self.receive(&mut queues[RX], mem, budget);
        }
        // Transmit waits for room the receive queue made, if it made any.
        more |= tx == Tx::Budget || (tx == Tx::Full && self.to_guest.len() < MAX_TO_GUEST);
        if self.reset_event && queues[EVENT].ready() {
            // struct virtio_vsock_event { le32 id }: 0, TRANSPORT_RESET.
            let q = &mut queues[EVENT];
            if let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let wrote = chain
                    .writer(mem)
                    .ok()
                    .and_then(|mut w| w.write_all(&0u32.to_le_bytes()).ok());
                let _ = q.add_used(mem, head, if wrote.is_some() { 4 } else { 0 });
                self.reset_event = false;
            }
        }
        if more {
            Served::More
        } else {
            Served::Done
        }
    }
}

/// Where [`Vsock::transmit`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tx {
    /// The queue is empty (or unusable).
    Done,
    /// The budget ran out.
    Budget,
    /// The control packets for the guest are at their limit.
    Full,
}

/// Put one packet in the next receive buffer; false if there is none.
fn put(queue: &mut Queue, mem: &GuestRam, h: &Header, payload: &[u8]) -> bool {
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return false;
    };
    let head = chain.head_index();
    let len = match chain.writer(mem) {
        Ok(mut w) if w.available_bytes() >= HDR_LEN + payload.len() => {
            let ok = w.write_all(&h.bytes()).and_then(|_| w.write_all(payload));
            if ok.is_ok() {
                (HDR_LEN + payload.len()) as u32
            } else {
                0
            }
        }
        _ => {
            crate::guest_warn!(
                "vsock: a receive buffer too small or outside guest memory; a packet was lost"
            );
            0
        }
    };
    let _ = queue.add_used(mem, head, len);
    true
}

/// A non-blocking connection to a host listener (`<uds>_<port>`): one
/// that is not there, or whose backlog is full, is refused at once.
fn connect(path: &Path) -> std::io::Result<UnixStream> {
    // socket2 opens it close-on-exec.
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&socket2::SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Ours: bound by this device.
        let _ = std::fs::remove_file(&self.uds);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_count(&self) -> usize {
        3
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid }.
        let config = self.cid.to_le_bytes();
        super::read_config_bytes(&config, offset, data);
    }

    fn restored(&mut self) {
        self.reset_event = true;
    }

    /// The driver reset the device: its connections go (their host sides
    /// see the sockets close).
    fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.close(key);
        }
        self.pending.clear();
        self.to_guest.clear();
    }

    fn process(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &GuestRam,
        budget: &mut Budget,
    ) -> Served {
        self.pump(queues, mem, budget)
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn backend_ready(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestRam,
        budget: &mut Budget,
    ) -> Served {
        self.pump(queues, mem, budget)
    }
}
