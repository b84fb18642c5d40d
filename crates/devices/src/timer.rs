//! Per-vCPU periodic timers, served by one thread per VM.
//!
//! vCPU `i`'s registers are at `base + 8 * i`: `+0` the vector (8-bit),
//! `+4` the period in microseconds (32-bit; writing starts the timer with
//! its first tick one period later, 0 stops it). Reading `+4` returns the
//! ticks raised so far. A tick whose vector is still pending coalesces with
//! it, like a real interrupt controller.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

use crate::InterruptSink;

/// Bytes of register space per vCPU.
pub const TIMER_STRIDE: u16 = 8;

#[derive(Clone, Copy, Default)]
struct Timer {
    vector: u8,
    period: Option<Duration>,
    next_due: Option<Instant>,
    ticks: u64,
}

struct State {
    timers: Vec<Timer>,
    shutdown: bool,
    /// Frozen since then ([`PeriodicTimers::freeze`]): nothing is raised,
    /// and the time until each next tick stands still.
    frozen_at: Option<Instant>,
    /// The thread is raising ticks it counted (without the lock).
    raising: bool,
    /// Largest delay seen between a tick's due time and its raise.
    max_late: Duration,
}

struct Inner {
    state: Mutex<State>,
    cv: Condvar,
    sink: Arc<dyn InterruptSink>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The timers of one VM and their thread; dropping it stops the thread.
pub struct PeriodicTimers {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

/// The bus side of [`PeriodicTimers`]: register it over
/// `vcpus * TIMER_STRIDE` ports.
pub struct TimerPorts {
    inner: Arc<Inner>,
    /// Where its port windows start, and the vCPU whose registers are
    /// first in each (a layout may place the vCPUs in two windows).
    windows: Vec<(u16, usize)>,
}

impl PeriodicTimers {
    /// Timers for `vcpus` vCPUs raising into `sink`. Spawns the timer thread.
    pub fn new(vcpus: usize, sink: Arc<dyn InterruptSink>) -> std::io::Result<Self> {
        Self::with_thread_init(vcpus, sink, Box::new(|| {}))
    }

    /// As [`PeriodicTimers::new`]; the timer thread first runs `init` (its
    /// seccomp filter, say).
    pub fn with_thread_init(
        vcpus: usize,
        sink: Arc<dyn InterruptSink>,
        init: Box<dyn FnOnce() + Send>,
    ) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                timers: vec![Timer::default(); vcpus],
                shutdown: false,
                frozen_at: None,
                raising: false,
                max_late: Duration::ZERO,
            }),
            cv: Condvar::new(),
            sink,
        });
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("brisk-timer".into())
                .spawn(move || {
                    init();
                    serve(&inner)
                })?
        };
        Ok(PeriodicTimers {
            inner,
            thread: Some(thread),
        })
    }

    /// The device to put on the bus.
    pub fn ports(&self) -> Arc<TimerPorts> {
        self.windows(vec![(0, 0)])
    }

    /// The registers, for port windows at these bases, each starting with
    /// the given vCPU (register the device at each base; a window not
    /// listed reads as the first).
    pub fn windows(&self, windows: Vec<(u16, usize)>) -> Arc<TimerPorts> {
        Arc::new(TimerPorts {
            inner: self.inner.clone(),
            windows,
        })
    }

    /// Ticks raised for vCPU `vcpu` so far.
    pub fn ticks(&self, vcpu: usize) -> u64 {
        self.inner.lock().timers.get(vcpu).map_or(0, |t| t.ticks)
    }

    /// The largest delay between a tick's due time and its raise (the
    /// timer thread's own wake-up lateness).
    pub fn max_late(&self) -> Duration {
        self.inner.lock().max_late
    }

    /// Stop time for the timers (a snapshot of a paused VM): returns once
    /// every tick counted so far has been raised, and raises none until
    /// [`PeriodicTimers::thaw`], so the saved ticks and the pending
    /// interrupts agree. Saving while frozen records the time left as it
    /// was at the freeze.
    pub fn freeze(&self) {
        let mut state = self.inner.lock();
        while state.raising {
            state = self.inner.cv.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.frozen_at.get_or_insert_with(Instant::now);
    }

    /// Let time run again: every next tick moves by the time spent frozen.
    pub fn thaw(&self) {
        let mut state = self.inner.lock();
        if let Some(at) = state.frozen_at.take() {
            let frozen = at.elapsed();
            for t in &mut state.timers {
                t.next_due = t.next_due.map(|d| d + frozen);
            }
        }
        drop(state);
        self.inner.cv.notify_all();
    }
}

