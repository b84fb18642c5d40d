//! A 16550 UART (vm-superio) writing the guest's output to a writer and
//! raising its interrupt line (IRQ 4 on the PC) on transmit-empty and on
//! received data, so a guest can take console input.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::{IrqLine, Stateful};

/// vm-superio's trigger, pulling the UART's line.
#[derive(Clone)]
pub struct LineTrigger(Arc<dyn IrqLine>);

impl Trigger for LineTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger();
        Ok(())
    }
}

/// The guest's output writer, shared so a restored UART keeps it.
#[derive(Clone)]
pub struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

type Inner = Serial<LineTrigger, NoEvents, SharedWriter>;

/// The UART: eight registers from its base port.
pub struct Uart {
    serial: Mutex<Inner>,
    line: LineTrigger,
    out: SharedWriter,
}

impl Uart {
    /// A UART whose transmitted bytes go to `out`, raising `line`.
    pub fn new(out: Box<dyn Write + Send>, line: Arc<dyn IrqLine>) -> Self {
        let line = LineTrigger(line);
        let out = SharedWriter(Arc::new(Mutex::new(out)));
        Uart {
            serial: Mutex::new(Serial::new(line.clone(), out.clone())),
            line,
            out,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes typed at the console: queued in the receive FIFO (raising
    /// the line if the guest enabled receive interrupts). Returns how many
    /// fit; the rest are for the caller to offer again. Never waits: while
    /// a vCPU holds the UART (writing output to a slow or full stdout, say)
    /// it takes nothing, and the caller tries again.
    pub fn input(&self, bytes: &[u8]) -> usize {
        match self.serial.try_lock() {
            Ok(mut s) => s.enqueue_raw_bytes(bytes).unwrap_or(0),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                p.into_inner().enqueue_raw_bytes(bytes).unwrap_or(0)
            }
            Err(std::sync::TryLockError::WouldBlock) => 0,
        }
    }
}

impl DevicePio for Uart {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if offset > 7 || data.is_empty() {
            data.fill(0xff);
            return;
        }
        data[0] = self.lock().read(offset as u8);
        data[1..].fill(0);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset > 7 || data.is_empty() {
            return;
        }
        // An output error (closed stdout) must not stop the guest.
        if let Err(e) = self.lock().write(offset as u8, data[0]) {
            log::debug!("UART output failed: {e:?}");
        }
    }
}

/// The 16550's registers and receive FIFO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// vm-superio's `SerialState` and ours have the same fields: move them
/// from `$src` into a `$dst`, the field list written once.
macro_rules! same_fields {
    ($src:ident => $dst:ident) => {
        $dst {
            baud_divisor_low: $src.baud_divisor_low,
            baud_divisor_high: $src.baud_divisor_high,
            interrupt_enable: $src.interrupt_enable,
            interrupt_identification: $src.interrupt_identification,
            line_control: $src.line_control,
            line_status: $src.line_status,
            modem_control: $src.modem_control,
            modem_status: $src.modem_status,
            scratch: $src.scratch,
            in_buffer: $src.in_buffer,
        }
    };
}

impl Stateful for Uart {
    const VERSION: u32 = 1;
    type State = UartState;

    fn save(&self) -> UartState {
        let s = self.lock().state();
        same_fields!(s => UartState)
    }

    fn restore(&self, s: UartState) -> Result<(), crate::InvalidState> {
        // vm-superio's own refusal says only "FullFifo"; its FIFO (a
        // private constant there) is a 16550A's 64 bytes.
        const FIFO: usize = 64;
        if s.in_buffer.len() > FIFO {
            return Err(crate::InvalidState::Range {
                what: "pending input".into(),
                value: format!("{} bytes", s.in_buffer.len()),
                allowed: format!("the FIFO holds {FIFO}"),
            });
        }
        let state = same_fields!(s => SerialState);
        let serial = Serial::from_state(&state, self.line.clone(), NoEvents, self.out.clone())
            .map_err(|e| crate::InvalidState::Range {
                what: "the UART state".into(),
                value: format!("{e:?}"),
                allowed: "vm-superio refuses it".into(),
            })?;
        *self.lock() = serial;
        Ok(())
    }

    /// An interrupt identified in IIR (bit 0 clear: one is pending):
    /// pull the line again.
    fn reassert(&self) {
        const IIR_NONE: u8 = 1;
        if self.lock().state().interrupt_identification & IIR_NONE == 0 {
            self.line.0.trigger();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    #[derive(Default)]
    struct Count(AtomicU32);
    impl IrqLine for Count {
        fn trigger(&self) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    fn uart() -> (Uart, Arc<Count>) {
        let line = Arc::new(Count::default());
        (Uart::new(Box::new(std::io::sink()), line.clone()), line)
    }

    #[test]
    fn receive_and_transmit_empty_raise_the_line() {
        let (u, line) = uart();
        let w = |off: u16, v: u8| u.pio_write(PioAddress(0), off, &[v]);
        w(1, 0b11); // IER: received data + THR empty
        let mut iir = [0u8];
        u.pio_read(PioAddress(0), 2, &mut iir); // acknowledge what IER raised
        let before = line.0.load(SeqCst);
        w(0, b'x'); // transmit: THR empty again -> interrupt
        assert!(line.0.load(SeqCst) > before, "no THR-empty interrupt");
        let before = line.0.load(SeqCst);
        assert_eq!(u.input(b"hi"), 2);
        assert!(line.0.load(SeqCst) > before, "no receive interrupt");
        let mut b = [0u8];
        u.pio_read(PioAddress(0), 0, &mut b);
        assert_eq!(b[0], b'h');
    }

    #[test]
    fn state_round_trips_with_registers_and_pending_input() {
        let (a, _) = uart();
        a.pio_write(PioAddress(0), 3, &[0x03]); // LCR
        a.pio_write(PioAddress(0), 7, &[0x5a]); // scratch
        a.input(b"abc");
        let (b, _) = uart();
        let saved = crate::state::tests::round_trip(&a, &b);
        assert_eq!(saved.data["scratch"], 0x5a);
        let mut c = [0u8];
        b.pio_read(PioAddress(0), 0, &mut c);
        assert_eq!(c[0], b'a', "restored FIFO");
    }

    /// A restored UART with an interrupt identified pulls its line again
    /// when asked (after every LAPIC is back: KVM_SET_LAPIC may have wiped
    /// the one its restore pulled); one with none pending does not.
    #[test]
    fn a_pending_interrupt_is_pulled_again_after_a_restore() {
        let (a, _) = uart();
        a.pio_write(PioAddress(0), 1, &[0b01]); // IER: received data
        a.input(b"x");
        let (b, line) = uart();
        b.restore(a.save()).unwrap();
        let before = line.0.load(SeqCst);
        b.reassert();
        assert_eq!(line.0.load(SeqCst), before + 1);
        let mut c = [0u8];
        b.pio_read(PioAddress(0), 0, &mut c); // read: nothing pending now
        let before = line.0.load(SeqCst);
        b.reassert();
        assert_eq!(line.0.load(SeqCst), before);
    }
}