impl Drop for PeriodicTimers {
    fn drop(&mut self) {
        self.inner.lock().shutdown = true;
        self.inner.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The timer thread: sleep until the earliest due tick, raise what is due.
fn serve(inner: &Inner) {
    let mut state = inner.lock();
    loop {
        if state.shutdown {
            return;
        }
        if state.frozen_at.is_some() {
            state = inner.cv.wait(state).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        let mut max_late = state.max_late;
        for (vcpu, t) in state.timers.iter_mut().enumerate() {
            let (Some(at), Some(period)) = (t.next_due, t.period) else {
                continue;
            };
            if at <= now {
                due.push((vcpu, t.vector));
                t.ticks += 1;
                max_late = max_late.max(now - at);
                // Fell behind by more than a period: skip, do not burst.
                let next = at + period;
                t.next_due = Some(if next <= now { now + period } else { next });
            }
        }
        state.max_late = max_late;
        if !due.is_empty() {
            // Raise without the lock: the sink kicks vCPUs. `raising`
            // makes a freeze wait for these.
            state.raising = true;
            drop(state);
            for (vcpu, vector) in due {
                inner.sink.raise(vcpu, vector);
            }
            state = inner.lock();
            state.raising = false;
            inner.cv.notify_all();
            continue;
        }
        let next = state.timers.iter().filter_map(|t| t.next_due).min();
        state = match next {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                inner
                    .cv
                    .wait_timeout(state, wait)
                    .map(|(s, _)| s)
                    .unwrap_or_else(|p| p.into_inner().0)
            }
            None => inner.cv.wait(state).unwrap_or_else(|p| p.into_inner()),
        };
    }
}

impl DevicePio for TimerPorts {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let (vcpu, reg) = self.register(base, offset);
        let state = self.inner.lock();
        let Some(t) = state.timers.get(vcpu) else {
            data.fill(0xff);
            return;
        };
        let v: u32 = match reg {
            0 => t.vector.into(),
            4 => t.ticks as u32,
            _ => u32::MAX,
        };
        crate::put_port_value(data, v);
    }

    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let (vcpu, reg) = self.register(base, offset);
        let v = crate::port_value(data);
        let mut state = self.inner.lock();
        let Some(t) = state.timers.get_mut(vcpu) else {
            return;
        };
        match reg {
            0 => t.vector = v as u8,
            4 if v == 0 => {
                t.period = None;
                t.next_due = None;
            }
            4 => {
                let period = Duration::from_micros(v.into());
                t.period = Some(period);
                t.next_due = Some(Instant::now() + period);
            }
            _ => return,
        }
        drop(state);
        self.inner.cv.notify_all();
    }
}

impl TimerPorts {
    /// The vCPU and register at `offset`.
    fn register(&self, base: PioAddress, offset: PioAddressOffset) -> (usize, PioAddressOffset) {
        let first = self
            .windows
            .iter()
            .find(|(b, _)| *b == base.0)
            .map_or(0, |(_, first)| *first);
        (
            first + (offset / TIMER_STRIDE) as usize,
            offset % TIMER_STRIDE,
        )
    }
}

/// One vCPU's timer as saved: its vector, its period and how long until
/// its next tick (the timer resumes that far from the restore), its ticks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimerState {
    pub vector: u8,
    pub period_us: Option<u64>,
    pub next_in_us: Option<u64>,
    pub ticks: u64,
}

impl crate::Stateful for TimerPorts {
    const VERSION: u32 = 1;
    type State = Vec<TimerState>;

    fn save(&self) -> Vec<TimerState> {
        let state = self.inner.lock();
        let now = state.frozen_at.unwrap_or_else(Instant::now);
        state
            .timers
            .iter()
            .map(|t| TimerState {
                vector: t.vector,
                period_us: t.period.map(|p| p.as_micros() as u64),
                next_in_us: t
                    .next_due
                    .map(|d| d.saturating_duration_since(now).as_micros() as u64),
                ticks: t.ticks,
            })
            .collect()
    }

    fn restore(&self, saved: Vec<TimerState>) -> Result<(), crate::InvalidState> {
        let now = Instant::now();
        let mut state = self.inner.lock();
        if saved.len() != state.timers.len() {
            return Err(crate::InvalidState::Count {
                what: "timers",
                saved: saved.len(),
                here: state.timers.len(),
            });
        }
        for s in &saved {
            // As the guest's own writes: a period of 0 means stopped, not
            // "tick without pause"; a next tick at most a period away.
            if s.period_us == Some(0) || s.period_us.is_none() != s.next_in_us.is_none() {
                return Err(unsettable(s));
            }
            if let (Some(p), Some(n)) = (s.period_us, s.next_in_us) {
                if n > p || p > u64::from(u32::MAX) {
                    return Err(unsettable(s));
                }
            }
        }
        for (t, s) in state.timers.iter_mut().zip(saved) {
            t.vector = s.vector;
            t.period = s.period_us.map(Duration::from_micros);
            t.next_due = s.next_in_us.map(|us| now + Duration::from_micros(us));
            t.ticks = s.ticks;
        }
        drop(state);
        self.inner.cv.notify_all();
        Ok(())
    }
}

/// A saved timer no guest write could have made.
fn unsettable(s: &TimerState) -> crate::InvalidState {
    crate::InvalidState::Range {
        what: "timer state".into(),
        value: format!("{s:?}"),
        allowed: "not one a guest can set".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

    #[derive(Default)]
    struct Count([AtomicU64; 2]);
    impl InterruptSink for Count {
        fn raise(&self, vcpu: usize, vector: u8) -> bool {
            assert_eq!(vector, 0x30 + vcpu as u8);
            self.0[vcpu].fetch_add(1, SeqCst);
            true
        }
    }

    fn write(p: &TimerPorts, offset: u16, v: u32) {
        p.pio_write(PioAddress(0), offset, &v.to_le_bytes());
    }

    #[test]
    fn each_vcpu_gets_its_own_vector_until_stopped() {
        let sink = Arc::new(Count::default());
        let timers = PeriodicTimers::new(2, sink.clone()).unwrap();
        let ports = timers.ports();
        for vcpu in 0..2u16 {
            ports.pio_write(PioAddress(0), vcpu * TIMER_STRIDE, &[0x30 + vcpu as u8]);
            write(&ports, vcpu * TIMER_STRIDE + 4, 200);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.0.iter().any(|c| c.load(SeqCst) < 5) {
            assert!(Instant::now() < deadline, "timers did not tick");
            std::thread::sleep(Duration::from_millis(1));
        }
        write(&ports, 4, 0);
        write(&ports, TIMER_STRIDE + 4, 0);
        // Ticks are counted under the lock the stop takes: final now. A
        // raise collected just before the stop may still be on its way.
        let stopped = [timers.ticks(0), timers.ticks(1)];
        while (0..2).any(|v| sink.0[v].load(SeqCst) < stopped[v]) {
            assert!(Instant::now() < deadline, "counted ticks were not raised");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(stopped, [sink.0[0].load(SeqCst), sink.0[1].load(SeqCst)]);
        assert_eq!(stopped, [timers.ticks(0), timers.ticks(1)]);
        let mut data = [0u8; 4];
        ports.pio_read(PioAddress(0), 4, &mut data);
        assert_eq!(u64::from(u32::from_le_bytes(data)), stopped[0]);
        drop(timers); // joins the thread: must not hang
    }

    #[test]
    fn state_round_trips() {
        let (sa, sb) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let (a, b) = (
            PeriodicTimers::new(2, sa).unwrap(),
            PeriodicTimers::new(2, sb).unwrap(),
        );
        let (pa, pb) = (a.ports(), b.ports());
        pa.pio_write(PioAddress(0), 0, &[0x30]);
        write(&pa, 4, 1_000_000); // 1 s: no tick during the test
        use crate::SaveRestore;
        // The next tick is saved as "due in": it counts down meanwhile.
        let saved = pa.save_state();
        pb.restore_state("timers", &saved).unwrap();
        let again = pb.save_state();
        assert_eq!(again.data[0]["vector"], 0x30);
        assert_eq!(again.data[0]["period_us"], 1_000_000);
        assert!(again.data[0]["next_in_us"].as_u64() <= saved.data[0]["next_in_us"].as_u64());
        assert!(again.data[1]["period_us"].is_null());
        let short = crate::DeviceState {
            version: 1,
            data: serde_json::json!([saved.data[0].clone()]),
        };
        assert!(matches!(
            pb.restore_state("timers", &short),
            Err(crate::StateError::Invalid { .. })
        ));
    }
}
